"""The example app's /dashboard in real headless Chromium against the example
app (``python -m example_app``) in a subprocess: its figures follow the
streams the test opens and the events it publishes, exactly."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from playwright.sync_api import expect
from playwright.sync_api import Page

from tests.support.browser import ExampleServerFactory
from tests.support.servers import open_clients
from tests.support.servers import SSEClient

pytestmark = [pytest.mark.browser, pytest.mark.server]

#: Every text a figure is given (each textContent assignment adds a text
#: node), injected ahead of the page's scripts.
FIGURE_LOG = """
window.__figures = {connections: [], rate: [], events: []};
new MutationObserver((records) => {
  for (const record of records) {
    const id = record.target instanceof Element ? record.target.id : "";
    if (!(id in window.__figures)) continue;
    for (const node of record.addedNodes) {
      if (node.nodeType === Node.TEXT_NODE) window.__figures[id].push(node.data);
    }
  }
}).observe(document, { childList: true, subtree: true });
"""

#: Where the documentation's screenshot is written when this is set
#: (``SCREENSHOT_DIR=docs/_static pytest tests/test_dashboard.py``).
SCREENSHOT_DIR = os.environ.get("SCREENSHOT_DIR")


def test_dashboard_follows_streams_and_events(
    chromium_page: Page, example_app_server: ExampleServerFactory, tmp_path: Path
) -> None:
    server = example_app_server()
    page = chromium_page
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.add_init_script(FIGURE_LOG)
    page.goto(server.url + "/dashboard")

    status = page.locator("#status")
    connections = page.locator("#connections")
    rate = page.locator("#rate")
    events = page.locator("#events")
    expect(status).to_have_text("live")
    # The page's own stats stream is the process's one open stream.
    expect(connections).to_have_text("1")
    expect(events).to_have_text("0")
    expect(rate).to_have_text("0")
    assert server.stats()["connections"] == 1

    port = server.port
    clients = open_clients(port, "/stream/lobby", 5)
    try:
        expect(connections).to_have_text("6")
        for client in clients[:2]:
            client.abort()
        expect(connections).to_have_text("4")

        # 12 events: the total follows exactly, and the per-second figures
        # it showed add up to them.
        for n in range(12):
            server.publish({"text": f"event {n}"})
        expect(events).to_have_text("12")
        for client in clients[2:]:
            assert [e.data for e in client.read_events(12)] == [
                f'{{"text":"event {n}"}}' for n in range(12)
            ]
        # One more tick, so the second that saw the last events has passed.
        shown = len(page.evaluate("window.__figures.rate"))
        for _ in range(100):  # wait_for_function evaluates strings: CSP forbids
            if len(page.evaluate("window.__figures.rate")) > shown:
                break
            page.wait_for_timeout(50)
        # Without the placeholder the page is parsed with.
        figures = {
            k: [v for v in values if v != "\u2013"]
            for k, values in page.evaluate("window.__figures").items()
        }
        assert sum(int(r) for r in figures["rate"]) == 12
        assert max(int(r) for r in figures["rate"]) > 0
        # Every update sets the three figures.
        assert len(figures["connections"]) == len(figures["rate"])
        assert figures["connections"][0] == "1"
        assert figures["events"][0] == "0"
        assert set(figures["connections"]) <= {"1", "6", "4"}

        # The chart was drawn: the canvas holds non-blank pixels in each
        # series' colour region (it is not a blank bitmap).
        painted = page.evaluate(
            """() => {
              const c = document.getElementById("chart");
              const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
              let n = 0;
              for (let i = 3; i < d.length; i += 4) if (d[i] !== 0) n++;
              return n;
            }"""
        )
        assert painted > 1000

        if SCREENSHOT_DIR:
            # For the documentation: half a minute of streams coming and
            # going and bursts of events, so the chart has something to show.
            extra: list[SSEClient] = []
            try:
                for second in range(30):
                    if second % 6 < 3:
                        extra += open_clients(port, "/stream/lobby", 3 + second % 4)
                    elif extra:
                        for client in extra[: 2 + second % 3]:
                            client.close()
                        extra = [c for c in extra if not c.closed]
                    for n in range((second * 7) % 11 + 2 * (second % 5)):
                        server.publish({"text": f"burst {second}.{n}"})
                    page.wait_for_timeout(1000)
            finally:
                for client in extra:
                    client.close()

        shot = tmp_path / "dashboard.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if SCREENSHOT_DIR:
            shutil.copy(shot, Path(SCREENSHOT_DIR) / "dashboard.png")
    finally:
        for client in clients:
            client.close()
    expect(connections).to_have_text("1")
    assert errors == []


def test_stats_stream_sends_one_stats_event_a_second(
    example_app_server: ExampleServerFactory,
) -> None:
    server = example_app_server()
    with SSEClient(server.port, "/stats/stream") as client:
        first, second = client.read_events(2, timeout=5.0)
    for event in (first, second):
        assert event.event == "stats"
    data = [json.loads(e.data) for e in (first, second)]
    assert [(d["connections"], d["events"], d["rate"]) for d in data] == [
        (1, 0, 0),
        (1, 0, 0),
    ]
