"""A client that goes away is noticed within 1 s on the gevent servers, even
on a channel with no traffic and with heartbeats far apart, and everything
held for it is released, the view's ``finally:`` included."""

from __future__ import annotations

import time
import typing as t

import pytest

from tests.support.servers import GEVENT_KINDS
from tests.support.servers import open_clients
from tests.support.servers import pump
from tests.support.servers import Server

pytestmark = pytest.mark.server

StartServer = t.Callable[..., Server]

#: Heartbeats this far apart cannot be what notices the disconnects.
QUIET = {"EVENTSTREAM_HEARTBEAT": "60", "EXAMPLE_CLOCK_INTERVAL": "60"}


@pytest.mark.parametrize("how", ["rst", "fin"])
@pytest.mark.parametrize("kind", GEVENT_KINDS)
def test_500_abrupt_disconnects_are_cleaned_up_within_a_second(
    start_server: StartServer, kind: str, how: str
):
    server = start_server(kind, env=QUIET)
    clients = open_clients(server.port, "/gen/idle", 500)
    try:
        pump(clients, lambda: all(len(c.events) == 1 for c in clients), 10)
        assert all(
            [(e.event, e.data) for e in c.events] == [("subscribed", "idle")]
            for c in clients
        )
        assert server.get_json("/healthz") == {
            "connections": 500,
            "channels": {"idle": 500},
        }
        counters = server.get_json("/counters")
        assert (counters["gen_started"], counters["gen_finally"]) == (500, 0)

        start = time.monotonic()
        for client in clients:
            if how == "rst":
                client.abort()
            else:
                client.close()
        server.wait_connections(0, 5)
        elapsed = time.monotonic() - start
    finally:
        for client in clients:
            client.close()
    print(f"{kind}: 500 {how} disconnects -> connections 0 in {elapsed:.3f}s")
    assert elapsed <= 1.0, elapsed
    assert server.get_json("/healthz") == {"connections": 0, "channels": {}}
    counters = server.get_json("/counters")
    assert (counters["gen_started"], counters["gen_finally"]) == (500, 500)
    # The server is still healthy: a new stream works.
    [again] = open_clients(server.port, "/stream/idle", 1)
    with again:
        sent = server.publish("idle", "still here")
        assert [(e.data, e.id) for e in again.read_events(1)] == [("still here", sent)]


@pytest.mark.parametrize("kind", GEVENT_KINDS)
def test_sleeping_and_periodic_views_end_when_the_client_leaves(
    start_server: StartServer, kind: str
):
    """Views parked in ``stream.sleep()`` or between periodic calls are woken
    and ended promptly too."""
    server = start_server(kind, env=QUIET)
    sleepers = open_clients(server.port, "/sleeper", 20)
    clocks = open_clients(server.port, "/clock", 20)
    clients = sleepers + clocks
    try:
        pump(clients, lambda: all(len(c.events) == 1 for c in clients), 10)
        assert all(
            [(e.event, e.data) for e in c.events] == [("hello", "awake")]
            for c in sleepers
        )
        assert all(c.events[0].data.startswith('{"n":1,') for c in clocks)
        assert server.connections() == 40
        start = time.monotonic()
        for i, client in enumerate(clients):
            client.abort() if i % 2 else client.close()
        server.wait_connections(0, 5)
        elapsed = time.monotonic() - start
    finally:
        for client in clients:
            client.close()
    assert elapsed <= 1.0, elapsed
    counters = server.get_json("/counters")
    assert (counters["sleep_started"], counters["sleep_finally"]) == (20, 20)
