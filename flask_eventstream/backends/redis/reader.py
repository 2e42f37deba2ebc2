"""The reader of the Redis backend: one greenlet (when sockets are gevent's)
or daemon thread per process that ``XREAD BLOCK``\\ s every channel with
local subscribers and hands each entry, encoded once, to the sink.

A subscription is registered by the reader between two reads: it reads, in
one atomic script call, the counter and every entry of the subscription's
channels newer than its position (the client's ``Last-Event-ID``, or for a new
client the counter when it subscribed), and starts the subscription with
those and a floor at the counter, so that an entry is neither missed nor sent
twice.

Each entry carries the id of the previous entry of its stream (field ``p``).
The reader uses it to notice that it fell behind the trimming, and cuts off
the streams that missed events so that they resume (and are told).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
import typing as t

import redis
from redis.exceptions import RedisError
from redis.exceptions import ResponseError

from ... import _gevent
from ...broker import format_id
from ...broker import Frame
from ...broker import Key
from ...broker import parse_id
from ...broker import Sink
from ...broker import Subscription
from ...broker import Waker
from ...sse import encode
from ...sse import Event
from ..planning import next_id
from ..planning import read_starts
from ..planning import replay
from ..planning import reset_reason
from .client import as_key
from .client import Client
from .client import TooFewReplicas

__all__ = ["SIZE_ID", "Encoded", "Pending", "Reader", "entry_event", "plan"]

log = logging.getLogger(__name__)

#: The reader's XREAD BLOCK, in milliseconds; it is woken earlier with
#: CLIENT UNBLOCK when a new subscription needs it.
BLOCK_MS = 5000
#: The same, where CLIENT UNBLOCK is not allowed (ACLs).
BLOCK_MS_NO_UNBLOCK = 100
#: Reconnection delays of the reader (seconds).
READER_BACKOFF = (0.05, 1.0)
#: An idle reader (no subscriptions) closes its connection after this.
READER_IDLE = 30.0

#: A stream entry as read: (key, channel, id, fields).
Entry = tuple[Key, str, str, dict[bytes, bytes]]


#: A placeholder id as long as real ones: an event is encoded with it before
#: it is published (to check its size), and the real id replaces it.
SIZE_ID = "1700000000000-0000000"
_SIZE_LINE = f"id: {SIZE_ID}\n".encode()


class Encoded:
    """An event encoded with :data:`SIZE_ID` by the process that publishes
    it, kept (under the entry's token) for this process's reader."""

    __slots__ = ("data", "at")

    def __init__(self, data: bytes, at: int) -> None:
        self.data = data
        self.at = at

    @classmethod
    def of(cls, data: bytes) -> Encoded | None:
        """``data`` with the place of its id line, if it has one."""
        at = data.find(_SIZE_LINE)
        # The id line follows only comment and event lines, which cannot
        # contain a line break: its first occurrence is the id line.
        if at < 0 or (at and data[at - 1] != 0x0A):
            return None
        return cls(data, at)

    def frame(self, event_id: str, key: Key) -> Frame:
        data, at = self.data, self.at
        line = f"id: {event_id}\n".encode()
        return Frame(data[:at] + line + data[at + len(_SIZE_LINE) :], key)


def _first(entry: Entry) -> Key:
    return entry[0]


@dataclasses.dataclass
class Pending:
    sub: Subscription
    #: Send what follows this id; None: what follows the counter at registration.
    since: Key | None
    #: The client asked to resume (a reset is possible).
    resume: bool


def entry_event(event_id: str, fields: dict[bytes, bytes]) -> Event | None:
    """The event of a stream entry; ``None`` (logged) for a malformed one."""
    try:
        data = fields.get(b"d")
        retry = fields.get(b"r")
        comment = fields.get(b"c")
        name = fields.get(b"e")
        event = Event(
            event=name.decode("utf-8") if name is not None else None,
            id=event_id,
            retry=int(retry) if retry is not None else None,
            comment=comment.decode("utf-8") if comment is not None else None,
        )
        if data is None:
            # No "d" field: a block without data (comment, id or retry only).
            return event
        return dataclasses.replace(event, data=data.decode("utf-8"))
    except (ValueError, TypeError) as e:
        log.error("Skipping malformed stream entry %s: %s", event_id, e)
        return None


def plan(
    p: Pending,
    counter: Key | None,
    epoch: Key | None,
    entries: dict[str, list[Entry]],
    history: int,
) -> tuple[str | None, list[list[Entry]]]:
    """Why the subscription ``p`` needs a reset (or ``None``), and the
    entries of each of its channels to replay."""
    since = p.since
    if since is None:
        return None, []
    streams = [
        newer
        for channel in p.sub.channels
        if (newer := [e for e in entries[channel] if e[0] > since])
    ]
    if not p.resume:
        return None, streams
    if history:
        # The predecessor of the oldest entry kept, when newer than the
        # client's id, was trimmed away.
        dropped = [as_key(newer[0][3].get(b"p")) for newer in streams]
    else:
        # No history is kept: report missed events, replay none.
        dropped = [newer[0][0] for newer in streams]
        streams = []
    return reset_reason(since, epoch, counter, dropped), streams


class Reader:
    """Registers subscriptions and reads their channels, for one process.

    :param encoded: events this process encoded when it published them, by
        the entry's token (used rather than encoding the entry again).
    """

    def __init__(
        self,
        client: Client,
        sink: Sink,
        prefix: str,
        history: int,
        encoded: dict[bytes, Encoded],
        control_key: str | None = None,
        on_control: t.Callable[[t.Any], None] | None = None,
    ) -> None:
        self._client = client
        #: The stream of control messages (revoke, disconnect) read along
        #: with the channels, and what to do with its entries.
        self._control_key = control_key
        self._on_control = on_control
        #: The id after which control messages are read; set once connected.
        self._control_position: str | None = None
        self._sink = sink
        self._prefix = prefix
        self._history = history
        self._encoded = encoded
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self.closed = False
        #: Subscriptions waiting to be registered.
        self._pending: list[Pending] = []
        #: Per channel read: the id it reads after.
        self._positions: dict[str, Key] = {}
        #: The newest id handed out.
        self.cursor: Key = (0, 0)
        self._generation = 0
        self._seen = 0
        self._running = False
        self._reader_id: int | None = None
        self._wakeup: Waker | None = None
        self._unblock = True

    # -- called by the backend --

    def add(self, pending: Pending) -> None:
        """Register ``pending`` before the next read; start if idle."""
        with self._lock:
            self._pending.append(pending)
            self._generation += 1
            generation = self._generation
            start = not self._running
            if start:
                self._running = True
                self._wakeup = _gevent.background_event()
        if start:
            _gevent.spawn_background(self._run, "flask-eventstream redis reader")
        else:
            self._wake(generation)

    def forget(self, sub: Subscription) -> None:
        with self._lock:
            self._pending = [p for p in self._pending if p.sub is not sub]

    def close(self) -> None:
        self.closed = True
        with self._lock:
            wakeup = self._wakeup
            self._pending = []
        if wakeup is not None:
            wakeup.set()
        if self._pid != os.getpid():
            return
        reader_id = self._reader_id
        if reader_id is not None:
            try:
                self._client.publisher().client_unblock(reader_id)
            except (RedisError, OSError):
                pass

    def _wake(self, generation: int) -> None:
        """Make the reader register pending subscriptions now."""
        wakeup = self._wakeup
        if wakeup is not None:
            wakeup.set()
        if not self._unblock:
            return
        delay = 0.001
        for _ in range(8):
            reader_id = self._reader_id
            # None: the reader is connecting, and registers before it reads.
            if self._seen >= generation or reader_id is None:
                return
            try:
                unblocked = self._client.publisher().client_unblock(reader_id)
            except ResponseError:
                self._no_unblock()
                return
            except (RedisError, OSError):
                return  # the reader reconnects, then registers
            if unblocked:
                return
            # The reader is between two reads: it registers before the next
            # one, unless that one was already on its way.
            _gevent.sleep(delay)
            delay *= 2

    def _no_unblock(self) -> None:
        if self._unblock:
            self._unblock = False
            log.warning(
                "CLIENT UNBLOCK is not allowed on %s: new subscriptions"
                " wait for the reader to poll (every %d ms).",
                self._client.where,
                BLOCK_MS_NO_UNBLOCK,
            )

    def _check_unblock(self, reader: redis.Redis, client_id: int) -> None:
        """Find out, before the first blocking read, whether the reader can
        be woken (unblocking itself, which is not blocked, does nothing)."""
        if not self._unblock:
            return
        try:
            reader.client_unblock(client_id)
        except ResponseError:
            self._no_unblock()

    # -- the loop --

    def _run(self) -> None:
        wakeup = self._wakeup
        assert wakeup is not None
        reader: redis.Redis | None = None
        #: CLIENT ID of the reader's connection, None while not connected.
        client_id: int | None = None
        failures = 0
        idle_since: float | None = None
        where = self._client.where

        def disconnect() -> None:
            nonlocal client_id
            if self._reader_id == client_id:
                self._reader_id = None
            client_id = None
            if reader is not None:
                reader.connection_pool.disconnect()

        try:
            while not self.closed and self._pid == os.getpid():
                try:
                    if reader is None:
                        reader = self._client.connector.client(
                            "reader",
                            max_connections=1,
                            **self._client.options(
                                "reader", socket_timeout=BLOCK_MS / 1000 + 5
                            ),
                        )
                    if client_id is None:
                        client_id = int(reader.client_id())
                        self._check_unblock(reader, client_id)
                        self._reader_id = client_id
                        if failures:
                            log.warning(
                                "Redis at %s is back; reading events again.", where
                            )
                        failures = 0
                    wakeup.clear()
                    if self._control_key and self._control_position is None:
                        # Control messages from now on: a stream opened
                        # before this checked revocations in Redis itself.
                        top: t.Any = reader.xrevrange(self._control_key, count=1)
                        self._control_position = (
                            top[0][0].decode("ascii") if top else "0-0"
                        )
                    self._register(reader)
                    streams = self._streams()
                    if not streams:
                        now = time.monotonic()
                        if idle_since is None:
                            idle_since = now
                        elif now - idle_since >= READER_IDLE and self._stop_idle():
                            return
                        wakeup.wait(READER_IDLE / 3)
                        continue
                    idle_since = None
                    block = BLOCK_MS if self._unblock else BLOCK_MS_NO_UNBLOCK
                    reply = reader.xread(t.cast(t.Any, streams), block=block)
                    if reply and self._client.replicated(reader):
                        self._dispatch(reply)
                except TooFewReplicas:
                    pass  # registration waits for the replicas, like reading
                except (RedisError, OSError) as e:
                    disconnect()
                    failures += 1
                    if failures == 1:
                        log.warning(
                            "Lost Redis at %s (%s); open streams stay connected"
                            " and resume where they were when it is back.",
                            where,
                            e,
                        )
                    low, high = READER_BACKOFF
                    _gevent.sleep(min(low * 2 ** (failures - 1), high))
                except Exception:
                    log.exception("The Redis event reader failed; restarting it.")
                    disconnect()
                    _gevent.sleep(READER_BACKOFF[1])
        finally:
            disconnect()
            with self._lock:
                if self._running and self._wakeup is wakeup:
                    self._running = False

    def _stop_idle(self) -> bool:
        """Stop an idle reader, unless a subscription just came."""
        with self._lock:
            if self._pending or any(map(self._sink.subscribers, self._positions)):
                return False
            self._running = False
            self._wakeup = None
            return True

    def _streams(self) -> dict[str, str]:
        """What to XREAD: every channel with registered subscriptions, and
        the control stream while there are any."""
        with self._lock:
            positions = self._positions
            subscribers = self._sink.subscribers
            for channel in [c for c in positions if not subscribers(c)]:
                del positions[channel]
            streams = {self._prefix + c: format_id(k) for c, k in positions.items()}
        if streams and self._control_key and self._control_position is not None:
            streams[self._control_key] = self._control_position
        return streams

    # -- registering --

    def _register(self, reader: redis.Redis) -> None:
        """Register the pending subscriptions (between two reads)."""
        with self._lock:
            batch = [p for p in self._pending if not p.sub.closed]
            self._pending = []
            self._seen = self._generation
        if not batch:
            return
        try:
            self._register_batch(reader, batch)
        except BaseException:
            with self._lock:
                self._pending[:0] = [
                    p for p in batch if not p.sub.closed and not p.sub.started
                ]
            raise

    def _register_batch(self, reader: redis.Redis, batch: list[Pending]) -> None:
        # The first id wanted per channel: after the oldest position.
        starts = read_starts((p.sub.channels, p.since) for p in batch)
        channels = list(starts)
        reply = self._client.snapshot(
            reader,
            [self._prefix + c for c in channels],
            [next_id(starts[c]) for c in channels],
        )
        if not self._client.replicated(reader):
            raise TooFewReplicas("registration waits for the replicas")
        counter = as_key(reply[0])
        epoch = as_key(reply[1])
        server_ms = int(reply[2])
        entries: dict[str, list[Entry]] = {}
        for channel, raw in zip(channels, reply[3:], strict=True):
            entries[channel] = [_entry(channel, item[0], item[1]) for item in raw]
        # Everything up to the counter is in this snapshot; a publish after
        # it gets a larger id (and goes to the live path). With no counter,
        # nothing was published through it: the server's clock stands in.
        top = counter if counter is not None else (max(server_ms - 1, 0), 0)
        # Events published on a channel this process did not read, between a
        # subscribe() and now, reach the subscriber in its replay, not through
        # the reader: they are announced here (once) instead.
        subscribers = self._sink.subscribers
        announce: dict[str, Key] = {}
        with self._lock:
            for p in batch:
                if p.resume or p.since is None:
                    continue
                for channel in p.sub.channels:
                    if not subscribers(channel):
                        oldest = announce.get(channel)
                        if oldest is None or p.since < oldest:
                            announce[channel] = p.since
        frames: dict[Key, Frame] = {}

        def frame(entry: Entry) -> Frame | None:
            key, _, event_id, fields = entry
            f = frames.get(key)
            if f is None:
                local = self._encoded.get(fields.get(b"t", b""))
                if local is not None:
                    f = local.frame(event_id, key)
                else:
                    event = entry_event(event_id, fields)
                    if event is None:
                        return None
                    f = Frame(encode(event), key)
                frames[key] = f
            return f

        for p in batch:
            reason, streams = plan(p, counter, epoch, entries, self._history)
            queued = (
                replay(p.since, reason, counter, streams, _first, frame)
                if p.since is not None
                else []
            )
            with self._lock:
                sub = p.sub
                if sub.closed:
                    continue
                # A channel new to the reader: it reads what follows this
                # snapshot (nothing older is wanted by anyone).
                new = [c for c in sub.channels if not subscribers(c)]
                sub.start(queued, top, reason)
                for channel in new:
                    self._positions[channel] = max(self.cursor, top)
        if announce:
            news = [
                e
                for channel, since in announce.items()
                for e in entries[channel]
                if e[0] > since
            ]
            # The subscribers have these in their replay (their floor keeps
            # them from a second copy): the application is told of them.
            for entry in sorted(news, key=_first):
                event = entry_event(entry[2], entry[3])
                f = frame(entry) if event is not None else None
                if event is None or f is None:
                    continue
                try:
                    self._sink.deliver(entry[1], f, event)
                except Exception:
                    log.exception("Announcing event %s failed.", entry[2])

    # -- reading --

    def _dispatch(self, reply: t.Any) -> None:
        """Hand one XREAD reply to local subscribers, in id order."""
        items: list[Entry] = []
        plen = len(self._prefix)
        pairs = reply.items() if isinstance(reply, dict) else reply
        control = self._control_key.encode() if self._control_key else None
        for stream, raw_entries in pairs:
            if stream == control:
                if raw_entries:
                    self._control_position = raw_entries[-1][0].decode("ascii")
                if self._on_control is not None:
                    self._on_control(raw_entries)
                continue
            channel = stream.decode("utf-8")[plen:]
            for raw_id, fields in raw_entries:
                event_id = raw_id.decode("ascii")
                key = parse_id(event_id)
                if key is not None:
                    items.append((key, channel, event_id, fields))
        items.sort(key=_first)
        sink = self._sink
        positions = self._positions
        local = self._encoded
        for key, channel, event_id, fields in items:
            position = positions.get(channel)
            if position is None or key <= position:
                continue
            prev = as_key(fields.get(b"p"))
            if prev is not None and prev > position:
                self._cut_off(channel, position)
            positions[channel] = key
            if key > self.cursor:
                self.cursor = key
            event = entry_event(event_id, fields)
            if event is None:
                continue
            encoded = local.pop(fields.get(b"t", b""), None)
            if encoded is not None:
                frame = encoded.frame(event_id, key)
            else:
                frame = Frame(encode(event), key)
            try:
                sink.deliver(channel, frame, event)
            except Exception:
                # A receiver of event_published failed; the subscribers had
                # the event already.
                log.exception("Delivering event %s failed.", event_id)

    def _cut_off(self, channel: str, position: Key) -> None:
        """Entries of ``channel`` after ``position`` were trimmed before this
        process read them: end its streams, which resume and are told."""
        subs = self._sink.subscribers(channel)
        for sub in subs:
            sub.cut_off()
        log.warning(
            "Events on channel %r after %s were trimmed from Redis before this"
            " process read them; ending its %d streams so that they resume.",
            channel,
            format_id(position),
            len(subs),
        )


def _entry(channel: str, raw_id: bytes, raw_fields: list[bytes]) -> Entry:
    event_id = raw_id.decode("ascii")
    key = parse_id(event_id)
    assert key is not None, event_id
    fields = dict(zip(raw_fields[::2], raw_fields[1::2], strict=True))
    return key, channel, event_id, fields
