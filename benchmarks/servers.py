"""Start and stop the servers under test, each on a free port, each stopped by
the PID the suite started (then its children, by PID)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import typing as t
import urllib.error
import urllib.request
from pathlib import Path

from benchmarks import procfs

__all__ = ["RedisServer", "Server", "free_port", "start_redis", "start_server"]

ROOT = Path(__file__).resolve().parent.parent
#: Streams per server process the suite may open, plus slack.
NOFILE = 65536
#: Heartbeat for both servers: long enough that no heartbeat falls inside a
#: measurement (the baseline uses the same value).
HEARTBEAT = 300.0
SERVER_CPU = 0
CLIENT_CPU = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pin(cpu: int) -> list[str]:
    if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        return ["taskset", "-c", str(cpu)]
    return []


def _raise_nofile() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, max(hard, NOFILE)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def raise_nofile() -> int:
    """Raise this process's file limit (children inherit it); return it."""
    import resource

    _raise_nofile()
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _stop(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM the process we started, wait, then SIGKILL what is left of its
    tree, PID by PID."""
    if proc.poll() is not None:
        return
    started = {pid: procfs.start_time(pid) for pid in procfs.descendants(proc.pid)}
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        pass
    for pid, start in reversed(started.items()):
        # Only the very processes seen above: a reused PID has another start.
        if start is not None and procfs.start_time(pid) == start:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


class Server:
    """A running HTTP server under test."""

    def __init__(
        self,
        kind: str,
        label: str,
        proc: subprocess.Popen[bytes],
        port: int,
        log: Path,
        workers: int,
    ) -> None:
        self.kind = kind
        self.label = label
        self.proc = proc
        self.port = port
        self.log = log
        self.workers = workers

    @property
    def pid(self) -> int:
        return self.proc.pid

    def pids(self) -> list[int]:
        return procfs.descendants(self.proc.pid)

    def worker_pids(self) -> list[int]:
        """The processes that serve requests (gunicorn's workers, or the
        baseline's single process)."""
        pids = self.pids()
        if self.kind.startswith("baseline"):
            return pids[:1]
        return [pid for pid in pids if pid != self.proc.pid]

    def rss(self) -> int:
        return procfs.tree_rss(self.proc.pid)

    def cpu(self) -> float:
        return procfs.tree_cpu(self.proc.pid)

    def system_cpu(self) -> float:
        return procfs.tree_system(self.proc.pid)

    def sockets(self) -> int:
        return procfs.socket_count(self.pids())

    def get(self, path: str, timeout: float = 5.0) -> bytes:
        url = f"http://127.0.0.1:{self.port}{path}"
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return t.cast(bytes, r.read())

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.label} exited with {self.proc.returncode}:\n"
                    + self.log_tail()
                )
            try:
                self.get("/healthz", timeout=2.0)
            except (OSError, urllib.error.URLError):
                time.sleep(0.1)
                continue
            if len(self.worker_pids()) >= self.workers:
                return
            time.sleep(0.1)
        raise RuntimeError(
            f"{self.label} not ready in {timeout} s:\n" + self.log_tail()
        )

    def stop(self) -> None:
        _stop(self.proc)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(
    kind: str,
    outdir: Path,
    *,
    workers: int = 1,
    redis_url: str | None = None,
    env: dict[str, str] | None = None,
) -> Server:
    """``kind`` is ``library`` (example app on gunicorn -k gevent),
    ``baseline`` (the hand-written app on gevent's WSGIServer) or
    ``baseline-nodelay`` (the same with TCP_NODELAY, as gunicorn sets it)."""
    port = free_port()
    environ = dict(os.environ)
    environ.pop("EVENTSTREAM_REDIS_URL", None)
    environ["PYTHONUNBUFFERED"] = "1"
    environ["PYTHONPATH"] = str(ROOT) + os.pathsep + environ.get("PYTHONPATH", "")
    if env:
        environ.update(env)
    if kind == "library":
        environ["EVENTSTREAM_HEARTBEAT"] = str(HEARTBEAT)
        if redis_url:
            environ["EVENTSTREAM_REDIS_URL"] = redis_url
        label = f"library (gunicorn -k gevent -w {workers}" + (
            ", Redis)" if redis_url else ", memory)"
        )
        cmd = [
            sys.executable,
            "-m",
            "gunicorn",
            "-k",
            "gevent",
            "-w",
            str(workers),
            "--worker-connections",
            "20000",
            "--backlog",
            "2048",
            "--timeout",
            "300",
            "--graceful-timeout",
            "5",
            # Publishers keep their connections between rounds (gunicorn's
            # default closes idle keep-alive connections after 2 s; the
            # baseline's WSGIServer keeps them).
            "--keep-alive",
            "300",
            "--log-level",
            "warning",
            "-b",
            f"127.0.0.1:{port}",
            "example_app:create_app()",
        ]
    elif kind in ("baseline", "baseline-nodelay"):
        environ["BASELINE_HEARTBEAT"] = str(HEARTBEAT)
        label = "baseline (Flask + gevent WSGIServer + a Queue per client)"
        if kind == "baseline-nodelay":
            environ["BASELINE_NODELAY"] = "1"
            label = "baseline + TCP_NODELAY"
        cmd = [sys.executable, "-m", "benchmarks.baseline", str(port)]
    else:
        raise ValueError(kind)
    log = outdir / f"server-{kind}-{port}.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            _pin(SERVER_CPU) + cmd,
            cwd=ROOT,
            env=environ,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            preexec_fn=_raise_nofile,
        )
    server = Server(kind, label, proc, port, log, workers)
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


class RedisServer:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, tmp: str) -> None:
        self.proc = proc
        self.port = port
        self.tmp = tmp

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self, *args: str, timeout: float = 5.0) -> bytes:
        """Send one command with RESP and return the raw reply (bulk strings
        only, which is what CLIENT LIST and PING need here)."""
        payload = f"*{len(args)}\r\n".encode()
        for arg in args:
            payload += f"${len(arg.encode())}\r\n{arg}\r\n".encode()
        with socket.create_connection(("127.0.0.1", self.port), timeout) as s:
            s.sendall(payload)
            data = b""
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                data += chunk
                if data.startswith((b"+", b"-", b":")) and data.endswith(b"\r\n"):
                    break
                if data.startswith(b"$"):
                    head, _, rest = data.partition(b"\r\n")
                    if int(head[1:]) < 0 or len(rest) >= int(head[1:]) + 2:
                        break
            return data

    def client_list(self) -> list[dict[str, str]]:
        raw = self.command("CLIENT", "LIST")
        _, _, body = raw.partition(b"\r\n")
        clients = []
        for line in body.decode(errors="replace").splitlines():
            fields = dict(item.split("=", 1) for item in line.split(" ") if "=" in item)
            if fields:
                clients.append(fields)
        return clients

    def stop(self) -> None:
        _stop(self.proc)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_redis(outdir: Path) -> RedisServer | None:
    """A private redis-server on a free port, or ``None`` without the binary."""
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    port = free_port()
    tmp = tempfile.mkdtemp(prefix="bench-redis-")
    log = outdir / f"redis-{port}.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            _pin(CLIENT_CPU)
            + [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                tmp,
                "--maxclients",
                "20000",
            ],
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            preexec_fn=_raise_nofile,
        )
    server = RedisServer(proc, port, tmp)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            if server.command("PING", timeout=1.0).startswith(b"+PONG"):
                return server
        except OSError:
            pass
        time.sleep(0.05)
    server.stop()
    raise RuntimeError(
        "redis-server did not start:\n" + log.read_text(errors="replace")
    )
