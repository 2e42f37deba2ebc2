"""The servers of the quick benchmarks (``quick_core``, ``redis_quick``), each
a subprocess on a free port of 127.0.0.1, stopped by the PID started here.

:class:`AppServer`
    :mod:`benchmarks.app` under ``gunicorn -k gevent`` or gevent's
    ``WSGIServer`` (``python -m benchmarks.app``), configured through
    ``EVENTSTREAM_*`` variables; a few HTTP helpers for its routes.
:class:`RedisProcess`
    ``redis-server`` (from ``PATH``) in a temporary directory, which can stop
    (SIGTERM, so it writes its AOF; or SIGKILL) and start again on the same
    port. :mod:`benchmarks.sentinel` builds a Sentinel topology of them.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import typing as t
from collections.abc import Callable
from collections.abc import Sequence
from pathlib import Path

from benchmarks.servers import free_port
from benchmarks.servers import raise_nofile
from benchmarks.sseclient import HOST

if t.TYPE_CHECKING:
    import redis

__all__ = [
    "APP",
    "AppServer",
    "RedisProcess",
    "raise_nofile",
    "redis_clients",
    "wait_for",
]

ROOT = Path(__file__).resolve().parent.parent
APP = "benchmarks.app"


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


def _stop(proc: subprocess.Popen[bytes], timeout: float, signum: int) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signum)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _start(
    proc: subprocess.Popen[bytes], ready: Callable[[], bool], timeout: float, what: str
) -> None:
    """Poll ``ready()`` (a port that is not open yet: no event to await)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not answer within {timeout}s")
        time.sleep(0.05)


class AppServer:
    """:mod:`benchmarks.app` in a subprocess on ``HOST:port``. ``kind`` is
    ``"gunicorn"`` (``-k gevent -w 1``, more workers with ``args``) or
    ``"pywsgi"``."""

    def __init__(
        self,
        kind: str,
        env: t.Mapping[str, str] | None = None,
        args: Sequence[str] = (),
    ) -> None:
        self.kind = kind
        self.port = free_port()
        self.env = dict(os.environ)
        self.env.pop("EVENTSTREAM_REDIS_URL", None)
        self.env.update(
            PYTHONUNBUFFERED="1",
            PYTHONPATH=os.pathsep.join(
                [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
            ),
            EXAMPLE_HOST=HOST,
            EXAMPLE_PORT=str(self.port),
        )
        self.env.update(env or {})
        py = sys.executable
        if kind == "gunicorn":
            self.argv = [
                py,
                "-m",
                "gunicorn",
                "-k",
                "gevent",
                "-w",
                "1",
                "-b",
                f"{HOST}:{self.port}",
                "--worker-connections",
                "4000",
                "--no-control-socket",
                *args,
                f"{APP}:create_app()",
            ]
        elif kind == "pywsgi":
            self.argv = [py, "-m", APP, *args]
        else:
            raise ValueError(f"unknown server kind {kind!r}")
        self._log = tempfile.TemporaryFile(prefix=f"bench-{kind}-")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> AppServer:
        self.proc = subprocess.Popen(
            self.argv,
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
        )
        try:
            _start(self.proc, self._healthy, timeout, f"{self.kind} server")
        except (RuntimeError, TimeoutError) as e:
            self.stop()
            raise type(e)(f"{e} (GET /healthz):\n{self.log()}") from None
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
        """The PID that answers requests (a worker under gunicorn)."""
        return int(self.get_json("/counters")["pid"])

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL (also to leftover workers) after ``timeout``."""
        if self.proc is None:
            return
        kids = self.children()
        _stop(self.proc, timeout, signal.SIGTERM)
        for pid in kids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def close(self) -> None:
        self.stop()
        self._log.close()

    def log(self, limit: int = 20000) -> str:
        if self._log.closed:
            return ""
        self._log.flush()
        self._log.seek(0)
        text = self._log.read().decode("utf-8", "replace")
        self._log.seek(0, os.SEEK_END)
        return text[-limit:]

    # -- HTTP --

    def request(
        self,
        method: str,
        path: str,
        body: t.Any = None,
        timeout: float = 10.0,
    ) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=timeout)
        try:
            headers = {}
            data = None
            if body is not None:
                data = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def publish(self, channel: str, data: t.Any) -> str:
        """``POST /publish/<channel>``; return the id the server assigned."""
        status, raw = self.request("POST", f"/publish/{channel}", {"data": data})
        if status != 202:
            raise RuntimeError(f"POST /publish/{channel}: {status} {raw!r}")
        return str(json.loads(raw)["id"])

    def get_json(self, path: str) -> t.Any:
        status, raw = self.request("GET", path)
        if status != 200:
            raise RuntimeError(f"GET {path}: {status} {raw!r}")
        return json.loads(raw)

    def connections(self) -> int:
        return int(self.get_json("/healthz")["connections"])

    def wait_connections(self, count: int, timeout: float) -> float:
        """Poll ``/healthz`` until ``connections == count``; return the
        seconds it took."""
        start = time.monotonic()
        while (last := self.connections()) != count:
            if time.monotonic() - start > timeout:
                raise TimeoutError(
                    f"connections is {last}, not {count}, after {timeout}s"
                )
            time.sleep(0.01)
        return time.monotonic() - start

    def __repr__(self) -> str:
        return f"<AppServer {self.kind} :{self.port}>"


class RedisProcess:
    """``redis-server`` on ``HOST:port``, in a temporary directory, with no
    persistence but ``appendonly``; ``extra`` options go last on its command
    line (:meth:`argv`), and with ``password`` it requires ``AUTH`` (also of
    its replicas, as ``masterauth``)."""

    def __init__(
        self,
        *,
        appendonly: bool = False,
        extra: Sequence[str] = (),
        password: str | None = None,
        binary: str | None = None,
    ) -> None:
        binary = binary or shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH")
        self.binary = binary
        self.appendonly = appendonly
        self.extra = list(extra)
        self.password = password
        self.port = free_port()
        self._tmp = tempfile.TemporaryDirectory(prefix="bench-redis-")
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
        auth = []
        if self.password:
            auth = ["--requirepass", self.password, "--masterauth", self.password]
        return [
            self.binary,
            "--port",
            str(self.port),
            *auth,
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
            *self.extra,
        ]

    def start(self, timeout: float = 10.0) -> RedisProcess:
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
            _start(self.proc, self._ping, timeout, "redis-server")
        except (RuntimeError, TimeoutError) as e:
            raise type(e)(f"{e}:\n{self.log()}") from None
        return self

    def _ping(self) -> bool:
        try:
            with socket.create_connection((HOST, self.port), timeout=0.5) as s:
                if self.password:
                    s.sendall(f"AUTH {self.password}\r\n".encode())
                    if not s.recv(64).startswith(b"+OK"):
                        return False
                s.sendall(b"PING\r\n")
                reply = s.recv(64)
        except OSError:
            return False
        return reply.startswith(b"+PONG")  # not "-LOADING" while reading the AOF

    def stop(self, *, kill: bool = False, timeout: float = 10.0) -> None:
        """SIGTERM (Redis writes its AOF and exits) or SIGKILL."""
        if self.proc is not None:
            _stop(self.proc, timeout, signal.SIGKILL if kill else signal.SIGTERM)

    def client(self) -> redis.Redis:
        """A redis-py client named ``bench``, closed by :meth:`close`."""
        import redis

        client = redis.Redis.from_url(
            self.url, client_name="bench", password=self.password, socket_timeout=5
        )
        self._clients.append(client)
        return client

    def log(self, limit: int = 5000) -> str:
        """The end of the server's log file."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()[-limit:]
        except OSError:
            return ""

    def close(self) -> None:
        for client in self._clients:
            with contextlib.suppress(Exception):
                client.close()
        self._clients.clear()
        self.stop(kill=True)
        self._tmp.cleanup()

    def __repr__(self) -> str:
        pid = self.proc and self.proc.pid
        return f"<{type(self).__name__} :{self.port} pid={pid}>"


def redis_clients(
    client: redis.Redis, pid: int | None = None
) -> list[dict[str, t.Any]]:
    """``CLIENT LIST`` entries other than ``bench``; with ``pid``, those the
    library named for that process (``flask-eventstream:<role>:<pid>``)."""
    found = [
        c
        for c in t.cast(list[dict[str, t.Any]], client.client_list())
        if c.get("name") != "bench"
    ]
    if pid is not None:
        found = [
            c
            for c in found
            if str(c.get("name", "")).startswith("flask-eventstream:")
            and str(c["name"]).rsplit(":", 1)[1] == str(pid)
        ]
    return found
