"""The wire format: exact bytes for every kind of event, and the validation
that keeps a field from ever breaking the framing (CWE-93)."""

from __future__ import annotations

import decimal
import re
import typing as t

import pytest

from flask_eventstream.sse import encode
from flask_eventstream.sse import encode_retry
from flask_eventstream.sse import Event
from flask_eventstream.sse import HEARTBEAT
from flask_eventstream.sse import parse
from flask_eventstream.sse import ReceivedEvent

ENCODE_TABLE: list[tuple[Event, bytes]] = [
    # plain data
    (Event("hi"), b"data: hi\n\n"),
    (Event(data="hello world"), b"data: hello world\n\n"),
    # every field, in the order they are written
    (
        Event("x", event="chat", id="7", retry=1500, comment="note"),
        b": note\nevent: chat\nid: 7\nretry: 1500\ndata: x\n\n",
    ),
    (Event("x", event="tick"), b"event: tick\ndata: x\n\n"),
    (Event("x", id="abc"), b"id: abc\ndata: x\n\n"),
    (Event("x", retry=10), b"retry: 10\ndata: x\n\n"),
    (Event("x", comment="keep"), b": keep\ndata: x\n\n"),
    (Event("x", comment=""), b":\ndata: x\n\n"),
    (Event("x", comment="a\nb\r\nc\rd"), b": a\n: b\n: c\n: d\ndata: x\n\n"),
    # line breaks in data: LF, CRLF and a lone CR each start a new data line
    (Event("a\nb"), b"data: a\ndata: b\n\n"),
    (Event("a\r\nb"), b"data: a\ndata: b\n\n"),
    (Event("a\rb"), b"data: a\ndata: b\n\n"),
    (Event("a\n\nb"), b"data: a\ndata: \ndata: b\n\n"),
    (Event("a\r\rb"), b"data: a\ndata: \ndata: b\n\n"),
    (Event("a\n\r\nb"), b"data: a\ndata: \ndata: b\n\n"),
    (Event("\r\n"), b"data: \ndata: \n\n"),
    (Event("\n"), b"data: \ndata: \n\n"),
    (Event("\r"), b"data: \ndata: \n\n"),
    (Event("end\n"), b"data: end\ndata: \n\n"),
    (Event("\nstart"), b"data: \ndata: start\n\n"),
    # only CR and LF are line breaks: these stay inside their line
    (Event("a\u2028b"), "data: a\u2028b\n\n".encode()),
    (Event("a\u2029b"), "data: a\u2029b\n\n".encode()),
    (Event("a\x85b"), "data: a\x85b\n\n".encode()),
    (Event("a\x0bb"), b"data: a\x0bb\n\n"),
    (Event("a\x0cb"), b"data: a\x0cb\n\n"),
    (Event("a\x1cb\x1db\x1eb"), b"data: a\x1cb\x1db\x1eb\n\n"),
    (Event("a\tb"), b"data: a\tb\n\n"),
    (Event("h\xe9llo \u4e16\u754c \U0001f600"), "data: h\xe9llo 世界 😀\n\n".encode()),
    # leading spaces and colons in data survive (one space follows the colon)
    (Event(" x"), b"data:  x\n\n"),
    (Event(":x"), b"data: :x\n\n"),
    (Event("data: x"), b"data: data: x\n\n"),
    # values that are easy to lose
    (Event(""), b"data: \n\n"),
    # without data: no data line, so nothing is dispatched
    (Event(), b"\n"),
    (Event(comment="keep"), b": keep\n\n"),
    (Event(id="7"), b"id: 7\n\n"),
    (Event(retry=10), b"retry: 10\n\n"),
    # ... unless it has an event type
    (Event(event="ping"), b"event: ping\ndata: \n\n"),
    (Event("0", id="0"), b"id: 0\ndata: 0\n\n"),
    (Event("x", retry=0), b"retry: 0\ndata: x\n\n"),
    (Event("x", id=""), b"id: \ndata: x\n\n"),
    (Event("x", event=""), b"event: \ndata: x\n\n"),
    # bytes are UTF-8 text
    (Event(b"raw"), b"data: raw\n\n"),
    (Event("é".encode()), "data: é\n\n".encode()),
    (Event(bytearray(b"a\nb")), b"data: a\ndata: b\n\n"),
    (Event(memoryview(b"mv")), b"data: mv\n\n"),
    # anything else is compact JSON (non-ASCII kept as is)
    (Event({"a": 1, "b": [1, 2]}), b'data: {"a":1,"b":[1,2]}\n\n'),
    (Event([1, "two", None]), b'data: [1,"two",null]\n\n'),
    (Event(42), b"data: 42\n\n"),
    (Event(0), b"data: 0\n\n"),
    (Event(1.5), b"data: 1.5\n\n"),
    (Event(True), b"data: true\n\n"),
    (Event(None), b"data: null\n\n"),
    (Event({"t": "é\n"}), 'data: {"t":"é\\n"}\n\n'.encode()),
    (Event({}), b"data: {}\n\n"),
    (Event([]), b"data: []\n\n"),
]


def test_encode_exact_bytes() -> None:
    # One test for the whole table (each test item costs the leak check);
    # every mismatching row is reported.
    wrong = [
        (event, encode(event), wire)
        for event, wire in ENCODE_TABLE
        if encode(event) != wire
    ]
    assert wrong == []


def test_text_is_the_data_as_sent() -> None:
    assert Event({"a": [1, 2]}).text == '{"a":[1,2]}'
    assert Event(b"xy").text == "xy"
    assert Event("a\r\nb").text == "a\r\nb"


def test_comment_only_event_has_no_data_line_and_dispatches_nothing() -> None:
    note = Event(comment="keep-alive")
    assert encode(note) == b": keep-alive\n\n"
    assert note.text is None
    assert parse(encode(note)) == []
    lines = Event(comment="a\nb", id="5", retry=100)
    assert encode(lines) == b": a\n: b\nid: 5\nretry: 100\n\n"
    assert parse(encode(lines) + encode(Event("x"))) == [
        ReceivedEvent("message", "x", "5")
    ]
    # Empty data is still an event, and so is an event type without data.
    assert encode(Event("", comment="c")) == b": c\ndata: \n\n"
    assert parse(encode(Event("", comment="c"))) == [ReceivedEvent("message", "")]
    assert parse(encode(Event(event="ping"))) == [ReceivedEvent("ping", "")]
    # Data that serialises to a JSON null is data.
    assert parse(encode(Event(None))) == [ReceivedEvent("message", "null")]


def test_heartbeat_and_retry_blocks() -> None:
    assert HEARTBEAT == b":\n\n"
    assert parse(HEARTBEAT) == []
    assert encode_retry(3000) == b"retry: 3000\n\n"
    assert encode_retry(0) == b"retry: 0\n\n"
    with pytest.raises(ValueError, match="negative"):
        encode_retry(-1)
    with pytest.raises(TypeError, match="retry"):
        encode_retry(1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="retry"):
        encode_retry(True)


@pytest.mark.parametrize("field", ["event", "id"])
def test_cr_lf_nul_in_event_or_id_is_rejected(field: str) -> None:
    for value in ["a\nb", "a\rb", "a\r\nb", "a\0b", "\n", "\r", "\0", "x\n", "\nx"]:
        with pytest.raises(ValueError, match=rf"Event {field}\b") as info:
            Event("x", **{field: value})
        assert "CR, LF or NUL" in str(info.value), value


def test_injection_attempt_is_rejected_not_stripped() -> None:
    # If the value were stripped or passed through, the "data: evil" line or
    # the extra event would reach clients.
    for kwargs in (
        {"event": "chat\ndata: evil\n\nevent: admin"},
        {"id": "1\n\ndata: evil"},
        {"id": "1\r\nretry: 1"},
    ):
        with pytest.raises(ValueError):
            Event("x", **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["a\u2028b", "a\x85b", "a\x0bb", "a\x0cb", " x", ""])
def test_other_characters_are_allowed_in_event_and_id(value: str) -> None:
    encoded = encode(Event("x", event=value, id=value))
    assert f"event: {value}\nid: {value}\n".encode() in encoded


@pytest.mark.parametrize("field", ["event", "id", "comment"])
@pytest.mark.parametrize("value", [1, b"x", ["x"]])
def test_fields_must_be_strings(field: str, value: object) -> None:
    with pytest.raises(TypeError, match=rf"Event {field} must be a str"):
        Event("x", **{field: value})  # type: ignore[arg-type]


def test_negative_retry_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"Event retry must not be negative: -1"):
        Event("x", retry=-1)


@pytest.mark.parametrize("value", [1.0, 1.5, "10", True, False, [1]])
def test_non_int_retry_is_a_type_error(value: object) -> None:
    with pytest.raises(TypeError, match=r"Event retry must be an int"):
        Event("x", retry=value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "data", [b"\xff", b"abc\xc3", b"\xed\xa0\x80", bytearray(b"\x80")]
)
def test_non_utf8_bytes_is_a_value_error_naming_data(data: bytes) -> None:
    with pytest.raises(ValueError, match=r"Event data bytes are not valid UTF-8"):
        Event(data)


class Opaque:
    pass


@pytest.mark.parametrize(
    ("data", "name"),
    [
        (Opaque(), "Opaque"),
        ({1, 2}, "set"),
        (decimal.Decimal("1.5"), "Decimal"),
        ({"k": Opaque()}, "dict"),
        ([object()], "list"),
        ({("a",): 1}, "dict"),
    ],
)
def test_non_serialisable_data_is_a_type_error_naming_the_type(
    data: object, name: str
) -> None:
    with pytest.raises(TypeError, match=rf"Event data of type {name} is not JSON"):
        Event(data)


def test_circular_data_is_rejected_naming_data() -> None:
    data: list[t.Any] = []
    data.append(data)
    with pytest.raises((TypeError, ValueError), match=r"Event data"):
        Event(data)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), [float("-inf")]])
def test_non_finite_floats_are_rejected_naming_data(value: object) -> None:
    # json.dumps would write NaN/Infinity, which no JSON parser accepts.
    with pytest.raises(ValueError, match=r"Event data"):
        Event(value)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"data": "a\ud800b"}, "data"),
        ({"data": {"k": "\udfff"}}, "data"),
        ({"data": "x", "event": "\ud800"}, "event"),
        ({"data": "x", "id": "\udc00"}, "id"),
        ({"data": "x", "comment": "\ud800"}, "comment"),
    ],
)
def test_lone_surrogates_are_rejected_at_construction(
    kwargs: dict[str, t.Any], field: str
) -> None:
    # They cannot be encoded to UTF-8: the error must come when the Event is
    # built, naming the field, not later on the wire.
    with pytest.raises(ValueError, match=rf"Event {field}\b"):
        Event(**kwargs)


def test_validation_happens_before_anything_is_encoded() -> None:
    # A bad field raises even when the data is fine, and the reverse.
    with pytest.raises(ValueError):
        Event({"ok": True}, id="1\n")
    with pytest.raises(TypeError):
        Event(Opaque(), id="1")


def test_event_is_immutable_and_compares_by_fields() -> None:
    event = Event("x", event="e", id="1")
    assert event == Event("x", event="e", id="1")
    with pytest.raises(AttributeError):
        event.id = "2"  # type: ignore[misc]


def test_encoded_bytes_parse_back() -> None:
    # The encode table, read by the parser, gives back what was sent; a
    # block without data gives nothing.
    for event, wire in ENCODE_TABLE:
        if event.text is None:
            assert parse(wire) == []
            continue
        [received] = parse(wire)
        assert received.data == re.sub(r"\r\n|\r", "\n", event.text)
        assert received.event == (event.event or "message")
        assert received.id == (event.id or "")
        assert received.retry == event.retry
