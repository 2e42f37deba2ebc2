"""SIGTERM ends every open stream promptly (a clean end of each chunked body)
and the server exits well inside gunicorn's graceful timeout (left at its
default of 30 s, so that it is the library, not the timeout, that does it)."""

from __future__ import annotations

import signal
import time
import typing as t
from pathlib import Path

import pytest

from tests.support.servers import open_clients
from tests.support.servers import pump
from tests.support.servers import Server
from tests.support.servers import SSEClient

pytestmark = pytest.mark.server

StartServer = t.Callable[..., Server]


def gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie nobody reaped counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True


def open_mixed_streams(server: Server) -> list[SSEClient]:
    """20 streams of every kind of view: subscriptions, a generator that
    follows a channel, a generator in ``stream.sleep()`` and a periodic view."""
    clients = open_clients(server.port, "/stream/lobby", 10)
    clients += open_clients(server.port, "/gen/lobby", 5)
    clients += open_clients(server.port, "/sleeper", 3)
    clients += open_clients(server.port, "/clock", 2)
    assert server.connections() == 20
    return clients


@pytest.mark.parametrize("kind", ["gunicorn", "pywsgi", "example"])
def test_sigterm_ends_every_stream_and_the_server_exits(
    start_server: StartServer, kind: str, tmp_path: Path
):
    app = "example_app" if kind == "example" else "tests.apps.streams:create_app"
    ended = tmp_path / "disconnected"
    server = start_server(
        kind,
        app=app,
        env={
            "EVENTSTREAM_HEARTBEAT": "60",
            "EXAMPLE_CLOCK_INTERVAL": "60",
            "TEST_DISCONNECT_LOG": str(ended),
        },
    )
    if kind == "example":
        clients = open_clients(server.port, "/stream/lobby", 18)
        clients += open_clients(server.port, "/clock", 2)
        assert server.connections() == 20
        subscribers, others = clients[:18], clients[18:]
    else:
        clients = open_mixed_streams(server)
        subscribers, others = clients[:10], clients[10:]
    workers = server.children()
    if kind == "gunicorn":
        assert len(workers) == 1
    try:
        # The generators, sleepers and clocks have sent their first event.
        pump(others, lambda: all(c.events for c in others), 5)
        sent = server.publish("lobby", "before shutdown")
        pump(subscribers, lambda: all(c.events for c in subscribers), 5)

        start = time.monotonic()
        server.signal(signal.SIGTERM)
        pump(clients, lambda: all(c.ended or c.eof for c in clients), 5)
        ended_in = time.monotonic() - start
        not_clean = [c for c in clients if not c.ended]
        assert not not_clean, not_clean
        assert ended_in < 2.0, ended_in
        assert server.wait(5) == 0
        exited_in = time.monotonic() - start
        for pid in workers:
            assert gone(pid), pid
    finally:
        for client in clients:
            client.close()
    print(f"{kind}: streams ended in {ended_in:.3f}s, exited in {exited_in:.3f}s")
    assert exited_in < 5.0, exited_in
    for client in subscribers:
        assert [(e.data, e.id) for e in client.events] == [("before shutdown", sent)]
    if kind == "gunicorn":
        assert "Worker graceful timeout" not in server.stderr()
    if kind != "example":
        # Every stream was released before the process exited, as a shutdown
        # (the sleepers and clocks follow no channel).
        lines = sorted(ended.read_text().splitlines())
        assert lines == ["shutdown "] * 5 + ["shutdown lobby"] * 15
