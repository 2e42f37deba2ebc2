"""Frames written straight to the client's socket on the gevent servers whose
write path is known (gevent's WSGIServer, gunicorn -k gevent and
-k gevent_pywsgi), and the server's own write path everywhere else: the
client receives the same bytes either way."""

from __future__ import annotations

import json
import pathlib
import typing as t

import pytest

from tests.support.servers import GEVENT_KINDS
from tests.support.servers import open_clients
from tests.support.servers import pump
from tests.support.servers import Server
from tests.support.servers import SSEClient
from tests.support.servers import wait_for

pytestmark = pytest.mark.server

StartServer = t.Callable[..., Server]


def writers(server: Server) -> dict[str, int]:
    return t.cast(dict[str, int], server.get_json("/writers"))


def triples(events: t.Iterable[t.Any]) -> list[tuple[str, str, str]]:
    return [(e.event, e.data, e.id) for e in events]


@pytest.mark.parametrize("kind", GEVENT_KINDS)
def test_direct_writes_deliver_every_event_in_order(
    start_server: StartServer, kind: str
):
    """Single publishes and bursts that go out as one joined frame."""
    server = start_server(kind, env={"EVENTSTREAM_HEARTBEAT": "60"})
    clients = open_clients(server.port, "/stream/direct", 4)
    try:
        server.wait_connections(4, 5)
        # Each stream waits for its first event before it takes the fast
        # path; the first publish goes through it already.
        sent = []
        for i in range(5):
            data = f"one {i}"
            sent.append(("message", data, server.publish("direct", data)))
        pump(clients, lambda: all(len(c.events) >= 5 for c in clients), 10)
        assert writers(server) == {"direct": 4, "server": 0}
        # 30 events published without yielding to the hub between them.
        bulk = server.post_json("/bulk/direct?n=30&batch=30")
        first, last = bulk["first"], bulk["last"]
        pump(clients, lambda: all(len(c.events) >= 35 for c in clients), 10)
        for client in clients:
            assert triples(client.events[:5]) == sent
            rest = client.events[5:]
            assert [e.data for e in rest] == [json.dumps(i) for i in range(30)]
            assert rest[0].id == first and rest[-1].id == last
            assert len(client.events) == 35
        assert writers(server) == {"direct": 4, "server": 0}
    finally:
        for client in clients:
            client.close()
    server.wait_connections(0, 5)


@pytest.mark.parametrize("kind", GEVENT_KINDS)
def test_slow_reader_gets_whole_chunks(start_server: StartServer, kind: str):
    """Events larger than the socket buffers: writes that the kernel takes
    in part are finished by the stream itself, and the HTTP chunks stay
    whole (the client's chunked decoder fails on anything else)."""
    server = start_server(
        kind, env={"EVENTSTREAM_HEARTBEAT": "60", "EVENTSTREAM_SEND_TIMEOUT": "30"}
    )
    slow = SSEClient(server.port, "/stream/big", rcvbuf=8192)
    fast = SSEClient(server.port, "/stream/big")
    try:
        pump([slow, fast], lambda: bool(slow.first_body_at and fast.first_body_at), 5)
        server.wait_connections(2, 5)
        sent = []
        for i in range(60):
            data = f"{i}:" + "z" * (50_000 + 997 * i)
            sent.append(("message", data, server.publish("big", data)))
            # The fast client keeps up; the slow one reads a little now and
            # then, so that its socket's buffer is full, then has room.
            pump([fast], lambda n=i + 1: len(fast.events) >= n, 10)
            if i % 3 == 0:
                slow.on_readable(65536)
        pump([slow], lambda: len(slow.events) >= len(sent), 30)
        assert triples(slow.events) == sent
        assert triples(fast.events) == sent
    finally:
        slow.close()
        fast.close()
    server.wait_connections(0, 5)


def test_werkzeug_uses_its_own_write_path(start_server: StartServer):
    server = start_server("werkzeug", env={"EVENTSTREAM_HEARTBEAT": "60"})
    with SSEClient(server.port, "/stream/plain") as client:
        pump([client], lambda: client.first_body_at is not None, 5)
        event_id = server.publish("plain", "hello")
        events = client.read_events(1, 5)
        assert triples(events) == [("message", "hello", event_id)]
        assert writers(server) == {"direct": 0, "server": 1}


@pytest.mark.parametrize("kind", GEVENT_KINDS)
def test_http10_client_gets_an_unchunked_body_from_the_server(
    start_server: StartServer, kind: str
):
    """No chunked encoding for HTTP/1.0: the server writes every frame."""
    server = start_server(kind, env={"EVENTSTREAM_HEARTBEAT": "60"})
    with SSEClient(server.port, "/stream/old", http_version="1.0") as client:
        pump([client], lambda: client.first_body_at is not None, 5)
        assert "chunked" not in client.headers.get("transfer-encoding", "")
        ids = [server.publish("old", f"e{i}") for i in range(3)]
        events = client.read_events(3, 5)
        assert triples(events) == [("message", f"e{i}", ids[i]) for i in range(3)]
        assert writers(server) == {"direct": 0, "server": 1}


# -- only where the server's write path is known --


def test_an_unknown_gunicorn_version_keeps_its_own_write_path(
    start_server: StartServer, tmp_path: pathlib.Path
):
    """gunicorn reporting a major version that was not checked: every frame
    goes through gunicorn's write path, and arrives the same."""
    config = tmp_path / "gunicorn_conf.py"
    config.write_text("import gunicorn\ngunicorn.__version__ = '99.0.0'\n")
    server = start_server(
        "gunicorn", env={"EVENTSTREAM_HEARTBEAT": "60"}, args=["-c", str(config)]
    )
    with SSEClient(server.port, "/stream/future") as client:
        pump([client], lambda: client.first_body_at is not None, 5)
        ids = [server.publish("future", f"f{i}") for i in range(3)]
        events = client.read_events(3, 5)
        assert triples(events) == [("message", f"f{i}", ids[i]) for i in range(3)]
        assert writers(server) == {"direct": 0, "server": 1}


def test_the_access_log_counts_the_bytes_written_directly(
    start_server: StartServer, tmp_path: pathlib.Path
):
    """gunicorn logs the body bytes of a stream whose events were written
    straight to the socket, as it does for the bytes it writes itself."""
    log = tmp_path / "access.log"
    server = start_server(
        "gunicorn",
        env={"EVENTSTREAM_HEARTBEAT": "60"},
        args=["--access-logfile", str(log), "--access-logformat", "%(U)s %(B)s"],
    )
    client = SSEClient(server.port, "/stream/counted")
    try:
        server.wait_connections(1, 5)
        for i in range(5):
            server.publish("counted", f"event {i}")
        server.post_json("/bulk/counted?n=20&batch=20")
        pump([client], lambda: len(client.events) >= 25, 10)
        assert writers(server) == {"direct": 1, "server": 0}
        assert len(client.events) == 25
    finally:
        client.close()
    server.wait_connections(0, 5)

    def logged() -> list[str]:
        text = log.read_text() if log.exists() else ""
        return [line for line in text.splitlines() if line.startswith("/stream/")]

    wait_for(lambda: bool(logged()), 5)
    assert logged() == [f"/stream/counted {client.body_len}"]
