"""Everything that touches gevent: waking, sleeping, killing, and noticing
clients that went away. The rest of the package calls these functions and
never imports gevent itself.

Code running in a gevent greenlet (any gevent server, monkey-patched or not)
gets gevent primitives; code running in a plain thread (Werkzeug's threaded
development server, a script) gets :mod:`threading` ones.
"""

from __future__ import annotations

import _socket
import atexit
import logging
import signal
import socket
import ssl
import sys
import threading
import time
import typing as t
from datetime import datetime

import gevent
import gevent.event
import gevent.monkey
import gevent.pywsgi
import gevent.socket
import greenlet

from .broker import Frame
from .broker import Waker

__all__ = [
    "Handoff",
    "Parked",
    "background_event",
    "call_later",
    "cooperative",
    "current_task",
    "deferrer",
    "direct_writer",
    "in_gevent",
    "install_term_handler",
    "kill",
    "make_waker",
    "parkable",
    "sleep",
    "spawn_background",
    "watch_disconnect",
    "Watchdog",
]

log = logging.getLogger(__name__)

_GreenletExit = gevent.GreenletExit


def in_gevent() -> bool:
    """Whether the caller runs in a greenlet under a gevent hub."""
    return greenlet.getcurrent().parent is not None


def make_waker() -> Waker:
    if in_gevent():
        return _GreenWaker()
    return threading.Event()


_os_thread_ident = gevent.monkey.get_original("_thread", "get_ident")


def _thread_ident() -> int:
    """The OS thread's identity; in a thread whose hub serves streams, the
    int object its :class:`_WakeBatch` keeps (an object that keeps it per
    stream then costs a pointer, not an int)."""
    ident = _os_thread_ident()
    batch = _batches.get(ident)
    return batch.thread if batch is not None else ident


class _WakeBatch:
    """Wakers of one OS thread's hub that were set since the hub last ran
    them. A fan-out to N waiting subscribers schedules one hub callback, not
    N (each callback is an allocation, and at thousands of subscribers per
    event their churn set off full garbage collections)."""

    __slots__ = ("wakers", "scheduled", "hub", "loop", "thread")

    def __init__(self, hub: t.Any, thread: int) -> None:
        self.wakers: list[_GreenWaker] = []
        self.scheduled = False
        self.hub = hub
        self.loop = hub.loop
        self.thread = thread

    def add(self, waker: _GreenWaker) -> None:
        self.wakers.append(waker)
        if not self.scheduled:
            self.scheduled = True
            self.loop.run_callback(self.run)

    def run(self) -> None:
        # Runs in the hub: each switch returns here when that greenlet
        # waits again, as in gevent's own Event._notify_links.
        wakers, self.wakers = self.wakers, []
        self.scheduled = False
        for waker in wakers:
            waker._wake_queued()


_batches: dict[int, _WakeBatch] = {}


class _Switchable(t.Protocol):
    @property
    def dead(self) -> bool: ...

    def switch(self, value: t.Any) -> t.Any: ...


class _GreenWaker:
    """A ``threading.Event``-like flag for one waiting greenlet.

    ``gevent.event.Event`` serves any number of waiters, schedules a callback
    per set() and creates a ``Timeout`` for every timed wait; a stream has
    exactly one waiter, so this switches to it directly, in one hub callback
    for every waker set by the same fan-out (see :class:`_WakeBatch`), and
    times out with a bare libev timer.

    ``set()`` may be called from any greenlet, from the hub, or from another
    OS thread (a publishing thread pool); the waiter is then woken through
    the loop's thread-safe callback. A wake-up that arrives after the wait
    ended is ignored or spurious, which its callers tolerate.
    """

    # The hub and the OS thread are the batch's: an idle stream's waker is
    # four pointers.
    __slots__ = ("_flag", "_waiter", "_queued", "_batch")

    def __init__(self) -> None:
        self._flag = False
        self._waiter: t.Any = None
        self._queued = False
        hub = gevent.get_hub()
        thread = _os_thread_ident()
        batch = _batches.get(thread)
        if batch is None or batch.loop is not hub.loop:
            batch = _batches[thread] = _WakeBatch(hub, thread)
        self._batch = batch

    def is_set(self) -> bool:
        return self._flag

    def clear(self) -> None:
        self._flag = False

    def set(self) -> None:
        self._flag = True
        if self._waiter is None or self._queued:
            return
        self._queued = True
        batch = self._batch
        if _os_thread_ident() == batch.thread:
            batch.add(self)
        else:
            batch.loop.run_callback_threadsafe(self._wake_queued)

    def _wake_queued(self) -> None:
        self._queued = False
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.dead:
                waiter.switch(True)

    def _timed_out(self, waiter: t.Any) -> None:
        if self._waiter is waiter:
            self._waiter = None
            if not waiter.dead:
                waiter.switch(False)

    def call(self, target: _Switchable) -> bool:
        """Have the next :meth:`set` call ``target.switch(True)`` in the hub
        instead of switching to a waiting greenlet (a stream served from the
        hub, see :class:`Parked`); ``False`` when the flag is set already, and
        nothing was armed."""
        if self._flag:
            return False
        self._waiter = target
        if self._flag:  # set() by another thread meanwhile
            self._waiter = None
            return False
        return True

    def wait(self, timeout: float | None = None) -> bool:
        if self._flag:
            return True
        waiter = greenlet.getcurrent()
        self._waiter = waiter
        if self._flag:  # set() by another thread meanwhile
            self._waiter = None
            return True
        hub = self._batch.hub
        timer = None
        if timeout is not None:
            timer = hub.loop.timer(max(timeout, 0.0))
            timer.start(self._timed_out, waiter)
        try:
            return bool(hub.switch())
        finally:
            self._waiter = None
            if timer is not None:
                timer.close()


class _Deferrer:
    """Runs a fan-out in the hub of the publishing greenlet's thread, once
    the publisher yields (see ``broker._Fanout``).

    Only in a thread whose hub serves streams (one made a waker there): a
    hub that is not running, such as that of a thread pool's worker thread,
    would never run the fan-out."""

    __slots__ = ()

    ident = staticmethod(_os_thread_ident)

    def __call__(self, func: t.Callable[[], None], delay: float = 0.0) -> bool:
        batch = _batches.get(_os_thread_ident())
        if batch is None or greenlet.getcurrent().parent is None:
            return False
        loop = batch.loop
        if gevent.get_hub().loop is not loop:
            return False
        if delay > 0:
            _Delayed(loop, delay, func)
        else:
            loop.run_callback(func)
        return True


class _Delayed:
    """Runs ``func`` once in the hub after ``delay`` seconds (a libev timer
    that closes itself once it fired or was cancelled)."""

    __slots__ = ("_timer", "_func")

    def __init__(self, loop: t.Any, delay: float, func: t.Callable[[], None]):
        self._func = func
        self._timer = loop.timer(delay)
        self._timer.start(self)

    def __call__(self) -> None:
        self._timer.close()
        self._func()

    def cancel(self) -> None:
        self._timer.stop()
        self._timer.close()


deferrer = _Deferrer()


def sleep(seconds: float) -> None:
    if in_gevent():
        gevent.sleep(seconds)
    else:
        time.sleep(seconds)


def current_task() -> t.Any:
    """The greenlet serving this request, or ``None`` in a plain thread."""
    return greenlet.getcurrent() if in_gevent() else None


def kill(task: t.Any) -> None:
    """Raise ``GreenletExit`` in ``task`` at its next switch; never blocks."""
    if isinstance(task, Parked):
        task.kill()
    elif task is not None and not task.dead:
        # gevent.kill() never blocks (it calls Greenlet.kill(block=False),
        # or throws from the hub for a raw greenlet) and takes no ``block``.
        gevent.kill(task)


def cooperative() -> bool:
    """Whether sockets are gevent's (the process is monkey-patched), so that
    blocking network I/O in a greenlet lets the other greenlets run."""
    return bool(gevent.monkey.is_module_patched("socket"))


def spawn_background(func: t.Callable[[], None], name: str) -> t.Any:
    """Run ``func`` in the background and return its greenlet or thread: a
    greenlet when :func:`cooperative`, else a daemon thread (whose blocking
    I/O would otherwise stall every greenlet of the hub)."""
    if cooperative():
        return gevent.spawn(func)
    thread = threading.Thread(target=func, name=name, daemon=True)
    thread.start()
    return thread


def background_event() -> Waker:
    """An event that a task of :func:`spawn_background` can wait on and any
    greenlet or thread can set."""
    if cooperative():
        return t.cast(Waker, gevent.event.Event())
    return threading.Event()


class _Cancel(t.Protocol):
    def __call__(self) -> None: ...


def call_later(seconds: float, func: t.Callable[[], None]) -> _Cancel:
    """Run ``func`` in the hub after ``seconds``; return a cancel function.
    ``func`` must not block."""
    return _Delayed(gevent.get_hub().loop, seconds, func).cancel


#: Non-standard environ keys under which servers expose the client socket.
SOCKET_KEYS = ("eventstream.socket", "gunicorn.socket", "gunicorn.sock")

_READ = 1
_WRITE = 2
_PEEK_FLAGS = socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0)


def find_socket(environ: t.Mapping[str, t.Any]) -> t.Any:
    for key in SOCKET_KEYS:
        sock = environ.get(key)
        if sock is not None:
            return sock
    return None


class _EOFStream(t.Protocol):
    def on_eof(self) -> None: ...


def watch_disconnect(
    environ: t.Mapping[str, t.Any], stream: _EOFStream, *, shared: bool = False
) -> _EOFWatch | None:
    """Call ``stream.on_eof()`` (in the hub, promptly) when the client closes
    its end.

    Uses a libev read watcher on the client socket and a non-blocking
    ``MSG_PEEK`` when it fires: no greenlet per connection, and no byte is
    taken from the server's parser. Returns the watch (whose
    :meth:`~_EOFWatch.stop` ends it), or ``None`` when the connection cannot
    be watched (no socket in the environ, TLS, HTTP/2, not under gevent);
    the heartbeat then detects the disconnect on its next write.

    With ``shared``, the caller guarantees that nothing reads the socket
    until the watch is stopped: the read watcher of gevent's socket (idle
    while nobody reads) is borrowed instead of a third watcher per
    connection.
    """
    if not in_gevent():
        return None
    if str(environ.get("HTTP_VERSION", "")).startswith("2"):
        return None
    sock = find_socket(environ)
    if sock is None or isinstance(sock, ssl.SSLSocket) or hasattr(sock, "getpeercert"):
        return None
    raw = getattr(sock, "_sock", sock)
    try:
        fileno = sock.fileno()
    except OSError:
        return None
    if fileno < 0:
        return None
    watcher = None
    if shared and type(sock) is gevent.socket.socket:
        watcher = getattr(sock, "_read_event", None)
        if watcher is not None and (watcher.callback is not None or watcher.active):
            watcher = None  # someone waits on it after all
    watch = _EOFWatch(raw, stream, watcher is None)
    if watcher is None:
        watcher = gevent.get_hub().loop.io(fileno, _READ)
    watch.watcher = watcher
    # The watch is its own callback: no closure or bound method per stream.
    # (gevent's cancel_wait() throws into ``callback.__self__`` when a socket
    # closes under a waiting greenlet; this callback has none.)
    watcher.start(watch)
    return watch


class _EOFWatch:
    """A running :func:`watch_disconnect`."""

    __slots__ = ("watcher", "_raw", "_stream", "_own")

    def __init__(self, raw: t.Any, stream: _EOFStream, own: bool) -> None:
        self.watcher: t.Any = None
        self._raw = raw
        self._stream: _EOFStream | None = stream
        #: Whether the watcher was made for this watch (and is closed by it).
        self._own = own

    def __call__(self) -> None:
        # The socket is readable.
        try:
            data = self._raw.recv(1, _PEEK_FLAGS)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        stream = self._stream
        self.stop()
        if not data and stream is not None:
            stream.on_eof()
        # Readable data that is not EOF (a pipelined request): stop watching
        # rather than spin; the heartbeat remains.

    def stop(self) -> None:
        """Stop watching; idempotent. A borrowed watcher is left open, idle,
        as it was."""
        watcher = self.watcher
        if watcher is None:
            return
        self.watcher = self._stream = None
        watcher.stop()
        if self._own:
            watcher.close()


class _WriteTiming(t.Protocol):
    last_write: float


class _Stream(t.Protocol):
    @property
    def timing(self) -> _WriteTiming: ...
    @property
    def waker(self) -> Waker: ...


#: Major versions in which :func:`direct_writer` takes the servers' write
#: path over (tested with gunicorn 27.0 and gevent 26.9; the attributes it
#: reads are checked on every response).
_GUNICORN_MAJORS = frozenset({22, 23, 24, 25, 26, 27})
_GEVENT_MAJORS = frozenset({23, 24, 25, 26})


def _major(module: t.Any) -> int | None:
    version = getattr(module, "__version__", None)
    try:
        return int(str(version).split(".", 1)[0])
    except ValueError:
        return None


def direct_writer(
    owner: t.Any, stream: _Stream, metrics: t.Any = None
) -> _Writer | None:
    """A writer that puts a stream's frames on the wire itself, or ``None``.

    ``owner`` is the object whose bound method the server passed to the
    application as ``start_response``. For the servers whose write path is
    known — gunicorn's ``Response`` (``-k gevent``) and gevent's
    ``pywsgi.WSGIHandler`` (gevent's ``WSGIServer``, :mod:`.serving`,
    ``gunicorn -k gevent_pywsgi``), in the versions checked, on a plain
    (not TLS) gevent socket — frames can then be written as whole HTTP/1.1
    chunks with one non-blocking ``send`` each, from whichever greenlet of
    the hub's thread delivers them, instead of waking the stream's greenlet
    and going through the server's per-write path. Anything else (another
    server or version, a middleware's ``start_response``, TLS, HTTP/2, an
    HTTP/1.0 client) gets ``None``: the server writes every frame.

    ``metrics`` (with a ``pending`` count of delivered events) is told of
    each frame's events once they are written, as the body's loop does.
    """
    if owner is None:
        return None
    cls = type(owner)
    gunicorn_wsgi = sys.modules.get("gunicorn.http.wsgi")
    if gunicorn_wsgi is not None and cls is getattr(gunicorn_wsgi, "Response", None):
        if _major(sys.modules.get("gunicorn")) not in _GUNICORN_MAJORS:
            return None
        sock = getattr(owner, "sock", None)
        writer: _Writer = _GunicornWriter(owner, sock, stream, metrics)
    elif isinstance(owner, gevent.pywsgi.WSGIHandler):
        if _major(gevent) not in _GEVENT_MAJORS:
            return None
        sock = getattr(owner, "socket", None)
        writer = _PyWSGIWriter(owner, sock, stream, metrics)
    else:
        return None
    if type(sock) is not gevent.socket.socket or not writer.usable():
        return None
    return writer


def _chunk(data: bytes) -> bytes:
    """``data`` as one HTTP/1.1 chunk."""
    return b"%X\r\n%b\r\n" % (len(data), data)


#: The end of a chunked body.
_LAST_CHUNK = b"0\r\n\r\n"


class _Writer:
    """Writes frames of one response as whole HTTP/1.1 chunks, once the
    server has sent the headers and the first chunk.

    :meth:`send` never blocks: it writes a frame with one non-blocking
    ``send`` and returns whether it took the frame; when the socket's buffer
    took only part of it, the rest is kept in :attr:`pending` and the stream
    is woken to finish it with :meth:`flush`, in its own greenlet, before
    anything else is written.
    """

    __slots__ = (
        "owner",
        "sock",
        "stream",
        "timing",
        "pending",
        "_pending_count",
        "_metrics",
        "_raw",
        "_thread",
        "_ready",
        "_body",
        "_wire",
    )

    def __init__(
        self, owner: t.Any, sock: t.Any, stream: _Stream, metrics: t.Any = None
    ) -> None:
        self.owner = owner
        self.sock = sock
        self.stream = stream
        self.timing = stream.timing
        self.pending: bytes | None = None
        #: Bytes written since the server was last told (:meth:`settle`):
        #: of the frames, and on the wire.
        self._body = 0
        self._wire = 0
        self._pending_count = 0
        self._metrics = metrics
        self._raw: t.Any = None
        self._thread = _thread_ident()
        #: None until the headers are out; then whether chunks can be sent.
        self._ready: bool | None = None

    def usable(self) -> bool:
        raise NotImplementedError

    def _state(self) -> bool | None:
        """Whether the response is chunked, once the headers are sent."""
        raise NotImplementedError

    def _count(self, body: int, wire: int) -> None:
        """Tell the server the bytes written (for its access log)."""
        raise NotImplementedError

    def ready(self) -> bool:
        ready = self._ready
        if ready is None:
            ready = self._ready = self._state()
            if ready:
                self._raw = self.sock._sock
        return bool(ready)

    def send(self, frame: Frame, now: float, thread: int) -> bool:
        """Write ``frame`` now, from ``thread``, at monotonic time ``now``;
        whether it was taken (see the class)."""
        if self.pending is not None or thread != self._thread:
            return False
        wire = frame.wire
        if wire is None:
            data = frame.data
            wire = frame.wire = _chunk(data)
        try:
            sent = self._raw.send(wire)
        except OSError:
            # Full (EAGAIN) or broken: the server's own write path, in the
            # stream's greenlet, waits or fails as it always does.
            return False
        self.timing.last_write = now
        self._body += len(frame.data)
        self._wire += sent
        if sent < len(wire):
            self.pending = wire[sent:]
            self._pending_count = frame.count
            self.stream.waker.set()
        elif self._metrics is not None:
            # A write's events count once it completed.
            self._metrics.pending += frame.count
        return True

    def settle(self) -> None:
        """Tell the server the bytes written since it was last told (for its
        access log): before the server writes again, and when the stream
        ends."""
        if self._wire:
            self._count(self._body, self._wire)
            self._body = self._wire = 0

    def write(self, frame: Frame, now: float) -> None:
        """Write ``frame`` without blocking, for a stream served from the hub
        (:class:`Parked`), with nothing pending: what the socket does not
        take now is kept in :attr:`pending` (:meth:`resume` writes it, and
        tells a client that is gone)."""
        if not self.send(frame, now, self._thread):
            # Full, or broken: all of it waits, and resume() says which.
            self.pending = frame.wire
            self._pending_count = frame.count
            self._body += len(frame.data)
        # The framed copy was for this write: a frame kept in history does
        # not keep it.
        frame.wire = None

    def resume(self) -> bool:
        """Write what is pending without blocking; whether all of it went.

        :raises OSError: the client is gone."""
        pending = self.pending
        if pending is None:
            return True
        try:
            sent = self._raw.send(pending)
        except (BlockingIOError, InterruptedError):
            return False
        self._wire += sent
        if sent < len(pending):
            self.pending = pending[sent:]
            return False
        self.pending = None
        self.timing.last_write = time.monotonic()
        if self._metrics is not None:
            self._metrics.pending += self._pending_count
        return True

    def flush(self) -> None:
        """Write what :meth:`send` left over; blocks this greenlet."""
        pending, self.pending = self.pending, None
        if pending:
            self.sock.sendall(pending)
            self._wire += len(pending)
            self.timing.last_write = time.monotonic()
            if self._metrics is not None:
                self._metrics.pending += self._pending_count


class _GunicornWriter(_Writer):
    __slots__ = ()

    def usable(self) -> bool:
        owner = self.owner
        return all(hasattr(owner, name) for name in ("headers_sent", "chunked", "sent"))

    def _state(self) -> bool | None:
        owner = self.owner
        if not owner.headers_sent:
            return None
        return owner.chunked is True and owner.response_length is None

    def _count(self, body: int, wire: int) -> None:
        self.owner.sent += body


class _PyWSGIWriter(_Writer):
    __slots__ = ()

    def usable(self) -> bool:
        owner = self.owner
        return all(
            hasattr(owner, name)
            for name in ("headers_sent", "response_use_chunked", "response_length")
        )

    def _state(self) -> bool | None:
        owner = self.owner
        if not owner.headers_sent:
            return None
        return owner.response_use_chunked is True

    def _count(self, body: int, wire: int) -> None:
        self.owner.response_length += wire


# -- streams served from the hub --


class _Pumped(t.Protocol):
    """A stream that :class:`Parked` serves."""

    @property
    def waker(self) -> Waker: ...

    def pump(self) -> None:
        """Take the stream's next turn (in the hub; never blocks)."""
        ...

    def on_eof(self) -> None: ...

    def end(self, reason: str) -> None:
        """Ask the stream to end, for ``reason``."""
        ...

    def release(self) -> None: ...


def parkable(
    body: t.Generator[bytes, None, None],
    owner: t.Any,
    park: t.Callable[[Handoff], bool],
) -> t.Iterator[bytes]:
    """``body``, the body generator of a stream that only follows a
    subscription, as the server is to get it.

    Under gunicorn's gevent worker, whose ``start_response`` belongs to
    ``owner``, it is wrapped in an object that gunicorn compares with its
    ``ALREADY_HANDLED`` marker before it iterates the body. That comparison
    calls ``park`` with a :class:`Handoff`: when it returns ``True`` the
    stream was handed to the hub (:class:`Parked`), and gunicorn's request
    greenlet ends. Anything else that gets the object (a middleware, another
    server) iterates it as the body it wraps.
    """
    if _already_handled() is None:
        return body
    return _ParkableBody(body, owner, park)


def _already_handled() -> t.Any:
    base = sys.modules.get("gunicorn.workers.base_async")
    return getattr(base, "ALREADY_HANDLED", None)


class _ParkableBody:
    """See :func:`parkable`."""

    __slots__ = ("_body", "_owner", "_park")

    def __init__(
        self,
        body: t.Generator[bytes, None, None],
        owner: t.Any,
        park: t.Callable[[Handoff], bool],
    ) -> None:
        self._body = body
        self._owner = owner
        self._park: t.Callable[[Handoff], bool] | None = park

    def __iter__(self) -> _ParkableBody:
        return self

    def __next__(self) -> bytes:
        self._park = None
        return next(self._body)

    def close(self) -> None:
        self._park = None
        self._body.close()

    __hash__ = object.__hash__

    def __eq__(self, other: object) -> bool:
        park = self._park
        if park is None or other is None or other is not _already_handled():
            return NotImplemented
        self._park = None
        hand = _handoff(self._owner, sys._getframe(1))
        if hand is None or not park(hand):
            return NotImplemented  # not handled: gunicorn iterates the body
        # The stream lives on in the hub: the body generator ends without
        # ending it.
        self._body.close()
        return True


def _handoff(owner: t.Any, caller: t.Any) -> Handoff | None:
    """A :class:`Handoff` of the response ``owner`` if ``caller`` is
    gunicorn's check for a response that was already handled, in the
    request loop of its gevent worker as checked, for a chunked HTTP/1.1
    response whose head is not sent yet; else ``None``."""
    base = sys.modules.get("gunicorn.workers.base_async")
    ggevent = sys.modules.get("gunicorn.workers.ggevent")
    if base is None or ggevent is None:
        return None
    if _major(sys.modules.get("gunicorn")) not in _GUNICORN_MAJORS:
        return None
    worker_class = ggevent.GeventWorker
    outer = caller.f_back
    if (
        caller.f_code is not base.AsyncWorker.is_already_handled.__code__
        or outer is None
        or outer.f_code is not base.AsyncWorker.handle_request.__code__
    ):
        return None
    worker = caller.f_locals.get("self")
    cls = type(worker)
    if not (
        isinstance(worker, worker_class)
        and cls.handle is worker_class.handle
        and cls.handle_request is worker_class.handle_request
    ):
        return None
    req = getattr(owner, "req", None)
    if (
        getattr(req, "must_close", None) is not False
        or getattr(owner, "headers_sent", True) is not False
        or getattr(owner, "chunked", None) is not True
        or getattr(owner, "response_length", 0) is not None
        or type(getattr(owner, "sock", None)) is not gevent.socket.socket
    ):
        return None
    local = outer.f_locals
    return Handoff(owner, worker, local.get("environ"), local.get("request_start"))


class Handoff:
    """A response that gunicorn's gevent worker lets go of (see
    :func:`parkable`): :meth:`start` writes its head and takes its socket."""

    __slots__ = ("owner", "worker", "environ", "started")

    def __init__(self, owner: t.Any, worker: t.Any, environ: t.Any, started: t.Any):
        self.owner = owner
        self.worker = worker
        self.environ = environ
        self.started = started if isinstance(started, datetime) else datetime.now()

    def start(
        self, data: bytes, stream: _Pumped, sub: t.Any, writer: _Writer
    ) -> Parked:
        """Send the head of the response (``Connection: close``: the
        connection ends with the stream) and ``data``, in this greenlet;
        then take the socket from gunicorn, which ends its request loop
        without closing it.

        :raises OSError: the client is gone (gunicorn closes the socket)."""
        owner = self.owner
        owner.force_close()
        owner.req.must_close = True
        owner.write(data)
        if not writer.ready():
            raise OSError("the response is not chunked")
        raw = _socket.socket(fileno=owner.sock.detach())
        raw.setblocking(False)
        writer.sock = writer._raw = raw
        log = self.worker.log
        if getattr(log, "access_log_enabled", True):
            access = (log, owner, owner.req, self.environ, self.started)
        else:
            access = None
        return Parked(stream, sub, raw, writer, access)


#: Every stream served from the hub: nothing else holds one while it waits.
_parked: set[Parked] = set()
_end_at_exit = False
#: Seconds the exit waits for the streams it ended to be released.
EXIT_RELEASE_TIMEOUT = 5.0


def _end_parked() -> None:
    """At exit: end the streams still served from the hub, as a shutdown,
    with their last chunk, and wait (a bounded time) for their release:
    ``client_disconnected`` and the rest of it. A gunicorn worker that stops
    without SIGTERM, at ``--max-requests``, has no greenlet left to wait for
    and would exit with them open."""
    releases = []
    for parked in list(_parked):
        if parked.stream is not None:
            parked.stream.end("shutdown")
        release = parked.finish(clean=True)
        if release is not None:
            releases.append(release)
    _parked.clear()
    done = gevent.joinall(releases, EXIT_RELEASE_TIMEOUT)
    if len(done) < len(releases):
        log.warning(
            "%d event stream(s) were not released within %g s of exit.",
            len(releases) - len(done),
            EXIT_RELEASE_TIMEOUT,
        )


class Parked:
    """A stream served from the hub after the server's greenlet let it go.

    It has no greenlet: its waker calls :meth:`switch` (which runs the
    stream's :meth:`~_Pumped.pump`) where it would switch to a waiting
    greenlet; its socket is watched for the client's EOF, and for room to
    write when a write was left pending. It is the stream's ``task``:
    :func:`kill` makes it take a turn (and end, once told to).
    """

    __slots__ = (
        "stream",
        "sub",
        "raw",
        "writer",
        "dead",
        "_waker",
        "_eof",
        "_writable",
        "_access",
    )

    def __init__(
        self,
        stream: _Pumped,
        sub: t.Any,
        raw: t.Any,
        writer: _Writer,
        access: tuple[t.Any, ...] | None,
    ) -> None:
        self.stream: _Pumped | None = stream
        #: The subscription whose frames are the body.
        self.sub = sub
        self.raw = raw
        self.writer = writer
        self.dead = False
        self._waker = t.cast(_GreenWaker, stream.waker)
        self._writable: t.Any = None
        #: What gunicorn's access log needs, when it is on.
        self._access = access
        eof = self._eof = _EOFWatch(raw, stream, True)
        eof.watcher = gevent.get_hub().loop.io(raw.fileno(), _READ)
        eof.watcher.start(eof)
        global _end_at_exit
        if not _end_at_exit:
            _end_at_exit = True
            atexit.register(_end_parked)
        _parked.add(self)

    def switch(self, value: t.Any = None) -> None:
        """The stream's waker was set (in the hub)."""
        stream = self.stream
        if stream is not None and not self.dead:
            stream.pump()

    def kill(self) -> None:
        self.switch()

    def arm(self) -> bool:
        """Have the stream's waker call :meth:`switch` when it is next set;
        ``False`` when it is set already (nothing was armed)."""
        return self._waker.call(self)

    def wait_writable(self) -> None:
        """Set the stream's waker when the socket has room again."""
        watcher = self._writable
        if watcher is None:
            loop = gevent.get_hub().loop
            watcher = self._writable = loop.io(self.raw.fileno(), _WRITE)
        if not watcher.active:
            watcher.start(self._on_writable)

    def _on_writable(self) -> None:
        self._writable.stop()
        if self.stream is not None:
            self.stream.waker.set()

    def finish(self, clean: bool) -> gevent.Greenlet | None:
        """End the response (with its last chunk when ``clean`` and nothing
        is left half-written), close the socket, and release the stream in a
        greenlet of its own (its ``client_disconnected`` receivers may
        block), which is returned; ``None`` if it was finished already."""
        if self.dead:
            return None
        self.dead = True
        _parked.discard(self)
        self._eof.stop()
        if self._writable is not None:
            self._writable.stop()
            self._writable.close()
            self._writable = None
        if clean and self.writer.pending is None:
            try:
                self.raw.send(_LAST_CHUNK)
            except OSError:
                pass
        self.raw.close()
        return gevent.spawn(self._release)

    def _release(self) -> None:
        stream, self.stream = self.stream, None
        try:
            if stream is not None:
                stream.release()
        except Exception:
            log.exception("Releasing an event stream failed.")
        access, self._access = self._access, None
        if access is not None:
            logger, resp, req, environ, started = access
            logger.access(resp, req, environ, datetime.now() - started)


class _Timing(t.Protocol):
    #: monotonic time a write started, or None when not writing.
    writing_since: float | None

    def due(self, now: float) -> bool:
        """Whether a heartbeat or the end of its lifetime is due."""
        ...

    def send_timed_out(self, now: float) -> bool: ...


class _Watched(t.Protocol):
    @property
    def task(self) -> t.Any: ...
    @property
    def timing(self) -> _Timing: ...
    @property
    def waker(self) -> Waker: ...

    def on_send_timeout(self) -> None: ...


class Watchdog:
    """One greenlet per application and process that sweeps its streams
    every ``tick`` seconds:

    - drops a stream whose write has blocked longer than its send timeout
      (a frozen or half-open client keeps ``sendall`` parked until TCP gives
      up, which can take many minutes);
    - wakes a stream whose heartbeat or lifetime end is due, so that idle
      streams wait without a timer of their own (one timer per wait was an
      allocation and two libev calls on every delivery).

    ``streams`` is the application's registry of open streams, which their
    owners keep (a stream leaves it when it is released): the watchdog
    keeps no registry of its own. Its greenlet runs while there are streams;
    :meth:`start` starts it again.
    """

    def __init__(
        self,
        streams: t.Collection[_Watched],
        tick: float = 0.5,
        on_tick: t.Callable[[], None] | None = None,
    ) -> None:
        self._tick = tick
        #: Called at every tick, before the sweep (it must not block).
        self._on_tick = on_tick
        self._streams = streams
        self._runner: t.Any = None

    def start(self) -> None:
        """Make sure the sweeps run (a stream was added to the registry)."""
        if self._runner is None or self._runner.dead:
            self._runner = gevent.spawn(self._run)

    def _run(self) -> None:
        while self._streams:
            gevent.sleep(self._tick)
            if self._on_tick is not None:
                self._on_tick()
            now = time.monotonic()
            for stream in list(self._streams):
                if stream.task is None:
                    continue  # a plain thread's stream times its own waits
                timing = stream.timing
                if timing.writing_since is None:
                    if timing.due(now):
                        stream.waker.set()
                elif timing.send_timed_out(now):
                    # Once: the write counts as over from here on.
                    timing.writing_since = None
                    stream.on_send_timeout()


_term_callbacks: list[t.Callable[[], None]] = []
_term_installed = False


def install_term_handler(callback: t.Callable[[], None]) -> bool:
    """Run ``callback`` (in the hub) when the process gets SIGTERM, before the
    Python handler that was there (gunicorn's graceful shutdown).

    Only possible from the main thread, and only when a Python handler is
    installed; returns whether it is.
    """
    global _term_installed
    if callback not in _term_callbacks:
        _term_callbacks.append(callback)
    if _term_installed:
        return True
    # No threading.current_thread() check: with threading monkey-patched it
    # names the greenlet, not the OS thread, so every request greenlet would
    # look like a foreign thread. signal.signal() itself raises ValueError
    # outside the main thread.
    previous = signal.getsignal(signal.SIGTERM)
    if not callable(previous):
        # Nobody handles SIGTERM gracefully here: the process dies at once
        # and ending streams first would gain nothing.
        return False

    def on_term(signum: int, frame: t.Any) -> None:
        loop = gevent.get_hub().loop
        for cb in list(_term_callbacks):
            loop.run_callback(cb)
        previous(signum, frame)

    try:
        signal.signal(signal.SIGTERM, on_term)
    except ValueError:
        return False
    _term_installed = True
    log.debug("SIGTERM ends event streams before %r", previous)
    return True
