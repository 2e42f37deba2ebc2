"""Property tests: what is encoded parses back exactly, and no data can forge
an event or a field."""

from __future__ import annotations

import re
import warnings

from hypothesis import example
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from flask_eventstream.sse import encode
from flask_eventstream.sse import Event
from flask_eventstream.sse import EventParser
from flask_eventstream.sse import parse
from flask_eventstream.sse import ReceivedEvent

# When a property fails, Hypothesis's pytest plugin imports libcst to suggest
# a patch, and libcst's import warns (mypy_extensions.TypedDict), which
# filterwarnings=error turns into an INTERNALERROR that hides the failure.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import hypothesis.extra._patching  # noqa: F401
    except ImportError:
        pass

PROPERTY_SETTINGS = settings(max_examples=150, deadline=None)

# Characters that break naive framing, mixed into arbitrary unicode so that
# they come up often.
TRICKY = [
    "\r",
    "\n",
    "\r\n",
    "\n\n",
    "\r\r",
    "\u2028",
    "\u2029",
    "\x85",
    "\x0b",
    "\x0c",
    "\x1c",
    "\x1d",
    "\x1e",
    "\0",
    "\ufeff",
    ":",
    " ",
    "data: x",
    "\n\nevent: forged\ndata: y\n\n",
    "\nid: forged\n",
    "\r\nretry: 1\r\n",
    "\u00e9",
    "\U0001f600",
]

# Lone surrogates cannot be encoded to UTF-8 and are rejected by Event.
ANY_CHAR = st.characters(blacklist_categories=("Cs",))
TEXT = st.lists(st.one_of(ANY_CHAR, st.sampled_from(TRICKY)), max_size=30).map("".join)
FIELD = st.text(
    alphabet=st.one_of(
        st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\0"),
        st.sampled_from(["\u2028", "\u2029", "\x85", "\x0b", "\x0c", " ", ":"]),
    ),
    max_size=20,
)
RETRY = st.one_of(st.none(), st.just(0), st.integers(min_value=0, max_value=2**63))
JSON = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=False, allow_infinity=False),
        TEXT,
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(TEXT, children, max_size=4),
    ),
    max_leaves=10,
)


def normalised(text: str) -> str:
    """Data as a conforming client sees it: CRLF and CR arrive as LF."""
    return re.sub(r"\r\n|\r", "\n", text)


def expected(event: Event) -> ReceivedEvent:
    return ReceivedEvent(
        event=event.event or "message",
        data=normalised(event.text),
        id=event.id if event.id is not None else "",
        retry=event.retry,
    )


@PROPERTY_SETTINGS
@given(
    data=TEXT,
    event=st.one_of(st.none(), FIELD),
    id=st.one_of(st.none(), st.just("0"), FIELD),
    retry=RETRY,
    comment=st.one_of(st.none(), TEXT),
)
@example(data="", event=None, id="0", retry=0, comment=None)
@example(data="\r", event=None, id=None, retry=None, comment=None)
@example(
    data="a\u2028b\u2029c\x85d\x0be\x0cf", event=None, id=None, retry=None, comment=None
)
@example(data="end\n", event="", id="", retry=None, comment="")
@example(data="\r\n\r\n", event="e", id="1", retry=1, comment="\n\n")
def test_parse_of_encode_gives_back_the_event(
    data: str, event: str | None, id: str | None, retry: int | None, comment: str | None
) -> None:
    sent = Event(data, event=event, id=id, retry=retry, comment=comment)
    assert parse(encode(sent)) == [expected(sent)]


@PROPERTY_SETTINGS
@given(data=JSON)
def test_json_data_round_trips(data: object) -> None:
    sent = Event(data)
    [received] = parse(encode(sent))
    assert received == expected(sent)
    if not isinstance(data, str):
        assert received.data == sent.text


@PROPERTY_SETTINGS
@given(data=st.binary(max_size=40).filter(lambda b: _utf8(b)))
def test_utf8_bytes_round_trip(data: bytes) -> None:
    [received] = parse(encode(Event(data)))
    assert received.data == normalised(data.decode("utf-8"))


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@PROPERTY_SETTINGS
@given(data=TEXT, comment=st.one_of(st.none(), TEXT))
def test_data_and_comment_cannot_add_an_event_or_a_field(
    data: str, comment: str | None
) -> None:
    # Whatever the data and comment, the stream holds exactly one event, and
    # its type, id and retry are the ones that were set; no other field line
    # than data appears after the fixed ones.
    sent = Event(data, event="e", id="42", retry=7, comment=comment)
    wire = encode(sent)
    parser = EventParser()
    events = parser.feed(wire)
    assert events == [ReceivedEvent("e", normalised(data), "42", 7)]
    assert parser.last_event_id == "42"
    assert parser.retry == 7
    lines = re.split(rb"\r\n|\r|\n", wire)
    assert lines[-2:] == [b"", b""]
    body = [line for line in lines[:-2] if not line.startswith(b":")]
    assert body[:3] == [b"event: e", b"id: 42", b"retry: 7"]
    assert all(line.startswith(b"data: ") for line in body[3:])
    assert len(body[3:]) == len(re.split(r"\r\n|\r|\n", data))


@PROPERTY_SETTINGS
@given(
    items=st.lists(
        st.tuples(TEXT, st.one_of(st.none(), FIELD), st.one_of(st.none(), FIELD)),
        min_size=1,
        max_size=5,
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=6),
)
def test_a_stream_of_events_parses_back_in_any_chunking(
    items: list[tuple[str, str | None, str | None]], cuts: list[int]
) -> None:
    sent = [Event(data, event=name, id=id) for data, name, id in items]
    wire = b"".join(encode(e) for e in sent)
    last_id = ""
    want = []
    for e in sent:
        if e.id is not None:
            last_id = e.id
        want.append(ReceivedEvent(e.event or "message", normalised(e.text), last_id))
    assert parse(wire) == want
    bounds = sorted({min(c, len(wire)) for c in cuts} | {0, len(wire)})
    parser = EventParser()
    got: list[ReceivedEvent] = []
    for start, end in zip(bounds, bounds[1:], strict=False):
        got.extend(parser.feed(wire[start:end]))
    assert got == want


@PROPERTY_SETTINGS
@given(
    stream=st.binary(max_size=200)
    | st.lists(
        st.sampled_from(
            [b"data: x", b"data", b"id: 1", b"retry: 5", b":c", b"\r", b"\n", b"\r\n"]
            + [b"\xef\xbb\xbf", b"\xc3", b"\xa9", b"event: e", b" ", b":"]
        ),
        max_size=40,
    ).map(b"".join),
    size=st.integers(min_value=1, max_value=9),
)
def test_chunked_parse_equals_whole_parse_for_any_bytes(
    stream: bytes, size: int
) -> None:
    parser = EventParser()
    got: list[ReceivedEvent] = []
    for i in range(0, len(stream), size):
        got.extend(parser.feed(stream[i : i + size]))
    got.extend(parser.close())
    assert got == parse(stream)
