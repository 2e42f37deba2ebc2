"""The life of one event stream, from the view's first item to its release.

A stream's resources (subscriptions, disconnect watcher, watchdog entry,
connection slot) are released in exactly one place, :meth:`Connection.release`,
which runs from the body generator's ``finally`` and, for a response that was
never iterated, from the response's close callback.

Nothing here touches Flask: the view layer (:mod:`.views`) builds the
response around :meth:`Connection.body`.
"""

from __future__ import annotations

import contextvars
import gc
import itertools
import logging
import time
import typing as t
from collections.abc import Iterator

from . import _gevent
from ._state import AppState
from .broker import encode_frame
from .broker import Frame
from .broker import Subscription
from .sse import Event
from .sse import HEARTBEAT
from .timing import Timing

__all__ = [
    "END",
    "ENVIRON_KEY",
    "Connection",
    "current_connection",
    "find_connection",
    "keep_connection",
]

log = logging.getLogger(__name__)

#: What a view's iterator gives when it is exhausted.
END: t.Any = object()
_HEARTBEAT = Frame(HEARTBEAT, count=0)
#: What :meth:`Connection.wait` returns when the time it waited for came.
TICK = Frame(b"", count=0)
#: Seconds a stream that was told to end may take before its greenlet is
#: killed (it may be stuck in a sleep that is not ours).
_KILL_GRACE = 0.5
_ids = itertools.count(1)
#: The environ key under which a request's stream is kept (for testing).
ENVIRON_KEY = "flask_eventstream.connection"


def keep_connection(environ: t.MutableMapping[str, t.Any], conn: Connection) -> None:
    """Make ``conn`` findable from its request's environ (or a copy)."""
    environ[ENVIRON_KEY] = conn


def find_connection(environ: t.Mapping[str, t.Any]) -> Connection | None:
    """The stream of the request with ``environ`` (or a copy of it).

    A test client that runs the application with a copy of the environ
    shares its input stream with the copy: the stream is found by that
    object, among the open streams, else among every stream object alive.
    No per-stream index is kept for this (it is for tests; on a server each
    entry would cost every idle stream memory).
    """
    conn = environ.get(ENVIRON_KEY)
    if isinstance(conn, Connection):
        return conn
    given = environ.get("wsgi.input")
    if given is None:
        return None
    for conn in _open_connections():
        if conn.input is given:
            return conn
    for obj in gc.get_objects():
        if isinstance(obj, Connection) and obj.input is given:
            return obj
    return None


def _open_connections() -> list[Connection]:
    from ._state import all_states

    return [
        conn
        for state in all_states()
        for conn in list(state.live)
        if isinstance(conn, Connection)
    ]


#: The stream whose body is running in this greenlet or thread.
current_connection: contextvars.ContextVar[Connection | None] = contextvars.ContextVar(
    "flask_eventstream.connection", default=None
)


class Connection(Timing):
    """One open event stream.

    A connection is its own :class:`~.timing.Timing` (:attr:`timing`): one
    object less for every open stream.
    """

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
        "writer",
        "user",
        "input",
        "_watch",
        "_cancel_kill",
    )

    def __init__(self, state: AppState, environ: t.Mapping[str, t.Any]) -> None:
        settings = state.settings
        self.state = state
        self.id = next(_ids)
        self.remote_addr: str | None = environ.get("REMOTE_ADDR")
        self.waker = _gevent.make_waker()
        #: A tuple: the empty one is shared, and it grows by one per
        #: subscription, which are few.
        self.subscriptions: tuple[Subscription, ...] = ()
        self.closed = False
        self.reason = "closed"
        self.released = False
        #: Whether the body started (and client_connected was sent).
        self.started = False
        self.task = _gevent.current_task()
        Timing.__init__(
            self,
            time.monotonic(),
            settings.heartbeat,
            settings.send_timeout,
            settings.max_lifetime,
        )
        #: Writes frames straight to the client while the stream waits (see
        #: :func:`._gevent.direct_writer`); ``None``: the server writes all.
        self.writer: _gevent._Writer | None = None
        #: Whose stream this is, once a subscription with a user was made.
        self.user: str | None = None
        #: The request's input stream, which a copy of its environ shares
        #: (see :func:`find_connection`).
        self.input: t.Any = environ.get("wsgi.input")
        self._watch: _gevent._EOFWatch | None = None
        self._cancel_kill: t.Callable[[], None] | None = None
        state.live.add(self)

    @property
    def timing(self) -> Timing:
        """The stream's clock: the connection itself."""
        return self

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
        if (
            kill
            and self.task is not None
            and self._cancel_kill is None
            and not isinstance(self.task, _gevent.Parked)
        ):
            self._cancel_kill = _gevent.call_later(_KILL_GRACE, self._kill)

    def adopt(self, sub: Subscription, user: str | None) -> None:
        """Keep ``sub``, subscribed in this stream with this stream as its
        owner, for the stream's life."""
        self.subscriptions += (sub,)
        if user is not None:
            self.user = user

    def revoke(self, reason: str) -> None:
        """End the stream: one of its subscriptions was revoked or
        disconnected (from any greenlet)."""
        self.end(reason, kill=True)

    def _kill(self) -> None:
        if not self.released:
            _gevent.kill(self.task)

    def on_send_timeout(self) -> None:
        log.info(
            "Dropping event stream %s from %s: a write blocked for more than %ss.",
            self.id,
            self.remote_addr,
            self.timing.send_timeout,
        )
        self.end("timeout")
        _gevent.kill(self.task)

    def set_deadline(self, deadline: float) -> None:
        """End the stream at ``deadline`` (monotonic) at the latest."""
        self.timing.end_by(deadline)
        self.waker.set()

    def on_eof(self) -> None:
        """The client closed its end (called in the hub)."""
        self.end("client", kill=True)

    def release(self) -> None:
        """Release everything held for this stream; idempotent."""
        if self.released:
            return
        self.released = True
        self.closed = True
        self.timing.writing_since = None
        if self.writer is not None:
            self.writer.settle()
            self.writer = None
        if self._watch is not None:
            self._watch.stop()
            self._watch = None
        if self._cancel_kill is not None:
            self._cancel_kill()
            self._cancel_kill = None
        state = self.state
        channels = self._channels()
        for sub in self.subscriptions:
            sub.close()
        self.subscriptions = ()
        state.live.discard(self)
        log.debug(
            "Event stream %s from %s ended (%s).",
            self.id,
            self.remote_addr,
            self.reason,
        )
        if not self.started:
            return
        state.broker.observer.stream_ended(self.id, channels, self.reason)
        state.send_disconnected(
            channels=channels,
            connection_id=self.id,
            remote_addr=self.remote_addr,
            reason=self.reason,
            user=self.user,
        )

    # -- waiting --

    def wait(
        self,
        sub: Subscription | None = None,
        until: float | None = None,
        *,
        heartbeats: bool = True,
    ) -> Frame | None:
        """The one wait of a stream: block until ``sub`` has frames (returned
        as one), a heartbeat is due (with ``heartbeats``; returned as a
        heartbeat frame) or ``until`` (monotonic) comes (:data:`TICK`).
        ``None`` when the stream is to end: told to, at its deadline, or its
        subscription cut off."""
        waker = self.waker
        timing = self.timing
        # In a plain thread no watchdog wakes the stream for a heartbeat or
        # its end; on gevent only a wait for ``until`` needs a timer.
        timed = self.task is None
        while not (self.closed or sub is not None and sub.closed):
            if sub is not None:
                # Nothing is taken once it overflowed: frames queued after
                # the overflow follow a gap, and sending them would skip
                # events silently.
                frame = sub.take()
                if frame is not None:
                    return frame
                if sub.overflowed:
                    self._fell_behind(sub)
                    return None
            else:
                waker.clear()
            now = time.monotonic()
            if timing.expired(now):
                self.end("lifetime")
                return None
            if until is not None and now >= until:
                return TICK
            if heartbeats and timing.heartbeat_due(now):
                return _HEARTBEAT
            if self.closed:
                return None
            if until is not None:
                waker.wait(min(until - now, timing.timeout(now, heartbeats=heartbeats)))
                continue
            writer = self.writer
            if sub is None or writer is None or not writer.ready():
                waker.wait(timing.timeout(now) if timed else None)
                continue
            # Nothing queued: until this wait ends, a fan-out writes frames
            # to the client itself, without waking this greenlet.
            sub.send = writer
            try:
                waker.wait(None)
            finally:
                sub.send = None
            if writer.pending is not None and not self.closed:
                # The socket took part of a frame: the rest goes first.
                timing.writing_since = time.monotonic()
                try:
                    writer.flush()
                except OSError:
                    self.end("client")
                    return None
                finally:
                    timing.writing_since = None
        return None

    def _fell_behind(self, sub: Subscription) -> None:
        log.warning(
            "Event stream %s from %s fell more than %d events behind"
            " on %s; disconnecting it (it resumes from history).",
            self.id,
            self.remote_addr,
            self.state.settings.queue_size,
            ", ".join(sub.channels),
        )
        self.end("overflow")

    # -- served from the hub --

    def park(
        self,
        hand: _gevent.Handoff,
        first: t.Any,
        sub: Subscription,
        environ: t.Mapping[str, t.Any],
    ) -> bool:
        """Serve the rest of this stream, which only follows ``sub``, from
        the hub (see :class:`._gevent.Parked`): the server's greenlet, and
        what it holds for the request, is let go. ``first`` is what the body
        would have started with. Whether the stream was taken over (it may
        have ended at once: the client was gone)."""
        writer = self.writer
        if writer is None or self.closed or self.released:
            return False
        data, count = self._open(first, environ, watch=False)
        try:
            parked = hand.start(data, self, sub, writer)
        except OSError:
            self.end("client")
            self.release()
            return True
        self.task = parked
        self.input = None
        self.last_write = time.monotonic()
        metrics = self.state.metrics
        if count and metrics is not None:
            metrics.pending += count
        self.state.watchdog.start()
        self.pump()
        return True

    def pump(self) -> None:
        """A turn of a stream served from the hub: write what is queued (or
        finish what the socket did not take), a heartbeat when one is due,
        or end; then leave a direct writer on the subscription and arm the
        waker, which the next delivery, heartbeat, end or room on the
        socket sets. Never blocks."""
        parked = self.task
        writer = self.writer
        if not isinstance(parked, _gevent.Parked) or writer is None:
            return
        sub = parked.sub
        waker = self.waker
        while not parked.dead:
            waker.clear()
            if self.closed or sub.closed:
                break
            if writer.pending is not None:
                try:
                    drained = writer.resume()
                except OSError:
                    self.end("client")
                    break
                if not drained:
                    if self.writing_since is None:
                        self.writing_since = time.monotonic()
                    parked.wait_writable()
                    if parked.arm():
                        return
                    continue
                self.writing_since = None
            frame = sub.take()
            now = time.monotonic()
            if frame is None:
                if sub.overflowed:
                    self._fell_behind(sub)
                    break
                if self.expired(now):
                    self.end("lifetime")
                    break
                if not self.heartbeat_due(now):
                    sub.send = writer
                    if parked.arm():
                        return
                    sub.send = None
                    continue
                frame = _HEARTBEAT
            writer.write(frame, now)
        parked.finish(clean=self.reason not in ("client", "timeout"))

    def sleep(self, seconds: float) -> None:
        """Sleep, returning early if the stream is told to end or reaches its
        deadline (``EVENTSTREAM_MAX_LIFETIME``, or a test's timeout)."""
        self.wait(until=time.monotonic() + seconds, heartbeats=False)

    def next_frame(self, sub: Subscription) -> Frame | None:
        """Block until ``sub`` has frames or a heartbeat is due, and return
        them; ``None`` when the stream is to end."""
        return self.wait(sub)

    def follow(self, sub: Subscription) -> Iterator[Frame | None]:
        """Iterate a subscription: its frames, heartbeats while idle, and an
        end when the stream is told to end. The first step never waits: it
        gives what is queued already (a replay), or ``None``, so that a view
        that subscribes returns at once."""
        try:
            yield sub.take()
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
        while not self.closed:
            got = self.wait(until=next_at)
            if got is None:
                return
            if got is not TICK:
                yield got  # a heartbeat
                continue
            yield view(*args, **kwargs)
            next_at += interval
            if next_at < time.monotonic():
                next_at = time.monotonic() + interval

    # -- the body --

    def _to_bytes(self, item: t.Any) -> bytes | None:
        if type(item) is Frame:
            return item.data
        if item is None:
            return HEARTBEAT if self.timing.heartbeat_due(time.monotonic()) else None
        if not isinstance(item, Event):
            item = Event(data=item)
        return encode_frame(item, None, self.state.settings.max_event_size).data

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
        if primed:
            try:
                yield b""
            except GeneratorExit:
                # Closed before it started: released, unless the stream was
                # handed to the hub (see park()).
                if not isinstance(self.task, _gevent.Parked):
                    if not self.closed:
                        self.end("client")
                    self.release()
                raise
        try:
            # Nothing reads the socket while a subscription's frames are the
            # whole body: the socket's own read watcher can be used.
            data, count = self._open(first, environ, watch=True, shared=sub is not None)
            # The hot loop: writes are inlined (no helper generator per
            # write) and frames, the common item, skip _to_bytes.
            # (No bound method kept in a local: the generator keeps its
            # locals for the life of the stream.)
            monotonic = time.monotonic
            timing = self.timing
            # A write's events count once it completed. On gevent they are
            # added up per process and reach the counter at the watchdog's
            # ticks: an integer addition per write on the hot path.
            metrics = self.state.metrics
            batched = self.task is not None
            while True:
                writer = self.writer
                if writer is not None:
                    # The server's count of bytes written first, then its write.
                    writer.settle()
                    writer = None
                timing.writing_since = now = monotonic()
                yield data
                timing.writing_since = None
                timing.last_write = now
                if count and metrics is not None:
                    if batched:
                        metrics.pending += count
                    else:
                        metrics.written(count)
                while True:
                    if self.closed:
                        return
                    deadline = timing.deadline
                    if deadline is not None and monotonic() >= deadline:
                        self.end("lifetime")
                        return
                    item = next(items, END) if sub is None else self.next_frame(sub)
                    if item is END or item is None and sub is not None:
                        return
                    if self.closed:
                        return
                    chunk: bytes | None
                    if type(item) is Frame:
                        chunk = item.data
                        count = item.count
                    else:
                        chunk = self._to_bytes(item)
                        count = _count(item, chunk)
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

    def _open(
        self,
        first: t.Any,
        environ: t.Mapping[str, t.Any],
        *,
        watch: bool,
        shared: bool = False,
    ) -> tuple[bytes, int]:
        """Start the stream: watch for the client's EOF (with ``watch``; see
        :func:`._gevent.watch_disconnect` for ``shared``), tell the
        observers and receivers, and return the first bytes to write (retry
        and ``first``) with the number of events in them."""
        if self.task is not None and watch:
            self._watch = _gevent.watch_disconnect(environ, self, shared=shared)
            self.state.watchdog.start()
        self.started = True
        self.state.broker.observer.stream_opened(self.id, self._channels())
        self.state.send_connected(
            channels=self._channels(),
            connection_id=self.id,
            remote_addr=self.remote_addr,
            user=self.user,
        )
        data = self.state.retry_bytes
        if first is END:
            return data, 0
        head = self._to_bytes(first)
        return data + (head or b""), _count(first, head)

    def _channels(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for sub in self.subscriptions:
            seen.update(dict.fromkeys(sub.channels))
        return tuple(seen)


def _count(item: t.Any, chunk: bytes | None) -> int:
    """Events in ``chunk``, the bytes of a view's ``item``."""
    if type(item) is Frame:
        return item.count
    if not chunk or chunk == HEARTBEAT:
        return 0
    return 1
