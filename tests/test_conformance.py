"""The conformance table (tests/support/conformance.py), drawn from the
web-platform-tests ``eventsource/`` format tests, both ways:

- the parser reads each row's bytes, whole and one byte at a time, as a
  browser does: the same events, the same last event id, the same retry;
- Chromium reads each row's bytes from a real server, which checks the table
  itself, and reads the encoding of each row's ``Event`` objects from an
  ``@eventstream`` view, which checks the encoder.

In Chromium, the id a browser holds when a stream has ended is observed as
the ``Last-Event-ID`` it sends when it reconnects.
"""

from __future__ import annotations

import secrets
import typing as t

import pytest

from flask_eventstream.sse import encode
from flask_eventstream.testing import EventParser
from flask_eventstream.testing import parse
from flask_eventstream.testing import ReceivedEvent
from tests.support.conformance import Row
from tests.support.conformance import ROWS
from tests.support.conformance import Seen
from tests.support.conformance import TYPES

if t.TYPE_CHECKING:
    from playwright.sync_api import Page

    from tests.support.servers import Server

APP = "tests.apps.conformance:create_app"
NO_RECONNECTION = "<no reconnection>"


def seen(events: t.Iterable[ReceivedEvent]) -> tuple[Seen, ...]:
    return tuple((e.event, e.data, e.id) for e in events)


def by_row(rows: t.Sequence[Row]) -> t.Any:
    return pytest.mark.parametrize("row", rows, ids=[row.name for row in rows])


@by_row(ROWS)
def test_parse_whole(row: Row) -> None:
    assert seen(parse(row.wire)) == row.events
    parser = EventParser()
    assert seen(parser.feed(row.wire)) == row.events
    assert parser.close() == []
    assert (parser.last_event_id, parser.retry) == (row.last_id, row.retry)


@by_row(ROWS)
def test_parse_one_byte_at_a_time(row: Row) -> None:
    parser = EventParser()
    events: list[ReceivedEvent] = []
    for i in range(len(row.wire)):
        events += parser.feed(row.wire[i : i + 1])
    events += parser.close()
    assert seen(events) == row.events
    assert (parser.last_event_id, parser.retry) == (row.last_id, row.retry)


ENCODABLE = [row for row in ROWS if row.sends]


@by_row(ENCODABLE)
def test_encoded_events_parse_as_the_row(row: Row) -> None:
    parser = EventParser()
    events = parser.feed(b"".join(encode(event) for event in row.sends))
    assert seen(events) == row.events
    assert parser.last_event_id == row.last_id


# -- in Chromium --

#: Opens one EventSource per URL, at most four at a time (Chromium allows six
#: connections per host), records every event of the listed types and
#: resolves when the EventSource is closed for good (the server's 204), or
#: after ``timeoutMs``.
READ_ALL = """
async ({urls, types, timeoutMs}) => {
  const one = (url) => new Promise((resolve) => {
    const seen = [];
    const source = new EventSource(url);
    const record = (e) => seen.push([e.type, e.data, e.lastEventId]);
    for (const type of types) source.addEventListener(type, record);
    const timer = setTimeout(() => {
      source.close();
      resolve({seen, closed: false});
    }, timeoutMs);
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED) {
        clearTimeout(timer);
        resolve({seen, closed: true});
      }
    };
  });
  const results = new Array(urls.length);
  let next = 0;
  const worker = async () => {
    while (next < urls.length) {
      const i = next++;
      results[i] = await one(urls[i]);
    }
  };
  await Promise.all([worker(), worker(), worker(), worker()]);
  return results;
}
"""


def read_in_chromium(
    page: Page, server: Server, kind: str, rows: t.Sequence[Row]
) -> dict[str, tuple[tuple[Seen, ...], str]]:
    """``{row name: (events seen, id sent back on reconnection)}``."""
    token = secrets.token_hex(8)
    page.goto(f"http://127.0.0.1:{server.port}/")
    paths = [f"/{kind}/{ROWS.index(row)}" for row in rows]
    results = page.evaluate(
        READ_ALL,
        {
            "urls": [f"{path}?run={token}" for path in paths],
            "types": list(TYPES),
            "timeoutMs": 8000,
        },
    )
    assert [r["closed"] for r in results] == [True] * len(rows), results
    sent_back: dict[str, str] = server.get_json(f"/reconnects?run={token}")
    return {
        row.name: (
            tuple(tuple(event) for event in result["seen"]),
            sent_back.get(path, NO_RECONNECTION),
        )
        for row, path, result in zip(rows, paths, results, strict=True)
    }


@pytest.mark.browser
@pytest.mark.server
def test_chromium_observes_the_table(
    chromium_page: Page, start_server: t.Callable[..., Server]
) -> None:
    server = start_server("pywsgi", app=APP)
    observed = read_in_chromium(chromium_page, server, "raw", ROWS)
    assert observed == {
        row.name: ((), NO_RECONNECTION)
        if row.chromium_refuses
        else (row.events, row.last_id)
        for row in ROWS
    }
    # The library's own streams say UTF-8 (see the encoded test).
    assert [row.name for row in ROWS if row.chromium_refuses] == ["format-utf-8"]


@pytest.mark.browser
@pytest.mark.server
def test_chromium_observes_the_encoded_events_as_the_table(
    chromium_page: Page, start_server: t.Callable[..., Server]
) -> None:
    server = start_server("pywsgi", app=APP)
    observed = read_in_chromium(chromium_page, server, "encoded", ENCODABLE)
    assert observed == {row.name: (row.events, row.last_id) for row in ENCODABLE}
