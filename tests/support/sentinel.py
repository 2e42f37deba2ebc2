"""Redis with a replica and three Sentinels, on free ports of 127.0.0.1
(loaded as a plugin by tests/conftest.py).

Fixture:

``start_sentinel(replicas=1, password=None, tls=False)``
    A factory for a :class:`benchmarks.sentinel.SentinelSetup` (the
    benchmarks' own, which ``benchmarks.failover`` runs in a loop): a master,
    ``replicas`` replicas (in sync before it returns) and three Sentinels
    (``redis-server CONF --sentinel``) watching them as service
    ``mymaster``, with a quorum of 2 and a down-after of 1.5 s; with
    ``tls``, every node and Sentinel speaks TLS only (the run's own CA,
    tests/support/tls.py), replication included. Everything
    is killed by PID in teardown, and the logs of every process are added to
    a failed test's report.

:meth:`SentinelSetup.kill_master` SIGKILLs the master;
:meth:`SentinelSetup.wait_failover` waits until the Sentinels agree on a new
one and it takes writes; :meth:`SentinelSetup.rejoin` starts a killed node
again (without persistence, so empty) and waits until it is an in-sync
replica of the current master.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterator

import pytest

from benchmarks.processes import RedisProcess
from benchmarks.sentinel import NODE_OPTIONS
from benchmarks.sentinel import SentinelSetup
from benchmarks.sentinel import SERVICE
from tests.support.servers import report_on_failure

__all__ = ["NODE_OPTIONS", "SERVICE", "SentinelSetup"]

_SENTINEL = pytest.StashKey[list[RedisProcess]]()

pytest_runtest_makereport = report_on_failure(
    _SENTINEL, lambda server: (f"log of {server!r}", server.log())
)


@pytest.fixture
def start_sentinel(
    request: pytest.FixtureRequest,
) -> Iterator[Callable[..., SentinelSetup]]:
    """``start_sentinel(replicas=1, password=None, tls=False)`` -> a running
    :class:`SentinelSetup`."""
    from tests.conftest import require_tool

    binary = require_tool("redis-server", "Redis")
    setups: list[SentinelSetup] = []
    processes: list[RedisProcess] = []
    request.node.stash[_SENTINEL] = processes

    def start(
        replicas: int = 1, password: str | None = None, tls: bool = False
    ) -> SentinelSetup:
        files = request.getfixturevalue("tls_files") if tls else None
        setup = SentinelSetup.start(binary, replicas, processes.append, password, files)
        setups.append(setup)
        return setup

    yield start
    for setup in setups:
        setup.close()
