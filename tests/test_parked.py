"""Streams served from the hub: under gunicorn's gevent worker, a view that
returns a subscription gives its request greenlet back once the stream is
open, and the stream is written, timed and ended from gevent's hub. Every
other stream, server or setup keeps its greenlet, and the client receives
the same events either way."""

from __future__ import annotations

import time
import typing as t
from pathlib import Path

import pytest

from tests.support.servers import GEVENT_KINDS
from tests.support.servers import open_clients
from tests.support.servers import pump
from tests.support.servers import Server
from tests.support.servers import SSEClient
from tests.support.servers import wait_for

pytestmark = pytest.mark.server

StartServer = t.Callable[..., Server]


def served_by(server: Server) -> dict[str, int]:
    return t.cast(dict[str, int], server.get_json("/served-by"))


def _exchange(server: Server, subscribers: list[SSEClient], channel: str) -> None:
    """Publish three events; each subscriber receives exactly those."""
    sent = [
        (f"{channel} {i}", server.publish(channel, f"{channel} {i}")) for i in range(3)
    ]
    pump(subscribers, lambda: all(len(c.events) >= 3 for c in subscribers), 10)
    for client in subscribers:
        assert [(e.data, e.id) for e in client.events] == sent


@pytest.mark.parametrize("kind", GEVENT_KINDS)
def test_subscriptions_are_served_from_the_hub_under_gunicorn_only(
    start_server: StartServer, kind: str
) -> None:
    server = start_server(kind, env={"EVENTSTREAM_HEARTBEAT": "60"})
    subscribers = open_clients(server.port, "/stream/hub", 3)
    others = open_clients(server.port, "/sleeper", 2)
    try:
        server.wait_connections(5, 5)
        pump(others, lambda: all(c.events for c in others), 5)
        parked = 3 if kind == "gunicorn" else 0
        assert served_by(server) == {"greenlet": 5 - parked, "hub": parked, "thread": 0}
        _exchange(server, subscribers, "hub")
        subscribers.pop().close()
        server.wait_connections(4, 5)
        left = 2 if kind == "gunicorn" else 0
        assert served_by(server) == {"greenlet": 4 - left, "hub": left, "thread": 0}
    finally:
        for client in subscribers + others:
            client.close()
    server.wait_connections(0, 5)


@pytest.mark.parametrize(
    "env",
    [{"EVENTSTREAM_PARK_STREAMS": "0"}, {"TEST_WRAP_BODY": "1"}],
    ids=["turned-off", "middleware-wraps-the-body"],
)
def test_gunicorn_keeps_the_greenlet_when_the_stream_cannot_be_handed_over(
    start_server: StartServer, env: dict[str, str]
) -> None:
    """With the setting off, or behind a middleware that iterates the body
    itself (gunicorn then never sees the object that hands the stream over),
    every stream keeps its greenlet and gets the same events."""
    server = start_server("gunicorn", env={"EVENTSTREAM_HEARTBEAT": "60", **env})
    subscribers = open_clients(server.port, "/stream/kept", 3)
    try:
        server.wait_connections(3, 5)
        assert served_by(server) == {"greenlet": 3, "hub": 0, "thread": 0}
        _exchange(server, subscribers, "kept")
        assert served_by(server) == {"greenlet": 3, "hub": 0, "thread": 0}
    finally:
        for client in subscribers:
            client.close()
    server.wait_connections(0, 5)


def test_a_stream_served_from_the_hub_gets_heartbeats_and_ends_at_its_lifetime(
    start_server: StartServer,
) -> None:
    server = start_server(
        "gunicorn",
        env={"EVENTSTREAM_HEARTBEAT": "0.3", "EVENTSTREAM_MAX_LIFETIME": "2"},
    )
    with SSEClient(server.port, "/stream/timed", record=True) as client:
        pump([client], lambda: client.first_body_at is not None, 5)
        assert served_by(server) == {"greenlet": 0, "hub": 1, "thread": 0}
        event_id = server.publish("timed", "between heartbeats")
        received = client.read_to_end(5)
        assert [(e.data, e.id) for e in received] == [("between heartbeats", event_id)]
        assert client.ended
        # Lifetime 2 s (jittered by 10 %), a heartbeat every 0.3 s while idle.
        body = b"".join(payload for _, payload in client.chunks)
        assert body.count(b":\n\n") >= 4, body
    server.wait_connections(0, 5)


def test_a_worker_that_stops_by_itself_ends_its_hub_streams_cleanly(
    start_server: StartServer, tmp_path: Path
) -> None:
    """At ``--max-requests`` gunicorn's worker stops without SIGTERM once
    its greenlets are done, which streams served from the hub no longer
    hold: their responses still end with the last chunk, and they are
    released as a shutdown (``client_disconnected``)."""
    ended = tmp_path / "disconnected"
    server = start_server(
        "gunicorn",
        env={"EVENTSTREAM_HEARTBEAT": "60", "TEST_DISCONNECT_LOG": str(ended)},
        args=["--max-requests", "4"],
    )
    with SSEClient(server.port, "/stream/recycled") as client:
        pump([client], lambda: client.first_body_at is not None, 5)
        event_id = server.publish("recycled", "last one")
        # The stream, the publish and this are requests 1 to 3; the fourth
        # makes the worker stop.
        assert client.read_events(1, 5)[0].id == event_id
        server.get_json("/healthz")
        assert client.read_to_end(10) == []
        assert client.ended, (client.eof, client.error)
    # Released after the last chunk went out, by the exiting worker.
    assert _lines_of(ended, 10) == ["shutdown recycled"]


def test_the_exit_waits_a_bounded_time_for_a_release_that_blocks(
    start_server: StartServer, tmp_path: Path
) -> None:
    """A ``client_disconnected`` receiver that never returns holds the
    exiting worker for ``EXIT_RELEASE_TIMEOUT`` (5 s) only: it says so and
    exits, and gunicorn starts another."""
    ended = tmp_path / "disconnected"
    server = start_server(
        "gunicorn",
        env={
            "EVENTSTREAM_HEARTBEAT": "60",
            "TEST_DISCONNECT_LOG": str(ended),
            "TEST_DISCONNECT_BLOCK": "1",
        },
        args=["--max-requests", "3"],
    )
    [worker] = server.children()
    with SSEClient(server.port, "/stream/blocked") as client:
        pump([client], lambda: client.first_body_at is not None, 5)
        # The stream and these are requests 1 to 3.
        server.get_json("/healthz")
        server.get_json("/healthz")
        assert client.read_to_end(10) == []
        assert client.ended, (client.eof, client.error)
    assert _lines_of(ended, 10) == ["shutdown blocked"]
    wait_for(lambda: worker not in server.children(), 20)
    assert "1 event stream(s) were not released within 5 s of exit." in (
        server.stderr()
    )


def _lines_of(path: Path, timeout: float) -> list[str]:
    """The lines of ``path`` once it has any (another process writes it)."""
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().endswith("\n")):
        assert time.monotonic() < deadline, f"nothing in {path} after {timeout} s"
        time.sleep(0.05)
    return path.read_text().splitlines()
