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
import selectors
import signal
import socket
import struct
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

from flask_eventstream import Event
from flask_eventstream import EventStream
from flask_eventstream import eventstream
from flask_eventstream.testing import EventParser
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


class ChunkedDecoder:
    """Incremental decoder of an HTTP/1.1 chunked body."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._left = 0  # bytes left in the current chunk
        self._state = "size"  # size | data | crlf | trailer | done
        self.done = False

    def feed(self, data: bytes) -> bytes:
        buf = self._buf
        buf += data
        out = bytearray()
        pos = 0
        while not self.done:
            state = self._state
            if state == "size":
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    break
                line = bytes(buf[pos:end]).split(b";", 1)[0].strip()
                pos = end + 2
                size = int(line, 16)
                if size == 0:
                    self._state = "trailer"
                else:
                    self._left = size
                    self._state = "data"
            elif state == "data":
                take = min(self._left, len(buf) - pos)
                if take == 0:
                    break
                out += buf[pos : pos + take]
                pos += take
                self._left -= take
                if self._left == 0:
                    self._state = "crlf"
            elif state == "crlf":
                if len(buf) - pos < 2:
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    raise ValueError(f"bad chunk end {bytes(buf[pos : pos + 2])!r}")
                pos += 2
                self._state = "size"
            else:  # trailer: lines until an empty one
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    break
                empty = end == pos
                pos = end + 2
                if empty:
                    self.done = True
        del buf[:pos]
        return bytes(out)


_REQUEST = (
    "GET {path} HTTP/{version}\r\nHost: {host}:{port}\r\n"
    "Accept: text/event-stream\r\nCache-Control: no-cache\r\n{extra}\r\n"
)


class SSEClient:
    """One HTTP/1.1 request over a plain socket, read as an event stream.

    ``count_only`` skips the parser and only counts events carrying an
    ``id`` (for the benchmark, where parsing would cost more than serving).
    ``record`` keeps ``(monotonic time, body bytes)`` per read.
    """

    def __init__(
        self,
        port: int,
        path: str,
        headers: t.Mapping[str, str] | None = None,
        *,
        rcvbuf: int | None = None,
        count_only: bool = False,
        record: bool = False,
        connect_timeout: float = 10.0,
        http_version: str = "1.1",
    ) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            # Before connect, so the window is negotiated small.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(connect_timeout)
        try:
            self.sock.connect((HOST, port))
            extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
            request = _REQUEST.format(
                path=path, host=HOST, port=port, extra=extra, version=http_version
            )
            self.sock.sendall(request.encode("latin-1"))
        except BaseException:
            self.sock.close()
            raise
        self.sock.setblocking(False)
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self._head = bytearray()
        self._chunked: ChunkedDecoder | None = None
        self._length: int | None = None
        self.body = bytearray()
        self.body_len = 0
        self.parser = EventParser()
        self.events: list[ReceivedEvent] = []
        self._taken = 0
        self.count_only = count_only
        self.count = 0
        self._tail = b""
        self.record = record
        self.chunks: list[tuple[float, bytes]] = []
        self.eof = False
        self.error: OSError | None = None
        self.ended = False  # the body ended as HTTP says (last chunk / length)
        self.closed = False
        self.first_body_at: float | None = None
        self.opened_at = time.monotonic()

    def fileno(self) -> int:
        return self.sock.fileno()

    # -- reading --

    def on_readable(self, size: int = 262144) -> bool:
        """Read what the socket has; return False at EOF or error."""
        try:
            data = self.sock.recv(size)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError as e:
            self.error = e
            self.eof = True
            return False
        if not data:
            self.eof = True
            return False
        self._feed(data)
        return True

    def _feed(self, data: bytes) -> None:
        if self.status is None:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self._head[:end]).decode("latin-1")
            data = bytes(self._head[end + 4 :])
            self._head = bytearray()
            lines = head.split("\r\n")
            self.status = int(lines[0].split()[1])
            for line in lines[1:]:
                name, _, value = line.partition(":")
                self.headers[name.strip().lower()] = value.strip()
            if self.headers.get("transfer-encoding", "").lower() == "chunked":
                self._chunked = ChunkedDecoder()
            elif "content-length" in self.headers:
                self._length = int(self.headers["content-length"])
                if self._length == 0:
                    self.ended = True
        if not data or self.ended:
            return
        if self._chunked is not None:
            payload = self._chunked.feed(data)
            if self._chunked.done:
                self.ended = True
        else:
            payload = data
            if self._length is not None:
                payload = payload[: self._length - self.body_len]
                if self.body_len + len(payload) >= self._length:
                    self.ended = True
        if payload:
            self._body(payload)

    def _body(self, payload: bytes) -> None:
        now = time.monotonic()
        if self.first_body_at is None:
            self.first_body_at = now
        self.body_len += len(payload)
        if self.record:
            self.chunks.append((now, payload))
        if self.count_only:
            text = self._tail + payload
            self.count += text.count(b"\nid: ")
            self._tail = text[-4:]
            return
        if self.status == 200:
            self.events.extend(self.parser.feed(payload))
        else:
            self.body += payload

    def wait(self, predicate: Callable[[SSEClient], bool], timeout: float) -> None:
        """Read until ``predicate(self)``; ``TimeoutError`` after ``timeout``."""
        pump([self], lambda: predicate(self), timeout)

    def read_head(self, timeout: float = 5.0) -> int:
        self.wait(lambda c: c.status is not None or c.eof, timeout)
        if self.status is None:
            raise ConnectionError(f"no response head (error {self.error!r})")
        return self.status

    def read_events(self, count: int, timeout: float = 5.0) -> list[ReceivedEvent]:
        """The next ``count`` events not returned before."""
        want = self._taken + count
        self.wait(lambda c: len(c.events) >= want or c.eof or c.ended, timeout)
        if len(self.events) < want:
            raise TimeoutError(
                f"stream ended before {count} events: got"
                f" {self.events[self._taken :]!r} (eof={self.eof}, ended={self.ended})"
            )
        events = self.events[self._taken : want]
        self._taken = want
        return events

    def read_to_end(self, timeout: float = 5.0) -> list[ReceivedEvent]:
        """Read until the body ends; return the events not returned before."""
        self.wait(lambda c: c.ended or c.eof, timeout)
        events = self.events[self._taken :]
        self._taken = len(self.events)
        return events

    def read_body(self, timeout: float = 5.0) -> bytes:
        """The whole body of a response that is not an event stream."""
        self.wait(lambda c: c.ended or c.eof, timeout)
        return bytes(self.body)

    @property
    def last_event_id(self) -> str:
        return self.parser.last_event_id

    # -- closing --

    def close(self) -> None:
        """Close (FIN)."""
        if not self.closed:
            self.closed = True
            self.sock.close()

    def abort(self) -> None:
        """Close with SO_LINGER 0, so the kernel sends RST."""
        if not self.closed:
            self.closed = True
            self.sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            self.sock.close()

    def __enter__(self) -> SSEClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<SSEClient {self.path} status={self.status} events={len(self.events)}"
            f" eof={self.eof} ended={self.ended}>"
        )


def pump(
    clients: Sequence[SSEClient], until: Callable[[], bool], timeout: float
) -> None:
    """Read every client as data arrives until ``until()`` is true; raise
    ``TimeoutError`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        for client in clients:
            if not (client.eof or client.closed):
                sel.register(client.sock, selectors.EVENT_READ, client)
        while not until():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"not done after {timeout}s")
            if not sel.get_map():
                if until():
                    return
                raise TimeoutError("every stream ended before the condition was met")
            for key, _ in sel.select(min(left, 0.5)):
                client = key.data
                if not client.on_readable():
                    sel.unregister(client.sock)


def open_clients(
    port: int,
    path: str,
    count: int,
    headers: t.Mapping[str, str] | None = None,
    *,
    batch: int = 100,
    timeout: float = 30.0,
    **kwargs: t.Any,
) -> list[SSEClient]:
    """Open ``count`` streams, ``batch`` at a time (so the listen backlog
    never overflows), and wait until each has its head and first bytes."""
    clients: list[SSEClient] = []
    deadline = time.monotonic() + timeout
    try:
        for start in range(0, count, batch):
            group = [
                SSEClient(port, path, headers, **kwargs)
                for _ in range(min(batch, count - start))
            ]
            clients.extend(group)
            pump(
                group,
                lambda g=group: all(c.first_body_at or c.eof for c in g),  # type: ignore[misc]
                max(deadline - time.monotonic(), 0.1),
            )
            bad = [c for c in group if c.status != 200 or c.eof]
            if bad:
                raise ConnectionError(f"{len(bad)} streams failed to open: {bad[:3]}")
    except BaseException:
        for client in clients:
            client.close()
        raise
    return clients


def abort_all(clients: Sequence[SSEClient], rst: bool = True) -> None:
    for client in clients:
        if rst:
            client.abort()
        else:
            client.close()
