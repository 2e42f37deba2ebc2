"""Real servers in subprocesses, and a raw-socket SSE client to read them.

Fixtures (loaded as a plugin by tests/conftest.py):

``start_server(kind, app=..., env=..., args=...)``
    Starts a server on a free port of 127.0.0.1 and waits (bounded) until it
    answers ``/healthz``. Kinds: ``"pywsgi"`` (gevent's WSGIServer through
    :func:`flask_eventstream.serving.run`, monkey-patched; ``python -m
    tests.apps.serve``), ``"example"`` (``python -m example_app``),
    ``"gunicorn"`` (``gunicorn -k gevent -w 1``), ``"gunicorn-sync"``
    (``gunicorn -k sync``) and ``"werkzeug"`` (``flask run``, threads).
    Configuration goes through ``EVENTSTREAM_*``/``EXAMPLE_*`` variables in
    ``env``. Servers are stopped by PID in teardown (SIGTERM, then SIGKILL),
    and the stderr of every server a failed test started is added to its
    report.

The client side is plain sockets and :mod:`selectors`: :class:`SSEClient`
speaks HTTP/1.1, decodes the chunked body and feeds
:class:`flask_eventstream.testing.EventParser`; :func:`open_clients` and
:func:`pump` drive hundreds of them at once from one thread.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import sys
import typing as t
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence

import pytest
from flask import Flask
from flask import request

from benchmarks.processes import ExitedEarly
from benchmarks.processes import ServerProcess
from benchmarks.processes import stop_process
from benchmarks.processes import wait_for
from benchmarks.processes import wait_started
from benchmarks.sseclient import ChunkedDecoder
from benchmarks.sseclient import open_clients
from benchmarks.sseclient import pump
from benchmarks.sseclient import SSEClient
from flask_eventstream import Event
from flask_eventstream import EventStream
from flask_eventstream import eventstream
from flask_eventstream.testing import ReceivedEvent

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HOST = "127.0.0.1"
TEST_APP = "tests.apps.streams:create_app"
#: The gevent servers, for tests that must hold on each: gevent's WSGIServer
#: (flask_eventstream.serving), gunicorn -k gevent and -k gevent_pywsgi.
GEVENT_KINDS = ("pywsgi", "gunicorn", "gunicorn-pywsgi")

__all__ = [
    "GEVENT_KINDS",
    "ChunkedDecoder",
    "ExitedEarly",
    "SSEClient",
    "Server",
    "abort_all",
    "free_port",
    "make_app",
    "open_clients",
    "pump",
    "raise_nofile",
    "rec",
    "report_on_failure",
    "stop_process",
    "wait_for",
    "wait_started",
]


def raise_nofile(wanted: int = 8192) -> int:
    """Raise this process's open-file limit towards ``wanted``; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


# -- in-process apps (Flask's test client) --


def make_app(
    ext: EventStream | None = None, **config: t.Any
) -> tuple[Flask, EventStream]:
    """The app of the in-process tests: ``GET /s?c=<channel>...`` streams a
    subscription to the channels; ``POST /pub/<channel>`` publishes its JSON
    body and answers ``{"id": ...}``. ``config`` goes into ``app.config``
    before ``ext`` (a new one by default) is registered."""
    app = Flask(__name__)
    app.config.update(config)
    ext = ext or EventStream()
    ext.init_app(app)

    @app.get("/s")
    @eventstream
    def s() -> t.Any:
        return ext.subscribe(*request.args.getlist("c"))

    @app.post("/pub/<channel>")
    def pub(channel: str) -> t.Any:
        return {"id": ext.publish(channel, request.get_json()).id}, 202

    return app, ext


def rec(event: Event) -> ReceivedEvent:
    """What a client receives for a published event."""
    return ReceivedEvent(event.event or "message", event.text, t.cast(str, event.id))


# -- servers --


class Server(ServerProcess):
    """A server subprocess on ``HOST:port`` serving ``app``."""

    def __init__(
        self,
        kind: str,
        app: str,
        env: t.Mapping[str, str] | None = None,
        args: Sequence[str] = (),
    ) -> None:
        self.app = app
        super().__init__(kind, env, args)

    def command(self, kind: str, args: list[str]) -> list[str]:
        py = sys.executable
        app = self.app
        bind = f"{HOST}:{self.port}"
        if kind == "pywsgi":
            return [py, "-m", "tests.apps.serve", app, *args]
        if kind == "example":
            return [py, "-m", "example_app", *args]
        if kind in ("gunicorn", "gunicorn-sync", "gunicorn-pywsgi"):
            worker = {
                "gunicorn": "gevent",
                "gunicorn-sync": "sync",
                "gunicorn-pywsgi": "gevent_pywsgi",
            }[kind]
            return [
                py,
                "-m",
                "gunicorn",
                "-k",
                worker,
                "-w",
                "1",
                "-b",
                bind,
                "--worker-connections",
                "4000",
                # Not ~/.gunicorn/gunicorn.ctl, shared by every gunicorn here.
                "--no-control-socket",
                *args,
                f"{app.replace(':create_app', '')}:create_app()",
            ]
        if kind == "werkzeug":
            module = app.split(":", 1)[0]
            return [
                py,
                "-m",
                "flask",
                "--app",
                module,
                "run",
                "--host",
                HOST,
                "--port",
                str(self.port),
                "--no-reload",
                "--no-debugger",
                "--with-threads",
                *args,
            ]
        raise ValueError(f"unknown server kind {kind!r}")

    def worker_pid(self) -> int:
        """The PID that serves requests (the worker under gunicorn)."""
        status, body = self.request("GET", "/counters")
        if status == 200:
            return int(json.loads(body)["pid"])
        kids = self.children()
        if self.kind.startswith("gunicorn"):
            assert len(kids) == 1, kids
            return kids[0]
        return self.pid

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        self.returncode = self.proc.wait(timeout)
        return self.returncode

    def stderr(self, limit: int = 20000) -> str:
        return self.output(limit)

    def post_json(self, path: str) -> t.Any:
        status, raw = self.request("POST", path, {})
        assert status == 202, (status, raw)
        return json.loads(raw)

    def __repr__(self) -> str:
        return f"<Server {self.kind} {self.app} :{self.port}>"


_T = t.TypeVar("_T")


def report_on_failure(
    key: pytest.StashKey[list[_T]], section: Callable[[_T], tuple[str, str]]
) -> Callable[..., Iterator[None]]:
    """A ``pytest_runtest_makereport`` hook wrapper that adds ``section(x)``
    to a failed test's report for each ``x`` in ``item.stash[key]``."""

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(
        item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Iterator[None]:
        outcome = yield
        report = outcome.get_result()
        if report.failed:
            for x in item.stash.get(key, []):
                report.sections.append(section(x))

    return pytest_runtest_makereport


_SERVERS = pytest.StashKey[list[Server]]()

pytest_runtest_makereport = report_on_failure(
    _SERVERS,
    lambda server: (
        f"stderr of {server!r} (exit {server.returncode})",
        server.stderr(),
    ),
)


@pytest.fixture
def start_server(request: pytest.FixtureRequest) -> Iterator[Callable[..., Server]]:
    """``start_server(kind, app=TEST_APP, env=None, args=())`` -> a running
    :class:`Server`, stopped in teardown."""
    from tests.conftest import require_module

    raise_nofile()
    servers: list[Server] = []
    request.node.stash[_SERVERS] = servers

    def start(
        kind: str,
        app: str = TEST_APP,
        env: t.Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        timeout: float = 30.0,
    ) -> Server:
        if kind.startswith("gunicorn"):
            require_module("gunicorn")
        server = Server(kind, app, env, args)
        servers.append(server)
        return server.start(timeout)

    yield start
    for server in servers:
        server.stop()
    for server in servers:
        # Kept open until the report was made; close the files now.
        server.close()


# -- a raw-socket SSE client --


def abort_all(clients: Sequence[SSEClient], rst: bool = True) -> None:
    for client in clients:
        if rst:
            client.abort()
        else:
            client.close()
