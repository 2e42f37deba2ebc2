"""A real Redis Cluster for the tests (loaded as a plugin by tests/conftest.py).

Fixtures:

``redis_cluster``
    Module-scoped: three masters and three replicas (``redis-server
    --cluster-enabled yes`` on free ports of 127.0.0.1, joined with
    ``redis-cli --cluster create --cluster-replicas 1 --cluster-yes``), each
    with its own directory and no persistence but ``nodes.conf``. A node
    timeout of one second makes a replica take over a killed master within a
    few seconds. Every node is stopped by PID at the end of the module.
    Tests that kill a node or move slots call :meth:`RedisCluster.heal`
    when done, which brings killed nodes back (as replicas) and waits until
    every slot is served again.
``redis_tls_cluster``
    Module-scoped: three masters and no replicas that speak TLS only (their
    plain port is off), between each other too (``--tls-cluster yes``), on
    a certificate of the run's own CA (tests/support/tls.py); reached with
    ``rediss+cluster://`` and ``ssl_ca_certs`` in
    ``EVENTSTREAM_REDIS_OPTIONS`` (:meth:`RedisCluster.config`).

Under ``CI=true`` a missing ``redis-server`` or ``redis-cli`` fails instead
of skipping.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
import typing as t
from collections.abc import Iterator

import pytest

from tests.support.redis import HOST
from tests.support.redis import RedisServer
from tests.support.servers import free_port
from tests.support.servers import report_on_failure

if t.TYPE_CHECKING:
    import redis
    import redis.cluster

    from tests.support.tls import TLSFiles

__all__ = ["ClusterNode", "RedisCluster", "slot_of"]

#: Milliseconds before a silent master is failed over.
NODE_TIMEOUT = 1000


def slot_of(key: str) -> int:
    """The hash slot of ``key`` (CRC16 of the hash tag, mod 16384)."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    crc = 0
    for byte in key.encode():
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc % 16384


class ClusterNode(RedisServer):
    """One ``redis-server --cluster-enabled yes``; its ``nodes.conf`` stays in
    its directory so that a restart rejoins the cluster. With TLS files, the
    node speaks TLS only, to clients, to its replicas and on the cluster
    bus."""

    def __init__(self, binary: str, tls: TLSFiles | None = None) -> None:
        super().__init__(binary, tls=tls)
        self.bus_port = free_port()

    def argv(self) -> list[str]:
        if self.tls:
            tls = ["--tls-cluster", "yes", "--tls-replication", "yes"]
        else:
            tls = []
        return super().argv() + [
            "--cluster-enabled",
            "yes",
            "--cluster-port",
            str(self.bus_port),
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            str(NODE_TIMEOUT),
            # A master without a reachable replica keeps serving its slots,
            # and the other masters keep serving theirs while one is down.
            "--cluster-require-full-coverage",
            "no",
            "--cluster-allow-reads-when-down",
            "no",
            *tls,
        ]

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def info(self) -> dict[str, str]:
        """``CLUSTER INFO`` as a dict."""
        raw = self.client().execute_command("CLUSTER INFO")
        if isinstance(raw, dict):  # parsed by redis-py
            return {str(k): str(v) for k, v in raw.items()}
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)

    def role(self) -> str:
        return str(self.client().info("replication")["role"])


class RedisCluster:
    """Six :class:`ClusterNode` s: three masters, one replica each (or
    ``size`` nodes, started with ``replicas`` per master). With TLS files,
    every node speaks TLS only."""

    def __init__(
        self,
        server_binary: str,
        cli_binary: str,
        size: int = 6,
        tls: TLSFiles | None = None,
    ) -> None:
        self.cli = cli_binary
        self.tls = tls
        self.nodes = [ClusterNode(server_binary, tls) for _ in range(size)]

    @property
    def scheme(self) -> str:
        return "rediss+cluster" if self.tls else "redis+cluster"

    @property
    def url(self) -> str:
        """A ``redis+cluster://`` (``rediss+cluster://``) URL naming every
        node."""
        return f"{self.scheme}://" + ",".join(n.address for n in self.nodes)

    @property
    def seed_url(self) -> str:
        """A ``redis+cluster://`` (``rediss+cluster://``) URL naming one node
        (the others are found through it)."""
        return f"{self.scheme}://{self.nodes[0].address}"

    @property
    def options(self) -> dict[str, t.Any]:
        """What EVENTSTREAM_REDIS_OPTIONS needs to reach the cluster."""
        return self.tls.redis_options() if self.tls else {}

    def config(self) -> dict[str, t.Any]:
        """App configuration for this cluster (through one seed node)."""
        config: dict[str, t.Any] = {"EVENTSTREAM_REDIS_URL": self.seed_url}
        if self.options:
            config["EVENTSTREAM_REDIS_OPTIONS"] = self.options
        return config

    def start(self, replicas: int = 1) -> RedisCluster:
        for node in self.nodes:
            node.start()
        tls = ["--tls", "--cacert", self.tls.ca] if self.tls else []
        subprocess.run(
            [
                self.cli,
                *tls,
                "--cluster",
                "create",
                *(n.address for n in self.nodes),
                "--cluster-replicas",
                str(replicas),
                "--cluster-yes",
            ],
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=60,
        )
        self.wait_ok()
        return self

    def running(self) -> list[ClusterNode]:
        return [n for n in self.nodes if n.running]

    def masters(self) -> list[ClusterNode]:
        """The running nodes that are masters now."""
        return [n for n in self.running() if n.role() == "master"]

    def slots(self) -> dict[ClusterNode, list[tuple[int, int]]]:
        """Slot ranges per master, as the first running node sees them."""
        by_port = {n.port: n for n in self.nodes}
        found: dict[ClusterNode, list[tuple[int, int]]] = {}
        for start, end, master, *_ in (
            self.running()[0].client().execute_command("CLUSTER SLOTS")
        ):
            node = by_port[int(master[1])]
            found.setdefault(node, []).append((int(start), int(end)))
        return found

    def master_of(self, key: str) -> ClusterNode:
        """The master that serves ``key``'s slot now."""
        slot = slot_of(key)
        for node, ranges in self.slots().items():
            if any(start <= slot <= end for start, end in ranges):
                return node
        raise LookupError(f"no master serves slot {slot}")

    def replica_of(self, master: ClusterNode) -> ClusterNode:
        """A running replica of ``master``."""
        info = master.client().info("replication")
        ports = {
            int(v["port"])
            for k, v in info.items()
            if k.startswith("slave") and isinstance(v, dict)
        }
        for node in self.running():
            if node.port in ports:
                return node
        raise LookupError(f"{master!r} has no running replica")

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Wait until every running node says ``cluster_state:ok``, all of
        them see the 16384 slots served by the same masters, and every
        master has its replicas attached."""
        deadline = time.monotonic() + timeout
        last: object = None
        while True:
            try:
                last = self._state()
                if last is True:
                    return
            except Exception as e:  # a node still starting
                last = e
            if time.monotonic() > deadline:
                raise TimeoutError(f"the cluster did not settle: {last!r}")
            time.sleep(0.05)

    def _state(self) -> object:
        views = set()
        for node in self.running():
            info = node.info()
            if info.get("cluster_state") != "ok":
                return f"{node!r}: {info.get('cluster_state')}"
            if info.get("cluster_slots_ok") != "16384":
                return f"{node!r}: {info.get('cluster_slots_ok')} slots ok"
            slots = node.client().execute_command("CLUSTER SLOTS")
            views.add(
                tuple(sorted((int(s[0]), int(s[1]), int(s[2][1])) for s in slots))
            )
        if len(views) != 1:
            return f"nodes disagree: {views}"
        for node in self.running():
            if node.role() == "slave":
                link = node.client().info("replication")["master_link_status"]
                if link != "up":
                    return f"{node!r}: master link {link}"
        return True

    def client(self) -> redis.cluster.RedisCluster:
        """A cluster client for assertions."""
        import redis.cluster

        return redis.cluster.RedisCluster(
            host=HOST,
            port=self.running()[0].port,
            client_name="tests",
            socket_timeout=5,
            ssl=bool(self.tls),
            **self.options,
        )

    def heal(self, timeout: float = 30.0) -> None:
        """Start killed nodes again (they rejoin, as replicas of whoever took
        over) and wait until the cluster is whole."""
        for node in self.nodes:
            if not node.running:
                node.start()
        self.wait_ok(timeout)

    def kill(self, node: ClusterNode) -> None:
        node.stop(kill=True)

    @staticmethod
    def node_id(node: ClusterNode) -> str:
        raw = node.client().execute_command("CLUSTER MYID")
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    def in_sync(self, master: ClusterNode, replica: ClusterNode) -> bool:
        """Whether ``replica`` has everything ``master`` wrote."""
        offset = master.client().info("replication")["master_repl_offset"]
        return bool(replica.client().info("replication")["slave_repl_offset"] == offset)

    def move_slot(self, slot: int, dst: ClusterNode, pause: float = 0.3) -> None:
        """Move ``slot`` to ``dst`` as ``redis-cli --cluster reshard`` does:
        IMPORTING / MIGRATING, MIGRATE its keys, then assign it. Between the
        last MIGRATE and the assignment, ``pause`` seconds pass, in which
        commands on the moved keys are redirected with ASK."""
        src = next(
            n for n, r in self.slots().items() if any(a <= slot <= b for a, b in r)
        )
        src_id, dst_id = self.node_id(src), self.node_id(dst)
        dst.client().execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
        src.client().execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
        while True:
            keys = src.client().execute_command("CLUSTER GETKEYSINSLOT", slot, 100)
            if not keys:
                break
            src.client().execute_command(
                "MIGRATE", HOST, dst.port, "", 0, 5000, "KEYS", *keys
            )
        time.sleep(pause)
        others = [m for m in self.masters() if m not in (src, dst)]
        for node in (dst, src, *others):
            node.client().execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
        self.wait_ok()

    def logs(self) -> str:
        return "\n".join(f"--- {n!r}\n{n.log(2000)}" for n in self.nodes)

    def close(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.close()

    def __repr__(self) -> str:
        return f"<RedisCluster {[n.port for n in self.nodes]}>"


_CLUSTERS = pytest.StashKey[list[RedisCluster]]()

pytest_runtest_makereport = report_on_failure(
    _CLUSTERS, lambda cluster: (f"logs of {cluster!r}", cluster.logs())
)


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[RedisCluster]:
    from tests.conftest import require_tool

    cluster = RedisCluster(
        require_tool("redis-server", "Redis"), require_tool("redis-cli", "Redis")
    )
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def redis_tls_cluster(tls_files: TLSFiles) -> Iterator[RedisCluster]:
    from tests.conftest import require_tool

    cluster = RedisCluster(
        require_tool("redis-server", "Redis"),
        require_tool("redis-cli", "Redis"),
        size=3,
        tls=tls_files,
    )
    try:
        cluster.start(replicas=0)
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def tls_cluster(
    request: pytest.FixtureRequest, redis_tls_cluster: RedisCluster
) -> RedisCluster:
    """The module's TLS-only :class:`RedisCluster`, whose node logs a failed
    test's report shows."""
    request.node.stash[_CLUSTERS] = [redis_tls_cluster]
    return redis_tls_cluster


@pytest.fixture
def _report_cluster(
    request: pytest.FixtureRequest, redis_cluster: RedisCluster
) -> RedisCluster:
    request.node.stash[_CLUSTERS] = [redis_cluster]
    return redis_cluster


@pytest.fixture
def cluster(_report_cluster: RedisCluster) -> RedisCluster:
    """The module's :class:`RedisCluster`, whose node logs a failed test's
    report shows."""
    return _report_cluster
