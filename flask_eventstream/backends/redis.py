"""The Redis backend: every process that shares a Redis server shares channels.

Each channel is a Redis Stream, ``eventstream:<channel>``, trimmed to about
``EVENTSTREAM_HISTORY`` entries. An event's SSE id is its stream entry id,
``<milliseconds>-<sequence>``. The ids are assigned by a Lua script from one
counter for the whole server (the hash ``eventstream:~meta``), so they
increase in publish order across all channels: one id resumes a
subscription to any set of channels, and an id tells in which order two
events on different channels were published.

Each entry carries the id of the previous entry of its stream (field ``p``).
When the first entry newer than a client's id says that its predecessor is
newer than the client's id too, that predecessor was trimmed away: the client
gets an ``eventstream-reset``. The reader uses the same field to notice that
it fell behind the trimming, and cuts off the streams that missed events so
that they resume (and are told).

A process holds at most three connections, however many clients it serves:

- one *reader* (a greenlet when sockets are gevent's, else a daemon thread)
  that ``XREAD BLOCK``\\ s every channel with local subscribers and hands
  each entry, encoded once, to the broker's local fan-out;
- a pool of at most two for publishing, the subscribe bookkeeping, and
  ``CLIENT UNBLOCK`` to wake the reader when a subscription needs it (under
  gevent, one such pool per OS thread that publishes: a gevent socket
  belongs to the hub of one thread).

The scripts touch several keys at once, so a Redis Cluster is not supported;
a single server (with replicas) is.

A subscription is registered by the reader between two reads: it reads, in
one atomic script call, the counter and every entry of the subscription's
channels newer than its position (the client's ``Last-Event-ID``, or for a new
client the counter when it subscribed), queues those, and connects the
subscription for live events with a floor at the counter, so that an entry
is neither missed nor sent twice.

Nothing else in the package imports :mod:`redis`; this module is imported
only when a Redis URL is configured.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import os
import secrets
import threading
import time
import typing as t
import urllib.parse

import redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from .. import _gevent
from ..broker import encode_frame
from ..broker import format_id
from ..broker import Frame
from ..broker import Key
from ..broker import parse_id
from ..broker import reset_frame
from ..broker import Sink
from ..broker import Subscription
from ..broker import Waker
from ..exceptions import PublishError
from ..sse import encode
from ..sse import Event

__all__ = ["RedisBackend"]

log = logging.getLogger(__name__)

#: Keys: ``PREFIX + channel`` for streams, ``PREFIX + "~meta"`` for the
#: counter ("~" cannot appear in a channel name).
PREFIX = "eventstream:"

#: Publishing retries for about this long (seconds) before PublishError.
PUBLISH_RETRY_TIME = 1.0
#: Connection timeouts of the publishing pool (seconds).
CONNECT_TIMEOUT = 0.5
COMMAND_TIMEOUT = 2.0
#: Longest wait for a free pooled connection (seconds).
POOL_TIMEOUT = 1.0
#: The reader's XREAD BLOCK, in milliseconds; it is woken earlier with
#: CLIENT UNBLOCK when a new subscription needs it.
BLOCK_MS = 5000
#: The same, where CLIENT UNBLOCK is not allowed (ACLs).
BLOCK_MS_NO_UNBLOCK = 100
#: Reconnection delays of the reader (seconds).
READER_BACKOFF = (0.05, 1.0)
#: An idle reader (no subscriptions) closes its connection after this.
READER_IDLE = 30.0
#: A stream opened while Redis is unreachable gets the events published from
#: this long (ms) before its estimate of Redis' clock: those published after
#: Redis came back and before the reader did.
OUTAGE_MARGIN_MS = 2000
#: A placeholder id as long as real ones, to check the encoded size.
_SIZE_ID = "1700000000000-0000000"

# Publish one event. KEYS: stream, meta. ARGV: maxlen, token, retry flag,
# then field/value pairs. The id continues the server-wide counter (or this
# stream's newest entry, and starts a new epoch, if the counter was lost).
# On a retry, an entry of the last minute carrying the same token means the
# first attempt went through: its id is returned and nothing is added.
_PUBLISH = """
local tm = redis.call('TIME')
local now = tonumber(tm[1]) * 1000 + math.floor(tonumber(tm[2]) / 1000)
if ARGV[3] == '1' then
  local recent = redis.call('XRANGE', KEYS[1], string.format('%.0f', now - 60000), '+')
  for i = #recent, 1, -1 do
    local f = recent[i][2]
    for j = 1, #f, 2 do
      if f[j] == 't' and f[j + 1] == ARGV[2] then return recent[i][1] end
    end
  end
end
local ms, seq = now, 0
local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
local prev = ''
if top then prev = top[1] end
local last = redis.call('HGET', KEYS[2], 'last')
for _, after in ipairs({last or '', prev}) do
  if after ~= '' then
    local ams, aseq = string.match(after, '^(%d+)-(%d+)$')
    ams, aseq = tonumber(ams), tonumber(aseq)
    if ms < ams or (ms == ams and seq <= aseq) then ms, seq = ams, aseq + 1 end
  end
end
local id = string.format('%.0f-%.0f', ms, seq)
if not last then redis.call('HSET', KEYS[2], 'epoch', id) end
redis.call('HSET', KEYS[2], 'last', id)
local cmd = {'XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], id, 't', ARGV[2], 'p', prev}
for i = 4, #ARGV do cmd[#cmd + 1] = ARGV[i] end
redis.call(unpack(cmd))
return id
"""

# A consistent snapshot for registering subscriptions. KEYS: meta, then
# streams; ARGV: the first id wanted from each stream. Returns the counter,
# the epoch, the server time in ms, then the entries of each stream.
_SNAPSHOT = """
local meta = redis.call('HMGET', KEYS[1], 'last', 'epoch')
local tm = redis.call('TIME')
local now = tonumber(tm[1]) * 1000 + math.floor(tonumber(tm[2]) / 1000)
local out = {meta[1], meta[2], string.format('%.0f', now)}
for i = 2, #KEYS do
  out[#out + 1] = redis.call('XRANGE', KEYS[i], ARGV[i - 1], '+')
end
return out
"""

# The newest id published; with none, one just before the server's clock.
# KEYS: meta.
_COUNTER = """
local last = redis.call('HGET', KEYS[1], 'last')
if last then return last end
local tm = redis.call('TIME')
local now = tonumber(tm[1]) * 1000 + math.floor(tonumber(tm[2]) / 1000)
return string.format('%.0f-0', now - 1)
"""

#: A stream entry as read: (key, channel, id, fields).
_Entry = tuple[Key, str, str, dict[bytes, bytes]]


def _first(entry: _Entry) -> Key:
    return entry[0]


def _next_id(key: Key) -> str:
    """The smallest id after ``key``, as XRANGE's inclusive start."""
    ms, seq = key
    if seq >= 2**64 - 1:
        return f"{ms + 1}-0"
    return f"{ms}-{seq + 1}"


def _key(value: bytes | str | None) -> Key | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return parse_id(value)


def _where(url: str) -> str:
    """The URL without credentials, for messages."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or parts.path or "localhost"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path if parts.hostname else ''}"


@dataclasses.dataclass
class _Pending:
    sub: Subscription
    #: Send what follows this id; None: what follows the counter at registration.
    since: Key | None
    #: The client asked to resume (a reset is possible).
    resume: bool


class RedisBackend:
    """A :class:`~flask_eventstream.broker.Backend` on a Redis server.

    :param sink: where events read from Redis go (the broker of this process).
    :param url: a ``redis://`` (or ``rediss://``, ``unix://``) URL.
    :param history: entries kept per channel (approximately: Redis trims
        whole nodes of a stream, so a few more may be kept).
    :param prefix: the prefix of every key this backend uses.
    """

    def __init__(
        self,
        sink: Sink,
        url: str,
        history: int = 1000,
        *,
        max_event_size: int = 1 << 20,
        prefix: str = PREFIX,
    ) -> None:
        self._sink = sink
        self._max_event_size = max_event_size
        self._url = url
        self._where = _where(url)
        self._history = max(history, 0)
        # Readers must find an entry before it is trimmed, even when no
        # history is kept; resume then replays nothing.
        self._maxlen = str(max(history, 1))
        self._prefix = prefix
        self._meta = prefix + "~meta"
        self._lock = threading.Lock()
        self._closed = False
        self._reset_process()

    def _reset_process(self) -> None:
        """(Re)start with nothing but the configuration: at creation, and in
        a child process after a fork (gunicorn ``--preload``)."""
        self._pid = os.getpid()
        self._clients: dict[int, redis.Redis] = {}
        self._publish_script: t.Any = None
        self._snapshot_script: t.Any = None
        self._counter_script: t.Any = None
        #: Subscriptions waiting for the reader to register them.
        self._pending: list[_Pending] = []
        #: Per channel read by the reader: the id it reads after.
        self._positions: dict[str, Key] = {}
        #: The newest id the reader handed out.
        self._cursor: Key = (0, 0)
        self._generation = 0
        self._seen = 0
        self._reader: t.Any = None
        self._reader_running = False
        self._reader_id: int | None = None
        self._wakeup: Waker | None = None
        self._unblock = True
        #: Redis' clock when last seen: (milliseconds, local monotonic time).
        self._clock: tuple[int, float] | None = None

    # -- connections --

    def _options(self, name: str, **kwargs: t.Any) -> dict[str, t.Any]:
        kwargs.setdefault("socket_connect_timeout", CONNECT_TIMEOUT)
        kwargs.update(
            # Retries are ours: bounded, and only where they cannot duplicate.
            retry=Retry(NoBackoff(), 0),
            client_name=f"flask-eventstream:{name}:{os.getpid()}",
        )
        return kwargs

    def _redis(self) -> redis.Redis:
        """The publishing client of this process (of this OS thread, under
        gevent: a gevent socket belongs to the hub of its thread, and a
        native thread, such as one of gevent's thread pool, has its own)."""
        if self._pid != os.getpid():
            self._reset_process()
        thread = threading.get_native_id() if _gevent.cooperative() else 0
        client = self._clients.get(thread)
        if client is None:
            pool = redis.BlockingConnectionPool.from_url(
                self._url,
                max_connections=2,
                timeout=POOL_TIMEOUT,
                **self._options("pub", socket_timeout=COMMAND_TIMEOUT),
            )
            client = redis.Redis(connection_pool=pool)
            if self._publish_script is None:
                self._publish_script = client.register_script(_PUBLISH)
                self._snapshot_script = client.register_script(_SNAPSHOT)
                self._counter_script = client.register_script(_COUNTER)
            self._clients[thread] = client
        return client

    # -- publishing --

    def publish(self, channel: str, event: Event) -> Event:
        if self._closed:
            raise PublishError("The Redis backend is closed.")
        # Validates the size with an id as long as a real one.
        encode_frame(
            dataclasses.replace(event, id=_SIZE_ID), None, self._max_event_size
        )
        client = self._redis()
        args: list[str] = [self._maxlen, secrets.token_hex(8), "0", "d", event.text]
        if event.event is not None:
            args += ["e", event.event]
        if event.retry is not None:
            args += ["r", str(event.retry)]
        if event.comment is not None:
            args += ["c", event.comment]
        keys = [self._prefix + channel, self._meta]
        deadline = time.monotonic() + PUBLISH_RETRY_TIME
        # At once first: a pooled connection that Redis closed fails once.
        delay = 0.0
        while True:
            try:
                raw = self._publish_script(keys=keys, args=args, client=client)
                break
            except (RedisConnectionError, RedisTimeoutError, OSError) as e:
                # The script may have run (a reply lost in a restart): the
                # retry finds the entry by its token instead of adding another.
                args[2] = "1"
                if time.monotonic() + delay > deadline:
                    raise PublishError(
                        f"Could not publish to channel {channel!r}: Redis at"
                        f" {self._where} is unreachable ({e})."
                    ) from e
                if delay:
                    _gevent.sleep(delay)
                delay = min(delay * 2, 0.4) if delay else 0.05
            except RedisError as e:
                raise PublishError(
                    f"Could not publish to channel {channel!r}: Redis at"
                    f" {self._where} refused it ({e})."
                ) from e
        event_id = raw.decode("ascii") if isinstance(raw, bytes) else str(raw)
        key = parse_id(event_id)
        if key is not None:
            self._clock = (key[0], time.monotonic())
        return dataclasses.replace(event, id=event_id)

    def _counter(self) -> Key | None:
        """The newest id published on this Redis, or None if it cannot be
        reached."""
        client = self._redis()
        try:
            raw = self._counter_script(keys=[self._meta], client=client)
        except (RedisError, OSError):
            return None
        return _key(raw)

    def _estimate(self) -> Key | None:
        """With Redis unreachable: an id a little older than any that Redis
        can give once it is back, from its clock when last seen."""
        clock = self._clock
        if clock is None:
            return None
        ms, at = clock
        now = ms + int((time.monotonic() - at) * 1000)
        return max((max(now - OUTAGE_MARGIN_MS, 0), 0), self._cursor)

    # -- subscribing --

    def attach(self, sub: Subscription, last: Key | None) -> None:
        if self._closed:
            raise RuntimeError("The Redis backend is closed.")
        since = last
        if since is None:
            # Events published from now on are the subscriber's.
            since = self._counter()
            if since is None:
                since = self._estimate()
        with self._lock:
            if self._pid != os.getpid():
                self._reset_process()
            self._pending.append(_Pending(sub, since, last is not None))
            self._generation += 1
            generation = self._generation
            start = not self._reader_running
            if start:
                self._reader_running = True
                self._wakeup = _gevent.background_event()
        if start:
            self._reader = _gevent.spawn_background(
                self._run, "flask-eventstream redis reader"
            )
        else:
            self._wake(generation)

    def detach(self, sub: Subscription) -> None:
        with self._lock:
            self._pending = [p for p in self._pending if p.sub is not sub]

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
                unblocked = self._redis().client_unblock(reader_id)
            except ResponseError:
                log.warning(
                    "CLIENT UNBLOCK is not allowed on %s: new subscriptions"
                    " wait for the reader to poll (every %d ms).",
                    self._where,
                    BLOCK_MS_NO_UNBLOCK,
                )
                self._unblock = False
                return
            except (RedisError, OSError):
                return  # the reader reconnects, then registers
            if unblocked:
                return
            # The reader is between two reads: it registers before the next
            # one, unless that one was already on its way.
            _gevent.sleep(delay)
            delay *= 2

    # -- the reader --

    def _run(self) -> None:
        wakeup = self._wakeup
        assert wakeup is not None
        reader: redis.Redis | None = None
        #: CLIENT ID of the reader's connection, None while not connected.
        client_id: int | None = None
        failures = 0
        idle_since: float | None = None

        def disconnect() -> None:
            nonlocal client_id
            if self._reader_id == client_id:
                self._reader_id = None
            client_id = None
            if reader is not None:
                reader.connection_pool.disconnect()

        try:
            while not self._closed and self._pid == os.getpid():
                try:
                    if reader is None:
                        pool = redis.ConnectionPool.from_url(
                            self._url,
                            max_connections=1,
                            **self._options(
                                "reader", socket_timeout=BLOCK_MS / 1000 + 5
                            ),
                        )
                        reader = redis.Redis(connection_pool=pool)
                    if client_id is None:
                        client_id = self._reader_id = int(reader.client_id())
                        if failures:
                            log.warning(
                                "Redis at %s is back; reading events again.",
                                self._where,
                            )
                        failures = 0
                    wakeup.clear()
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
                    if reply:
                        self._dispatch(reply)
                except (RedisError, OSError) as e:
                    disconnect()
                    failures += 1
                    if failures == 1:
                        log.warning(
                            "Lost Redis at %s (%s); open streams stay connected"
                            " and resume where they were when it is back.",
                            self._where,
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
                if self._reader_running and self._wakeup is wakeup:
                    self._reader_running = False

    def _stop_idle(self) -> bool:
        """Stop an idle reader, unless a subscription just came."""
        with self._lock:
            if self._pending or any(map(self._sink.subscribers, self._positions)):
                return False
            self._reader_running = False
            self._wakeup = None
            return True

    def _streams(self) -> dict[str, str]:
        """What to XREAD: every channel with registered subscriptions."""
        with self._lock:
            positions = self._positions
            subscribers = self._sink.subscribers
            for channel in [c for c in positions if not subscribers(c)]:
                del positions[channel]
            return {self._prefix + c: format_id(k) for c, k in positions.items()}

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

    def _register_batch(self, reader: redis.Redis, batch: list[_Pending]) -> None:
        # The first id wanted per channel: after the oldest position.
        starts: dict[str, Key] = {}
        for p in batch:
            for channel in p.sub.channels:
                since = p.since if p.since is not None else (1 << 62, 0)
                if channel not in starts or since < starts[channel]:
                    starts[channel] = since
        channels = list(starts)
        self._redis()  # scripts registered
        reply = self._snapshot_script(
            keys=[self._meta, *(self._prefix + c for c in channels)],
            args=[_next_id(starts[c]) for c in channels],
            client=reader,
        )
        counter = _key(reply[0])
        epoch = _key(reply[1])
        server_ms = int(reply[2])
        self._clock = (server_ms, time.monotonic())
        entries: dict[str, list[_Entry]] = {}
        for channel, raw in zip(channels, reply[3:], strict=True):
            entries[channel] = [self._entry(channel, item[0], item[1]) for item in raw]
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
        for p in batch:
            replay = self._replay(p, top, counter, epoch, entries, frames)
            with self._lock:
                sub = p.sub
                if sub.closed:
                    continue
                # A channel new to the reader: it reads what follows this
                # snapshot (nothing older is wanted by anyone).
                new = [c for c in sub.channels if not subscribers(c)]
                sub.start(replay, top)
                for channel in new:
                    self._positions[channel] = max(self._cursor, top)
        if announce:
            news = [
                e
                for channel, since in announce.items()
                for e in entries[channel]
                if e[0] > since
            ]
            # The subscribers have these in their replay (their floor keeps
            # them from a second copy): the application is told of them.
            for key, channel, event_id, fields in sorted(news, key=_first):
                event = self._event(event_id, fields)
                if event is None:
                    continue
                frame = frames.get(key) or Frame(encode(event), key)
                try:
                    self._sink.deliver(channel, frame, event)
                except Exception:
                    log.exception("Announcing event %s failed.", event_id)

    def _replay(
        self,
        p: _Pending,
        top: Key,
        counter: Key | None,
        epoch: Key | None,
        entries: dict[str, list[_Entry]],
        frames: dict[Key, Frame],
    ) -> list[Frame]:
        """The frames to queue for a subscription before its live events."""
        since = p.since
        if since is None:
            return []
        reason = None
        if p.resume:
            if counter is None or since > counter or (epoch and since < epoch):
                # Newer than anything published, or older than what this
                # Redis remembers (it lost its data).
                reason = "unknown"
        streams: list[list[_Entry]] = []
        for channel in p.sub.channels:
            newer = [e for e in entries[channel] if e[0] > since]
            if newer:
                prev = _key(newer[0][3].get(b"p"))
                if p.resume and reason is None and prev is not None and prev > since:
                    reason = "expired"
                streams.append(newer)
        if p.resume and not self._history:
            # No history is kept: report missed events, replay none.
            if streams and reason is None:
                reason = "expired"
            streams = []
        replay: list[Frame] = []
        if reason is not None:
            replay.append(reset_frame(reason, format_id(since), counter))
        for key, _, event_id, fields in heapq.merge(*streams, key=_first):
            frame = frames.get(key)
            if frame is None:
                event = self._event(event_id, fields)
                if event is None:
                    continue
                frame = frames[key] = Frame(encode(event), key)
            replay.append(frame)
        return replay

    def _entry(self, channel: str, raw_id: bytes, raw_fields: list[bytes]) -> _Entry:
        event_id = raw_id.decode("ascii")
        key = parse_id(event_id)
        assert key is not None, event_id
        fields = dict(zip(raw_fields[::2], raw_fields[1::2], strict=True))
        return key, channel, event_id, fields

    @staticmethod
    def _event(event_id: str, fields: dict[bytes, bytes]) -> Event | None:
        try:
            retry = fields.get(b"r")
            comment = fields.get(b"c")
            name = fields.get(b"e")
            return Event(
                data=fields.get(b"d", b"").decode("utf-8"),
                event=name.decode("utf-8") if name is not None else None,
                id=event_id,
                retry=int(retry) if retry is not None else None,
                comment=comment.decode("utf-8") if comment is not None else None,
            )
        except (ValueError, TypeError) as e:
            log.error("Skipping malformed stream entry %s: %s", event_id, e)
            return None

    def _dispatch(self, reply: t.Any) -> None:
        """Hand one XREAD reply to local subscribers, in id order."""
        items: list[_Entry] = []
        plen = len(self._prefix)
        pairs = reply.items() if isinstance(reply, dict) else reply
        for stream, raw_entries in pairs:
            channel = stream.decode("utf-8")[plen:]
            for raw_id, fields in raw_entries:
                event_id = raw_id.decode("ascii")
                key = parse_id(event_id)
                if key is not None:
                    items.append((key, channel, event_id, fields))
        items.sort(key=lambda item: item[0])
        sink = self._sink
        positions = self._positions
        for key, channel, event_id, fields in items:
            position = positions.get(channel)
            if position is None or key <= position:
                continue
            prev = _key(fields.get(b"p"))
            if prev is not None and prev > position:
                self._cut_off(channel, position)
            positions[channel] = key
            if key > self._cursor:
                self._cursor = key
            event = self._event(event_id, fields)
            if event is None:
                continue
            try:
                sink.deliver(channel, Frame(encode(event), key), event)
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

    def close(self) -> None:
        self._closed = True
        with self._lock:
            wakeup = self._wakeup
            pending, self._pending = self._pending, []
        if wakeup is not None:
            wakeup.set()
        if self._pid != os.getpid():
            return
        reader_id = self._reader_id
        if reader_id is not None:
            try:
                self._redis().client_unblock(reader_id)
            except (RedisError, OSError):
                pass
        for client in list(self._clients.values()):
            try:
                client.connection_pool.disconnect()
            except Exception:  # a socket of another thread's hub
                log.debug("Closing a Redis pool failed.", exc_info=True)
        del pending
