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
from .connection import ENVIRON_KEY
from .sse import EventParser
from .sse import parse
from .sse import ReceivedEvent

__all__ = ["EventParser", "ReceivedEvent", "parse", "read_events"]


def _connection(response: t.Any) -> Connection | None:
    """The stream behind a test-client response, if it is one.

    Werkzeug's test client runs the app with a copy of the request's environ,
    so the connection is looked for in the response's close callbacks (the
    stream registers :meth:`Connection.release` with ``call_on_close``), and
    in the environ for clients that do not copy it.
    """
    request = getattr(response, "request", None)
    environ = getattr(request, "environ", None) or {}
    conn = environ.get(ENVIRON_KEY)
    if isinstance(conn, Connection):
        return conn
    todo: list[t.Any] = [getattr(response, "response", None)]
    seen: set[int] = set()
    while todo and len(seen) < 50:
        obj = todo.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, Connection):
            return obj
        owner = getattr(obj, "__self__", None)
        if owner is not None:
            todo.append(owner)
        for name in ("_callbacks", "_on_close"):
            callbacks = getattr(obj, name, None)
            if isinstance(callbacks, list):
                todo.extend(callbacks)
    return None


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
    conn = _connection(response)
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
