"""The parser follows the WHATWG algorithm, "Interpreting an event stream"."""

from __future__ import annotations

from flask_eventstream.sse import EventParser
from flask_eventstream.testing import parse
from flask_eventstream.testing import ReceivedEvent


def ev(
    data: str, event: str = "message", id: str = "", retry: int | None = None
) -> ReceivedEvent:
    return ReceivedEvent(event=event, data=data, id=id, retry=retry)


def feed_in_chunks(stream: bytes, size: int) -> list[ReceivedEvent]:
    parser = EventParser()
    events: list[ReceivedEvent] = []
    for i in range(0, len(stream), size):
        events.extend(parser.feed(stream[i : i + size]))
    events.extend(parser.close())
    return events


PARSE_TABLE: list[tuple[bytes, list[ReceivedEvent]]] = [
    # dispatch on a blank line; the type defaults to "message"
    (b"data: hi\n\n", [ev("hi")]),
    (b"data: a\n\ndata: b\n\n", [ev("a"), ev("b")]),
    (b"event: chat\ndata: hi\n\n", [ev("hi", "chat")]),
    (b"event: chat\ndata: a\n\ndata: b\n\n", [ev("a", "chat"), ev("b")]),
    (b"event:\ndata: x\n\n", [ev("x")]),
    # data lines are joined with LF; the last LF is removed
    (b"data: a\ndata: b\n\n", [ev("a\nb")]),
    (b"data: a\ndata:\ndata: b\n\n", [ev("a\n\nb")]),
    (b"data\n\n", [ev("")]),
    (b"data:\n\n", [ev("")]),
    (b"data: \n\n", [ev("")]),
    (b"data\ndata\n\n", [ev("\n")]),
    # exactly one leading space is stripped, nothing else
    (b"data:  two\n\n", [ev(" two")]),
    (b"data:x\n\n", [ev("x")]),
    (b"data:\tx\n\n", [ev("\tx")]),
    (b"data: x \n\n", [ev("x ")]),
    (b"data: a:b: c\n\n", [ev("a:b: c")]),
    # line terminators: LF, CR, CRLF, mixed
    (b"data: a\r\rdata: b\r\r", [ev("a"), ev("b")]),
    (b"data: a\r\n\r\ndata: b\r\n\r\n", [ev("a"), ev("b")]),
    (b"data: a\rdata: b\r\ndata: c\n\n", [ev("a\nb\nc")]),
    (b"data: a\n\r\n", [ev("a")]),
    (b"data: a\r\n\n", [ev("a")]),
    # a BOM is skipped only at the very start
    (b"\xef\xbb\xbfdata: x\n\n", [ev("x")]),
    (b"\xef\xbb\xbf\xef\xbb\xbfdata: x\n\n", []),
    (b"data: a\n\n\xef\xbb\xbfdata: b\n\n", [ev("a")]),
    (b"data: \xef\xbb\xbfx\n\n", [ev("\ufeffx")]),
    # comments are ignored, also between fields
    (b": hello\n\n", []),
    (b":\n\n", []),
    (b": c\ndata: a\n: c\ndata: b\n\n", [ev("a\nb")]),
    # a field without a colon has an empty value
    (b"event\ndata: x\n\n", [ev("x")]),
    (b"id\ndata: x\n\n", [ev("x")]),
    # unknown fields are ignored (names are case-sensitive)
    (b"foo: bar\ndata: x\n\n", [ev("x")]),
    (b"Data: x\n\n", []),
    (b" data: x\n\n", []),
    (b"data : x\n\n", []),
    (b"foo: bar\n\n", []),
    # no dispatch while the data buffer is empty; the type is reset anyway
    (b"event: e\n\n", []),
    (b"event: e\n\ndata: x\n\n", [ev("x")]),
    (b"\n\n\n", []),
    (b"id: 5\n\n", []),
    # an incomplete event at the end is discarded
    (b"data: x\n", []),
    (b"data: x", []),
    (b"data: a\n\ndata: b", [ev("a")]),
    (b"data: a\n\ndata: b\n", [ev("a")]),
    # the last event id persists across events
    (b"id: 1\ndata: a\n\ndata: b\n\n", [ev("a", id="1"), ev("b", id="1")]),
    (b"id: 1\n\ndata: a\n\n", [ev("a", id="1")]),
    (
        b"id: 1\ndata: a\n\nid\ndata: b\n\n",
        [ev("a", id="1"), ev("b", id="")],
    ),
    (b"id: 0\ndata: a\n\n", [ev("a", id="0")]),
    (b"id: 1\nid: 2\ndata: a\n\n", [ev("a", id="2")]),
    # an id containing NUL is ignored
    (b"id: 1\ndata: a\n\nid: 2\x003\ndata: b\n\n", [ev("a", id="1"), ev("b", id="1")]),
    (b"id: \x00\ndata: a\n\n", [ev("a")]),
    # retry: ASCII digits only, otherwise ignored
    (b"retry: 1000\ndata: a\n\n", [ev("a", retry=1000)]),
    (b"retry: 0\ndata: a\n\n", [ev("a", retry=0)]),
    (b"retry: 007\ndata: a\n\n", [ev("a", retry=7)]),
    (b"retry: 1.5\ndata: a\n\n", [ev("a")]),
    (b"retry: -1\ndata: a\n\n", [ev("a")]),
    (b"retry: 1e3\ndata: a\n\n", [ev("a")]),
    (b"retry: \ndata: a\n\n", [ev("a")]),
    (b"retry\ndata: a\n\n", [ev("a")]),
    (b"retry:  10\ndata: a\n\n", [ev("a")]),
    (b"retry: 10 \ndata: a\n\n", [ev("a")]),
    ("retry: \u0663\ndata: a\n\n".encode(), [ev("a")]),
    ("retry: \xb2\ndata: a\n\n".encode(), [ev("a")]),
    (b"retry: 5\ndata: a\n\ndata: b\n\n", [ev("a", retry=5), ev("b")]),
    # invalid UTF-8 is replaced, not an error
    (b"data: a\xffb\n\n", [ev("a\ufffdb")]),
    (b"data: \xc3\n\n", [ev("\ufffd")]),
    (b"event: \xfe\ndata: x\n\n", [ev("x", "\ufffd")]),
    # unicode that is not a line break stays in the line
    (
        "data: a\u2028b\x85c\x0bd\x0ce\u2029f\n\n".encode(),
        [ev("a\u2028b\x85c\x0bd\x0ce\u2029f")],
    ),
]


def _parse_all_ways(stream: bytes) -> list[tuple[str, list[ReceivedEvent]]]:
    results = [("whole", parse(stream))]
    # fed in chunks, down to a byte at a time
    for size in (1, 2, 3, 7):
        results.append((f"chunks of {size}", feed_in_chunks(stream, size)))
    try:
        text = stream.decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:
        results.append(("text", parse(text)))
    return results


def test_parse() -> None:
    # One test for the whole table (each test item costs the leak check);
    # every mismatching row and way of feeding it is reported.
    wrong = [
        (stream, how, got, expected)
        for stream, expected in PARSE_TABLE
        for how, got in _parse_all_ways(stream)
        if got != expected
    ]
    assert wrong == []


def test_crlf_split_across_chunks_is_one_line_break() -> None:
    parser = EventParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\ndata: b\r") == []
    assert parser.feed(b"\n\r") == [ev("a\nb")]
    # the LF after that CR belongs to it: no second blank line, no event
    assert parser.feed(b"\ndata: c\r") == []
    assert parser.feed(b"\r") == [ev("c")]


def test_cr_at_a_chunk_end_then_text_is_two_lines() -> None:
    parser = EventParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"data: b\r\r") == [ev("a\nb")]


def test_cr_then_empty_chunk_then_lf() -> None:
    parser = EventParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"") == []
    assert parser.feed(b"\n") == []
    assert parser.feed(b"\n") == [ev("a")]


def test_multibyte_character_split_across_chunks() -> None:
    data = "data: é😀\n\n".encode()
    for cut in range(len(data) + 1):
        parser = EventParser()
        events = parser.feed(data[:cut]) + parser.feed(data[cut:])
        assert events == [ev("é😀")], cut


def test_bom_split_across_chunks_is_skipped() -> None:
    parser = EventParser()
    assert parser.feed(b"\xef") == []
    assert parser.feed(b"\xbb") == []
    assert parser.feed(b"\xbfdata: x\n\n") == [ev("x")]


def test_bom_after_an_empty_first_chunk_is_still_the_first() -> None:
    parser = EventParser()
    assert parser.feed(b"") == []
    assert parser.feed(b"\xef\xbb\xbfdata: x\n\n") == [ev("x")]


def test_parser_retry_attribute_is_the_reconnection_time() -> None:
    parser = EventParser()
    assert parser.retry is None
    assert parser.feed(b"retry: 3000\n\n") == []
    assert parser.retry == 3000
    assert parser.feed(b"retry: x\ndata: a\n\n") == [ev("a")]
    assert parser.retry == 3000
    assert parser.feed(b"retry: 10\n") == []
    assert parser.retry == 10


def test_last_event_id_attribute_persists() -> None:
    parser = EventParser()
    assert parser.last_event_id == ""
    parser.feed(b"id: 7\n\n")
    assert parser.last_event_id == "7"
    parser.feed(b"id: a\x00b\n\n")
    assert parser.last_event_id == "7"
    assert parser.feed(b"data: x\n\n") == [ev("x", id="7")]


def test_last_event_id_changes_only_when_a_block_ends() -> None:
    parser = EventParser()
    assert parser.feed(b"data:a\n\nid:x\ndata:b\n") == [ev("a")]
    # The block with id x has not ended: a client resuming now must not
    # claim to have seen it.
    assert parser.last_event_id == ""
    assert parser.feed(b"\n") == [ev("b", id="x")]
    assert parser.last_event_id == "x"
    parser.feed(b"id: y\n")
    assert parser.last_event_id == "x"
    assert parser.close() == []
    assert parser.last_event_id == "x"


def test_id_only_block_sets_last_event_id_without_an_event() -> None:
    parser = EventParser()
    assert parser.feed(b"id: 1\ndata: a\n\nid: 2\n") == [ev("a", id="1")]
    assert parser.last_event_id == "1"
    assert parser.feed(b"\n") == []
    assert parser.last_event_id == "2"
    # The id persists into the next event, which has none of its own.
    assert parser.feed(b"data: b\n\n") == [ev("b", id="2")]
    # An empty id resets it, at the end of its block too.
    assert parser.feed(b"id\n") == []
    assert parser.last_event_id == "2"
    assert parser.feed(b"\n") == []
    assert parser.last_event_id == ""


def test_close_discards_the_incomplete_event() -> None:
    parser = EventParser()
    assert parser.feed(b"data: a\n\ndata: b\n") == [ev("a")]
    assert parser.close() == []


def test_close_flushes_an_incomplete_utf8_sequence_as_replacement() -> None:
    parser = EventParser()
    assert parser.feed(b"data: x\n\n\xc3") == [ev("x")]
    assert parser.close() == []


def test_large_stream_byte_at_a_time_matches_whole() -> None:
    stream = b"".join(
        b"id: %d\r\nevent: e%d\rdata: line %d\ndata: \xc3\xa9\r\n\r\n" % (i, i, i)
        for i in range(50)
    )
    whole = parse(stream)
    assert len(whole) == 50
    assert whole[49] == ev("line 49\n\xe9", "e49", "49")
    assert feed_in_chunks(stream, 1) == whole
