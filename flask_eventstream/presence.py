"""Presence bookkeeping of one process: which users have how many open
streams on each channel, and the changes not yet handed on to a shared
store. Plain data: no Flask, no gevent, no network."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from collections.abc import Iterator

__all__ = ["Changes", "PresenceTable"]

#: Net changes of open streams per (channel, user) since they were last taken.
Changes = dict[tuple[str, str], int]


class PresenceTable:
    """``{channel: {user: open streams}}`` on this process.

    :meth:`add` and :meth:`remove` return the channels on which the user's
    count went from 0 to 1, or from 1 to 0, here; :meth:`take_changes` hands
    over the net changes since it was last called (for a store shared by
    several processes), and :meth:`give_back` returns changes that could not
    be handed on. Safe to use from several threads.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, dict[str, int]] = {}
        self._changes: Changes = {}

    def add(self, channels: Iterable[str], user: str) -> list[str]:
        """Count one more stream of ``user`` on each of ``channels``."""
        first = []
        with self._lock:
            for channel in channels:
                users = self._counts.setdefault(channel, {})
                n = users.get(user, 0) + 1
                users[user] = n
                if n == 1:
                    first.append(channel)
                self._change(channel, user, 1)
        return first

    def remove(self, channels: Iterable[str], user: str) -> list[str]:
        """Count one stream fewer; channels the user was not counted on are
        ignored."""
        last = []
        with self._lock:
            for channel in channels:
                users = self._counts.get(channel)
                n = users.get(user, 0) if users is not None else 0
                if users is None or n == 0:
                    continue
                if n == 1:
                    del users[user]
                    if not users:
                        del self._counts[channel]
                    last.append(channel)
                else:
                    users[user] = n - 1
                self._change(channel, user, -1)
        return last

    def _change(self, channel: str, user: str, delta: int) -> None:
        key = (channel, user)
        n = self._changes.get(key, 0) + delta
        if n:
            self._changes[key] = n
        else:
            self._changes.pop(key, None)

    def users(self, channel: str) -> dict[str, int]:
        """``{user: open streams}`` on ``channel``."""
        with self._lock:
            return dict(self._counts.get(channel, {}))

    def count(self, channel: str, user: str) -> int:
        with self._lock:
            return self._counts.get(channel, {}).get(user, 0)

    def snapshot(self) -> Changes:
        """Every count, as changes from nothing (to rebuild a lost store)."""
        with self._lock:
            return {
                (channel, user): n
                for channel, users in self._counts.items()
                for user, n in users.items()
            }

    def take_changes(self) -> Changes:
        """The net changes since the last call (none that cancel out)."""
        with self._lock:
            changes, self._changes = self._changes, {}
        return changes

    def give_back(self, changes: Changes) -> None:
        """Put back changes that :meth:`take_changes` gave and that could not
        be applied; they merge with the ones made since."""
        with self._lock:
            for (channel, user), delta in changes.items():
                self._change(channel, user, delta)

    def clear_changes(self) -> None:
        with self._lock:
            self._changes = {}

    @property
    def pending(self) -> bool:
        return bool(self._changes)

    def __iter__(self) -> Iterator[tuple[str, str, int]]:
        for (channel, user), n in self.snapshot().items():
            yield channel, user, n

    def __len__(self) -> int:
        with self._lock:
            return sum(len(users) for users in self._counts.values())
