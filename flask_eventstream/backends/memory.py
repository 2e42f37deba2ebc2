"""The in-memory backend: one process, history in a ring buffer per channel."""

from __future__ import annotations

import bisect
import collections
import dataclasses
import heapq
import threading
import time

from ..broker import Broker
from ..broker import format_id
from ..broker import Frame
from ..broker import Key
from ..broker import parse_id
from ..broker import reset_frame
from ..broker import Subscription
from ..sse import Event

__all__ = ["MemoryBackend"]


class _Channel:
    __slots__ = ("history", "dropped")

    def __init__(self, size: int) -> None:
        self.history: collections.deque[Frame] = collections.deque(maxlen=size)
        #: Key of the newest frame that fell out of the history.
        self.dropped: Key | None = None


class MemoryBackend:
    """Ids are ``<milliseconds>-<sequence>``, increasing across all channels of
    the broker, so one id resumes any set of channels. A client whose id is
    older than this process (the server restarted) or than what a channel
    retains gets an ``eventstream-reset`` before the retained events it has
    not seen.
    """

    def __init__(self, broker: Broker, history: int = 1000) -> None:
        self._broker = broker
        self._history_size = max(history, 0)
        self._channels: dict[str, _Channel] = {}
        self._lock = threading.Lock()
        self._last: Key = (int(time.time() * 1000), 0)
        #: Ids below this were handed out by an earlier process.
        self._start: Key = self._last

    def _next_key(self) -> Key:
        ms = int(time.time() * 1000)
        last_ms, seq = self._last
        key = (ms, 0) if ms > last_ms else (last_ms, seq + 1)
        self._last = key
        return key

    def publish(self, channel: str, event: Event) -> Event:
        with self._lock:
            key = self._next_key()
            event = dataclasses.replace(event, id=format_id(key))
            frame = self._broker.encode(event, key)
            state = self._channels.get(channel)
            if state is None:
                state = self._channels[channel] = _Channel(self._history_size)
            history = state.history
            if not self._history_size:
                # Nothing is retained: every event is dropped at once, so a
                # client resuming from before it gets a reset, not silence.
                state.dropped = key
            else:
                if len(history) == self._history_size:
                    state.dropped = history[0].key
                history.append(frame)
            self._broker.fanout(channel, frame, event)
        return event

    def attach(self, sub: Subscription, last_id: str | None) -> None:
        last = parse_id(last_id)
        with self._lock:
            if last is not None:
                sub.replay(self._missed(sub.channels, last))
            self._broker.connect(sub)

    def _missed(self, channels: tuple[str, ...], last: Key) -> list[Frame]:
        # Older than this process, or newer than anything it assigned.
        reason = "unknown" if last < self._start or last > self._last else None
        streams = []
        for name in channels:
            state = self._channels.get(name)
            if state is None:
                continue
            if reason is None and state.dropped is not None and state.dropped > last:
                reason = "expired"
            streams.append(_after(state.history, last))
        frames = list(heapq.merge(*streams, key=_key)) if streams else []
        if reason is not None:
            frames.insert(0, reset_frame(reason, format_id(last), self._last))
        return frames

    def detach(self, sub: Subscription) -> None:
        self._broker.disconnect(sub)

    def close(self) -> None:
        with self._lock:
            self._channels.clear()


def _key(frame: Frame) -> Key:
    assert frame.key is not None
    return frame.key


def _after(history: collections.deque[Frame], last: Key) -> list[Frame]:
    """Frames of ``history`` (sorted by key) newer than ``last``."""
    frames = list(history)
    return frames[bisect.bisect_right(frames, last, key=_key) :]
