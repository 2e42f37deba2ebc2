"""Redis with a replica and three Sentinels, on free ports of 127.0.0.1
(loaded as a plugin by tests/conftest.py).

Fixture:

``start_sentinel(replicas=1)``
    A factory for a :class:`SentinelSetup`: a master, ``replicas`` replicas
    (in sync before it returns) and three Sentinels (``redis-server CONF
    --sentinel``) watching them as service ``mymaster``, with a quorum of 2
    and a down-after of 1.5 s. Everything is killed by PID in teardown,
    and the logs of every process are added to a failed test's report.

:meth:`SentinelSetup.kill_master` SIGKILLs the master;
:meth:`SentinelSetup.wait_failover` waits until the Sentinels agree on a new
one and it takes writes; :meth:`SentinelSetup.rejoin` starts a killed node
again (without persistence, so empty) and waits until it is an in-sync
replica of the current master.
"""

from __future__ import annotations

import os
import time
import typing as t
from collections.abc import Callable
from collections.abc import Iterator

import pytest

from tests.support.redis import HOST
from tests.support.redis import RedisServer
from tests.support.servers import report_on_failure

__all__ = ["SERVICE", "SentinelServer", "SentinelSetup"]

SERVICE = "mymaster"
#: Sentinels consider a node down after this many ms without an answer. More
#: than their one-second PING period: a Sentinel pings a just-promoted master
#: first one second after the switch, and with 1000 here it could find it
#: down before the answer came, and fail over again.
DOWN_AFTER_MS = 1500
#: A Sentinel that took part in a failover (voted or led) starts none for the
#: same service for twice this long (ms): kills closer together wait for it.
FAILOVER_TIMEOUT_MS = 2000
#: The options every data node runs with: a full sync starts at once
#: (Redis 7 waits 5 s for more replicas by default).
NODE_OPTIONS = ("--repl-diskless-sync-delay", "0", "--repl-ping-replica-period", "1")


class SentinelServer(RedisServer):
    """``redis-server sentinel.conf --sentinel`` on ``127.0.0.1:port``."""

    def __init__(
        self, binary: str, master_port: int, quorum: int, password: str | None = None
    ) -> None:
        super().__init__(binary, password=password)
        self.conf_path = os.path.join(self.dir, "sentinel.conf")
        # Sentinel rewrites its configuration file as it learns the topology.
        with open(self.conf_path, "w", encoding="ascii") as f:
            f.write(
                f"port {self.port}\n"
                f"bind {HOST}\n"
                f"dir {self.dir}\n"
                f"logfile {self.log_path}\n"
                "daemonize no\n"
                f"sentinel monitor {SERVICE} {HOST} {master_port} {quorum}\n"
                f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            if password:
                f.write(
                    f"requirepass {password}\nsentinel auth-pass {SERVICE} {password}\n"
                )

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def argv(self) -> list[str]:
        return [self.binary, self.conf_path, "--sentinel"]

    def ask(self, *command: t.Any) -> t.Any:
        """A command's reply, or None if this Sentinel does not answer."""
        import redis

        client = redis.Redis(
            HOST,
            self.port,
            password=self.password,
            socket_timeout=1,
            decode_responses=True,
        )
        try:
            return client.execute_command(*command)
        except (redis.RedisError, OSError):
            return None
        finally:
            client.close()

    def master(self) -> tuple[str, int] | None:
        """The master address this Sentinel gives, or None."""
        reply = self.ask("SENTINEL", "get-master-addr-by-name", SERVICE)
        if not reply:
            return None
        return reply[0], int(reply[1])

    def __repr__(self) -> str:
        return f"<SentinelServer :{self.port} pid={self.proc and self.proc.pid}>"


class SentinelSetup:
    """A master, its replicas and three Sentinels."""

    def __init__(
        self, nodes: list[RedisServer], sentinels: list[SentinelServer]
    ) -> None:
        self.nodes = nodes
        self.sentinels = sentinels

    @property
    def url(self) -> str:
        hosts = ",".join(f"{HOST}:{s.port}" for s in self.sentinels)
        password = self.sentinels[0].password
        auth = f":{password}@" if password else ""
        return f"redis+sentinel://{auth}{hosts}/0/{SERVICE}"

    def config(self) -> dict[str, t.Any]:
        return {"EVENTSTREAM_REDIS_URL": self.url}

    def env(self) -> dict[str, str]:
        return {"EVENTSTREAM_REDIS_URL": self.url}

    # -- the topology --

    def node(self, port: int) -> RedisServer:
        [node] = [n for n in self.nodes if n.port == port]
        return node

    def agreed_master(self) -> RedisServer | None:
        """The node that every running Sentinel names master, if they agree."""
        answers = {s.master() for s in self.sentinels if s.running}
        if len(answers) != 1:
            return None
        [address] = answers
        return None if address is None else self.node(address[1])

    @property
    def master(self) -> RedisServer:
        master = self.agreed_master()
        assert master is not None, "the Sentinels do not agree on a master"
        return master

    def replication(self, node: RedisServer) -> dict[str, str]:
        info = node.client().info("replication")
        return {k: str(v) for k, v in info.items()}

    def wait_in_sync(self, master: RedisServer, replicas: int, timeout: float) -> None:
        """Wait until ``master`` has ``replicas`` replicas online."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.replication(master)
            online = [
                v for k, v in info.items() if k.startswith("slave") and "online" in v
            ]
            if info.get("role") == "master" and len(online) >= replicas:
                return
            assert time.monotonic() < deadline, (
                f"{master!r} has not {replicas} replica(s) online: {info}"
            )
            time.sleep(0.05)

    # -- failures --

    def kill_master(self) -> RedisServer:
        """SIGKILL the master; return it (stopped)."""
        master = self.master
        master.stop(kill=True)
        return master

    def wait_failover(self, old: RedisServer, timeout: float = 30.0) -> RedisServer:
        """Wait until the Sentinels agree on a master other than ``old`` and
        it answers as master; return it."""
        deadline = time.monotonic() + timeout
        while True:
            master = self.agreed_master()
            if master is not None and master is not old and master.running:
                if self.replication(master).get("role") == "master":
                    return master
            assert time.monotonic() < deadline, (
                f"no failover after {timeout}s: "
                + ", ".join(f"{s!r}: {s.master()}" for s in self.sentinels)
            )
            time.sleep(0.05)

    def rejoin(
        self, node: RedisServer, *, as_replica: bool = True, timeout: float = 30.0
    ) -> None:
        """Start a stopped node again (empty: no persistence) and wait until
        it is an in-sync replica of the master.

        With ``as_replica``, it starts with ``--replicaof`` the current master,
        as a restart script would; otherwise it starts as a master and waits
        for the Sentinels to turn it into a replica (they notice on their next
        ``INFO``, within 10 s).
        """
        assert not node.running
        master = self.master
        extra = node.extra
        if "--replicaof" in extra:
            at = extra.index("--replicaof")
            del extra[at : at + 3]
        if as_replica:
            extra += ["--replicaof", HOST, str(master.port)]
        node.start()
        deadline = time.monotonic() + timeout
        while True:
            info = self.replication(node)
            if (
                info.get("role") == "slave"
                and info.get("master_port") == str(master.port)
                and info.get("master_link_status") == "up"
            ):
                break
            assert time.monotonic() < deadline, f"{node!r} did not rejoin: {info}"
            time.sleep(0.05)
        self.wait_in_sync(master, 1, max(deadline - time.monotonic(), 1))

    def close(self) -> None:
        for server in [*self.sentinels, *self.nodes]:
            server.close()

    @classmethod
    def start(
        cls,
        binary: str = "redis-server",
        replicas: int = 1,
        started: Callable[[RedisServer], object] = lambda server: None,
        password: str | None = None,
    ) -> SentinelSetup:
        """Start a master, ``replicas`` replicas and three Sentinels, and
        wait until the replicas are in sync and every Sentinel knows the
        others. ``started`` is called with each process before it starts.
        With ``password``, every node and Sentinel requires it."""
        master = RedisServer(binary, extra=NODE_OPTIONS, password=password)
        nodes = [master]
        for _ in range(replicas):
            extra = [*NODE_OPTIONS, "--replicaof", HOST, str(master.port)]
            nodes.append(RedisServer(binary, extra=extra, password=password))
        sentinels = [SentinelServer(binary, master.port, 2, password) for _ in range(3)]
        setup = cls(nodes, sentinels)
        try:
            for server in [*nodes, *sentinels]:
                started(server)
                server.start()
            setup.wait_in_sync(master, replicas, 30)
            # Every Sentinel knows every replica and the other Sentinels, so
            # a failover can start as soon as the master is down.
            deadline = time.monotonic() + 30
            while not all(_knows(s, replicas) for s in sentinels):
                assert time.monotonic() < deadline, "the Sentinels did not settle"
                time.sleep(0.1)
        except BaseException:
            setup.close()
            raise
        return setup


_SENTINEL = pytest.StashKey[list[RedisServer]]()

pytest_runtest_makereport = report_on_failure(
    _SENTINEL, lambda server: (f"log of {server!r}", server.log())
)


@pytest.fixture
def start_sentinel(
    request: pytest.FixtureRequest,
) -> Iterator[Callable[..., SentinelSetup]]:
    """``start_sentinel(replicas=1, password=None)`` -> a running
    :class:`SentinelSetup`."""
    from tests.conftest import require_tool

    binary = require_tool("redis-server", "Redis")
    setups: list[SentinelSetup] = []
    processes: list[RedisServer] = []
    request.node.stash[_SENTINEL] = processes

    def start(replicas: int = 1, password: str | None = None) -> SentinelSetup:
        setup = SentinelSetup.start(binary, replicas, processes.append, password)
        setups.append(setup)
        return setup

    yield start
    for setup in setups:
        setup.close()


def _knows(sentinel: SentinelServer, replicas: int) -> bool:
    found = sentinel.ask("SENTINEL", "replicas", SERVICE)
    others = sentinel.ask("SENTINEL", "sentinels", SERVICE)
    return bool(found is not None and len(found) >= replicas) and bool(
        others is not None and len(others) >= 2
    )
