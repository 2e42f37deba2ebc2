"""A real ``redis-server`` for the tests (loaded as a plugin by tests/conftest.py).

Fixtures:

``redis_server``
    A :class:`RedisServer` on a free port of 127.0.0.1 with a temporary
    directory and no persistence (``--save ''``), stopped by PID in teardown.
``redis_server_aof``
    The same with ``--appendonly yes``, for tests that restart it.
``start_redis(**options)``
    A factory for servers with other options (``appendonly=True``,
    ``extra=["--stream-node-max-entries", "2"]``).
``redis_app(config=None, server=None)``
    The example app on a Redis server (``redis_server`` by default); its
    backend is closed in teardown.

:class:`RedisServer` can stop (SIGTERM, which makes Redis flush its AOF; or
SIGKILL) and start again on the same port. Under ``CI=true`` a missing
``redis-server`` fails the test instead of skipping it.

Helpers: :func:`stream_entries` (a channel's stream as stored),
:func:`redis_clients` (``CLIENT LIST``), :class:`Publisher` (a thread that
POSTs numbered events and keeps every answer), :func:`ids_of`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
import typing as t
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence

import pytest

from flask_eventstream._state import state_for
from tests.support.servers import ExitedEarly
from tests.support.servers import free_port
from tests.support.servers import report_on_failure
from tests.support.servers import stop_process
from tests.support.servers import wait_started

if t.TYPE_CHECKING:
    import redis
    from flask import Flask

    from tests.support.servers import Server
    from tests.support.servers import SSEClient

HOST = "127.0.0.1"

__all__ = [
    "Publisher",
    "RedisServer",
    "close_app",
    "ids_of",
    "redis_clients",
    "stream_entries",
]


class RedisServer:
    """``redis-server`` in a subprocess on ``127.0.0.1:port``."""

    def __init__(
        self,
        binary: str = "redis-server",
        *,
        appendonly: bool = False,
        extra: Sequence[str] = (),
        port: int | None = None,
    ) -> None:
        self.binary = binary
        self.appendonly = appendonly
        self.extra = list(extra)
        self.port = port or free_port()
        self._tmp = tempfile.TemporaryDirectory(prefix="eventstream-redis-")
        self.dir = self._tmp.name
        self.log_path = os.path.join(self.dir, "redis.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self._clients: list[redis.Redis] = []

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def argv(self) -> list[str]:
        argv = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            HOST,
            "--dir",
            self.dir,
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--logfile",
            self.log_path,
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
        ]
        return argv + self.extra

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start (again, on the same port) and wait until it answers PING
        with its data loaded."""
        assert not self.running, "already running"
        self.proc = subprocess.Popen(
            self.argv(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_started(self.proc, self._ping, timeout, 0.02, "redis-server")
        except (ExitedEarly, TimeoutError) as e:
            raise type(e)(f"{e}:\n{self.log()}") from None
        return self

    def _ping(self) -> bool:
        try:
            with socket.create_connection((HOST, self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                reply = s.recv(64)
        except OSError:
            return False
        # "-LOADING ..." while the AOF is read.
        return reply.startswith(b"+PONG")

    def stop(self, *, kill: bool = False, timeout: float = 10.0) -> None:
        """SIGTERM (Redis writes its AOF and exits) or SIGKILL; then wait
        until the port is free to bind again."""
        proc = self.proc
        if proc is None:
            return
        stop_process(proc, timeout, signal.SIGKILL if kill else signal.SIGTERM)

    def restart(self, *, kill: bool = False) -> None:
        self.stop(kill=kill)
        self.start()

    def client(self, **kwargs: t.Any) -> redis.Redis:
        """A client for assertions (named ``tests``); closed in teardown."""
        import redis

        kwargs.setdefault("client_name", "tests")
        kwargs.setdefault("socket_timeout", 5)
        client = redis.Redis.from_url(self.url, **kwargs)
        self._clients.append(client)
        return client

    def log(self, limit: int = 5000) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            return ""
        return text[-limit:]

    def close(self) -> None:
        for client in self._clients:
            with contextlib.suppress(Exception):
                client.close()
        self._clients.clear()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._tmp.cleanup()

    def __repr__(self) -> str:
        return f"<RedisServer :{self.port} pid={self.proc and self.proc.pid}>"


def redis_clients(
    client: redis.Redis, pid: int | None = None
) -> list[dict[str, t.Any]]:
    """CLIENT LIST entries other than the tests' own; with ``pid``, only
    those that the library named for that process
    (``flask-eventstream:<role>:<pid>``)."""
    clients = t.cast(list[dict[str, t.Any]], client.client_list())
    found = [c for c in clients if c.get("name") != "tests"]
    if pid is not None:
        found = [
            c
            for c in found
            if str(c.get("name", "")).startswith("flask-eventstream:")
            and str(c["name"]).rsplit(":", 1)[1] == str(pid)
        ]
    return found


def close_app(app: Flask) -> None:
    """Close an app's broker (its Redis reader and connections)."""
    if "eventstream" in app.extensions:
        state_for(app).broker.close()


def stream_entries(server: RedisServer, channel: str) -> list[tuple[str, str]]:
    """(id, data) of every entry of a channel's stream."""
    return [
        (raw_id.decode(), fields[b"d"].decode())
        for raw_id, fields in server.client().xrange(f"eventstream:{channel}")
    ]


def ids_of(client: SSEClient) -> list[str]:
    return [e.id for e in client.events if e.event != "subscribed"]


class Publisher(threading.Thread):
    """POSTs numbered events one after another until stopped; keeps what
    each POST answered."""

    def __init__(self, server: Server, channel: str, pause: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.channel = channel
        self.pause = pause
        self.stopped = threading.Event()
        self.accepted: list[tuple[str, str]] = []  # (id, data) of 202s
        self.refused: list[str] = []  # data of 503s
        self.errors: list[str] = []  # other outcomes (must stay empty)
        self.n = 0

    def run(self) -> None:
        while not self.stopped.is_set():
            data = f"e{self.n}"
            self.n += 1
            try:
                status, raw = self.server.request(
                    "POST", f"/publish/{self.channel}", {"data": data}
                )
            except OSError as e:
                self.errors.append(f"{data}: {e!r}")
                continue
            if status == 202:
                self.accepted.append((json.loads(raw)["id"], data))
            elif status == 503:
                self.refused.append(data)
            else:
                self.errors.append(f"{data}: {status} {raw!r}")
            time.sleep(self.pause)

    def wait_for(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.accepted) < count:
            assert self.is_alive() and time.monotonic() < deadline, (
                len(self.accepted),
                self.errors,
            )
            time.sleep(0.01)

    def wait_refused(self, count: int, timeout: float) -> None:
        """Wait until at least ``count`` POSTs were answered 503."""
        deadline = time.monotonic() + timeout
        while len(self.refused) < count:
            assert time.monotonic() < deadline, "no POST got a 503"
            time.sleep(0.01)

    def stop(self) -> None:
        self.stopped.set()
        self.join(30)
        assert not self.is_alive()


_REDIS = pytest.StashKey[list[RedisServer]]()

pytest_runtest_makereport = report_on_failure(
    _REDIS, lambda server: (f"log of {server!r}", server.log())
)


@pytest.fixture
def start_redis(request: pytest.FixtureRequest) -> Iterator[Callable[..., RedisServer]]:
    """``start_redis(appendonly=False, extra=())`` -> a running
    :class:`RedisServer`, killed by PID in teardown."""
    from tests.conftest import require_tool

    binary = require_tool("redis-server", "Redis")
    servers: list[RedisServer] = []
    request.node.stash[_REDIS] = servers

    def start(*, appendonly: bool = False, extra: Sequence[str] = ()) -> RedisServer:
        server = RedisServer(binary, appendonly=appendonly, extra=extra)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def redis_server(start_redis: Callable[..., RedisServer]) -> RedisServer:
    return start_redis()


@pytest.fixture
def redis_server_aof(start_redis: Callable[..., RedisServer]) -> RedisServer:
    return start_redis(appendonly=True)


@pytest.fixture
def redis_app(
    redis_server: RedisServer,
) -> Iterator[Callable[..., Flask]]:
    """``redis_app(config=None, server=None)`` -> the example app on Redis."""
    from example_app import create_app

    apps: list[Flask] = []

    def make(
        config: t.Mapping[str, t.Any] | None = None, server: RedisServer | None = None
    ) -> Flask:
        url = (server or redis_server).url
        app = create_app({"EVENTSTREAM_REDIS_URL": url, **(config or {})})
        apps.append(app)
        return app

    yield make
    for app in apps:
        close_app(app)
