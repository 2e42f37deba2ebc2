"""The points where a stream's life and an event's path can be counted.

An :class:`Observer` is called at each such point; the default one does
nothing. A metrics exporter (or a test) subclasses it and sets it as a
broker's ``observer``. Its methods run on the hot path, in the publishing or
the streaming greenlet: they must not block, and must not raise. They are
never called under a lock of the library.
"""

from __future__ import annotations

import typing as t

if t.TYPE_CHECKING:  # pragma: no cover
    from .sse import Event

__all__ = ["Observer"]


class Observer:
    """Called at every point worth a metric; does nothing by default."""

    def stream_opened(self, connection_id: int, channels: tuple[str, ...]) -> None:
        """A stream started (after the view produced its first item)."""

    def stream_ended(
        self, connection_id: int, channels: tuple[str, ...], reason: str
    ) -> None:
        """A stream that started was released; ``reason`` as in
        :data:`~flask_eventstream.signals.client_disconnected`."""

    def published(self, channel: str, event: Event) -> None:
        """This process published ``event`` (with its id)."""

    def publish_failed(self, channel: str, error: Exception) -> None:
        """Publishing to ``channel`` raised ``error`` (bad input, or the
        broker could not take the event)."""

    def delivered(self, channel: str, event: Event, subscribers: int) -> None:
        """``event`` reached this process and was handed to ``subscribers``
        local subscriptions."""

    def resumed(self, channels: tuple[str, ...], result: str) -> None:
        """A subscription asked to resume: ``"exact"``, or the reset reason
        (``"unknown"``, ``"expired"``)."""
