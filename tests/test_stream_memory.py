"""What an open stream keeps, and that nothing of it outlives the stream.

An idle stream holds as few objects as it can (one registry entry, no
closures, no generator besides its body); what the leaner layout relies on
is checked here: a stream's objects are all gone once it ended, and a
connection whose stream ended serves its next request (the disconnect watch
borrowed the socket's read watcher and gave it back)."""

from __future__ import annotations

import gc
import json
import socket
import time
import typing as t
import weakref

import gevent
import pytest

from flask_eventstream.connection import Connection
from flask_eventstream.testing import connection
from flask_eventstream.testing import read_events
from tests.support.servers import GEVENT_KINDS
from tests.support.servers import HOST
from tests.support.servers import make_app
from tests.support.servers import Server

StartServer = t.Callable[..., Server]


def _stream_once(app: t.Any, ext: t.Any) -> tuple[list[weakref.ref[t.Any]], bool]:
    """Open a stream with the test client, read one event, close it; weak
    references to what the stream held, and whether it was served from a
    greenlet (the server's direct path)."""
    response = app.test_client().get("/s?c=mem", buffered=False)
    conn = connection(response)
    assert isinstance(conn, Connection)
    [sub] = conn.subscriptions
    assert sub.owner is conn
    held = [conn, sub, response.response]
    refs = [weakref.ref(o) for o in held]
    direct = conn.task is not None
    del held, sub, conn
    ext.publish("mem", "one")
    assert [e.data for e in read_events(response, 1)] == ["one"]
    return refs, direct


@pytest.mark.parametrize("where", ["thread", "greenlet"])
def test_nothing_of_a_stream_outlives_it(where: str) -> None:
    app, ext = make_app()
    if where == "greenlet":
        refs, direct = gevent.spawn(_stream_once, app, ext).get(timeout=10)
    else:
        refs, direct = _stream_once(app, ext)
    assert direct is (where == "greenlet")
    gc.collect()
    assert [r() for r in refs] == [None] * len(refs)
    assert ext.stats() == {"connections": 0, "channels": {}}


def test_an_open_stream_is_in_the_registry_the_watchdog_sweeps() -> None:
    app, ext = make_app(EVENTSTREAM_HEARTBEAT=0.2)

    def run() -> tuple[list[str], dict[str, t.Any]]:
        response = app.test_client().get("/s?c=hb", buffered=False)
        open_ = ext.stats()
        chunks: list[str] = []
        try:
            # Nothing is published: only the watchdog's sweep of the
            # registry wakes the stream for its heartbeat.
            for chunk in response.response:
                chunks.append(chunk.decode())
                if chunk.startswith(b":"):
                    break
        finally:
            response.close()
        return chunks, open_

    chunks, open_ = gevent.spawn(run).get(timeout=10)
    assert open_ == {"connections": 1, "channels": {"hb": 1}}
    assert chunks == ["retry: 3000\n\n", ":\n\n"], chunks
    assert ext.stats() == {"connections": 0, "channels": {}}


def _read_until(sock: socket.socket, end: bytes, timeout: float) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while end not in data:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    return data


def _stream_to_its_end(sock: socket.socket) -> bytes:
    """Request ``/stream/ka`` on ``sock`` and read its response, which ends
    at the stream's lifetime with ``retry`` alone; the response head."""
    sock.sendall(b"GET /stream/ka HTTP/1.1\r\nHost: test\r\n\r\n")
    stream = _read_until(sock, b"\r\n0\r\n\r\n", 10)
    head, body = stream.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"transfer-encoding: chunked" in head.lower()
    # Chunk sizes in hex, in either case.
    assert body.lower() == b"d\r\nretry: 3000\n\n\r\n0\r\n\r\n"
    return head


#: (server, EVENTSTREAM_PARK_STREAMS): gunicorn's gevent worker hands streams
#: to the hub unless that is turned off.
_KEEP_ALIVE = [(kind, True) for kind in GEVENT_KINDS if kind != "gunicorn"] + [
    ("gunicorn", False)
]


@pytest.mark.server
@pytest.mark.parametrize(("kind", "park"), _KEEP_ALIVE)
def test_a_connection_serves_its_next_request_after_a_stream_ended(
    start_server: StartServer, kind: str, park: bool
) -> None:
    server = start_server(
        kind,
        env={
            "EVENTSTREAM_MAX_LIFETIME": "0.5",
            "EVENTSTREAM_HEARTBEAT": "60",
            "EVENTSTREAM_PARK_STREAMS": "1" if park else "0",
        },
    )
    with socket.create_connection((HOST, server.port), timeout=10) as sock:
        # The stream ends at its lifetime: the last chunk, and the
        # connection stays open.
        head = _stream_to_its_end(sock)
        assert b"connection: close" not in head.lower()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        reply = _read_until(sock, b"}", 10)
    assert reply.startswith(b"HTTP/1.1 200"), reply
    body = reply.split(b"\r\n\r\n", 1)[1]
    assert json.loads(body) == {"connections": 0, "channels": {}}


@pytest.mark.server
def test_a_stream_served_from_the_hub_ends_its_connection(
    start_server: StartServer,
) -> None:
    """Under gunicorn's gevent worker a stream that follows a subscription
    gives its greenlet back and is served from the hub; its response says
    ``Connection: close``, ends with the last chunk, and the connection
    closes (the client's next request opens a new one)."""
    server = start_server(
        "gunicorn",
        env={"EVENTSTREAM_MAX_LIFETIME": "0.5", "EVENTSTREAM_HEARTBEAT": "60"},
    )
    with socket.create_connection((HOST, server.port), timeout=10) as sock:
        head = _stream_to_its_end(sock)
        assert b"connection: close" in head.lower()
        sock.settimeout(5)
        assert sock.recv(100) == b""
    server.wait_connections(0, 5)
