"""The Server-Sent Events wire format, without I/O.

This module imports only the standard library. It turns :class:`Event` objects
into the exact bytes of the ``text/event-stream`` format and parses such bytes
back with the algorithm of the WHATWG HTML standard ("Server-sent events",
section 9.2.6, "Interpreting an event stream").
"""

from __future__ import annotations

import codecs
import enum
import json
import re
import typing as t
from dataclasses import dataclass
from dataclasses import field

__all__ = [
    "HEARTBEAT",
    "Event",
    "EventParser",
    "ReceivedEvent",
    "encode",
    "encode_retry",
    "parse",
]

#: A comment line followed by a blank line: keeps proxies from timing the
#: stream out and makes a write that reveals a dead client. It must carry at
#: least one byte, as servers drop empty chunks without touching the socket.
HEARTBEAT = b":\n\n"

# Only CR, LF and CRLF end a line in an event stream. ``str.splitlines()``
# also splits on U+2028, U+2029, NEL, VT, FF and others, which would corrupt
# data that contains them.
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_FORBIDDEN_IN_FIELD = re.compile(r"[\r\n\0]")
# Lone surrogates cannot be encoded to UTF-8.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_text(name: str, value: str) -> str:
    if _SURROGATE.search(value):
        raise ValueError(
            f"Event {name} contains a lone surrogate, which cannot be encoded as UTF-8."
        )
    return value


def _check_field(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"Event {name} must be a str, not {type(value).__name__}.")
    if _FORBIDDEN_IN_FIELD.search(value):
        raise ValueError(
            f"Event {name} {value!r} contains CR, LF or NUL, which would"
            " break the event stream framing."
        )
    return _check_text(name, value)


def _data_text(data: object) -> str:
    if isinstance(data, str):
        return _check_text("data", data)
    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            return bytes(data).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"Event data bytes are not valid UTF-8: {e}") from None
    try:
        text = json.dumps(
            data, ensure_ascii=False, separators=(",", ":"), allow_nan=False
        )
    except TypeError as e:
        raise TypeError(
            f"Event data of type {type(data).__name__} is not JSON serialisable: {e}"
        ) from None
    except ValueError as e:
        # NaN or infinity (which no JSON parser reads), or a circular reference.
        raise ValueError(
            f"Event data of type {type(data).__name__} cannot be sent as JSON: {e}"
        ) from None
    return _check_text("data", text)


class _Missing(enum.Enum):
    NO_DATA = "NO_DATA"

    def __repr__(self) -> str:
        return "<no data>"


#: The default of :attr:`Event.data`: no ``data`` at all, not even empty.
_NO_DATA = _Missing.NO_DATA


@dataclass(frozen=True)
class Event:
    """One server-sent event.

    :param data: the payload. A ``str`` is sent as is, ``bytes`` must be UTF-8,
        anything else is serialised as compact JSON. Leave it out for a block
        that browsers do not dispatch: comment lines, an ``id`` that only
        moves the client's last event id, a ``retry`` that only sets its
        reconnection delay. ``data=""`` is an event with empty data.
    :param event: the event type; ``None`` sends an unnamed event, which
        browsers dispatch as ``message``. An event type without ``data``
        is dispatched with empty data.
    :param id: the event id. Events published through a channel get an id
        assigned by the library; generator views may set their own.
    :param retry: the reconnection delay, in milliseconds, for the client.
    :param comment: a comment sent before the fields; clients ignore it.
    :raises ValueError: if ``event`` or ``id`` contains CR, LF or NUL, if
        ``retry`` is negative, if ``data`` is bytes that are not UTF-8 or
        JSON with NaN or infinity, or if a text has a lone surrogate.
    :raises TypeError: if ``data`` cannot be serialised, or a field has the
        wrong type.

    .. versionchanged:: 0.2
        Without ``data`` (and without ``event``) no ``data:`` line is sent,
        so browsers dispatch nothing; before, an empty ``message`` was
        dispatched.

    .. versionadded:: 0.1
    """

    data: t.Any = _NO_DATA
    event: str | None = None
    id: str | None = None
    retry: int | None = None
    comment: str | None = None
    #: ``data`` as the text that is sent on the wire, ``None`` when the block
    #: has no ``data:`` line.
    text: str | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.event is not None:
            _check_field("event", self.event)
        if self.id is not None:
            _check_field("id", self.id)
        if self.retry is not None:
            if isinstance(self.retry, bool) or not isinstance(self.retry, int):
                raise TypeError(
                    f"Event retry must be an int of milliseconds,"
                    f" not {type(self.retry).__name__}."
                )
            if self.retry < 0:
                raise ValueError(f"Event retry must not be negative: {self.retry}.")
        if self.comment is not None:
            if not isinstance(self.comment, str):
                raise TypeError(
                    f"Event comment must be a str, not {type(self.comment).__name__}."
                )
            _check_text("comment", self.comment)
        if self.data is not _NO_DATA:
            text: str | None = _data_text(self.data)
        elif self.event is not None:
            text = ""
        else:
            text = None
        object.__setattr__(self, "text", text)


def encode(event: Event) -> bytes:
    """Return the wire bytes of ``event``, ending with the blank line that
    ends its block (and dispatches it, if it has data).

    Line breaks in ``data`` (LF, CRLF or a lone CR) split it into several
    ``data:`` lines, which a conforming parser joins back with LF. Other
    characters, U+2028 and NEL included, are sent unchanged.
    """
    parts: list[str] = []
    if event.comment is not None:
        for line in _LINE_BREAK.split(event.comment):
            parts.append(f": {line}\n" if line else ":\n")
    if event.event is not None:
        parts.append(f"event: {event.event}\n")
    if event.id is not None:
        parts.append(f"id: {event.id}\n")
    if event.retry is not None:
        parts.append(f"retry: {event.retry}\n")
    if event.text is not None:
        for line in _LINE_BREAK.split(event.text):
            parts.append(f"data: {line}\n")
    parts.append("\n")
    return "".join(parts).encode("utf-8")


def encode_retry(milliseconds: int) -> bytes:
    """Return a block that only sets the client's reconnection delay."""
    if isinstance(milliseconds, bool) or not isinstance(milliseconds, int):
        raise TypeError("retry must be an int of milliseconds")
    if milliseconds < 0:
        raise ValueError(f"retry must not be negative: {milliseconds}")
    return b"retry: %d\n\n" % milliseconds


@dataclass(frozen=True)
class ReceivedEvent:
    """An event as a client dispatches it.

    .. versionadded:: 0.1
    """

    #: The event type, ``"message"`` when the event had none.
    event: str
    #: The data lines joined with LF.
    data: str
    #: The last event id at the time of dispatch (it persists across events).
    id: str = ""
    #: The ``retry`` value given in this event's block, if any.
    retry: int | None = None


_BOM = "\ufeff"


class EventParser:
    """Incremental event stream parser following the WHATWG algorithm.

    Feed it bytes as they arrive; it returns the events completed so far.
    It handles a leading BOM, CR, LF and CRLF line endings (also when a CRLF
    is split across two chunks), fields without a colon, one optional space
    after the colon, ``id`` values containing NUL (ignored), ``retry`` values
    that are not all ASCII digits (ignored) and comments.

    :attr:`last_event_id` is what a browser would send back as
    ``Last-Event-ID``: it changes when a block ends with a blank line, also
    for a block with an ``id`` and no data, never for a block that has not
    ended.

    .. versionchanged:: 0.2
        ``last_event_id`` no longer changes before the block ends.

    .. versionadded:: 0.1
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""
        self._started = False
        self._skip_lf = False
        self._data: list[str] = []
        self._event = ""
        self._block_retry: int | None = None
        self._id_buffer = ""
        #: The last event id, as a browser's ``lastEventId``: set from the
        #: ``id`` fields of a block when the block ends with a blank line,
        #: even if it had no data, and kept across blocks. A block that has
        #: not ended yet does not change it.
        self.last_event_id = ""
        #: The reconnection time most recently set by a ``retry`` field.
        self.retry: int | None = None

    def feed(self, chunk: bytes) -> list[ReceivedEvent]:
        """Parse ``chunk`` and return the events it completed."""
        text = self._decoder.decode(chunk)
        return self._consume(text)

    def _consume(self, text: str) -> list[ReceivedEvent]:
        if not self._started:
            text = self._buffer + text
            self._buffer = ""
            if not text:
                return []
            self._started = True
            if text[0] == _BOM:
                text = text[1:]
        else:
            text = self._buffer + text
        if self._skip_lf and text:
            if text[0] == "\n":
                text = text[1:]
            self._skip_lf = False
        events: list[ReceivedEvent] = []
        pos = 0
        for match in _LINE_BREAK.finditer(text):
            line = text[pos : match.start()]
            pos = match.end()
            if match.group() == "\r" and pos == len(text):
                # A CR at the end of the input may be the first half of CRLF.
                self._skip_lf = True
            event = self._line(line)
            if event is not None:
                events.append(event)
        self._buffer = text[pos:]
        return events

    def _line(self, line: str) -> ReceivedEvent | None:
        if not line:
            return self._dispatch()
        if line[0] == ":":
            return None
        name, colon, value = line.partition(":")
        if colon and value[:1] == " ":
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._id_buffer = value
        elif name == "retry":
            if value and value.isascii() and value.isdigit():
                self.retry = int(value)
                self._block_retry = self.retry
        return None

    def _dispatch(self) -> ReceivedEvent | None:
        data, event, retry = self._data, self._event, self._block_retry
        self._data, self._event, self._block_retry = [], "", None
        self.last_event_id = self._id_buffer
        if not data:
            return None
        return ReceivedEvent(
            event=event or "message",
            data="\n".join(data),
            id=self.last_event_id,
            retry=retry,
        )

    def close(self) -> list[ReceivedEvent]:
        """Signal the end of the stream. An incomplete event is discarded, as
        the standard says; only undecoded trailing bytes are flushed."""
        self._consume(self._decoder.decode(b"", final=True))
        return []


def parse(data: bytes | str) -> list[ReceivedEvent]:
    """Parse a complete event stream and return its events.

    .. versionadded:: 0.1
    """
    parser = EventParser()
    if isinstance(data, str):
        events = parser._consume(data)
    else:
        events = parser.feed(data)
    parser.close()
    return events
