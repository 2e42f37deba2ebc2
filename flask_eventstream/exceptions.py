"""Exceptions raised by flask-eventstream."""

from __future__ import annotations

__all__ = ["EventStreamError", "PublishError"]


class EventStreamError(Exception):
    """Base class of the errors this library raises itself.

    .. versionadded:: 0.1
    """


class PublishError(EventStreamError):
    """An event could not be handed to the broker, for example because Redis
    stayed unreachable through the bounded retry. The event is not known to be
    published: when Redis went away after storing it but before answering, it
    is delivered once all the same, so retrying may publish it twice. Nothing
    is ever dropped silently.

    .. versionadded:: 0.1
    """
