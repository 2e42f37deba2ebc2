"""Sentinel failover under load: gunicorn with three gevent workers on a
``redis+sentinel://`` URL and EVENTSTREAM_REDIS_MIN_REPLICAS=1, clients
streaming on every worker while a publisher POSTs steadily, and the master
killed with SIGKILL. Publishing fails (503) only while the Sentinels switch,
then works without a restart, and every client ends with exactly the events
that were answered 202, in order, once.

benchmarks/failover.py runs the same in a loop and measures it."""

from __future__ import annotations

import json
import time
import typing as t

import pytest

from tests.support.redis import ids_of
from tests.support.redis import Publisher
from tests.support.redis import stream_entries
from tests.support.sentinel import SentinelSetup
from tests.support.servers import open_clients
from tests.support.servers import pump
from tests.support.servers import Server
from tests.support.servers import wait_for

pytestmark = [pytest.mark.redis, pytest.mark.server]

StartServer = t.Callable[..., Server]
WORKERS = 3


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_sentinel_failover_loses_and_repeats_nothing(
    start_server: StartServer,
    start_sentinel: t.Callable[..., SentinelSetup],
    tls: bool,
):
    """With ``tls``, the nodes and the Sentinels speak TLS only (replication
    too), and the app reaches both with ``EVENTSTREAM_REDIS_OPTIONS``."""
    setup = start_sentinel(replicas=1, tls=tls)
    server = start_server(
        "gunicorn",
        env={
            **setup.env(),
            "EVENTSTREAM_REDIS_MIN_REPLICAS": "1",
            "EVENTSTREAM_HEARTBEAT": "0.5",
        },
        args=["-w", str(WORKERS), "--graceful-timeout", "30"],
    )
    wait_for(lambda: len(server.children()) == WORKERS, 30)
    workers = set(server.children())
    clients = open_clients(server.port, "/gen/lobby", 24, batch=8)
    try:
        pump(clients, lambda: all(c.events for c in clients), 10)
        # Requests reach more than one worker (the kernel picks the worker
        # that accepts; on a busy machine one may take a long run of them).
        busy: set[int] = set()
        deadline = time.monotonic() + 20
        while len(busy) < 2 and time.monotonic() < deadline:
            busy.add(server.get_json("/counters")["pid"])
        assert len(busy) >= 2, "every request went to one worker"
        publisher = Publisher(server, "lobby", pause=0.01)
        publisher.start()
        try:
            publisher.wait_for(30, 20)
            old = setup.kill_master()
            killed_at = time.monotonic()
            # While the Sentinels still name the dead master: a 503, after
            # the bounded retry.
            status, body = server.request(
                "POST", "/publish/lobby", {"data": "during the switch"}, timeout=30
            )
            assert status == 503, body
            assert "is unreachable" in json.loads(body)["error"]
            new = setup.wait_failover(old)
            # The new master takes events once it has a replica again.
            setup.rejoin(old)
            mark = len(publisher.accepted)
            publisher.wait_for(mark + 30, 30)
        finally:
            publisher.stop()
        assert publisher.errors == []
        # 503s only during the switch: after the first 202 that followed the
        # kill, every POST was accepted.
        back_at = min(
            at for at, status in publisher.answers if at > killed_at and status == 202
        )
        # (The publisher's POST under way at the kill, if any, is retried
        # through the switch and answered 202.)
        refused_at = [at for at, status in publisher.answers if status == 503]
        assert all(killed_at < at < back_at for at in refused_at)
        assert not [s for at, s in publisher.answers if at > back_at and s != 202]
        # No worker was restarted.
        assert set(server.children()) == workers
        # The new master holds exactly the accepted events, once each.
        assert stream_entries(new, "lobby") == publisher.accepted
        expected = [event_id for event_id, _ in publisher.accepted]
        # One channel: its offsets count on, in one history.
        assert len({i.split(".")[0] for i in expected}) == 1
        offsets = [int(i.split(".")[1]) for i in expected]
        assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
        pump(clients, lambda: all(len(ids_of(c)) >= len(expected) for c in clients), 30)
        for client in clients:
            assert not client.eof, "a stream was closed by the failover"
            assert ids_of(client) == expected
            assert [e.data for e in client.events[1:]] == [
                data for _, data in publisher.accepted
            ]
        print(
            f"failover: first 202 {back_at - killed_at:.2f}s after SIGKILL,"
            f" {len(refused_at)} more POSTs answered 503"
        )
    finally:
        for client in clients:
            client.close()
