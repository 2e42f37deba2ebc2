"""``last_event_id()``: the client's id for the current request, with the
UTF-8 that browsers send decoded from the latin-1 text WSGI gives."""

from __future__ import annotations

import secrets
import typing as t

import pytest
from flask import Flask

from flask_eventstream import last_event_id

if t.TYPE_CHECKING:
    from playwright.sync_api import Page

    from tests.support.servers import Server


def echo_app() -> Flask:
    app = Flask(__name__)

    @app.get("/")
    def echo() -> t.Any:
        return {"id": last_event_id()}

    return app


def as_wsgi(value: str) -> str:
    """A header value as a WSGI server hands over what a browser sent: its
    UTF-8 bytes, each read as one latin-1 character."""
    return value.encode("utf-8").decode("latin-1")


def get(headers: dict[str, str] | None = None, query: str = "") -> t.Any:
    response = echo_app().test_client().get("/" + query, headers=headers)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()["id"]


def test_utf8_header_is_decoded() -> None:
    for value in ["café-1", "…", "世界-7", "😀", "1732435200000-3", " x "]:
        assert get({"Last-Event-ID": as_wsgi(value)}) == value


def test_query_argument_when_there_is_no_header() -> None:
    assert get(query="?lastEventId=caf%C3%A9-1") == "café-1"
    assert get({"Last-Event-ID": as_wsgi("é-2")}, "?lastEventId=other") == "é-2"


def test_absent_or_empty_is_none() -> None:
    assert get() is None
    assert get({"Last-Event-ID": ""}) is None
    assert get(query="?lastEventId=") is None
    assert last_event_id() is None  # outside a request
    with echo_app().app_context():
        assert last_event_id() is None


def test_header_that_is_not_utf8_comes_back_as_read() -> None:
    # Bytes that are not UTF-8 (a client that sent latin-1): one character
    # per byte, never an error.
    assert get({"Last-Event-ID": "caf\xe9"}) == "caf\xe9"
    assert get({"Last-Event-ID": "\xff\xfe\x80"}) == "\xff\xfe\x80"
    # A server that gave text beyond latin-1 already decoded it.
    assert get({"Last-Event-ID": "世界"}) == "世界"


#: Reads ``count`` message events, then closes the EventSource.
READ_MESSAGES = """
async ({url, count, timeoutMs}) => new Promise((resolve) => {
  const seen = [];
  const source = new EventSource(url);
  const timer = setTimeout(() => { source.close(); resolve(seen); }, timeoutMs);
  source.onmessage = (e) => {
    seen.push([e.data, e.lastEventId]);
    if (seen.length === count) {
      clearTimeout(timer);
      source.close();
      resolve(seen);
    }
  };
})
"""


@pytest.mark.browser
@pytest.mark.server
def test_chromium_sends_a_non_ascii_id_back_and_the_view_reads_it(
    chromium_page: Page, start_server: t.Callable[..., Server]
) -> None:
    # The view sends one event with id café-<n> and ends; Chromium
    # reconnects by itself with that id as Last-Event-ID, and the view's
    # next event says what last_event_id() read.
    server = start_server("pywsgi", app="tests.apps.conformance:create_app")
    chromium_page.goto(f"http://127.0.0.1:{server.port}/")
    seen = chromium_page.evaluate(
        READ_MESSAGES,
        {"url": f"/cafe?run={secrets.token_hex(8)}", "count": 3, "timeoutMs": 8000},
    )
    assert seen == [
        ['{"got":null}', "caf\u00e9-1"],
        ['{"got":"caf\u00e9-1"}', "caf\u00e9-2"],
        ['{"got":"caf\u00e9-2"}', "caf\u00e9-3"],
    ]
