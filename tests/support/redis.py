"""A real ``redis-server`` for the tests (loaded as a plugin by tests/conftest.py).

Fixtures:

``redis_server``
    A :class:`RedisServer` on a free port of 127.0.0.1 with a temporary
    directory and no persistence (``--save ''``), stopped by PID in teardown.
``redis_server_aof``
    The same with ``--appendonly yes``, for tests that restart it.
``start_redis(**options)``
    A factory for servers with other options (``appendonly=True``,
    ``extra=["--stream-node-max-entries", "2"]``, ``tls=True``: TLS only, on
    a certificate of the run's own CA, see tests/support/tls.py).
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

import json
import threading
import time
import typing as t
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence

import pytest

from benchmarks.processes import RedisProcess
from flask_eventstream.testing import broker
from tests.support.servers import report_on_failure

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
    "sse_id",
    "stream_entries",
    "stream_key",
]


class RedisServer(RedisProcess):
    """``redis-server`` in a subprocess on ``127.0.0.1:port``, for the
    tests: its clients are named ``tests``, and it gives the app
    configuration that reaches it."""

    client_name = "tests"

    def config(self) -> dict[str, t.Any]:
        """App configuration for this server."""
        config: dict[str, t.Any] = {"EVENTSTREAM_REDIS_URL": self.url}
        if self.options:
            config["EVENTSTREAM_REDIS_OPTIONS"] = self.options
        return config

    def env(self) -> dict[str, str]:
        """The same as environment variables, for the example app."""
        return {
            k: v if isinstance(v, str) else json.dumps(v)
            for k, v in self.config().items()
        }

    def restart(self, *, kill: bool = False) -> None:
        self.stop(kill=kill)
        self.start()


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
        broker(app).close()


def stream_key(channel: str) -> str:
    """The key of a channel's stream (the channel is its hash tag)."""
    return f"eventstream:{{{channel}}}"


def sse_id(entry_id: str | bytes) -> str:
    """The id that a stream on one channel gets for a stream entry
    (``<epoch>-<offset>`` -> ``<epoch in base 36>.<offset>``)."""
    from flask_eventstream.backends.positions import format_position
    from flask_eventstream.backends.positions import Position

    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    epoch, offset = text.split("-")
    return format_position(Position(int(epoch), int(offset)))


def stream_entries(server: RedisServer, channel: str) -> list[tuple[str, str]]:
    """(SSE id, data) of every entry of a channel's stream."""
    return [
        (sse_id(raw_id), fields[b"d"].decode())
        for raw_id, fields in server.client().xrange(stream_key(channel))
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
        #: (time.monotonic() when answered, status) of every POST.
        self.answers: list[tuple[float, int]] = []
        self.n = 0

    def run(self) -> None:
        while not self.stopped.is_set():
            data = f"e{self.n}"
            self.n += 1
            try:
                # A publish whose outcome Redis left unsure retries for up to
                # 10 s.
                status, raw = self.server.request(
                    "POST", f"/publish/{self.channel}", {"data": data}, timeout=30
                )
            except OSError as e:
                self.errors.append(f"{data}: {e!r}")
                continue
            self.answers.append((time.monotonic(), status))
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
    """``start_redis(appendonly=False, extra=(), tls=False)`` -> a running
    :class:`RedisServer`, killed by PID in teardown."""
    from tests.conftest import require_tool

    binary = require_tool("redis-server", "Redis")
    servers: list[RedisServer] = []
    request.node.stash[_REDIS] = servers

    def start(
        *, appendonly: bool = False, extra: Sequence[str] = (), tls: bool = False
    ) -> RedisServer:
        files = request.getfixturevalue("tls_files") if tls else None
        server = RedisServer(binary, appendonly=appendonly, extra=extra, tls=files)
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
        app = create_app({**(server or redis_server).config(), **(config or {})})
        apps.append(app)
        return app

    yield make
    for app in apps:
        close_app(app)
