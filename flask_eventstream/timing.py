"""The timing rules of one stream: when a heartbeat is due, when the stream
reaches the end of its lifetime, when a write has blocked too long.

:class:`Timing` is fed the current time and does no I/O, so that the rules
are tested without gevent or a clock; the loops that wait
(:mod:`.connection`) and the watchdog's sweep (:mod:`._gevent`) ask it.
"""

from __future__ import annotations

import random
import typing as t

__all__ = ["JITTER", "Timing"]

#: A stream's lifetime is ``max_lifetime`` times a factor drawn from this
#: range, so that streams opened together do not all reconnect together.
JITTER = (0.9, 1.1)


class Timing:
    """The clock of one stream, in the seconds of :func:`time.monotonic`.

    :param now: when the stream opened.
    :param heartbeat: seconds without a write after which a heartbeat is due.
    :param send_timeout: seconds a single write may block.
    :param max_lifetime: seconds after which the stream ends (jittered).
    :param uniform: draws the jitter factor (``random.uniform``).
    """

    __slots__ = ("heartbeat", "send_timeout", "deadline", "last_write", "writing_since")

    def __init__(
        self,
        now: float,
        heartbeat: float,
        send_timeout: float,
        max_lifetime: float | None = None,
        uniform: t.Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.heartbeat = heartbeat
        self.send_timeout = float(send_timeout)
        #: When the stream ends at the latest, or ``None``.
        self.deadline: float | None = None
        if max_lifetime:
            self.deadline = now + max_lifetime * uniform(*JITTER)
        #: When the last write started.
        self.last_write = now
        #: When the write under way started, or ``None`` between writes.
        self.writing_since: float | None = None

    def end_by(self, deadline: float) -> None:
        """End at ``deadline`` at the latest (an earlier one stays)."""
        if self.deadline is None or deadline < self.deadline:
            self.deadline = deadline

    def heartbeat_due(self, now: float) -> bool:
        return now - self.last_write >= self.heartbeat

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def due(self, now: float) -> bool:
        """Whether a heartbeat or the end of the stream is due."""
        return self.heartbeat_due(now) or self.expired(now)

    def timeout(self, now: float, *, heartbeats: bool = True) -> float:
        """Seconds until the next heartbeat (if ``heartbeats``) or the end,
        whichever comes first; ``inf`` for neither."""
        timeout = self.last_write + self.heartbeat - now if heartbeats else _INF
        if self.deadline is not None:
            timeout = min(timeout, self.deadline - now)
        return max(timeout, 0.0)

    def send_timed_out(self, now: float) -> bool:
        """Whether the write under way has blocked longer than allowed."""
        since = self.writing_since
        return since is not None and now - since > self.send_timeout


_INF = float("inf")
