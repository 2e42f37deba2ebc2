"""flask-sse's own quickstart app (tests/apps/flask_sse_quickstart), with
``from flask_sse import sse`` changed to the compatibility import and nothing
else, served as its docs say (``gunicorn sse:app --worker-class gevent``) on a
real Redis: events reach a real Chromium, and the app now resumes, sends
heartbeats and frees the clients that went away."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import typing as t
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.redis import redis_clients
from tests.support.redis import RedisServer
from tests.support.servers import abort_all
from tests.support.servers import free_port
from tests.support.servers import open_clients
from tests.support.servers import SSEClient
from tests.support.servers import stop_process
from tests.support.servers import wait_for
from tests.support.servers import wait_started

if t.TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = [pytest.mark.redis, pytest.mark.server]

QUICKSTART = Path(__file__).parent / "apps" / "flask_sse_quickstart"
GREETING = "The server says Hello!"
FAILED = "Failed to connect to event stream. Is Redis running?"

#: Records what every EventSource of the page sees, before the page's own
#: listeners run (Playwright injects it ahead of the page's scripts).
RECORDER = """
window.__seen = [];
const NativeEventSource = window.EventSource;
window.EventSource = class extends NativeEventSource {
  constructor(url, init) {
    super(url, init);
    this.addEventListener("open", () => window.__seen.push(["open", "", ""]));
    this.addEventListener("greeting",
      (e) => window.__seen.push(["greeting", e.data, e.lastEventId]));
    this.addEventListener("error", () => window.__seen.push(["error", "", ""]));
  }
};
"""


class Quickstart:
    """``gunicorn sse:app --worker-class gevent`` in a copy of the app."""

    def __init__(self, directory: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._log = open(log, "ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "sse:app",
                "--worker-class",
                "gevent",
                "--bind",
                f"127.0.0.1:{self.port}",
                "--no-control-socket",
            ],
            cwd=directory,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        # No keep-alive: the only connections the server holds are streams.
        self.client = httpx.Client(
            base_url=self.url,
            timeout=10.0,
            trust_env=False,
            limits=httpx.Limits(max_keepalive_connections=0),
        )
        wait_started(self.proc, self._up, 30.0, 0.05, "gunicorn")

    def _up(self) -> bool:
        try:
            return self.client.get("/", timeout=1.0).status_code == 200
        except httpx.TransportError:
            return False

    def hello(self) -> None:
        response = self.client.get("/hello")
        assert (response.status_code, response.text) == (200, "Message sent!")

    def worker(self) -> int:
        def one() -> int | None:
            path = f"/proc/{self.proc.pid}/task/{self.proc.pid}/children"
            with open(path) as f:
                kids = f.read().split()
            return int(kids[0]) if len(kids) == 1 else None

        return int(wait_for(one, 10.0))

    def close(self) -> None:
        try:
            stop_process(self.proc, 15.0)
        finally:
            self.client.close()
            self._log.close()

    def log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])


@pytest.fixture
def quickstart(
    tmp_path: Path, redis_server: RedisServer
) -> Iterator[Callable[[], Quickstart]]:
    """Copies the app, pointing its ``REDIS_URL`` at the test's Redis (the
    one line a user edits for their own server), and serves it."""
    app_dir = tmp_path / "quickstart"
    shutil.copytree(QUICKSTART, app_dir)
    source = (app_dir / "sse.py").read_text()
    assert source.count('"redis://localhost"') == 1
    (app_dir / "sse.py").write_text(
        source.replace('"redis://localhost"', repr(redis_server.url))
    )
    started: list[Quickstart] = []

    def start() -> Quickstart:
        server = Quickstart(app_dir, tmp_path / "gunicorn.log")
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


def test_quickstart_source_differs_from_flask_sse_by_the_import_only() -> None:
    source = (QUICKSTART / "sse.py").read_text().splitlines()
    assert source[:2] == [
        "from flask import Flask, render_template",
        "from flask_eventstream.compat.flask_sse import sse",
    ]
    assert "flask_sse import" not in "\n".join(source[2:])


@pytest.mark.browser
def test_quickstart_in_chromium_receives_and_resumes(
    chromium_page: Page, quickstart: Callable[[], Quickstart]
) -> None:
    from playwright.sync_api import expect

    server = quickstart()
    page = chromium_page
    dialogs: list[str] = []
    errors: list[str] = []

    def on_dialog(dialog: t.Any) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", on_dialog)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.add_init_script(RECORDER)
    page.goto(server.url + "/")
    expect(page.locator("h1")).to_have_text("Flask-SSE Quickstart")

    def wait_dialogs(count: int) -> None:
        # Dialog events are handled while Playwright waits.
        for _ in range(200):
            if len(dialogs) >= count:
                return
            page.wait_for_timeout(25)
        raise TimeoutError(f"dialogs: {dialogs!r}")

    def seen() -> list[list[str]]:
        return t.cast(list[list[str]], page.evaluate("window.__seen"))

    page.wait_for_function("window.__seen.length === 1")
    assert seen() == [["open", "", ""]]

    # Another tab visits /hello: the alert of the quickstart.
    server.hello()
    page.wait_for_function("window.__seen.length === 2")
    first = seen()[1]
    assert first[:2] == ["greeting", '{"message": "Hello!"}']
    assert first[2] != ""  # every event carries an id now
    wait_dialogs(1)
    assert dialogs == [GREETING]

    # The worker shuts down (a deploy, --max-requests): the stream ends at
    # once, the page notices, and two greetings are published while it
    # waits to reconnect (retry: 3000 ms).
    os.kill(server.worker(), signal.SIGTERM)
    page.wait_for_function("window.__seen.length === 3")
    assert seen()[2] == ["error", "", ""]
    server.hello()
    server.hello()
    assert len(seen()) == 3, "reconnected before the greetings were published"

    # It reconnects with Last-Event-ID and gets both, exactly once.
    page.wait_for_function("window.__seen.length === 6")
    page.wait_for_timeout(300)  # room for a duplicate to show up
    after = seen()
    assert [e[0] for e in after] == [
        "open",
        "greeting",
        "error",
        "open",
        "greeting",
        "greeting",
    ]
    assert [e[1] for e in after[4:]] == ['{"message": "Hello!"}'] * 2
    ids = [first[2], after[4][2], after[5][2]]
    assert len(set(ids)) == 3
    wait_dialogs(4)
    assert dialogs == [GREETING, FAILED, GREETING, GREETING]
    assert errors == []

    # The ids are the channel's: resuming from the first gives the other two.
    with SSEClient(server.port, "/stream", {"Last-Event-ID": ids[0]}) as client:
        assert [e.id for e in client.read_events(2)] == ids[1:]


def test_quickstart_heartbeats_and_frees_disconnected_clients(
    quickstart: Callable[[], Quickstart], redis_server: RedisServer
) -> None:
    server = quickstart()
    with SSEClient(server.port, "/stream", record=True) as watcher:
        watcher.read_head()
        assert watcher.status == 200
        assert watcher.headers["content-type"] == "text/event-stream; charset=utf-8"
        worker = server.worker()
        redis = redis_server.client()
        wait_for(lambda: streams_of(worker, server.port) == 1, 5.0)

        # flask-sse held a Redis connection per client, and never noticed a
        # client that left an idle channel.
        clients = open_clients(server.port, "/stream?channel=idle", 50)
        wait_for(lambda: streams_of(worker, server.port) == 51, 5.0)
        # A few connections per worker, however many streams.
        assert 1 <= len(redis_clients(redis, pid=worker)) <= 3
        assert len(redis_clients(redis)) == len(redis_clients(redis, pid=worker))
        abort_all(clients)
        wait_for(lambda: streams_of(worker, server.port) == 1, 5.0)

        # The remaining stream still works, and idles with heartbeats
        # (EVENTSTREAM_HEARTBEAT, 15 s by default).
        server.hello()
        [event] = watcher.read_events(1)
        assert (event.event, event.data) == ("greeting", '{"message": "Hello!"}')
        watcher.wait(lambda c: c.body_len > 0 and _heartbeats(c) >= 1, 25.0)
        assert watcher.read_events(0) == []
    body = b"".join(chunk for _, chunk in watcher.chunks)
    assert body.startswith(b"retry: 3000\n\n")


def _heartbeats(client: SSEClient) -> int:
    return sum(chunk == b":\n\n" for _, chunk in client.chunks)


def streams_of(pid: int, port: int) -> int:
    """Sockets of process ``pid`` connected on local port ``port`` (the
    server's side of client connections)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    count = 0
    with open(f"/proc/{pid}/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            # State 0A is LISTEN: the shared listening socket.
            if local_port == port and fields[3] != "0A" and fields[9] in inodes:
                count += 1
    return count
