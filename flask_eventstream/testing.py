"""Helpers for testing your own streams with pytest and Flask's test client.

.. code-block:: python

    def test_chat(app, client):
        response = client.get("/stream/lobby", buffered=False)
        stream.publish("lobby", "hi")
        [event] = read_events(response, 1)
        assert event.data == "hi"
"""

from __future__ import annotations

import time
import typing as t

from .connection import Connection
from .connection import find_connection
from .sse import EventParser
from .sse import parse
from .sse import ReceivedEvent

__all__ = ["EventParser", "ReceivedEvent", "connection", "parse", "read_events"]


def connection(response: t.Any) -> Connection | None:
    """The stream behind a test-client response, if it is one: to end it
    (:meth:`~flask_eventstream.connection.Connection.end`), give it a
    deadline (:meth:`~flask_eventstream.connection.Connection.set_deadline`)
    or look at its subscriptions.

    .. versionadded:: 0.2
    """
    request = getattr(response, "request", None)
    environ = getattr(request, "environ", None)
    return find_connection(environ) if environ is not None else None


def read_events(
    response: t.Any, count: int, timeout: float = 5.0
) -> list[ReceivedEvent]:
    """Read ``count`` events from a streaming test-client response (made with
    ``buffered=False``), then close it.

    The stream is told to end after ``timeout`` seconds, so a view that waits
    on a subscription or :meth:`EventStream.sleep` cannot hang the test.

    :raises TimeoutError: if fewer than ``count`` events arrived in time; the
        message lists those that did.
    """
    conn = connection(response)
    if conn is not None:
        conn.set_deadline(time.monotonic() + timeout)
    deadline = time.monotonic() + timeout
    parser = EventParser()
    events: list[ReceivedEvent] = []
    try:
        for chunk in response.response:
            if isinstance(chunk, str):
                chunk = chunk.encode("utf-8")
            events.extend(parser.feed(chunk))
            if len(events) >= count or time.monotonic() > deadline:
                break
    finally:
        response.close()
    if len(events) < count:
        raise TimeoutError(
            f"Expected {count} events within {timeout}s, got {len(events)}: {events!r}"
        )
    return events[:count]
