"""The in-memory backend: one process, history in a ring buffer per channel."""

from __future__ import annotations

import bisect
import collections
import dataclasses
import threading
import time

from ..broker import encode_frame
from ..broker import format_id
from ..broker import Frame
from ..broker import Key
from ..broker import Sink
from ..broker import Subscription
from ..presence import PresenceTable
from ..sse import Event
from .planning import replay
from .planning import reset_reason

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

    Publishing stores the event under a lock and puts it in an outbox; the
    outbox is handed to the sink outside the lock, in id order, by one caller
    at a time. A receiver of the sink that publishes again (from the same
    greenlet, or another thread) adds to the outbox and returns; the caller
    that is delivering hands its event on next.
    """

    def __init__(
        self, sink: Sink, history: int = 1000, *, max_event_size: int = 1 << 20
    ) -> None:
        self._sink = sink
        self._history_size = max(history, 0)
        self._max_event_size = max_event_size
        self._channels: dict[str, _Channel] = {}
        self._lock = threading.Lock()
        self._outbox: collections.deque[tuple[str, Frame, Event]] = collections.deque()
        self._delivering = False
        self._last: Key = (int(time.time() * 1000), 0)
        #: Ids below this were handed out by an earlier process.
        self._start: Key = self._last
        self._presence = PresenceTable()
        self._revoked: dict[str, int] = {}

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
            frame = encode_frame(event, key, self._max_event_size)
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
            self._outbox.append((channel, frame, event))
            if self._delivering:
                return event
            self._delivering = True
        self._deliver()
        return event

    def _deliver(self) -> None:
        """Hand the outbox to the sink, holding no lock; raise the first
        error of a receiver once the outbox is empty."""
        error: BaseException | None = None
        while True:
            with self._lock:
                if not self._outbox:
                    self._delivering = False
                    break
                channel, frame, event = self._outbox.popleft()
            try:
                self._sink.deliver(channel, frame, event)
            except BaseException as e:
                if error is None:
                    error = e
        if error is not None:
            raise error

    def attach(self, sub: Subscription, last: Key | None) -> None:
        with self._lock:
            frames, reason = (
                self._missed(sub.channels, last) if last is not None else ([], None)
            )
            # Events still in the outbox are older than the subscription (or
            # in its replay): the floor keeps them out of its live queue.
            sub.start(frames, self._last, reason)

    def _missed(
        self, channels: tuple[str, ...], last: Key
    ) -> tuple[list[Frame], str | None]:
        """The frames missed after ``last``, and the reset reason if any."""
        streams = []
        dropped = []
        for name in channels:
            state = self._channels.get(name)
            if state is not None:
                dropped.append(state.dropped)
                streams.append(_after(state.history, last))
        # Older than this process, or newer than anything it assigned.
        reason = reset_reason(last, self._start, self._last, dropped)
        return replay(last, reason, self._last, streams, _key, _same), reason

    def detach(self, sub: Subscription) -> None:
        pass

    # -- users: this process is every process --

    def track(self, channels: tuple[str, ...], user: str, delta: int) -> None:
        table = self._presence
        if delta > 0:
            changed = table.add(channels, user)
        else:
            changed = table.remove(channels, user)
        table.clear_changes()
        for channel in changed:
            self._sink.presence_changed(channel, user, delta > 0)

    def presence(self, channel: str) -> dict[str, int]:
        return self._presence.users(channel)

    def revoke(self, user: str, at_ms: int) -> None:
        with self._lock:
            if at_ms > self._revoked.get(user, 0):
                self._revoked[user] = at_ms
        self._sink.note_revoked(user, at_ms)
        self._sink.control("revoke", None, user)

    def revoked_at(self, user: str) -> int | None:
        return self._revoked.get(user)

    def disconnect(self, channel: str | None, user: str | None) -> None:
        self._sink.control("disconnect", channel, user)

    def close(self) -> None:
        with self._lock:
            self._channels.clear()


def _key(frame: Frame) -> Key:
    assert frame.key is not None
    return frame.key


def _same(frame: Frame) -> Frame:
    return frame


def _after(history: collections.deque[Frame], last: Key) -> list[Frame]:
    """Frames of ``history`` (sorted by key) newer than ``last``."""
    frames = list(history)
    return frames[bisect.bisect_right(frames, last, key=_key) :]
