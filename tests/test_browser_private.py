"""The example page's nickname, who's-online list, private messages and
revocation, in real headless Chromium against ``python -m example_app``."""

from __future__ import annotations

import time

import pytest
from playwright.sync_api import BrowserContext
from playwright.sync_api import expect
from playwright.sync_api import Page
from playwright.sync_api import Response

from tests.support.browser import ExampleServer
from tests.support.browser import ExampleServerFactory

pytestmark = [pytest.mark.browser, pytest.mark.server]

ADMIN = "the-admin-token"


class Person:
    """The page at GET / after joining as ``nick``, with every response it got."""

    def __init__(self, page: Page, server: ExampleServer, nick: str) -> None:
        self.page = page
        self.nick = nick
        self.errors: list[str] = []
        self.responses: list[tuple[str, int]] = []
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.on("response", self._on_response)
        page.goto(server.url + "/")
        self.status = page.locator("#status")
        self.items = page.locator("#messages li")
        self.online = page.locator("#online li")
        expect(self.status).to_have_text("live")
        page.locator("#nickname").fill(nick)
        page.locator("#join button").click()
        expect(page.locator("#me")).to_have_text(f"You are {nick}")
        expect(self.status).to_have_text("live")

    def _on_response(self, response: Response) -> None:
        path = response.url.split("/", 3)[3]
        self.responses.append(("/" + path, response.status))

    def shown(self) -> list[tuple[str, str]]:
        items: list[list[str]] = self.items.evaluate_all(
            "items => items.map("
            "  li => [li.className, li.querySelector('.text').textContent])"
        )
        return [(kind, text) for kind, text in items]

    def expect_shown(self, expected: list[tuple[str, str]]) -> None:
        expect(self.items).to_have_count(len(expected))
        assert self.shown() == expected

    def expect_online(self, names: list[str]) -> None:
        expect(self.online).to_have_text(names)

    def send_private(self, to: str, text: str) -> None:
        self.page.locator("#to").fill(to)
        self.page.locator("#private-text").fill(text)
        self.page.locator("#private button").click()

    def refused_streams(self) -> list[str]:
        return [
            path
            for path, status in self.responses
            if status == 403 and path.startswith("/stream/")
        ]


def people(
    chromium: BrowserContext, server: ExampleServer, *nicks: str
) -> list[Person]:
    pages = [chromium.pages[0]] + [chromium.new_page() for _ in nicks[1:]]
    return [Person(page, server, nick) for page, nick in zip(pages, nicks, strict=True)]


def test_two_pages_see_each_other_and_a_private_message_reaches_only_its_addressee(
    chromium: BrowserContext, example_app_server: ExampleServerFactory
) -> None:
    server = example_app_server(EXAMPLE_PRIVATE_TOKEN=ADMIN)
    alice, bob = people(chromium, server, "alice", "bob")
    alice.expect_online(["alice", "bob"])
    bob.expect_online(["alice", "bob"])
    assert server.client.get("/presence/lobby").json() == {
        "users": {"alice": 1, "bob": 1}
    }

    carol = Person(chromium.new_page(), server, "carol")
    for person in (alice, bob, carol):
        person.expect_online(["alice", "bob", "carol"])

    alice.send_private("bob", "psst, bob")
    bob.expect_shown([("private", "from alice: psst, bob")])
    alice.expect_shown([("private sent", "to bob: psst, bob")])
    # Carol is live and gets what is public, and only that.
    server.publish({"text": "for everyone"})
    carol.expect_shown([("message", "for everyone")])
    bob.expect_shown(
        [("private", "from alice: psst, bob"), ("message", "for everyone")]
    )
    # A private stream needs its owner's grant.
    assert server.client.get("/grant/private-bob?user=carol").status_code == 403
    assert server.client.get("/stream/private-bob").status_code == 403

    # Carol leaves: the others see it.
    carol.page.close()
    alice.expect_online(["alice", "bob"])
    bob.expect_online(["alice", "bob"])
    assert alice.errors == bob.errors == carol.errors == []


def test_revoked_page_stops_receiving_and_its_reconnect_is_refused(
    chromium: BrowserContext, example_app_server: ExampleServerFactory
) -> None:
    server = example_app_server(EXAMPLE_PRIVATE_TOKEN=ADMIN)
    alice, bob = people(chromium, server, "alice", "bob")
    alice.expect_online(["alice", "bob"])
    server.publish({"text": "before"})
    for person in (alice, bob):
        person.expect_shown([("message", "before")])

    assert server.client.post("/revoke/bob").status_code == 403
    response = server.client.post(
        "/revoke/bob", headers={"Authorization": f"Bearer {ADMIN}"}
    )
    assert response.status_code == 204

    expect(bob.status).to_have_text("refused")
    expect(bob.page.locator("#people-status")).to_have_text(
        "Access revoked: the server refused a new grant for bob."
    )
    alice.expect_online(["alice"])
    # The browser's reconnect with the old grant was refused, and so was the
    # page's request for a new one.
    assert any(
        p.startswith("/stream/lobby+private-bob?grant=") for p in bob.refused_streams()
    )
    assert ("/grant/lobby+private-bob?user=bob", 403) in bob.responses

    server.publish({"text": "after"})
    alice.expect_shown([("message", "before"), ("message", "after")])
    bob.expect_shown([("message", "before")])
    assert server.stats()["connections"] == 1  # alice's
    assert server.client.get("/presence/lobby").json() == {"users": {"alice": 1}}
    assert alice.errors == bob.errors == []


def test_page_keeps_streaming_across_grant_expiry_without_losing_an_event(
    chromium_page: Page, example_app_server: ExampleServerFactory
) -> None:
    expires = 1.5
    server = example_app_server(EXAMPLE_GRANT_EXPIRES=expires)
    alice = Person(chromium_page, server, "alice")
    sent = []
    # Published all through three expiries, some while the page reopens.
    end = time.monotonic() + 3 * expires + 1
    n = 0
    while time.monotonic() < end:
        sent.append(("message", f"n{n}"))
        server.publish({"text": f"n{n}"})
        n += 1
        time.sleep(0.1)
    alice.expect_shown(sent)
    grants = [
        p for p, s in alice.responses if p == "/grant/lobby+private-alice?user=alice"
    ]
    refused = alice.refused_streams()
    # It had to: a new grant for each expiry, after the browser's reconnect
    # with the expired one was refused.
    assert len(grants) >= 3, alice.responses
    assert len(refused) >= 2
    expect(alice.status).to_have_text("live")
    assert alice.errors == []
