"""Redis with replicas and three Sentinels, on free ports of 127.0.0.1, for
``benchmarks.failover`` (and the test suite's ``start_sentinel`` fixture).

:meth:`SentinelSetup.start` starts a master, ``replicas`` replicas (in sync
before it returns) and three Sentinels (``redis-server CONF --sentinel``)
watching them as service ``mymaster``, with a quorum of 2 and a down-after
of 1.5 s. :meth:`SentinelSetup.kill_master` SIGKILLs the master;
:meth:`SentinelSetup.wait_failover` waits until the Sentinels agree on a new
one and it takes writes; :meth:`SentinelSetup.rejoin` starts a killed node
again (without persistence, so empty) and waits until it is an in-sync
replica of the current master. :meth:`SentinelSetup.close` kills every
process by the PID started here.
"""

from __future__ import annotations

import json
import os
import time
import typing as t
from collections.abc import Callable

from benchmarks.processes import RedisProcess
from benchmarks.processes import TLSFiles
from benchmarks.sseclient import HOST

__all__ = [
    "DOWN_AFTER_MS",
    "FAILOVER_TIMEOUT_MS",
    "NODE_OPTIONS",
    "SERVICE",
    "SentinelProcess",
    "SentinelSetup",
]

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


class SentinelProcess(RedisProcess):
    """``redis-server sentinel.conf --sentinel`` on ``HOST:port``."""

    def __init__(
        self,
        master_port: int,
        quorum: int,
        password: str | None = None,
        binary: str | None = None,
        tls: TLSFiles | None = None,
    ) -> None:
        super().__init__(password=password, binary=binary, tls=tls)
        self.conf_path = os.path.join(self.dir, "sentinel.conf")
        if tls is None:
            ports = f"port {self.port}\n"
        else:
            # TLS only, to clients and to the nodes it watches.
            ports = (
                f"port 0\ntls-port {self.port}\ntls-cert-file {tls.cert}\n"
                f"tls-key-file {tls.key}\ntls-ca-cert-file {tls.ca}\n"
                "tls-auth-clients no\ntls-replication yes\n"
            )
        # Sentinel rewrites its configuration file as it learns the topology.
        with open(self.conf_path, "w", encoding="ascii") as f:
            f.write(
                ports + f"bind {HOST}\n"
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

    def argv(self) -> list[str]:
        return [self.binary, self.conf_path, "--sentinel"]

    def ask(self, *command: t.Any) -> t.Any:
        """A command's reply, or None if this Sentinel does not answer."""
        import redis

        tls = {} if self.tls is None else {"ssl": True, "ssl_ca_certs": self.tls.ca}
        client = redis.Redis(
            HOST,
            self.port,
            password=self.password,
            socket_timeout=1,
            decode_responses=True,
            **tls,  # type: ignore[arg-type]
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

    def knows(self, replicas: int) -> bool:
        """Whether this Sentinel knows ``replicas`` replicas and the two
        other Sentinels."""
        found = self.ask("SENTINEL", "replicas", SERVICE)
        others = self.ask("SENTINEL", "sentinels", SERVICE)
        return bool(found is not None and len(found) >= replicas) and bool(
            others is not None and len(others) >= 2
        )


def _poll(done: Callable[[], bool], timeout: float, what: Callable[[], str]) -> None:
    """Poll ``done()`` every 50 ms (the topology's state, which no event
    announces); raise ``TimeoutError(what())`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() >= deadline:
            raise TimeoutError(what())
        time.sleep(0.05)


class SentinelSetup:
    """A master, its replicas and three Sentinels."""

    def __init__(
        self, nodes: list[RedisProcess], sentinels: list[SentinelProcess]
    ) -> None:
        self.nodes = nodes
        self.sentinels = sentinels

    @property
    def url(self) -> str:
        hosts = ",".join(f"{HOST}:{s.port}" for s in self.sentinels)
        password = self.sentinels[0].password
        auth = f":{password}@" if password else ""
        return f"redis+sentinel://{auth}{hosts}/0/{SERVICE}"

    @property
    def options(self) -> dict[str, t.Any]:
        """``EVENTSTREAM_REDIS_OPTIONS`` that reach it (TLS to the nodes and
        to the Sentinels, trusting their CA), or none."""
        tls = self.sentinels[0].tls
        if tls is None:
            return {}
        trust = {"ssl": True, "ssl_ca_certs": tls.ca}
        return {**trust, "sentinel_kwargs": dict(trust)}

    def config(self) -> dict[str, t.Any]:
        options = self.options
        return {
            "EVENTSTREAM_REDIS_URL": self.url,
            **({"EVENTSTREAM_REDIS_OPTIONS": options} if options else {}),
        }

    def env(self) -> dict[str, str]:
        return {
            k: v if isinstance(v, str) else json.dumps(v)
            for k, v in self.config().items()
        }

    # -- the topology --

    def node(self, port: int) -> RedisProcess:
        [node] = [n for n in self.nodes if n.port == port]
        return node

    def agreed_master(self) -> RedisProcess | None:
        """The node that every running Sentinel names master, if they agree."""
        answers = {s.master() for s in self.sentinels if s.running}
        if len(answers) != 1:
            return None
        [address] = answers
        return None if address is None else self.node(address[1])

    @property
    def master(self) -> RedisProcess:
        master = self.agreed_master()
        if master is None:
            raise RuntimeError("the Sentinels do not agree on a master")
        return master

    def replication(self, node: RedisProcess) -> dict[str, str]:
        info = node.client().info("replication")
        return {k: str(v) for k, v in info.items()}

    def wait_in_sync(self, master: RedisProcess, replicas: int, timeout: float) -> None:
        """Wait until ``master`` has ``replicas`` replicas online."""
        info: dict[str, str] = {}

        def in_sync() -> bool:
            nonlocal info
            info = self.replication(master)
            online = [
                v for k, v in info.items() if k.startswith("slave") and "online" in v
            ]
            return info.get("role") == "master" and len(online) >= replicas

        _poll(
            in_sync,
            timeout,
            lambda: f"{master!r} has not {replicas} replica(s) online: {info}",
        )

    # -- failures --

    def kill_master(self) -> RedisProcess:
        """SIGKILL the master; return it (stopped)."""
        master = self.master
        master.stop(kill=True)
        return master

    def wait_failover(self, old: RedisProcess, timeout: float = 30.0) -> RedisProcess:
        """Wait until the Sentinels agree on a master other than ``old`` and
        it answers as master; return it."""
        found: list[RedisProcess] = []

        def promoted() -> bool:
            master = self.agreed_master()
            if master is None or master is old or not master.running:
                return False
            if self.replication(master).get("role") != "master":
                return False
            found.append(master)
            return True

        _poll(
            promoted,
            timeout,
            lambda: (
                f"no failover after {timeout}s: "
                + ", ".join(f"{s!r}: {s.master()}" for s in self.sentinels)
            ),
        )
        return found[0]

    def rejoin(
        self, node: RedisProcess, *, as_replica: bool = True, timeout: float = 30.0
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
        info: dict[str, str] = {}

        def replicating() -> bool:
            nonlocal info
            info = self.replication(node)
            return (
                info.get("role") == "slave"
                and info.get("master_port") == str(master.port)
                and info.get("master_link_status") == "up"
            )

        _poll(replicating, timeout, lambda: f"{node!r} did not rejoin: {info}")
        self.wait_in_sync(master, 1, max(deadline - time.monotonic(), 1))

    def close(self) -> None:
        for server in [*self.sentinels, *self.nodes]:
            server.close()

    @classmethod
    def start(
        cls,
        binary: str | None = None,
        replicas: int = 1,
        started: Callable[[RedisProcess], object] = lambda server: None,
        password: str | None = None,
        tls: TLSFiles | None = None,
    ) -> SentinelSetup:
        """Start a master, ``replicas`` replicas and three Sentinels, and
        wait until the replicas are in sync and every Sentinel knows the
        others. ``binary`` is ``redis-server`` (from ``PATH`` by default);
        ``started`` is called with each process before it starts. With
        ``password``, every node and Sentinel requires it; with ``tls``,
        every one speaks TLS only, replication included."""
        options = [*NODE_OPTIONS]
        if tls is not None:
            options += ["--tls-replication", "yes"]
        master = RedisProcess(extra=options, password=password, binary=binary, tls=tls)
        nodes = [master]
        for _ in range(replicas):
            extra = [*options, "--replicaof", HOST, str(master.port)]
            nodes.append(
                RedisProcess(extra=extra, password=password, binary=binary, tls=tls)
            )
        sentinels = [
            SentinelProcess(master.port, 2, password, binary, tls) for _ in range(3)
        ]
        setup = cls(nodes, sentinels)
        try:
            for server in [*nodes, *sentinels]:
                started(server)
                server.start()
            setup.wait_in_sync(master, replicas, 30)
            # Every Sentinel knows every replica and the other Sentinels, so
            # a failover can start as soon as the master is down.
            _poll(
                lambda: all(s.knows(replicas) for s in sentinels),
                30,
                lambda: "the Sentinels did not settle",
            )
        except BaseException:
            setup.close()
            raise
        return setup
