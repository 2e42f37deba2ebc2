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

import contextlib
import http.client
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import typing as t
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence

import pytest
from flask import Flask
from flask import request

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


def wait_for(
    predicate: Callable[[], t.Any], timeout: float, interval: float = 0.02
) -> t.Any:
    """Poll ``predicate`` until it returns something truthy; raise
    ``TimeoutError`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"condition not met within {timeout}s")
        time.sleep(interval)


def stop_process(
    proc: subprocess.Popen[bytes], timeout: float, signum: int = signal.SIGTERM
) -> bool:
    """Send ``signum`` to a running ``proc`` by PID and wait up to ``timeout``
    seconds; SIGKILL it after that. Return True if it had to be killed."""
    if proc.poll() is not None:
        return False
    proc.send_signal(signum)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
        return True
    return False


class ExitedEarly(RuntimeError):
    """The process exited before it was ready."""


def wait_started(
    proc: subprocess.Popen[bytes],
    ready: Callable[[], bool],
    timeout: float,
    interval: float,
    what: str,
) -> None:
    """Poll ``ready()`` (polling a port that is not open yet: no event to
    await) until it is true. Raise :class:`ExitedEarly` if ``proc`` exits
    first, ``TimeoutError`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise ExitedEarly(f"{what} exited with {proc.returncode}")
        if ready():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not answer within {timeout}s")
        time.sleep(interval)


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


class Server:
    """A server subprocess on ``HOST:port``."""

    def __init__(
        self,
        kind: str,
        app: str,
        env: t.Mapping[str, str] | None = None,
        args: Sequence[str] = (),
    ) -> None:
        self.kind = kind
        self.app = app
        self.port = free_port()
        self.env = dict(os.environ)
        self.env.pop("EVENTSTREAM_REDIS_URL", None)
        self.env.update(
            PYTHONUNBUFFERED="1",
            PYTHONPATH=os.pathsep.join(
                [ROOT, *filter(None, [os.environ.get("PYTHONPATH")])]
            ),
            EXAMPLE_HOST=HOST,
            EXAMPLE_PORT=str(self.port),
        )
        self.env.update(env or {})
        self.argv = self._argv(kind, app, list(args))
        self._stderr = tempfile.TemporaryFile(prefix=f"server-{kind}-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    def _argv(self, kind: str, app: str, args: list[str]) -> list[str]:
        py = sys.executable
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

    # -- life --

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> Server:
        self.proc = subprocess.Popen(
            self.argv,
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._stderr,
            stderr=self._stderr,
        )
        what = f"{self.kind} server"
        try:
            wait_started(self.proc, self._healthy, timeout, 0.05, what)
        except (ExitedEarly, TimeoutError) as e:
            raise type(e)(f"{e} (GET /healthz):\n{self.stderr()}") from None
        return self

    def _healthy(self) -> bool:
        try:
            status, _ = self.request("GET", "/healthz", timeout=1.0)
        except OSError:
            return False
        return status == 200

    def children(self) -> list[int]:
        """PIDs of the server's child processes (gunicorn's workers)."""
        if self.proc is None:
            return []
        path = f"/proc/{self.proc.pid}/task/{self.proc.pid}/children"
        try:
            with open(path) as f:
                return [int(p) for p in f.read().split()]
        except OSError:
            return []

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

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL (also to leftover children) after ``timeout``."""
        proc = self.proc
        if proc is None:
            return
        kids = self.children()
        stop_process(proc, timeout)
        self.returncode = proc.returncode
        for pid in kids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def close(self) -> None:
        self.stop()
        self._stderr.close()

    def stderr(self, limit: int = 20000) -> str:
        f = self._stderr
        if f.closed:
            return ""
        f.flush()
        f.seek(0)
        text = f.read().decode("utf-8", "replace")
        f.seek(0, os.SEEK_END)
        return text if len(text) <= limit else "...\n" + text[-limit:]

    # -- HTTP --

    def request(
        self,
        method: str,
        path: str,
        body: t.Any = None,
        headers: t.Mapping[str, str] | None = None,
        timeout: float = 10.0,
    ) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=timeout)
        try:
            hdrs = dict(headers or {})
            data = None
            if body is not None:
                data = json.dumps(body).encode()
                hdrs.setdefault("Content-Type", "application/json")
            conn.request(method, path, body=data, headers=hdrs)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def publish(self, channel: str, data: t.Any, event: str | None = None) -> str:
        """POST /publish/<channel>; return the id the server assigned."""
        body: dict[str, t.Any] = {"data": data}
        if event is not None:
            body["event"] = event
        status, raw = self.request("POST", f"/publish/{channel}", body)
        assert status == 202, (status, raw)
        return str(json.loads(raw)["id"])

    def post_json(self, path: str) -> t.Any:
        status, raw = self.request("POST", path, {})
        assert status == 202, (status, raw)
        return json.loads(raw)

    def get_json(self, path: str) -> t.Any:
        status, raw = self.request("GET", path)
        assert status == 200, (status, raw)
        return json.loads(raw)

    def connections(self) -> int:
        return int(self.get_json("/healthz")["connections"])

    def wait_connections(self, count: int, timeout: float) -> float:
        """Poll /healthz until ``connections == count``; return the seconds
        it took. Raises ``TimeoutError`` with the last figure."""
        start = time.monotonic()
        deadline = start + timeout
        last = -1
        while True:
            last = self.connections()
            if last == count:
                return time.monotonic() - start
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"connections is {last}, not {count}, after {timeout}s"
                )
            time.sleep(0.01)

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
        server._stderr.close()


# -- a raw-socket SSE client --


def abort_all(clients: Sequence[SSEClient], rst: bool = True) -> None:
    for client in clients:
        if rst:
            client.abort()
        else:
            client.close()
