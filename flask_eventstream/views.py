"""The ``@eventstream`` decorator and the life of one stream.

A stream's resources (subscriptions, disconnect watcher, watchdog entry,
connection slot) are released in exactly one place, :meth:`Connection.release`,
which runs from the body generator's ``finally`` and, for a response that was
never iterated, from Werkzeug's ``call_on_close``.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import itertools
import logging
import random
import time
import typing as t
from collections.abc import Iterable
from collections.abc import Iterator

from flask import abort
from flask import current_app
from flask import request
from flask import Response
from flask import stream_with_context

from . import _gevent
from .broker import Frame
from .broker import Subscription
from .sse import Event
from .sse import HEARTBEAT

if t.TYPE_CHECKING:
    from .extension import _State

__all__ = ["eventstream"]

log = logging.getLogger(__name__)

P = t.ParamSpec("P")

_END = object()
_HEARTBEAT = Frame(HEARTBEAT)
#: Seconds a stream that was told to end may take before its greenlet is
#: killed (it may be stuck in a sleep that is not ours).
_KILL_GRACE = 0.5
_ids = itertools.count(1)
#: The environ key under which a request's stream is kept (for testing).
ENVIRON_KEY = "flask_eventstream.connection"

#: The stream whose body is running in this greenlet or thread.
current_connection: contextvars.ContextVar[Connection | None] = contextvars.ContextVar(
    "flask_eventstream.connection", default=None
)


class Connection:
    """One open event stream."""

    __slots__ = (
        "__weakref__",
        "state",
        "id",
        "remote_addr",
        "waker",
        "subscriptions",
        "closed",
        "reason",
        "released",
        "started",
        "task",
        "deadline",
        "last_write",
        "writing_since",
        "send_timeout",
        "writer",
        "_stop_watch",
        "_cancel_kill",
    )

    def __init__(self, state: _State, environ: t.Mapping[str, t.Any]) -> None:
        settings = state.settings
        self.state = state
        self.id = next(_ids)
        self.remote_addr: str | None = environ.get("REMOTE_ADDR")
        self.waker = _gevent.make_waker()
        self.subscriptions: list[Subscription] = []
        self.closed = False
        self.reason = "closed"
        self.released = False
        #: Whether the body started (and client_connected was sent).
        self.started = False
        self.task = _gevent.current_task()
        now = time.monotonic()
        self.last_write = now
        self.writing_since: float | None = None
        self.send_timeout = float(settings.send_timeout)
        self.deadline: float | None = None
        if settings.max_lifetime:
            self.deadline = now + settings.max_lifetime * random.uniform(0.9, 1.1)
        #: Writes frames straight to the client while the stream waits (see
        #: :func:`._gevent.direct_writer`); ``None``: the server writes all.
        self.writer: _gevent._Writer | None = None
        self._stop_watch: t.Callable[[], None] | None = None
        self._cancel_kill: t.Callable[[], None] | None = None
        state.live.add(self)

    # -- ending --

    def end(self, reason: str, *, kill: bool = False) -> None:
        """Ask the stream to end; safe from the hub, a signal or another
        greenlet. With ``kill``, a stream that has not ended after a grace
        period (stuck in a foreign sleep) has its greenlet killed."""
        if self.closed:
            return
        self.closed = True
        self.reason = reason
        self.waker.set()
        if kill and self.task is not None and self._cancel_kill is None:
            self._cancel_kill = _gevent.call_later(_KILL_GRACE, self._kill)

    def _kill(self) -> None:
        if not self.released:
            _gevent.kill(self.task)

    def on_send_timeout(self) -> None:
        log.info(
            "Dropping event stream %s from %s: a write blocked for more than %ss.",
            self.id,
            self.remote_addr,
            self.send_timeout,
        )
        self.end("timeout")
        _gevent.kill(self.task)

    def set_deadline(self, deadline: float) -> None:
        """End the stream at ``deadline`` (monotonic) at the latest."""
        if self.deadline is None or deadline < self.deadline:
            self.deadline = deadline
        self.waker.set()

    def _on_eof(self) -> None:
        self.end("client", kill=True)

    def release(self) -> None:
        """Release everything held for this stream; idempotent."""
        if self.released:
            return
        self.released = True
        self.closed = True
        self.writing_since = None
        self.writer = None
        for cancel in (self._stop_watch, self._cancel_kill):
            if cancel is not None:
                cancel()
        self._stop_watch = self._cancel_kill = None
        state = self.state
        state.watchdog.discard(self)
        channels = self._channels()
        for sub in self.subscriptions:
            sub.close()
        self.subscriptions.clear()
        state.live.discard(self)
        log.debug(
            "Event stream %s from %s ended (%s).",
            self.id,
            self.remote_addr,
            self.reason,
        )
        if not self.started:
            return
        state.send_disconnected(
            channels=channels,
            connection_id=self.id,
            remote_addr=self.remote_addr,
            reason=self.reason,
        )

    # -- waiting --

    def _timeout(self, now: float) -> float:
        timeout = self.last_write + self.state.settings.heartbeat - now
        if self.deadline is not None:
            timeout = min(timeout, self.deadline - now)
        return max(timeout, 0.0)

    def _heartbeat_due(self, now: float) -> bool:
        return now - self.last_write >= self.state.settings.heartbeat

    def _expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def due(self, now: float) -> bool:
        """Whether a heartbeat or the end of the stream is due (for the
        watchdog's sweep, which wakes such streams on gevent)."""
        return self._heartbeat_due(now) or self._expired(now)

    def _idle(self, now: float) -> Frame | None:
        """With nothing to send: end at the deadline, or a heartbeat."""
        if self._expired(now):
            self.end("lifetime")
            return None
        return _HEARTBEAT if self._heartbeat_due(now) else None

    def sleep(self, seconds: float) -> None:
        """Sleep, returning early if the stream is told to end or reaches its
        deadline (``EVENTSTREAM_MAX_LIFETIME``, or a test's timeout)."""
        end = time.monotonic() + seconds
        waker = self.waker
        while not self.closed:
            now = time.monotonic()
            if self._expired(now):
                self.end("lifetime")
                return
            until = end if self.deadline is None else min(end, self.deadline)
            if now >= until:
                return
            waker.clear()
            if self.closed:
                return
            waker.wait(until - now)

    def next_frame(self, sub: Subscription) -> Frame | None:
        """Block until ``sub`` has frames or a heartbeat is due, and return
        them; ``None`` when the stream is to end."""
        waker = self.waker
        timed = self.task is None  # a plain thread: no watchdog
        while not (self.closed or sub.closed):
            sub.woken = False
            waker.clear()
            # Checked before draining: frames queued after the overflow
            # follow a gap, and sending them would skip events silently.
            if sub.overflowed:
                log.warning(
                    "Event stream %s from %s fell more than %d events behind"
                    " on %s; disconnecting it (it resumes from history).",
                    self.id,
                    self.remote_addr,
                    self.state.settings.queue_size,
                    ", ".join(sub.channels),
                )
                self.end("overflow")
                return None
            frame = sub.drain()
            if frame is not None:
                return frame
            frame = self._idle(time.monotonic())
            if frame is not None:
                return frame
            if self.closed:
                return None
            writer = self.writer
            if writer is not None and writer.ready():
                # Nothing queued: frames published from now on until the
                # wait ends are written by whoever delivers them, without
                # waking this greenlet.
                sub.send = writer.send
                try:
                    waker.wait(None)
                finally:
                    sub.send = None
                if writer.pending is not None and not self.closed:
                    self.writing_since = time.monotonic()
                    try:
                        writer.flush()
                    except OSError:
                        self.end("client")
                        return None
                    finally:
                        self.writing_since = None
                continue
            # On gevent the watchdog's sweep wakes the stream when a
            # heartbeat or its end is due: no timer per wait.
            waker.wait(self._timeout(time.monotonic()) if timed else None)
        return None

    def follow(self, sub: Subscription) -> Iterator[Frame | None]:
        """Iterate a subscription: its frames, heartbeats while idle, and an
        end when the stream is told to end. The first step never waits: it
        gives what is queued already (a replay), or ``None``, so that a view
        that subscribes returns at once."""
        try:
            sub.woken = False
            self.waker.clear()
            yield sub.drain()
            while (frame := self.next_frame(sub)) is not None:
                yield frame
        finally:
            sub.close()

    def periodic(
        self,
        view: t.Callable[..., t.Any],
        args: tuple[t.Any, ...],
        kwargs: dict[str, t.Any],
        interval: float,
    ) -> Iterator[t.Any]:
        """Call ``view`` every ``interval`` seconds (the first call has been
        made by the caller), with heartbeats in between."""
        next_at = time.monotonic() + interval
        waker = self.waker
        while not self.closed:
            now = time.monotonic()
            if now >= next_at:
                yield view(*args, **kwargs)
                next_at += interval
                if next_at < time.monotonic():
                    next_at = time.monotonic() + interval
                continue
            waker.clear()
            if self.closed:
                return
            # Woken by its own timeout, or by the watchdog when a heartbeat
            # or the end is due: either way, look.
            waker.wait(min(next_at - now, self._timeout(now)))
            now = time.monotonic()
            if now < next_at:
                beat = self._idle(now)
                if beat is not None:
                    yield beat

    # -- the body --

    def _to_bytes(self, item: t.Any) -> bytes | None:
        if type(item) is Frame:
            return item.data
        if item is None:
            return HEARTBEAT if self._heartbeat_due(time.monotonic()) else None
        if not isinstance(item, Event):
            item = Event(data=item)
        return self.state.broker.encode(item, None).data

    def body(
        self,
        first: t.Any,
        items: Iterator[t.Any],
        environ: t.Mapping[str, t.Any],
        *,
        primed: bool = False,
        sub: Subscription | None = None,
    ) -> Iterator[bytes]:
        """The response body: retry and the first item, then the rest.

        With ``primed``, the generator first yields an empty chunk that the
        caller consumes at once: a started generator runs its ``finally``
        when closed, so it can be handed to the server as the response
        iterable itself, without Werkzeug's wrappers around it.

        With ``sub``, ``items`` is ``follow(sub)`` after its first step, and
        the loop takes frames from :meth:`next_frame` directly: one generator
        less to resume on every write, and a shallower stack to save on
        every wait.
        """
        token = None if primed else current_connection.set(self)
        try:
            if primed:
                yield b""
            if self.task is not None:
                self._stop_watch = _gevent.watch_disconnect(environ, self._on_eof)
                self.state.watchdog.add(self)
            self.started = True
            self.state.send_connected(
                channels=self._channels(),
                connection_id=self.id,
                remote_addr=self.remote_addr,
            )
            data = self.state.retry_bytes
            if first is not _END:
                data += self._to_bytes(first) or b""
            # The hot loop: writes are inlined (no helper generator per
            # write) and frames, the common item, skip _to_bytes.
            monotonic = time.monotonic
            to_bytes = self._to_bytes
            while True:
                self.writing_since = now = monotonic()
                yield data
                self.writing_since = None
                self.last_write = now
                while True:
                    if self.closed:
                        return
                    deadline = self.deadline
                    if deadline is not None and monotonic() >= deadline:
                        self.end("lifetime")
                        return
                    item = next(items, _END) if sub is None else self.next_frame(sub)
                    if item is _END or item is None and sub is not None:
                        return
                    if self.closed:
                        return
                    chunk = item.data if type(item) is Frame else to_bytes(item)
                    if chunk:
                        data = chunk
                        break
        except GeneratorExit:
            if not self.closed:
                self.end("client")
            raise
        except _gevent._GreenletExit:
            if not self.closed:
                self.end("killed")
            raise
        except Exception:
            log.exception(
                "Event stream %s from %s failed; ending it.", self.id, self.remote_addr
            )
            self.end("error")
        finally:
            try:
                close = getattr(items, "close", None)
                if close is not None:
                    close()
            finally:
                self.release()
                if token is not None:
                    current_connection.reset(token)

    def _channels(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for sub in self.subscriptions:
            seen.update(dict.fromkeys(sub.channels))
        return tuple(seen)


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
    state: _State,
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
    request.environ[ENVIRON_KEY] = conn
    token = current_connection.set(conn)
    try:
        rv = view(*args, **kwargs)
        if interval is not None:
            first = rv
            items: Iterator[t.Any] = conn.periodic(view, args, kwargs, interval)
        elif isinstance(rv, (Response, tuple)):
            conn.release()
            return current_app.make_response(rv)
        else:
            iterator = _items(rv)
            if iterator is None:
                first, items = rv, iter(())
            else:
                items = iterator
                first = next(items, _END)
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


_stream_classes: dict[type[Response], type[Response]] = {}


def _stream_class(base: type[Response]) -> type[Response]:
    """``base`` with a ``__call__`` that tells the stream which server object
    it is written through (the owner of ``start_response``)."""
    cls = _stream_classes.get(base)
    if cls is None:

        class StreamResponse(base):  # type: ignore[valid-type,misc]
            eventstream_connection: Connection | None = None

            def __call__(
                self, environ: t.Any, start_response: t.Any
            ) -> Iterable[bytes]:
                app_iter: Iterable[bytes] = super().__call__(environ, start_response)
                conn = self.eventstream_connection
                if conn is not None and not conn.released:
                    owner = getattr(start_response, "__self__", None)
                    conn.writer = _gevent.direct_writer(owner, conn)
                return app_iter

        cls = _stream_classes[base] = StreamResponse
    return cls


def _response(
    state: _State,
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
            from .extension import _state_for_request

            return _make_response(_state_for_request(), func, interval, *args, **kwargs)

        return wrapper

    if view is not None:
        return decorator(view)
    return decorator
