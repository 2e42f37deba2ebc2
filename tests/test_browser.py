"""The example app's page (GET /) in real headless Chromium against the real
example app (``python -m example_app`` on gevent) in a subprocess."""

from __future__ import annotations

import time
import typing as t

import pytest
from playwright.sync_api import BrowserContext
from playwright.sync_api import expect
from playwright.sync_api import Page

from tests.support.browser import ExampleServer
from tests.support.browser import ExampleServerFactory

pytestmark = [pytest.mark.browser, pytest.mark.server]

#: The notice the page shows for an ``eventstream-reset`` with reason "unknown".
RESET_NOTICE = "Stream reset: the server restarted; messages may be missing."

#: Records every text #status ever gets (each textContent assignment adds a
#: new text node), from the parser's "connecting" on. Runs before the page's
#: own scripts; Playwright injects it, so the page's CSP does not apply.
STATUS_LOG = """
window.__statusLog = [];
new MutationObserver((records) => {
  for (const record of records) {
    if (!(record.target instanceof Element) || record.target.id !== "status") continue;
    for (const node of record.addedNodes) {
      if (node.nodeType === Node.TEXT_NODE) window.__statusLog.push(node.data);
    }
  }
}).observe(document, { childList: true, subtree: true });
"""


class Lobby:
    """The page at GET / with what it reported."""

    def __init__(self, page: Page, server: ExampleServer) -> None:
        self.page = page
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.on("dialog", self._on_dialog)
        page.add_init_script(STATUS_LOG)
        page.goto(server.url + "/")
        self.status = page.locator("#status")
        self.items = page.locator("#messages li")

    def _on_dialog(self, dialog: t.Any) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def status_log(self) -> list[str]:
        log: list[str] = self.page.evaluate("window.__statusLog")
        return log

    def shown(self) -> list[tuple[str, str]]:
        """(kind, exact text) of every item in the list, in order."""
        items: list[list[str]] = self.items.evaluate_all(
            "items => items.map("
            "  li => [li.className, li.querySelector('.text').textContent])"
        )
        return [(kind, text) for kind, text in items]

    def expect_shown(self, expected: list[tuple[str, str]]) -> None:
        """Wait (bounded) for exactly these items, then compare exact texts."""
        expect(self.items).to_have_count(len(expected))
        expect(self.page.locator("#messages li .text")).to_have_text(
            [text for _, text in expected]
        )
        assert self.shown() == expected


def test_page_goes_live_and_shows_messages_through_the_stream(
    chromium_page: Page, example_app_server: ExampleServerFactory
) -> None:
    server = example_app_server()
    lobby = Lobby(chromium_page, server)
    page = lobby.page

    expect(lobby.status).to_have_text("live")
    assert lobby.status_log() == ["connecting", "live"]
    expect(lobby.status).to_be_visible()
    expect(lobby.status).to_be_in_viewport()
    assert server.stats() == {"connections": 1, "channels": {"lobby": 1}}
    expect(lobby.items).to_have_count(0)

    # Typed and submitted: POSTed as JSON by fetch() (no navigation), shown
    # when it comes back on the stream.
    page.evaluate("window.__samePage = true")
    with page.expect_response(
        lambda r: r.url == server.url + "/publish/lobby" and r.request.method == "POST"
    ) as posted:
        page.locator("#message").fill("hello from the form")
        page.locator("#send button").click()
    response = posted.value
    assert response.status == 202
    assert response.request.post_data_json == {
        "data": {"text": "hello from the form"},
        "event": "chat",
    }
    sent_id = response.json()["id"]
    lobby.expect_shown([("message", "hello from the form")])
    expect(page.locator("#message")).to_have_value("")
    assert page.evaluate("window.__samePage") is True
    expect(lobby.items.nth(0)).to_have_attribute("data-id", sent_id)

    # Published by someone else; markup in the data is text, not elements.
    markup = "<b>x</b> <img src=x onerror=alert(1)>"
    markup_id = server.publish({"text": markup})
    # Exactly two items: the form's message arrived once, before this one.
    lobby.expect_shown([("message", "hello from the form"), ("message", markup)])
    expect(lobby.items.nth(1)).to_have_attribute("data-id", markup_id)
    expect(page.locator("#messages b")).to_have_count(0)
    expect(page.locator("#messages img")).to_have_count(0)

    # Any JSON: a string (unnamed event, type "message"), an object without
    # "text", a list, and text with line breaks and markup.
    server.publish("a plain <i>string</i>", event=None)
    server.publish({"n": 1, "text2": "<u>"})
    server.publish([1, "<s>"])
    server.publish({"text": "two\nlines"})
    lobby.expect_shown(
        [
            ("message", "hello from the form"),
            ("message", markup),
            ("message", "a plain <i>string</i>"),
            ("message", '{"n":1,"text2":"<u>"}'),
            ("message", '[1,"<s>"]'),
            ("message", "two\nlines"),
        ]
    )
    expect(page.locator("#messages i, #messages u, #messages s")).to_have_count(0)
    expect(page.locator("#send-error")).to_be_hidden()
    assert lobby.status_log() == ["connecting", "live"]
    assert lobby.dialogs == []
    assert lobby.errors == []


def test_page_reconnects_to_a_restarted_server_and_shows_what_it_missed(
    chromium_page: Page, example_app_server: ExampleServerFactory
) -> None:
    # The page reconnects RETRY ms after the stream ended (Chromium retries a
    # refused connection at the same pace), so the new server is up and has
    # its events long before the page comes back.
    retry_ms = 4000
    first = example_app_server(EVENTSTREAM_RETRY=retry_ms)
    lobby = Lobby(chromium_page, first)
    expect(lobby.status).to_have_text("live")
    first.publish({"text": "before 1"})
    first.publish({"text": "before 2"})
    before = [("message", "before 1"), ("message", "before 2")]
    lobby.expect_shown(before)

    stopped_at = time.monotonic()
    assert first.stop() == 0, first.log_tail()
    expect(lobby.status).to_have_text("reconnecting")

    second = example_app_server(port=first.port, EVENTSTREAM_RETRY=retry_ms)
    away_ids = [second.publish({"text": "away 1"}), second.publish({"text": "away 2"})]
    published_after = time.monotonic() - stopped_at
    assert second.stats()["connections"] == 0, (
        f"the page reconnected before the events were published "
        f"({published_after:.2f} s after the stop; retry is {retry_ms} ms)"
    )

    # Reconnects by itself with the first server's Last-Event-ID, which the
    # new process does not know: a reset notice, then what it retained.
    expect(lobby.status).to_have_text("live", timeout=3 * retry_ms + 5000)
    lobby.expect_shown(
        [
            *before,
            ("notice", RESET_NOTICE),
            ("message", "away 1"),
            ("message", "away 2"),
        ]
    )
    assert [lobby.items.nth(i).get_attribute("data-id") for i in (3, 4)] == away_ids
    assert lobby.status_log() == ["connecting", "live", "reconnecting", "live"]

    # And it is live on the new server.
    assert second.stats() == {"connections": 1, "channels": {"lobby": 1}}
    second.publish({"text": "after"})
    lobby.expect_shown(
        [
            *before,
            ("notice", RESET_NOTICE),
            ("message", "away 1"),
            ("message", "away 2"),
            ("message", "after"),
        ]
    )
    assert lobby.errors == []


def test_page_reopens_the_stream_after_an_http_error(
    chromium: BrowserContext, example_app_server: ExampleServerFactory
) -> None:
    # With one stream allowed, a second page gets 503: EventSource gives up
    # (readyState CLOSED) and the page reopens the stream itself.
    server = example_app_server(EVENTSTREAM_MAX_CONNECTIONS=1)
    first = Lobby(chromium.pages[0], server)
    expect(first.status).to_have_text("live")
    second = Lobby(chromium.new_page(), server)
    expect(second.status).to_have_text("reconnecting")
    expect(first.status).to_have_text("live")

    first.page.close()
    expect(second.status).to_have_text("live", timeout=20_000)
    server.publish({"text": "for the second page"})
    second.expect_shown([("message", "for the second page")])
    assert second.status_log() == ["connecting", "reconnecting", "live"]
    assert first.errors == second.errors == []
