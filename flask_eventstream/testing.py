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

from . import _gevent
from ._state import Settings
from ._state import state_for
from .broker import Broker
from .connection import Connection
from .connection import find_connection
from .sse import EventParser
from .sse import parse
from .sse import ReceivedEvent

__all__ = [
    "EventParser",
    "ReceivedEvent",
    "broker",
    "connection",
    "direct_writes",
    "parse",
    "read_events",
    "served_by",
    "settings",
]


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


def settings(app: t.Any) -> Settings:
    """The ``EVENTSTREAM_*`` settings of ``app`` as its
    :class:`~flask_eventstream.EventStream` read them in ``init_app``:
    checked, with the defaults filled in, in a frozen dataclass whose
    attributes are the keys without the prefix, in lower case
    (``settings(app).retry`` for ``EVENTSTREAM_RETRY``).

    :raises RuntimeError: if no ``EventStream`` is registered on ``app``.

    .. versionadded:: 0.2
    """
    return state_for(app).settings


def direct_writes(app: t.Any) -> dict[str, int]:
    """``{"direct": n, "server": m}`` for the open streams of ``app`` in this
    process: those whose frames are written straight to their socket while
    they wait (gunicorn ``-k gevent``, gevent's ``pywsgi``), and those the
    server writes.

    :raises RuntimeError: if no ``EventStream`` is registered on ``app``.

    .. versionadded:: 0.2
    """
    live = list(state_for(app).live)
    direct = 0
    for conn in live:
        writer = getattr(conn, "writer", None)
        if writer is not None and writer.ready():
            direct += 1
    return {"direct": direct, "server": len(live) - direct}


def served_by(app: t.Any) -> dict[str, int]:
    """``{"greenlet": n, "hub": m, "thread": k}`` for the open streams of
    ``app`` in this process: those a greenlet of the server serves, those
    served from gevent's hub once the server's greenlet let them go (a view
    that returns a subscription, under gunicorn's gevent worker; see
    :data:`EVENTSTREAM_PARK_STREAMS`), and those of a threaded server.

    :raises RuntimeError: if no ``EventStream`` is registered on ``app``.

    .. versionadded:: 0.2
    """
    counts = {"greenlet": 0, "hub": 0, "thread": 0}
    for conn in list(state_for(app).live):
        task = getattr(conn, "task", None)
        if task is None:
            counts["thread"] += 1
        elif isinstance(task, _gevent.Parked):
            counts["hub"] += 1
        else:
            counts["greenlet"] += 1
    return counts


def broker(app: t.Any) -> Broker:
    """The broker of ``app`` in this process, which every stream and publish
    of the app goes through. A test may set its ``observer`` to a subclass of
    :class:`flask_eventstream.observe.Observer` to record each stream and
    event, and calls ``close()`` to let go of its backend (a Redis reader
    and connections) when the app is done with.

    :raises RuntimeError: if no ``EventStream`` is registered on ``app``.

    .. versionadded:: 0.2
    """
    return state_for(app).broker


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
