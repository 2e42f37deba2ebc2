"""``flask eventstream tail CHANNEL... [--last-event-id ID]`` as a user runs
it: a subprocess (``python -m flask``) on the same Redis as a 3-worker
gunicorn server, printing what is published through each worker."""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import sys
import time
import typing as t
from collections.abc import Callable
from collections.abc import Iterator

import pytest
from flask import Flask

from flask_eventstream import Event
from flask_eventstream import EventStream
from flask_eventstream.sse import encode
from tests.support.redis import RedisServer
from tests.support.servers import ROOT
from tests.support.servers import Server
from tests.support.workers import worker_connections
from tests.support.workers import WorkerConnection

APP = "tests.apps.streams:create_app"
#: The example's signing key, the same for the server and the command.
SECRET_KEY = "tail-test-secret"


class Tail:
    """``python -m flask --app APP eventstream tail ...`` in a subprocess."""

    def __init__(self, redis_url: str, *args: str) -> None:
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("EVENTSTREAM_", "EXAMPLE_", "FLASK_"))
        }
        env.update(
            EVENTSTREAM_REDIS_URL=redis_url,
            EXAMPLE_SECRET_KEY=SECRET_KEY,
            PYTHONPATH=os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")])),
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flask", "--app", APP, "eventstream", "tail", *args],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.out = b""
        self.err = b""

    def _read(self, until: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None and self.proc.stderr is not None
        with selectors.DefaultSelector() as sel:
            for f in (self.proc.stdout, self.proc.stderr):
                os.set_blocking(f.fileno(), False)
                sel.register(f, selectors.EVENT_READ)
            while not until():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"tail: not done after {timeout}s; stdout {self.out!r},"
                        f" stderr {self.err!r}"
                    )
                if not sel.get_map():
                    # Both pipes closed: the process is exiting.
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.proc.wait(left)
                    if until():
                        return
                    raise AssertionError(
                        f"tail exited ({self.proc.poll()}): stdout {self.out!r},"
                        f" stderr {self.err!r}"
                    )
                for key, _ in sel.select(min(left, 0.5)):
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        sel.unregister(key.fileobj)
                    elif key.fileobj is self.proc.stdout:
                        self.out += chunk
                    else:
                        self.err += chunk

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until it says it is subscribed (what is published after that is
        printed)."""
        self._read(lambda: b"Ctrl-C to stop" in self.err, timeout)

    def blocks(self, count: int, timeout: float = 10.0) -> list[bytes]:
        """Wait for ``count`` complete SSE blocks; return every block so far."""
        self._read(lambda: self.out.count(b"\n\n") >= count, timeout)
        return [b + b"\n\n" for b in self.out.split(b"\n\n")[:-1]]

    def interrupt(self, timeout: float = 10.0) -> int:
        """Ctrl-C: SIGINT, then the exit code."""
        self.proc.send_signal(signal.SIGINT)
        self._read(lambda: self.proc.poll() is not None, timeout)
        self.proc.wait(timeout)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.out += self.proc.stdout.read() or b""
        self.err += self.proc.stderr.read() or b""
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


@pytest.fixture
def tails() -> Iterator[list[Tail]]:
    started: list[Tail] = []
    yield started
    for tail in started:
        tail.kill()


def block(event_id: str, data: t.Any, event: str | None) -> bytes:
    """The exact SSE block a subscriber receives for a published event."""
    return encode(Event(data=data, event=event, id=event_id))


def publish_round(
    workers: list[WorkerConnection], tag: str
) -> tuple[list[bytes], list[str]]:
    """Two events on tailed channels and one on another, through each
    worker; returns the blocks of the tailed ones (in publish order) and
    every id."""
    expected: list[bytes] = []
    ids = []
    for i, worker in enumerate(workers):
        data = {"from": worker.pid, "tag": tag, "n": i}
        a = worker.publish("alpha", data, event="chat")
        expected.append(block(a, data, "chat"))
        worker.publish("gamma", f"untailed {tag} {i}")
        b = worker.publish("beta", f"plain {tag} {i}\nsecond line")
        expected.append(block(b, f"plain {tag} {i}\nsecond line", None))
        ids += [a, b]
    return expected, ids


@pytest.mark.redis
@pytest.mark.server
def test_tail_prints_events_from_every_worker_then_resumes(
    start_server: Callable[..., Server],
    redis_server: RedisServer,
    tails: list[Tail],
) -> None:
    server = start_server(
        "gunicorn",
        app=APP,
        env={
            "EVENTSTREAM_REDIS_URL": redis_server.url,
            "EXAMPLE_SECRET_KEY": SECRET_KEY,
        },
        args=["-w", "3", "--keep-alive", "60"],
    )
    workers = worker_connections(server, 3)
    try:
        tail = Tail(redis_server.url, "alpha", "beta")
        tails.append(tail)
        tail.wait_ready()
        assert tail.err == b"Tailing alpha, beta; Ctrl-C to stop.\n"

        expected, ids = publish_round(workers, "live")
        blocks = tail.blocks(len(expected))
        assert blocks == expected
        assert tail.out == b"".join(expected)

        # Ctrl-C: a clean exit, no traceback.
        assert tail.interrupt() in (0, 130)
        assert b"Traceback" not in tail.err
        assert tail.out == b"".join(expected)

        # Published while nothing tails; then resumed from the last id seen.
        missed, _ = publish_round(workers, "missed")
        resumed = Tail(redis_server.url, "alpha", "beta", "--last-event-id", ids[-1])
        tails.append(resumed)
        resumed.wait_ready()
        assert resumed.blocks(len(missed)) == missed
        # Then live events, after the replay and nothing in between.
        live, _ = publish_round(workers[:1], "after")
        assert resumed.blocks(len(missed) + len(live)) == missed + live
        time.sleep(0.2)  # room for a duplicate to show up
        resumed._read(lambda: True, 0.1)
        assert resumed.out == b"".join(missed + live)
        assert resumed.interrupt() in (0, 130)
        assert b"Traceback" not in resumed.err
    finally:
        for worker in workers:
            worker.close()


@pytest.fixture
def app() -> Flask:
    app = Flask(__name__)
    EventStream(app)
    return app


@pytest.mark.parametrize("channel", ["bad channel", "x" * 129, "a/b"])
def test_tail_bad_channel_is_a_usage_error(app: Flask, channel: str) -> None:
    result = app.test_cli_runner().invoke(args=["eventstream", "tail", channel])
    assert result.exit_code == 2
    assert "Invalid channel name" in result.output
    assert "Traceback" not in result.output


def test_tail_needs_a_channel(app: Flask) -> None:
    result = app.test_cli_runner().invoke(args=["eventstream", "tail"])
    assert result.exit_code == 2
    assert "CHANNEL" in result.output


def test_tail_is_listed_in_help(app: Flask) -> None:
    result = app.test_cli_runner().invoke(args=["eventstream", "tail", "--help"])
    assert result.exit_code == 0
    assert "--last-event-id" in result.output
