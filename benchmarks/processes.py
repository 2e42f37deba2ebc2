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
import ssl
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
    "ExitedEarly",
    "RedisClusterProcess",
    "RedisProcess",
    "ServerProcess",
    "TLSFiles",
    "raise_nofile",
    "redis_clients",
    "stop_process",
    "wait_for",
    "wait_started",
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


_S = t.TypeVar("_S", bound="ServerProcess")
_R = t.TypeVar("_R", bound="RedisProcess")


class JsonRoutes:
    """HTTP helpers for the routes that the example app, the benchmark app
    and the test apps share, over a subclass's :meth:`request`."""

    def request(self, method: str, path: str, body: t.Any = None) -> tuple[int, bytes]:
        raise NotImplementedError

    def get_json(self, path: str) -> t.Any:
        status, raw = self.request("GET", path)
        assert status == 200, (status, raw)
        return json.loads(raw)

    def publish(self, channel: str, data: t.Any, event: str | None = None) -> str:
        """``POST /publish/<channel>``; return the id the server assigned."""
        body: dict[str, t.Any] = {"data": data}
        if event is not None:
            body["event"] = event
        status, raw = self.request("POST", f"/publish/{channel}", body)
        assert status == 202, (status, raw)
        return str(json.loads(raw)["id"])


class ServerProcess(JsonRoutes):
    """An application server in a subprocess on ``HOST:port``, its output
    kept in a temporary file, with HTTP helpers for the routes that the
    example app, the benchmark app and the test apps share (``/healthz``,
    ``/publish/<channel>``). Subclasses give the command line
    (:meth:`command`)."""

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
        self.argv = self.command(kind, list(args))
        self._output = tempfile.TemporaryFile(prefix=f"server-{kind}-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    def command(self, kind: str, args: list[str]) -> list[str]:
        raise NotImplementedError

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self: _S, timeout: float = 30.0) -> _S:
        self.proc = subprocess.Popen(
            self.argv,
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._output,
            stderr=self._output,
        )
        what = f"{self.kind} server"
        try:
            wait_started(self.proc, self._healthy, timeout, 0.05, what)
        except (ExitedEarly, TimeoutError) as e:
            self.stop()
            raise type(e)(f"{e} (GET /healthz):\n{self.output()}") from None
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
        self._output.close()

    def output(self, limit: int = 20000) -> str:
        """What the server wrote (stdout and stderr), the last ``limit``
        characters."""
        f = self._output
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

    def connections(self) -> int:
        return int(self.get_json("/healthz")["connections"])

    def wait_connections(self, count: int, timeout: float) -> float:
        """Poll ``/healthz`` until ``connections == count``; return the
        seconds it took. Raises ``TimeoutError`` with the last figure."""
        start = time.monotonic()
        while (last := self.connections()) != count:
            if time.monotonic() - start > timeout:
                raise TimeoutError(
                    f"connections is {last}, not {count}, after {timeout}s"
                )
            time.sleep(0.01)
        return time.monotonic() - start


class AppServer(ServerProcess):
    """:mod:`benchmarks.app` in a subprocess on ``HOST:port``. ``kind`` is
    ``"gunicorn"`` (``-k gevent -w 1``, more workers with ``args``) or
    ``"pywsgi"``."""

    def command(self, kind: str, args: list[str]) -> list[str]:
        py = sys.executable
        if kind == "gunicorn":
            return [
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
        if kind == "pywsgi":
            return [py, "-m", APP, *args]
        raise ValueError(f"unknown server kind {kind!r}")

    def log(self, limit: int = 20000) -> str:
        return self.output(limit)

    def worker_pid(self) -> int:
        """The PID that answers requests (a worker under gunicorn)."""
        return int(self.get_json("/counters")["pid"])

    def __repr__(self) -> str:
        return f"<AppServer {self.kind} :{self.port}>"


class TLSFiles(t.Protocol):
    """A server certificate, its key and the CA that signed it (paths)."""

    cert: str
    key: str
    ca: str


class RedisProcess:
    """``redis-server`` on ``HOST:port``, in a temporary directory, with no
    persistence but ``appendonly``; ``extra`` options go last on its command
    line (:meth:`argv`), with ``password`` it requires ``AUTH`` (also of its
    replicas, as ``masterauth``), and with ``tls`` it speaks TLS only (its
    plain port is off)."""

    #: The name of the clients :meth:`client` makes.
    client_name = "bench"

    def __init__(
        self,
        binary: str | None = None,
        *,
        appendonly: bool = False,
        extra: Sequence[str] = (),
        password: str | None = None,
        port: int | None = None,
        tls: TLSFiles | None = None,
    ) -> None:
        binary = binary or shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH")
        self.binary = binary
        self.appendonly = appendonly
        self.extra = list(extra)
        self.password = password
        self.port = port or free_port()
        self.tls = tls
        self._tmp = tempfile.TemporaryDirectory(prefix="redis-")
        self.dir = self._tmp.name
        self.log_path = os.path.join(self.dir, "redis.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self._clients: list[redis.Redis] = []

    @property
    def url(self) -> str:
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{HOST}:{self.port}/0"

    @property
    def options(self) -> dict[str, t.Any]:
        """What redis-py needs besides the URL (the CA of a TLS server)."""
        if self.tls is None:
            return {}
        return {"ssl_ca_certs": self.tls.ca}

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def argv(self) -> list[str]:
        tls = self.tls
        if tls is not None:
            ports = ["--port", "0", "--tls-port", str(self.port)]
            ports += ["--tls-cert-file", tls.cert, "--tls-key-file", tls.key]
            ports += ["--tls-ca-cert-file", tls.ca, "--tls-auth-clients", "no"]
        else:
            ports = ["--port", str(self.port)]
        if self.password:
            ports += ["--requirepass", self.password, "--masterauth", self.password]
        return [
            self.binary,
            *ports,
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
            *self.extra,
        ]

    def start(self: _R, timeout: float = 10.0) -> _R:
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
            with contextlib.ExitStack() as stack:
                s = stack.enter_context(
                    socket.create_connection((HOST, self.port), timeout=0.5)
                )
                if self.tls is not None:
                    context = ssl.create_default_context(cafile=self.tls.ca)
                    s = stack.enter_context(
                        context.wrap_socket(s, server_hostname=HOST)
                    )
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
            stop_process(self.proc, timeout, signal.SIGKILL if kill else signal.SIGTERM)

    def client(self, **kwargs: t.Any) -> redis.Redis:
        """A redis-py client named :attr:`client_name`, closed by
        :meth:`close`; ``kwargs`` go to ``redis.Redis``."""
        import redis

        kwargs.setdefault("client_name", self.client_name)
        kwargs.setdefault("password", self.password)
        kwargs.setdefault("socket_timeout", 5)
        client = redis.Redis.from_url(self.url, **{**self.options, **kwargs})
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
        tls = " tls" if self.tls else ""
        return f"<{type(self).__name__} :{self.port}{tls} pid={pid}>"


class RedisClusterProcess:
    """A Redis Cluster of ``size`` masters without replicas: ``redis-server
    --cluster-enabled yes`` on free ports, joined by ``redis-cli --cluster
    create``."""

    def __init__(self, size: int = 3) -> None:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli is not on PATH")
        self.cli = cli
        self.nodes = [
            RedisProcess(
                extra=[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-port",
                    str(free_port()),
                    "--cluster-config-file",
                    "nodes.conf",
                ]
            )
            for _ in range(size)
        ]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{HOST}:{n.port}" for n in self.nodes)

    def start(self, timeout: float = 30.0) -> RedisClusterProcess:
        for node in self.nodes:
            node.start()
        subprocess.run(
            [
                self.cli,
                "--cluster",
                "create",
                *(f"{HOST}:{n.port}" for n in self.nodes),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            timeout=60,
        )

        def settled() -> bool:
            for node in self.nodes:
                info = node.client().execute_command("CLUSTER INFO")
                text = (
                    info
                    if isinstance(info, dict)
                    else dict(
                        line.split(":", 1)
                        for line in info.decode().splitlines()
                        if ":" in line
                    )
                )
                if str(text.get("cluster_state")) != "ok":
                    return False
            return True

        wait_for(settled, timeout)
        return self

    def master_of(self, slot: int) -> RedisProcess:
        """The node that serves ``slot``."""
        by_port = {n.port: n for n in self.nodes}
        for start, end, master, *_ in (
            self.nodes[0].client().execute_command("CLUSTER SLOTS")
        ):
            if int(start) <= slot <= int(end):
                return by_port[int(master[1])]
        raise LookupError(slot)

    def close(self) -> None:
        for node in self.nodes:
            node.close()


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
