"""Positions in per-channel histories, the ids that carry them, and the replay
plan that resumes from them. Pure functions: no I/O, no Redis.

A channel's history is numbered by itself: an *epoch*, fixed when the
channel's history was created (a number, the creation time in milliseconds;
a history that was lost and created again gets a new one), and an *offset*
that counts its events from 1. :class:`Position` ``(epoch, offset)`` says
"every event of this channel up to ``offset`` was seen"; epoch 0 with offset
0 says "nothing of this channel was seen, whatever its epoch".

Event ids (what clients send back as ``Last-Event-ID``):

- a stream on one channel gets the channel's position, ``<epoch>.<offset>``
  with the epoch in base 36: ``mij0p8g0.42``;
- a stream on several channels gets the position of each, ``~``-separated,
  each behind a 4-character tag of the channel name:
  ``Qx7amij0p8g0.42~b0Fzmij0p9k1.7``. Ten channels take about 170 bytes.

Every character is URL-safe (``A-Z a-z 0-9 . ~``), so an id also travels
unencoded in ``?lastEventId=``. Ids of the ``<milliseconds>-<sequence>``
form (one counter for all channels) are recognised as *stale*: the client
is told to reset.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import re
import typing as t

__all__ = [
    "Entry",
    "Plan",
    "Position",
    "Snapshot",
    "Stale",
    "channel_tag",
    "format_position",
    "format_positions",
    "parse_positions",
    "plan_replay",
]

_B62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
#: Longest id accepted from a client (64 channels of a long epoch and offset).
MAX_ID_LENGTH = 2048
MAX_CHANNELS = 64
_TAG_LENGTH = 4
_POSITION = re.compile(r"([0-9a-z]{1,13})\.([0-9]{1,19})")
_ITEM = re.compile(r"([0-9A-Za-z]{4})([0-9a-z]{1,13})\.([0-9]{1,19})")
_STALE = re.compile(r"[0-9]{1,15}-[0-9]{1,19}")


class Position(t.NamedTuple):
    """Where a reader is in one channel's history."""

    epoch: int
    offset: int


#: "Nothing seen": replay the whole retained history, whatever its epoch.
START = Position(0, 0)


class Stale:
    """A well-formed id of the earlier ``<milliseconds>-<sequence>`` form."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"Stale({self.text!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Stale) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)


def _base36(n: int) -> str:
    if n == 0:
        return "0"
    digits = []
    while n:
        n, r = divmod(n, 36)
        digits.append(_B62[r].lower() if r >= 10 else _B62[r])
    return "".join(reversed(digits))


def channel_tag(channel: str) -> str:
    """Four base-62 characters from a hash of ``channel``: which position of a
    several-channel id belongs to which channel."""
    digest = hashlib.blake2b(channel.encode(), digest_size=8).digest()
    n = int.from_bytes(digest, "big") % 62**_TAG_LENGTH
    tag = []
    for _ in range(_TAG_LENGTH):
        n, r = divmod(n, 62)
        tag.append(_B62[r])
    return "".join(tag)


def format_position(position: Position) -> str:
    """``<epoch base 36>.<offset>``: the id of an event of a one-channel stream."""
    return f"{_base36(position.epoch)}.{position.offset}"


def format_positions(
    channels: t.Sequence[str], positions: t.Mapping[str, Position]
) -> str:
    """The id for a stream on ``channels``: one position per channel, tagged
    when there are several (a channel without one is at :data:`START`)."""
    if len(channels) == 1:
        return format_position(positions.get(channels[0], START))
    return "~".join(
        channel_tag(c) + format_position(positions.get(c, START)) for c in channels
    )


def parse_positions(
    value: str | None, channels: t.Sequence[str]
) -> dict[str, Position | None] | Stale | None:
    """Read a client's id for a stream on ``channels``.

    Returns ``None`` when there is no id, or it is malformed or oversized (all
    treated as no id); :class:`Stale` for an id of the earlier form; else the
    position of each channel, ``None`` for a channel the id does not cover
    (an id of a stream on other channels, or of a one-channel stream given
    to a stream on several)."""
    if not value or len(value) > MAX_ID_LENGTH:
        return None
    # Only the optional whitespace of an HTTP header value is dropped.
    value = value.strip(" \t")
    if _STALE.fullmatch(value):
        return Stale(value)
    single = _POSITION.fullmatch(value)
    if single is not None:
        position = Position(int(single.group(1), 36), int(single.group(2)))
        if len(channels) == 1:
            return {channels[0]: position}
        return dict.fromkeys(channels)
    items = value.split("~")
    if len(items) > MAX_CHANNELS:
        return None
    by_tag: dict[str, Position | None] = {}
    for item in items:
        match = _ITEM.fullmatch(item)
        if match is None:
            return None
        tag = match.group(1)
        position = Position(int(match.group(2), 36), int(match.group(3)))
        # A tag twice (two channels whose tags collide): neither is trusted.
        by_tag[tag] = None if tag in by_tag else position
    return {c: by_tag.get(channel_tag(c)) for c in channels}


# -- replay planning --


class Entry(t.NamedTuple):
    """One stored event of a channel."""

    offset: int
    #: Publishing time (orders a replay across channels).
    time: int
    #: The stored fields, decoded by the backend.
    fields: t.Any


@dataclasses.dataclass
class Snapshot:
    """A channel's history as read in one atomic step."""

    #: Epoch and offset of the newest event; None: the channel has no history.
    top: Position | None
    #: Offset of the oldest retained event (None: none retained).
    first: int | None
    #: Retained entries after the position asked for, oldest first (all
    #: retained entries when the epoch asked for is not the history's).
    entries: list[Entry]


@dataclasses.dataclass
class Plan:
    """What to send a stream before its live events."""

    #: ``"unknown"`` (an id this history never gave: stale, newer than it, or
    #: of a history that was lost) or ``"expired"`` (events were trimmed
    #: before they could be replayed); None: resumed exactly.
    reset: str | None
    #: (channel, entry) to replay, in publishing order.
    replay: list[tuple[str, Entry]]
    #: Each channel's position once the replay was sent.
    positions: dict[str, Position]


def plan_replay(
    since: t.Mapping[str, Position | None] | Stale,
    snapshots: t.Mapping[str, Snapshot],
    joins: t.Mapping[str, Position],
    *,
    resume: bool,
    history: bool = True,
) -> Plan:
    """Plan a stream's replay.

    :param since: per channel, the client's position (None: not covered by
        its id), or :class:`Stale`.
    :param snapshots: per channel, the history after ``since`` as read.
    :param joins: per channel, the position from which live events reach the
        stream (what the process's reader has handed out): entries up to it
        are replayed, later ones come live. Each is at or below its
        snapshot's top.
    :param resume: the client sent an id (so it expects to be told when it
        cannot be resumed exactly); False for a new stream, whose ``since``
        is the channels' positions when it subscribed.
    :param history: False when no history is kept: missed events are
        reported, not replayed.
    """
    reset: str | None = None
    streams: list[list[tuple[str, Entry]]] = []
    channels = list(joins)
    if isinstance(since, Stale):
        if resume:
            reset = "unknown"
        since = dict.fromkeys(channels)
    for channel in channels:
        join = joins[channel]
        snap = snapshots[channel]
        position = since.get(channel)
        if position is None:
            # Not covered by the client's id: live from here on.
            if resume:
                reset = reset or "unknown"
            continue
        top = snap.top
        if top is None:
            # No history: nothing to replay. An id of a history that existed
            # (it was lost) is unknown.
            if resume and position.offset:
                reset = reset or "unknown"
            continue
        if position.epoch not in (0, top.epoch):
            # Another history of this channel: it was lost and created again
            # since. Everything retained of the new one is news.
            if resume:
                reset = reset or "unknown"
            after = 0
        elif position.epoch == 0:
            after = 0
        else:
            after = position.offset
            if after > top.offset:
                if resume:
                    reset = reset or "unknown"
                continue
        wanted = [e for e in snap.entries if after < e.offset <= join.offset]
        first = wanted[0].offset if wanted else snap.first
        missed = join.offset > after
        if missed and (first is None or first > after + 1):
            # Some of what followed the client's position was trimmed.
            if resume:
                reset = reset or "expired"
        if not history:
            if resume and missed:
                reset = reset or "expired"
            continue
        streams.append([(channel, e) for e in wanted])
    # Each channel in its own order; across channels, by publishing time.
    replay = list(heapq.merge(*streams, key=lambda item: item[1].time))
    return Plan(reset, replay, dict(joins))
