"""Browser fixtures (loaded as a plugin by tests/conftest.py).

- ``example_app_server``: a factory that runs ``python -m example_app`` (gevent,
  in-memory broker) in a subprocess on 127.0.0.1 and stops it by PID.
- ``chromium``: a fresh headless Chromium (/usr/bin/chromium driven by
  Playwright) with its own temporary profile; ``chromium_page`` is a page in it.

Nothing here reaches beyond 127.0.0.1.
"""

from __future__ import annotations

import os
import subprocess
import sys
import typing as t
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.servers import ExitedEarly
from tests.support.servers import free_port
from tests.support.servers import stop_process
from tests.support.servers import wait_started

if t.TYPE_CHECKING:
    from playwright.sync_api import BrowserContext
    from playwright.sync_api import Page
    from playwright.sync_api import Playwright

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # Belt and braces: no name other than localhost resolves, no proxy is used.
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE localhost , EXCLUDE 127.0.0.1",
    "--no-proxy-server",
]
#: Default timeout of Playwright actions and expectations, ms.
PAGE_TIMEOUT_MS = 10_000


class ExampleServer:
    """``python -m example_app`` in a subprocess on ``127.0.0.1:port``."""

    def __init__(self, port: int, log_path: Path, env: dict[str, str]) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._env = env
        self._log: t.IO[bytes] | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = httpx.Client(base_url=self.url, timeout=5.0, trust_env=False)

    def start(self, timeout: float = 20.0) -> ExampleServer:
        """Start the process and wait (bounded) until ``/healthz`` answers."""
        assert self.proc is None, "already started"
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "example_app"],
            cwd=ROOT,
            env=self._env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_started(self.proc, self._healthy, timeout, 0.02, "example app")
        except ExitedEarly as e:
            self._close_log()
            pytest.fail(f"{e} during start:\n{self.log_tail()}", pytrace=False)
        except TimeoutError as e:
            self.stop()
            pytest.fail(f"{e} (GET /healthz):\n{self.log_tail()}", pytrace=False)
        return self

    def _healthy(self) -> bool:
        try:
            return self.client.get("/healthz", timeout=1.0).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM by PID and wait (bounded) for the exit; SIGKILL as a last resort.
        Returns the exit code (None if never started)."""
        proc = self.proc
        if proc is None:
            return None
        try:
            if stop_process(proc, timeout):
                pytest.fail(
                    f"example app ignored SIGTERM for {timeout} s:\n{self.log_tail()}",
                    pytrace=False,
                )
            return proc.returncode
        finally:
            self._close_log()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def close(self) -> None:
        try:
            self.stop()
        finally:
            self.client.close()

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def publish(
        self, data: t.Any, event: str | None = "chat", channel: str = "lobby"
    ) -> str:
        """POST to /publish/<channel>; returns the event id."""
        body: dict[str, t.Any] = {"data": data}
        if event is not None:
            body["event"] = event
        response = self.client.post(f"/publish/{channel}", json=body)
        assert response.status_code == 202, response.text
        result = response.json()
        assert result["channel"] == channel
        event_id: str = result["id"]
        return event_id

    def stats(self) -> dict[str, t.Any]:
        response = self.client.get("/healthz")
        assert response.status_code == 200, response.text
        stats: dict[str, t.Any] = response.json()
        return stats


class ExampleServerFactory(t.Protocol):
    def __call__(
        self, *, port: int | None = None, **env: str | int | float
    ) -> ExampleServer: ...


@pytest.fixture
def example_app_server(
    tmp_path: Path,
) -> Iterator[ExampleServerFactory]:
    """``start(port=None, **env)`` starts the example app on a free port (or on
    ``port``, e.g. to restart a server in place) with ``env`` added to a clean
    environment (``EVENTSTREAM_RETRY=500`` unless given). Every server is
    stopped by PID at teardown."""
    servers: list[ExampleServer] = []
    base_env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("EVENTSTREAM_", "EXAMPLE_"))
    }
    pythonpath = os.pathsep.join(
        p for p in (str(ROOT), base_env.get("PYTHONPATH", "")) if p
    )

    def start(*, port: int | None = None, **env: str | int | float) -> ExampleServer:
        settings = {"EVENTSTREAM_RETRY": "500", **{k: str(v) for k, v in env.items()}}
        port = free_port() if port is None else port
        full_env = {
            **base_env,
            **settings,
            "EXAMPLE_HOST": "127.0.0.1",
            "EXAMPLE_PORT": str(port),
            "PYTHONPATH": pythonpath,
            "PYTHONUNBUFFERED": "1",
        }
        log_path = tmp_path / f"example-app-{len(servers) + 1}.log"
        server = ExampleServer(port, log_path, full_env)
        servers.append(server)
        return server.start()

    yield start
    errors = []
    for server in servers:
        try:
            server.close()
        except BaseException as e:  # noqa: B036 - report after stopping all
            errors.append(e)
    if errors:
        raise errors[0]


def _import_playwright() -> t.Any:
    try:
        from playwright import sync_api
    except ImportError as e:
        message = f"playwright is not installed ({e}); pip install -e '.[test]'"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return sync_api


@pytest.fixture(scope="session")
def playwright_session() -> Iterator[Playwright]:
    """The Playwright driver (sync API), started once per test session."""
    sync_api = _import_playwright()
    manager = sync_api.sync_playwright()
    playwright = manager.start()
    try:
        yield playwright
    finally:
        manager.__exit__(None, None, None)


@pytest.fixture
def chromium(
    playwright_session: Playwright, tmp_path: Path
) -> Iterator[BrowserContext]:
    """Headless /usr/bin/chromium with a fresh temporary profile."""
    from tests.conftest import require_tool

    executable = require_tool(CHROMIUM, "Chromium")
    sync_api = _import_playwright()
    sync_api.expect.set_options(timeout=PAGE_TIMEOUT_MS)
    context = playwright_session.chromium.launch_persistent_context(
        str(tmp_path / "chromium-profile"),
        executable_path=executable,
        headless=True,
        args=CHROMIUM_ARGS,
        timeout=30_000,
        viewport={"width": 900, "height": 700},
    )
    context.set_default_timeout(PAGE_TIMEOUT_MS)
    try:
        yield context
    finally:
        context.close()


@pytest.fixture
def chromium_page(chromium: BrowserContext) -> Page:
    """A page of ``chromium`` (the one a persistent context opens with)."""
    return chromium.pages[0] if chromium.pages else chromium.new_page()
