"""The ``@eventstream`` decorator and the responses it builds.

The stream itself, from its first item to its release, is a
:class:`~flask_eventstream.connection.Connection`; this module decides what
to iterate for a view's return value and wraps it in a response.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import typing as t
from collections.abc import Iterable
from collections.abc import Iterator

from flask import abort
from flask import current_app
from flask import request
from flask import Response
from flask import stream_with_context

from . import _gevent
from ._state import AppState
from ._state import state_for
from .broker import Subscription
from .connection import Connection
from .connection import current_connection
from .connection import END
from .connection import keep_connection
from .sse import Event

__all__ = ["eventstream"]

P = t.ParamSpec("P")


#: An exhausted iterator: the items of a body that takes its frames from a
#: subscription directly.
_NOTHING: Iterator[t.Any] = iter(())


def _direct(conn: Connection, rv: t.Any) -> t.TypeGuard[Subscription]:
    """Whether the body of ``conn`` takes the frames of ``rv``, a view's
    return value, from the subscription itself: a subscription of this
    stream, on a gevent server."""
    return isinstance(rv, Subscription) and rv.owner is conn and conn.task is not None


_SINGLE = (Event, str, bytes, bytearray, dict, list, int, float, bool, type(None))


def _items(rv: t.Any) -> Iterator[t.Any] | None:
    """What to iterate for a view's return value, or ``None`` for a single
    value."""
    if isinstance(rv, _SINGLE):
        return None
    if isinstance(rv, Iterator):
        return rv
    if isinstance(rv, Iterable):
        return iter(rv)
    return None


def _make_response(
    state: AppState,
    view: t.Callable[..., t.Any],
    interval: float | None,
    *args: t.Any,
    **kwargs: t.Any,
) -> Response:
    if state.closing:
        # Shutting down: open and end at once, so the client reconnects to
        # another worker after its retry delay.
        return _response(state, [state.retry_bytes])
    limit = state.settings.max_connections
    if limit is not None and len(state.live) >= limit:
        response = Response(
            "Too many open event streams; retry later.\n",
            status=503,
            mimetype="text/plain",
            headers={"Retry-After": str(state.settings.retry_after)},
        )
        abort(response)
    state.check_server(request.environ)
    conn = Connection(state, request.environ)
    keep_connection(request.environ, conn)
    token = current_connection.set(conn)
    try:
        rv = view(*args, **kwargs)
        if interval is not None:
            first = rv
            items: Iterator[t.Any] = conn.periodic(view, args, kwargs, interval)
        elif isinstance(rv, (Response, tuple)):
            conn.release()
            return current_app.make_response(rv)
        elif _direct(conn, rv):
            # What iterating the subscription would give first (see
            # Connection.follow), without a generator kept for the life of
            # the stream: the body takes the rest from the subscription,
            # which the stream closes when it is released.
            first, items = rv.take(), _NOTHING
        else:
            iterator = _items(rv)
            if iterator is None:
                first, items = rv, iter(())
            else:
                items = iterator
                first = next(items, END)
    except BaseException:
        conn.release()
        raise
    finally:
        current_connection.reset(token)
    if isinstance(rv, Subscription) and interval is None and conn.task is not None:
        # The common case on gevent servers: a view that returned a
        # subscription needs no request context while it streams, and each
        # layer between the server and the subscription costs time on every
        # write and stack on every idle stream. The server gets the body
        # generator itself.
        body = conn.body(first, items, request.environ, primed=True, sub=rv)
        next(body)
        response = _response(state, body, passthrough=True, conn=conn)
        if state.settings.park_streams:
            environ = request.environ
            response.eventstream_park = (  # type: ignore[attr-defined]
                body,
                lambda hand: conn.park(hand, first, rv, environ),
            )
    else:
        body = conn.body(first, items, request.environ)
        response = _response(state, _OwnContext(stream_with_context(body)))
    # For a response that is never iterated (HEAD, or the client left first).
    response.call_on_close(conn.release)
    return response


class _OwnContext:
    """Runs every step of a stream body in a copy of the request's context.

    ``stream_with_context`` pushes the request context inside the body, and a
    generator runs in its caller's context: without this, a suspended stream
    would leave its request context pushed in the caller (Flask's test client
    iterates several streams in one thread, where they then pop each other's
    contexts and see each other's ``request``).
    """

    __slots__ = ("_body", "_context")

    def __init__(self, body: Iterator[bytes]) -> None:
        self._body = body
        self._context = contextvars.copy_context()

    def __iter__(self) -> _OwnContext:
        return self

    def __next__(self) -> bytes:
        return self._context.run(next, self._body)

    def close(self) -> None:
        close = getattr(self._body, "close", None)
        if close is not None:
            self._context.run(close)


_Body = t.Generator[bytes, None, None]
_Park = t.Callable[[_gevent.Handoff], bool]
_stream_classes: dict[type[Response], type[Response]] = {}


def _stream_class(base: type[Response]) -> type[Response]:
    """``base`` with a ``__call__`` that tells the stream which server object
    it is written through (the owner of ``start_response``)."""
    cls = _stream_classes.get(base)
    if cls is None:

        class StreamResponse(base):  # type: ignore[valid-type,misc]
            eventstream_connection: Connection | None = None
            #: The body generator, and what hands its stream to the hub.
            eventstream_park: tuple[_Body, _Park] | None = None

            def __call__(
                self, environ: t.Any, start_response: t.Any
            ) -> Iterable[bytes]:
                app_iter: Iterable[bytes] = super().__call__(environ, start_response)
                conn = self.eventstream_connection
                if conn is None or conn.released:
                    return app_iter
                owner = getattr(start_response, "__self__", None)
                conn.writer = _gevent.direct_writer(owner, conn, conn.state.metrics)
                park = self.eventstream_park
                self.eventstream_park = None
                if conn.writer is not None and park is not None and app_iter is park[0]:
                    return _gevent.parkable(park[0], owner, park[1])
                return app_iter

        cls = _stream_classes[base] = StreamResponse
    return cls


def _response(
    state: AppState,
    body: Iterable[bytes],
    *,
    passthrough: bool = False,
    conn: Connection | None = None,
) -> Response:
    if conn is not None:
        response = _stream_class(current_app.response_class)(
            body, mimetype="text/event-stream"
        )
        response.eventstream_connection = conn  # type: ignore[attr-defined]
    else:
        response = current_app.response_class(body, mimetype="text/event-stream")
    # Werkzeug hands a direct_passthrough body to the server as it is, with
    # no encoding or closing wrapper.
    response.direct_passthrough = passthrough
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    return response


@t.overload
def eventstream(view: t.Callable[P, t.Any], /) -> t.Callable[P, Response]: ...


@t.overload
def eventstream(
    *, interval: float | None = None
) -> t.Callable[[t.Callable[P, t.Any]], t.Callable[P, Response]]: ...


def eventstream(
    view: t.Callable[P, t.Any] | None = None, /, *, interval: float | None = None
) -> t.Any:
    """Turn a Flask view into a ``text/event-stream`` response.

    Used bare on a view that yields events (a generator) or returns
    :meth:`EventStream.subscribe() <flask_eventstream.EventStream.subscribe>`,
    or with ``interval=`` on a view that is called every ``interval`` seconds
    and whose return value is sent. Items may be :class:`~flask_eventstream.Event`,
    ``str``, JSON data, or ``None`` (nothing sent this round).

    Errors raised before the first event (``abort(403)``, a failed lookup)
    become normal HTTP error responses. The request context stays available
    for the life of the stream.

    :param interval: seconds between calls of a periodic view.

    .. versionadded:: 0.1
    """
    if interval is not None and not interval > 0:
        raise ValueError(
            f"interval must be a positive number of seconds, not {interval!r}"
        )

    def decorator(func: t.Callable[P, t.Any]) -> t.Callable[P, Response]:
        if interval is not None and inspect.isgeneratorfunction(func):
            raise TypeError(
                f"{func.__name__} is a generator function: use @eventstream"
                " without interval for views that yield events."
            )

        @functools.wraps(func)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> Response:
            state = state_for(current_app._get_current_object())  # type: ignore[attr-defined]
            return _make_response(state, func, interval, *args, **kwargs)

        return wrapper

    if view is not None:
        return decorator(view)
    return decorator
