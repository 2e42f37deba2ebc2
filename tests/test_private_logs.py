"""Grants travel in query strings: no server the example app runs on writes
one to its logs at INFO level (gevent's server, gunicorn with its access log
on, Werkzeug's development server)."""

from __future__ import annotations

import typing as t

import pytest

from tests.support.servers import Server
from tests.support.servers import SSEClient
from tests.support.servers import wait_for

pytestmark = [pytest.mark.server]

StartServer = t.Callable[..., Server]

SERVERS = {
    "example": [],
    "gunicorn": ["--access-logfile", "-", "--log-level", "info"],
    "werkzeug": [],
}


@pytest.mark.parametrize("kind", list(SERVERS))
def test_grants_stay_out_of_server_logs(start_server: StartServer, kind: str) -> None:
    server = start_server(
        kind,
        app="example_app",
        env={"EXAMPLE_SECRET_KEY": "k", "EXAMPLE_GRANT_EXPIRES": "60"},
        args=SERVERS[kind],
    )
    token = server.get_json("/grant/lobby?user=alice")["grant"]
    bad = token[:-3] + ("xyz" if not token.endswith("xyz") else "abc")
    with SSEClient(server.port, f"/stream/lobby?grant={token}&lastEventId=1-0") as ok:
        assert ok.read_head() == 200
        ok.read_events(1)  # the reset for an unknown id: the stream is on
    with SSEClient(server.port, f"/stream/lobby?grant={bad}") as refused:
        assert refused.read_head() == 403
        refused.read_body()
    # The streams' lines are written when they end.
    wait_for(lambda: server.stderr().count("grant=[redacted]") >= 2, 10)
    log = server.stderr()
    assert token not in log
    assert bad not in log
    assert token.split(".")[-1] not in log  # not even the signature
