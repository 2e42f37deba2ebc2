"""Resume planning shared by the backends: plain functions of keys and
entries, tested without a server.

A client comes back with the id of the last event it got. What it missed is
every retained event of its channels newer than that id, in id order; when
that is not exactly what was published after it, it first gets an
``eventstream-reset`` event saying why:

- ``"unknown"``: its id is older than anything this broker remembers (the
  process restarted, or Redis lost its data) or newer than anything it
  assigned;
- ``"expired"``: an event newer than its id was dropped from a channel's
  history before it could be replayed.
"""

from __future__ import annotations

import heapq
import typing as t

from ..broker import format_id
from ..broker import Frame
from ..broker import Key
from ..broker import reset_frame

__all__ = ["is_unknown", "next_id", "read_starts", "replay", "reset_reason"]

T = t.TypeVar("T")


def is_unknown(last: Key, oldest: Key | None, newest: Key | None) -> bool:
    """Whether ``last`` lies outside what the broker remembers: before
    ``oldest`` (the first id it assigned, if known) or after ``newest`` (the
    newest it assigned; ``None``: it assigned none)."""
    return newest is None or last > newest or (oldest is not None and last < oldest)


def reset_reason(
    last: Key,
    oldest: Key | None,
    newest: Key | None,
    dropped: t.Iterable[Key | None] = (),
) -> str | None:
    """Why resuming after ``last`` cannot be exact, or ``None`` if it can.

    :param dropped: per channel, the newest key known to be gone from its
        history (``None``: nothing known to be gone).
    """
    if is_unknown(last, oldest, newest):
        return "unknown"
    if any(key is not None and key > last for key in dropped):
        return "expired"
    return None


def replay(
    last: Key,
    reason: str | None,
    newest: Key | None,
    streams: t.Iterable[t.Iterable[T]],
    key: t.Callable[[T], Key],
    frame: t.Callable[[T], Frame | None],
) -> list[Frame]:
    """The frames to queue for a subscription before its live events: the
    reset (if ``reason``), then every item of ``streams`` (each sorted by
    ``key``) in key order, as ``frame(item)`` (``None``: skipped)."""
    frames: list[Frame] = []
    if reason is not None:
        frames.append(reset_frame(reason, format_id(last), newest))
    for item in heapq.merge(*streams, key=key):
        f = frame(item)
        if f is not None:
            frames.append(f)
    return frames


def next_id(key: Key) -> str:
    """The smallest id after ``key``, as an inclusive start of a range."""
    ms, seq = key
    if seq >= 2**64 - 1:
        return f"{ms + 1}-0"
    return f"{ms}-{seq + 1}"


def read_starts(
    starts: t.Iterable[tuple[tuple[str, ...], Key | None]],
) -> dict[str, Key]:
    """Per channel, the oldest position to read after, over subscriptions
    given as ``(channels, since)`` (``None``: nothing older is wanted)."""
    out: dict[str, Key] = {}
    for channels, since in starts:
        position = since if since is not None else (1 << 62, 0)
        for channel in channels:
            if channel not in out or position < out[channel]:
                out[channel] = position
    return out
