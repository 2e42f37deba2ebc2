"""Server-Sent Events for Flask on gevent."""

from __future__ import annotations

from .exceptions import EventStreamError
from .exceptions import PublishError
from .extension import EventStream
from .extension import GrantRefused
from .request import last_event_id
from .sse import Event
from .views import eventstream

__all__ = [
    "Event",
    "EventStream",
    "EventStreamError",
    "GrantRefused",
    "PublishError",
    "eventstream",
    "last_event_id",
]
