"""What a browser observes for the bytes of an event stream: a table drawn
from the web-platform-tests ``eventsource/`` format tests. Each row names the
file under ``eventsource/`` whose case it restates, mostly with data of its
own.

Each row has the raw bytes a server sends (including what the WPT server
appends after its message), the events an ``EventSource`` dispatches for
them as ``(type, data, lastEventId)``, the last event id the browser holds
when the stream has ended (what it sends back as ``Last-Event-ID``, ``""``
for none) and the reconnection time that the stream set. ``sends`` lists
:class:`~flask_eventstream.Event` objects whose encoding a browser must
observe in exactly the same way (empty when no Event can produce it).

Used by tests/test_conformance.py and served to Chromium by
tests/apps/conformance.py.
"""

from __future__ import annotations

import typing as t
from dataclasses import dataclass

from flask_eventstream import Event

__all__ = ["ROWS", "TYPES", "Row", "Seen"]

#: An event as a page sees it: ``(event.type, event.data, event.lastEventId)``.
Seen = tuple[str, str, str]

EVENT_STREAM = "text/event-stream"
#: 2 KiB of filler for long comment lines.
LONG = "z" * 2048


@dataclass(frozen=True)
class Row:
    source: str
    wire: bytes
    events: tuple[Seen, ...]
    last_id: str = ""
    retry: int | None = None
    sends: tuple[Event, ...] = ()
    content_type: str = EVENT_STREAM
    #: Tells apart rows from one file.
    part: str = ""
    #: Why Chromium, unlike the standard, fails the connection for the raw
    #: bytes (no event, no reconnection); empty when it follows the table.
    chromium_refuses: str = ""

    @property
    def name(self) -> str:
        return self.source.split(".", 1)[0] + (f"-{self.part}" if self.part else "")


def msg(data: str, last_id: str = "", type: str = "message") -> Seen:
    return (type, data, last_id)


ROWS: tuple[Row, ...] = (
    # Lines, fields and dispatch.
    Row(
        "event-data.html",
        # A two-line event; a comment and an unknown field dispatch nothing;
        # "Data" is not "data"; a bare "data" line is an empty data line.
        b"data:one\ndata: two\n\n:\nnope:x\n\nnope:x\nData:y\n\ndata\n\ndata:end\n\n",
        (msg("one\ntwo"), msg(""), msg("end")),
        sends=(Event("one\ntwo"), Event(""), Event("end")),
    ),
    Row(
        "format-field-data.htm",
        b"data:\n\ndata\ndata\n\ndata:last\n\n\n",
        (msg(""), msg("\n"), msg("last")),
        sends=(Event(""), Event("\n"), Event(data="last")),
    ),
    Row(
        "format-field-unknown.htm",
        b"data:a\n data\ndata\nfoo:bar\nloose text\n:a comment\ndata:b\n\n\n",
        (msg("a\n\nb"),),
        sends=(Event("a\n\nb"),),
    ),
    Row(
        "format-field-parsing.htm",
        # NUL in data is kept; one space after the colon is dropped, a second
        # is data; names are case-sensitive; a field name with NUL, "da-ta",
        # "data_5" and " data" are unknown; a lone CR ends a line.
        b"data:\x00\ndata:  2\rData:1\ndata\x00:2\ndata:1\r\x00data:4\n"
        b"da-ta:3\rdata_5\ndata:3\rdata:\r\n data:32\ndata:4\n\n",
        (msg("\x00\n 2\n1\n3\n\n4"),),
        sends=(Event("\x00\n 2\n1\n3\n\n4"),),
    ),
    Row(
        "format-leading-space.htm",
        # Only a space is dropped after the colon, not a tab.
        b"data:\tx\rdata: \ndata:y\n\n\n",
        (msg("\tx\n\ny"),),
        sends=(Event("\tx\r\n\r\ny"),),
    ),
    Row(
        "format-newlines.htm",
        # CRLF, LF and CR end lines; the last line ends with a CR that the
        # server's LF completes to one CRLF.
        b"data:p\r\ndata\ndata:q\r\n\r\n",
        (msg("p\n\nq"),),
        sends=(Event("p\r\rq"),),
    ),
    Row(
        "format-null-character.html",
        b"data:\x00\n\n\n\n",
        (msg("\x00"),),
        sends=(Event("\x00"),),
    ),
    Row(
        "format-comments.js",
        # Comments with NUL, CR and 2 KiB of text between the data lines
        # of one event, and a comment line that looks like a field.
        b"data:1\r:\x00\n:\r\ndata:2\n:"
        + LONG.encode()
        + b"\rdata:3\n:data:fail\r:"
        + LONG.encode()
        + b"\ndata:4\n\n",
        (msg("1\n2\n3\n4"),),
        # A comment-only Event dispatches nothing.
        sends=(Event(comment=LONG), Event("1\n2\n3\n4", comment="data:fail")),
    ),
    Row(
        "format-data-before-final-empty-line.js",
        # The last block is not ended by a blank line: no event, and its id
        # is not the last event id.
        b"retry:150\ndata:first\n\nid:unseen\ndata:second\n",
        (msg("first"),),
        retry=150,
        sends=(Event("first", retry=150),),
    ),
    # Byte order marks.
    Row(
        "format-bom.js",
        # One BOM at the start is skipped; a BOM later makes the field name
        # "\ufeffdata", which is unknown.
        b"\xef\xbb\xbfdata:1\n\n\xef\xbb\xbfdata:2\n\ndata:3\n\n\n",
        (msg("1"), msg("3")),
        sends=(Event("1"), Event("3")),
    ),
    Row(
        "format-bom-2.any.js",
        # Only one BOM is skipped: a second one spoils the first field.
        b"\xef\xbb\xbf\xef\xbb\xbfdata:1\n\ndata:2\n\ndata:3\n\n\n",
        (msg("2"), msg("3")),
        sends=(Event("2"), Event("3")),
    ),
    # Event types.
    Row(
        "format-field-event.htm",
        b"event:custom\ndata:x\n\ndata:y\n\n\n",
        (msg("x", type="custom"), msg("y")),
        sends=(Event("x", event="custom"), Event("y")),
    ),
    Row(
        "format-field-event-empty.htm",
        # An empty type (after the one space is dropped) is "message".
        b"event: \ndata:d\n\n\n",
        (msg("d"),),
        sends=(Event("d", event=""),),
    ),
    # Ids.
    Row(
        "format-field-id.htm",
        "id: \u2026\nretry: 200\ndata: hello\n\n\n".encode(),
        (msg("hello", "\u2026"),),
        last_id="\u2026",
        retry=200,
        # An id-only block sets the id without an event.
        sends=(Event(id="\u2026", retry=200), Event("hello")),
    ),
    Row(
        "format-field-id-3.htm",
        b"id: 1\ndata: 1\n\ndata:2\n\n",
        (msg("1", "1"), msg("2", "1")),
        last_id="1",
        sends=(Event("1", id="1"), Event("2")),
        part="persists",
    ),
    Row(
        "format-field-id-3.htm",
        b"id: 1\ndata: 1\n\nid: 2\ndata:2\n\ndata:3\n\n",
        (msg("1", "1"), msg("2", "2"), msg("3", "2")),
        last_id="2",
        sends=(Event("1", id="1"), Event("2", id="2"), Event("3")),
        part="changes",
    ),
    Row(
        "format-field-id-3.htm",
        b"id: 1\ndata: 1\n\nid:\ndata:2\n\ndata:3\n\n",
        (msg("1", "1"), msg("2"), msg("3")),
        sends=(Event("1", id="1"), Event("2", id=""), Event("3")),
        part="resets",
    ),
    Row(
        "format-field-id-null.window.js",
        # An id containing NUL is ignored: the previous id stays.
        b"id: 7\ndata: a\n\nid: \x00\x00\ndata: b\n\nid: x\x00\ndata: c\n\n"
        b"id: \x00x\ndata: d\n\nid:  \x00\ndata: e\n\n",
        (msg("a", "7"), msg("b", "7"), msg("c", "7"), msg("d", "7"), msg("e", "7")),
        last_id="7",
        sends=(Event("a", id="7"), Event("b"), Event("c"), Event("d"), Event("e")),
    ),
    # Retry.
    Row(
        "format-field-retry-bogus.htm",
        # "400x" is not all digits: ignored, the 400 before stays.
        b"retry:400\nretry:100x\ndata:x\n\n\n",
        (msg("x"),),
        retry=400,
        sends=(Event("x", retry=400),),
    ),
    Row(
        "format-field-retry-empty.htm",
        b"retry\ndata:test\n\n\n",
        (msg("test"),),
        sends=(Event("test"),),
    ),
    # Encoding and MIME type.
    Row(
        "format-utf-8.any.js",
        # Always UTF-8, whatever charset the Content-Type names.
        "data:ok\u2026 caf\u00e9 \U0001f600\n\n\n".encode(),
        (msg("ok\u2026 caf\u00e9 \U0001f600"),),
        sends=(Event("ok\u2026 caf\u00e9 \U0001f600"),),
        content_type="text/event-stream;charset=windows-1252",
        chromium_refuses="a charset other than UTF-8 in the Content-Type",
    ),
    Row(
        "format-mime-trailing-semicolon.htm",
        b"data: data\n\n\n",
        (msg("data"),),
        sends=(Event("data"),),
        content_type="text/event-stream;",
    ),
)

#: Every event type the table expects, for the page's listeners.
TYPES: tuple[str, ...] = tuple(
    sorted({seen[0] for row in ROWS for seen in row.events} | {"message"})
)


def _check_names_unique(rows: t.Sequence[Row]) -> None:
    names = [row.name for row in rows]
    assert len(names) == len(set(names)), names


_check_names_unique(ROWS)
