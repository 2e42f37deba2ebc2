"""The Redis backend: every process that shares a Redis server, or a Redis
Cluster, shares channels.

Each channel is one Redis stream, ``<prefix>{<channel>}``: the braces make
the channel name the key's hash tag, so everything the library does with a
channel touches one key in one slot, and a Redis Cluster spreads channels
over its masters. A single server is the same code with one shard.

Positions are per channel (:mod:`.positions`): a stream entry's id is
``<epoch>-<offset>``, the epoch being the time at which the channel's
history was created and the offset counting its events from 1. Ids increase
in publish order per channel; there is no order across channels, and no key
that every publish touches. An event's SSE id is the channel's position for
a stream on one channel, and every channel's position for a stream on
several (so each such stream gets its own id line).

``publish()`` runs one Lua script on the channel's key: it adds the entry
(``XADD <epoch>-*``) and ``SPUBLISH``\\ es it on the shard channel of the
same name, in the same slot. Each entry carries a token so that a retried
publish never adds an event twice.

A process holds at most three connections to each master:

- one *reader* per master that has channels with local subscribers: it
  ``SSUBSCRIBE``\\ s to those channels' shard channels and hands each event,
  encoded once, to the local subscribers (a greenlet when sockets are
  gevent's, else a daemon thread);
- a pool of at most two for publishing and bookkeeping (under gevent, one
  such pool per OS thread that publishes: a gevent socket belongs to the hub
  of one thread).

A *manager* (one greenlet or thread per process) does the bookkeeping: it
routes channels to readers by slot, and brings each channel *live* by
reading its stream after the last position handed out (after a reconnection,
a failover, a slot that moved, or a gap in the offsets). While a channel is
not live its messages wait in a buffer. A subscription is registered once
its channels are live, with what it missed read from the streams and
replayed up to the position from which live events reach it, so nothing is
missed or sent twice.

Nothing else in the package imports :mod:`redis`; this module is imported
only when a Redis URL is configured.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import secrets
import threading
import time
import typing as t
import urllib.parse

import redis
import redis.cluster
from redis.backoff import NoBackoff
from redis.exceptions import AskError
from redis.exceptions import ClusterError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MovedError
from redis.exceptions import NoScriptError
from redis.exceptions import RedisClusterException
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from .. import _gevent
from ..broker import Broker
from ..broker import Frame
from ..broker import Subscription
from ..broker import Waker
from ..exceptions import PublishError
from ..sse import encode
from ..sse import Event
from .positions import Entry
from .positions import format_position
from .positions import format_positions
from .positions import parse_positions
from .positions import plan_replay
from .positions import Position
from .positions import Snapshot
from .positions import Stale

__all__ = ["RedisBackend"]

log = logging.getLogger(__name__)

#: What a lost or moving Redis raises (a cluster client that reaches no node
#: raises RedisClusterException, which is not a RedisError).
_LOST = (RedisError, OSError, RedisClusterException)

#: Keys: ``PREFIX + "{" + channel + "}"``.
PREFIX = "eventstream:"

#: Publishing retries for about this long (seconds) before PublishError.
PUBLISH_RETRY_TIME = 1.0
#: Connection timeouts (seconds).
CONNECT_TIMEOUT = 0.5
COMMAND_TIMEOUT = 2.0
#: Longest wait for a free pooled connection (seconds).
POOL_TIMEOUT = 1.0
#: A reader that heard nothing for this long (seconds) PINGs its master, and
#: reconnects if that gets no answer within as long again.
READER_PING = 5.0
#: Reconnection delays of readers and the manager (seconds).
BACKOFF = (0.05, 1.0)
#: Readers and the manager of a process without subscriptions stop after this.
IDLE = 30.0
#: Messages buffered per channel while it is brought live.
BUFFER_LIMIT = 10000
#: With min_replicas, the longest WAIT (milliseconds) for the replicas.
WAIT_MS = 1000
#: MOVED or ASK redirections followed by one publish.
MAX_REDIRECTIONS = 5
#: Channels whose newest position a process remembers after it stopped
#: reading them.
SEEN_LIMIT = 10000
#: A placeholder id as long as a real one, to check the encoded size.
_SIZE_ID = "mil5tqqr.1000000000"

# Publish one event. KEYS: the stream (also the shard channel). ARGV: maxlen,
# token, retry flag, announce flag, then field/value pairs. The entry id is
# <epoch>-<offset>: the epoch of the newest entry, or the server's time for a
# new history. On a retry, an entry carrying the same token among the
# retained ones means the first attempt went through: nothing is added, and
# that entry is announced again (readers skip what they have). With the
# announce flag, the script SPUBLISHes the entry and returns its id; without,
# it returns the id and the message, for the caller to SPUBLISH once enough
# replicas hold the entry.
_PUBLISH = """
local function done(id, f)
  local msg = {id, ''}
  for j = 1, #f, 2 do
    if f[j] == 'w' then
      msg[2] = f[j + 1]
    elseif f[j] ~= 't' then
      msg[#msg + 1] = f[j]
      msg[#msg + 1] = f[j + 1]
    end
  end
  msg = cjson.encode(msg)
  if ARGV[4] == '1' then
    redis.call('SPUBLISH', KEYS[1], msg)
    return id
  end
  return {id, msg}
end
local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
if ARGV[3] == '1' and top then
  local recent = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', ARGV[1])
  for i = 1, #recent do
    local f = recent[i][2]
    for j = 1, #f, 2 do
      if f[j] == 't' and f[j + 1] == ARGV[2] then return done(recent[i][1], f) end
    end
  end
end
local tm = redis.call('TIME')
local ms = tonumber(tm[1]) * 1000 + math.floor(tonumber(tm[2]) / 1000)
local now = string.format('%.0f', tonumber(tm[1]) * 1000000 + tonumber(tm[2]))
local id
if top then
  id = string.match(top[1], '^(%d+)-') .. '-*'
else
  id = string.format('%.0f', ms) .. '-1'
end
local fields = {'t', ARGV[2], 'w', now}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], id, unpack(fields))
return done(id, fields)
"""

# A channel's history after a position. KEYS: the stream. ARGV: epoch,
# offset ('' for the newest entry only). Returns the newest id, the oldest
# id, and the entries after <epoch>-<offset> (all of them if the epoch is
# not the history's).
_SNAPSHOT = """
local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
if not top then return {} end
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1]
local out = {top[1], first[1]}
if ARGV[2] == '' then return out end
local epoch = string.match(top[1], '^(%d+)-')
local start = '-'
if ARGV[1] == epoch then start = '(' .. epoch .. '-' .. ARGV[2] end
out[3] = redis.call('XRANGE', KEYS[1], start, '+')
return out
"""


def _position(raw: bytes | str) -> Position:
    text = raw.decode("ascii") if isinstance(raw, bytes) else raw
    epoch, offset = text.split("-")
    return Position(int(epoch), int(offset))


def _fields(raw: list[t.Any]) -> dict[str, str]:
    items = [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in raw]
    return dict(zip(items[::2], items[1::2], strict=True))


def _event(position: Position, fields: dict[str, str], single: bool) -> Event | None:
    try:
        retry = fields.get("r")
        return Event(
            data=fields.get("d", ""),
            event=fields.get("e"),
            id=format_position(position) if single else None,
            retry=int(retry) if retry is not None else None,
            comment=fields.get("c"),
        )
    except (ValueError, TypeError) as e:
        log.error("Skipping malformed stream entry %s: %s", position, e)
        return None


class _TooFewReplicas(RedisError):
    """WAIT returned before enough replicas acknowledged."""


class _Origin:
    """An event of one channel, as a frame's origin: what a stream on several
    channels needs to give the frame its own id."""

    __slots__ = ("channel", "position", "event", "_bare")

    def __init__(self, channel: str, position: Position, event: Event) -> None:
        self.channel = channel
        self.position = position
        self.event = event
        self._bare: bytes | None = None

    def bare(self) -> bytes:
        """The event without an id line."""
        if self._bare is None:
            self._bare = encode(dataclasses.replace(self.event, id=None))
        return self._bare


def _frame(channel: str, position: Position, event: Event) -> Frame:
    """The frame of an event with the channel's position as id."""
    return Frame(encode(event), None, _Origin(channel, position, event))


class _Ids:
    """Gives the frames of a stream on several channels an id with every
    channel's position (installed as the subscription's relabel hook; the
    readers deliver under the backend's lock, so one at a time)."""

    __slots__ = ("channels", "positions")

    def __init__(self, channels: tuple[str, ...], positions: dict[str, Position]):
        self.channels = channels
        self.positions = positions

    def __call__(self, frame: Frame) -> Frame:
        origin = frame.origin
        if not isinstance(origin, _Origin):
            return frame
        self.positions[origin.channel] = origin.position
        return Frame(self.label(origin.bare()))

    def label(self, bare: bytes) -> bytes:
        value = format_positions(self.channels, self.positions)
        return b"id: " + value.encode("ascii") + b"\n" + bare


# -- where Redis is --


@dataclasses.dataclass
class _Target:
    """A parsed URL: one server, or the seed nodes of a cluster."""

    cluster: bool
    url: str
    nodes: list[tuple[str, int]]
    options: dict[str, t.Any]
    where: str


def _parse_url(url: str) -> _Target:
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("redis+cluster", "rediss+cluster"):
        host = parts.hostname or parts.path or "localhost"
        port = f":{parts.port}" if parts.port else ""
        path = parts.path if parts.hostname else ""
        return _Target(False, url, [], {}, f"{scheme}://{host}{port}{path}")
    nodes: list[tuple[str, int]] = []
    netloc = parts.netloc.rpartition("@")[2]
    for item in netloc.split(","):
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(
                f"EVENTSTREAM_REDIS_URL: {scheme}:// needs host:port pairs"
                f" separated by commas, not {item!r}"
            )
        nodes.append((host.strip("[]"), int(port)))
    options: dict[str, t.Any] = {}
    if parts.username:
        options["username"] = urllib.parse.unquote(parts.username)
    if parts.password:
        options["password"] = urllib.parse.unquote(parts.password)
    if scheme == "rediss+cluster":
        options["ssl"] = True
    where = f"{scheme}://" + ",".join(f"{h}:{p}" for h, p in nodes)
    return _Target(True, url, nodes, options, where)


class _Shards:
    """The publishing client of one OS thread, and where each key lives."""

    def __init__(self, target: _Target, options: dict[str, t.Any]) -> None:
        self.target = target
        self.client: t.Any
        if target.cluster:
            cluster: t.Any = redis.cluster
            self.client = cluster.RedisCluster(
                startup_nodes=[cluster.ClusterNode(h, p) for h, p in target.nodes],
                connection_pool_class=functools.partial(
                    redis.BlockingConnectionPool, timeout=POOL_TIMEOUT
                ),
                max_connections=2,
                # Redirections are followed; failures are ours to retry.
                retry=Retry(NoBackoff(), 0),
                **target.options,
                **options,
            )
        else:
            pool = redis.BlockingConnectionPool.from_url(
                target.url, max_connections=2, timeout=POOL_TIMEOUT, **options
            )
            self.client = redis.Redis(connection_pool=pool)

    def node_of(self, key: str) -> str:
        """The name (``host:port``) of the master that serves ``key``."""
        if not self.target.cluster:
            return "main"
        client = self.client
        node = client.nodes_manager.get_node_from_slot(client.keyslot(key))
        return str(node.name)

    def refresh(self) -> None:
        """Ask the cluster again which master serves which slots."""
        if self.target.cluster:
            self.client.nodes_manager.initialize()

    def connection(self, node: str, name: str) -> t.Any:
        """A new connection to ``node``, for a reader."""
        if self.target.cluster:
            found = self.client.get_node(node_name=node)
            if found is None:
                raise RedisConnectionError(f"{node} is no longer in the cluster")
            pool = self.client.get_redis_connection(found).connection_pool
        else:
            pool = self.client.connection_pool
        kwargs = dict(pool.connection_kwargs)
        # A plain RESP2 connection: pushes other than ours are not wanted.
        for option in list(kwargs):
            if option == "redis_connect_func" or "maint_notifications" in option:
                del kwargs[option]
        kwargs.update(
            protocol=2,
            client_name=name,
            socket_timeout=READER_PING * 2 + 1,
            retry=Retry(NoBackoff(), 0),
        )
        conn: t.Any = pool.connection_class(**kwargs)
        return conn

    def disconnect(self) -> None:
        if self.target.cluster:
            self.client.close()
        else:
            self.client.connection_pool.disconnect()


# -- per-process state --


class _Channel:
    """A channel with local subscribers."""

    __slots__ = (
        "name",
        "key",
        "subs",
        "position",
        "node",
        "confirmed",
        "live",
        "buffer",
    )

    def __init__(self, name: str, key: str) -> None:
        self.name = name
        self.key = key
        self.subs: set[Subscription] = set()
        #: The newest position handed out; None until first brought live.
        self.position: Position | None = None
        #: The master it is (being) subscribed on; None: to route.
        self.node: str | None = None
        #: The reader's SSUBSCRIBE was confirmed.
        self.confirmed = False
        #: Messages go straight to subscribers.
        self.live = False
        #: Messages that came while not live: (position, time, fields).
        self.buffer: list[tuple[Position, int, dict[str, str]]] = []


@dataclasses.dataclass
class _Pending:
    sub: Subscription
    #: Per channel, what to send after (None: from when it is registered).
    since: dict[str, Position | None] | Stale
    #: The client asked to resume (a reset is possible).
    resume: bool
    last_id: str | None


class _Reader:
    """The subscriber connection to one master."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.conn: t.Any | None = None
        self.lock = threading.Lock()
        self.running = True
        self.idle_since: float | None = None


class RedisBackend:
    """A :class:`~flask_eventstream.broker.Backend` on Redis.

    :param broker: the broker that fans events out in this process.
    :param url: ``redis://`` (or ``rediss://``, ``unix://``) for one server,
        ``redis+cluster://host:port[,host:port…]`` (or ``rediss+cluster://``)
        for a Redis Cluster.
    :param history: entries kept per channel (approximately: Redis trims
        whole nodes of a stream, so a few more may be kept).
    :param prefix: the prefix of every key this backend uses.
    :param min_replicas: replicas that must hold an event before
        :meth:`publish` returns it (Redis ``WAIT``), and before the readers
        hear of it.
    """

    def __init__(
        self,
        broker: Broker,
        url: str,
        history: int = 1000,
        *,
        prefix: str = PREFIX,
        min_replicas: int = 0,
    ) -> None:
        self._broker = broker
        self._target = _parse_url(url)
        self._where = self._target.where
        self._history = max(history, 0)
        # Readers must find an entry before it is trimmed, even when no
        # history is kept; resume then replays nothing.
        self._maxlen = str(max(history, 1))
        self._prefix = prefix
        self._min_replicas = min_replicas
        self._lock = threading.Lock()
        self._closed = False
        self._reset_process()

    def _reset_process(self) -> None:
        """(Re)start with nothing but the configuration: at creation, and in
        a child process after a fork (gunicorn ``--preload``)."""
        self._pid = os.getpid()
        self._shards: dict[int, _Shards] = {}
        self._publish_script: t.Any = None
        self._snapshot_script: t.Any = None
        self._channels: dict[str, _Channel] = {}
        self._pending: list[_Pending] = []
        self._readers: dict[str, _Reader] = {}
        self._manager_running = False
        self._wakeup: Waker | None = None
        self._refresh = False
        #: Too few replicas were found (warned once until there are enough).
        self._short = False
        #: The newest position seen per channel, for streams that subscribe
        #: while Redis is away (bounded: the most recently seen channels).
        self._seen: dict[str, Position] = {}

    def _key(self, channel: str) -> str:
        return f"{self._prefix}{{{channel}}}"

    # -- connections --

    def _options(self, role: str, **kwargs: t.Any) -> dict[str, t.Any]:
        kwargs.setdefault("socket_connect_timeout", CONNECT_TIMEOUT)
        kwargs.update(client_name=f"flask-eventstream:{role}:{os.getpid()}")
        if not self._target.cluster:
            # Retries are ours: bounded, and only where they cannot duplicate.
            kwargs["retry"] = Retry(NoBackoff(), 0)
        return kwargs

    def _client(self) -> _Shards:
        """The publishing client of this process (of this OS thread, under
        gevent: a gevent socket belongs to the hub of its thread, and a
        native thread, such as one of gevent's thread pool, has its own)."""
        if self._pid != os.getpid():
            self._reset_process()
        thread = threading.get_native_id() if _gevent.cooperative() else 0
        shards = self._shards.get(thread)
        if shards is None:
            shards = _Shards(
                self._target, self._options("pub", socket_timeout=COMMAND_TIMEOUT)
            )
            if self._publish_script is None:
                self._publish_script = shards.client.register_script(_PUBLISH)
                self._snapshot_script = shards.client.register_script(_SNAPSHOT)
            self._shards[thread] = shards
        return shards

    # -- publishing --

    def publish(self, channel: str, event: Event) -> Event:
        if self._closed:
            raise PublishError("The Redis backend is closed.")
        # Validates the size with an id as long as a real one.
        self._broker.encode(dataclasses.replace(event, id=_SIZE_ID), None)
        shards = self._client()
        announce = "0" if self._min_replicas else "1"
        args = [self._maxlen, secrets.token_hex(8), "0", announce, "d", event.text]
        if event.event is not None:
            args += ["e", event.event]
        if event.retry is not None:
            args += ["r", str(event.retry)]
        if event.comment is not None:
            args += ["c", event.comment]
        keys = [self._key(channel)]
        deadline = time.monotonic() + PUBLISH_RETRY_TIME
        # At once first: a pooled connection that Redis closed fails once.
        delay = 0.0
        while True:
            try:
                if self._min_replicas:
                    raw = self._publish_replicated(shards, keys[0], args)
                else:
                    raw = self._publish_script(
                        keys=keys, args=args, client=shards.client
                    )
                break
            except (
                RedisConnectionError,
                RedisTimeoutError,
                RedisClusterException,
                OSError,
            ) as e:
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
            except _TooFewReplicas as e:
                # The event is in Redis, but not yet announced: a retry finds
                # it, and announces it once the replicas have it.
                args[2] = "1"
                if time.monotonic() + delay > deadline:
                    raise PublishError(
                        f"Could not publish to channel {channel!r}: Redis at"
                        f" {self._where} {e}."
                    ) from e
                _gevent.sleep(delay or 0.05)
                delay = min(delay * 2, 0.4) if delay else 0.05
            except RedisError as e:
                if _retryable(e) and time.monotonic() + delay <= deadline:
                    args[2] = "1"
                    _gevent.sleep(delay or 0.05)
                    delay = min(delay * 2, 0.4) if delay else 0.05
                    continue
                raise PublishError(
                    f"Could not publish to channel {channel!r}: Redis at"
                    f" {self._where} refused it ({e})."
                ) from e
        position = _position(raw)
        with self._lock:
            self._remember(channel, position)
        return dataclasses.replace(event, id=format_position(position))

    def _publish_replicated(self, shards: _Shards, key: str, args: list[str]) -> t.Any:
        """Run the publish script, ``WAIT`` until ``min_replicas`` replicas
        hold the entry, then announce it; all on one connection to the
        master of ``key`` (following MOVED and ASK redirections)."""
        need = self._min_replicas
        client = shards.client
        asking: str | None = None
        for _ in range(MAX_REDIRECTIONS):
            if not self._target.cluster:
                node_client = client
            else:
                node = (
                    client.get_node(node_name=asking)
                    if asking
                    else client.get_node_from_key(key)
                )
                node_client = client.get_redis_connection(node)
            pool = node_client.connection_pool
            conn: t.Any = pool.get_connection()
            try:
                if asking:
                    conn.send_command("ASKING")
                    conn.read_response()
                try:
                    raw_id, message = self._evalsha(conn, key, args)
                except MovedError:
                    shards.refresh()
                    asking = None
                    continue
                except AskError as e:
                    asking = f"{e.host}:{e.port}"
                    continue
                conn.send_command("WAIT", need, WAIT_MS)
                acked = int(conn.read_response())
                if acked < need:
                    raise _TooFewReplicas(
                        f"has only {acked} of the {need} replicas that must"
                        f" hold an event acknowledging it within {WAIT_MS} ms"
                    )
                conn.send_command("SPUBLISH", key, message)
                conn.read_response()
                return raw_id
            except _TooFewReplicas:
                raise
            except (RedisError, OSError):
                conn.disconnect()
                raise
            finally:
                pool.release(conn)
        raise ClusterError(f"{key!r} was redirected {MAX_REDIRECTIONS} times")

    def _replicated(self, shards: _Shards, key: str) -> bool:
        """With ``min_replicas``: whether the replicas hold everything that
        the master of ``key`` has now (a write of its own, then ``WAIT``), so
        that events read from a stream are handed out only once a failover
        cannot lose them."""
        need = self._min_replicas
        if not need:
            return True
        client = shards.client
        if self._target.cluster:
            client = client.get_redis_connection(client.get_node_from_key(key))
        pipe: t.Any = client.pipeline(transaction=False)
        pipe.execute_command("SPUBLISH", key + ":sync", "")
        pipe.execute_command("WAIT", need, WAIT_MS)
        try:
            _, acked = pipe.execute()
        except MovedError:
            self._refresh = True
            return False
        if int(acked) >= need:
            self._short = False
            return True
        if not self._short:
            self._short = True
            log.warning(
                "Redis at %s has %s of the %d replicas that must hold an event"
                " before it is sent; waiting for them.",
                self._where,
                acked,
                need,
            )
        return False

    def _evalsha(self, conn: t.Any, key: str, args: list[str]) -> t.Any:
        sha = self._publish_script.sha
        try:
            conn.send_command("EVALSHA", sha, 1, key, *args)
            return conn.read_response()
        except NoScriptError:
            # Nothing ran; the script is loaded once per server.
            conn.send_command("SCRIPT", "LOAD", _PUBLISH)
            conn.read_response()
            conn.send_command("EVALSHA", sha, 1, key, *args)
            return conn.read_response()

    def _remember(self, channel: str, position: Position) -> None:
        """Note the newest position seen of ``channel``. Lock held."""
        seen = self._seen
        seen.pop(channel, None)
        seen[channel] = position
        if len(seen) > SEEN_LIMIT:
            del seen[next(iter(seen))]

    # -- subscribing --

    def attach(self, sub: Subscription, last_id: str | None) -> None:
        if self._closed:
            raise RuntimeError("The Redis backend is closed.")
        if self._pid != os.getpid():
            with self._lock:
                self._reset_process()
        parsed = parse_positions(last_id, sub.channels)
        resume = parsed is not None
        since: dict[str, Position | None] | Stale
        if parsed is None:
            # Events published from now on are the subscriber's.
            since = self._positions_now(sub.channels)
        else:
            since = parsed
        with self._lock:
            self._pending.append(_Pending(sub, since, resume, last_id))
            for channel in sub.channels:
                if channel not in self._channels:
                    self._channels[channel] = _Channel(channel, self._key(channel))
            self._start_manager()

    def _positions_now(self, channels: tuple[str, ...]) -> dict[str, Position | None]:
        """Each channel's newest position (None where Redis cannot say)."""
        now: dict[str, Position | None] = {}
        ask: list[str] = []
        with self._lock:
            for channel in channels:
                state = self._channels.get(channel)
                if state is not None and state.live and state.position is not None:
                    now[channel] = state.position
                else:
                    ask.append(channel)
        if ask:
            client = self._client().client
            try:
                pipe = client.pipeline(transaction=False)
                for channel in ask:
                    pipe.xrevrange(self._key(channel), count=1)
                replies = pipe.execute()
            except _LOST:
                replies = [None] * len(ask)
            for channel, reply in zip(ask, replies, strict=True):
                if reply is None:
                    # Redis is away: the last position this process saw, so
                    # that events published when it is back are not missed.
                    with self._lock:
                        state = self._channels.get(channel)
                        seen = state.position if state is not None else None
                        now[channel] = seen or self._seen.get(channel)
                elif reply:
                    now[channel] = _position(reply[0][0])
                else:
                    now[channel] = Position(0, 0)
        return now

    def detach(self, sub: Subscription) -> None:
        with self._lock:
            self._pending = [p for p in self._pending if p.sub is not sub]
            connected = False
            for channel in sub.channels:
                state = self._channels.get(channel)
                if state is not None and sub in state.subs:
                    connected = True
                    state.subs.discard(sub)
            wakeup = self._wakeup
        if connected:
            self._broker.disconnect(sub)
        if wakeup is not None:
            wakeup.set()

    def _start_manager(self) -> None:
        """Start the manager, or wake it (with the lock held)."""
        if self._manager_running:
            assert self._wakeup is not None
            self._wakeup.set()
            return
        self._manager_running = True
        self._wakeup = _gevent.background_event()
        _gevent.spawn_background(self._manage, "flask-eventstream redis manager")

    # -- the manager --

    def _manage(self) -> None:
        wakeup = self._wakeup
        assert wakeup is not None
        failures = 0
        idle_since: float | None = None
        try:
            while not self._closed and self._pid == os.getpid():
                wakeup.clear()
                try:
                    busy = self._step()
                    if failures:
                        log.warning("Redis at %s is back.", self._where)
                    failures = 0
                except _LOST as e:
                    failures += 1
                    self._refresh = True
                    if failures == 1:
                        log.warning(
                            "Lost Redis at %s (%s); open streams stay connected"
                            " and resume where they were when it is back.",
                            self._where,
                            e,
                        )
                    low, high = BACKOFF
                    _gevent.sleep(min(low * 2 ** (failures - 1), high))
                    continue
                except Exception:
                    log.exception("The Redis manager failed; restarting it.")
                    _gevent.sleep(BACKOFF[1])
                    continue
                if busy:
                    idle_since = None
                    # Something waits on Redis: look again soon.
                    wakeup.wait(BACKOFF[0])
                    continue
                with self._lock:
                    empty = not self._channels and not self._pending
                if empty:
                    now = time.monotonic()
                    if idle_since is None:
                        idle_since = now
                    elif now - idle_since >= IDLE and self._stop_idle():
                        return
                else:
                    idle_since = None
                wakeup.wait(IDLE / 3)
        finally:
            with self._lock:
                if self._wakeup is wakeup:
                    self._manager_running = False
                    self._wakeup = None

    def _stop_idle(self) -> bool:
        with self._lock:
            if self._pending or self._channels:
                return False
            self._manager_running = False
            self._wakeup = None
            readers = list(self._readers.values())
        for reader in readers:
            self._stop_reader(reader)
        return True

    def _step(self) -> bool:
        """One round of bookkeeping; True while something still waits."""
        shards = self._client()
        if self._refresh:
            self._refresh = False
            shards.refresh()
            self._reroute(shards)
        self._drop_unused()
        waiting = self._route(shards)
        waiting |= self._bring_live(shards)
        waiting |= self._register(shards)
        return waiting

    def _reroute(self, shards: _Shards) -> None:
        """Route again the channels whose slot another master serves now."""
        with self._lock:
            routed = [(s, s.node) for s in self._channels.values() if s.node]
        moved = [(s, old) for s, old in routed if shards.node_of(s.key) != old]
        with self._lock:
            readers = []
            for state, old in moved:
                if state.node == old:
                    state.node = None
                    state.confirmed = state.live = False
                    reader = self._readers.get(old) if old else None
                    if reader is not None:
                        readers.append((reader, state.key))
        for reader, key in readers:
            self._send(reader, "SUNSUBSCRIBE", key)

    def _drop_unused(self) -> None:
        """Stop reading channels without subscribers."""
        with self._lock:
            wanted = {c for p in self._pending for c in p.sub.channels}
            dropped = [
                s
                for s in self._channels.values()
                if not s.subs and s.name not in wanted
            ]
            for state in dropped:
                del self._channels[state.name]
                if state.position is not None:
                    self._remember(state.name, state.position)
            readers = dict(self._readers)
        for state in dropped:
            reader = readers.get(state.node) if state.node else None
            if reader is not None:
                self._send(reader, "SUNSUBSCRIBE", state.key)

    def _route(self, shards: _Shards) -> bool:
        """Subscribe each channel on the reader of its master."""
        with self._lock:
            unrouted = [s for s in self._channels.values() if s.node is None]
        for state in unrouted:
            node = shards.node_of(state.key)
            with self._lock:
                if self._channels.get(state.name) is not state:
                    continue
                state.node = node
                state.confirmed = state.live = False
                reader = self._readers.get(node)
                if reader is None or not reader.running:
                    reader = self._readers[node] = _Reader(node)
                    _gevent.spawn_background(
                        functools.partial(self._read, reader),
                        f"flask-eventstream redis reader {node}",
                    )
                    continue  # a new reader subscribes its channels
            self._send(reader, "SSUBSCRIBE", state.key)
        with self._lock:
            return any(not s.confirmed for s in self._channels.values())

    def _send(self, reader: _Reader, *command: str) -> None:
        """Send a command on a reader's connection (its replies come to the
        reader); nothing if it is not connected (it subscribes every channel
        routed to it when it connects)."""
        with reader.lock:
            conn = reader.conn
            if conn is None:
                return
            try:
                conn.send_packed_command(
                    conn.pack_command(*command), check_health=False
                )
            except _LOST:
                pass  # the reader sees the broken connection too

    def _bring_live(self, shards: _Shards) -> bool:
        """Read what each confirmed, not yet live channel missed."""
        with self._lock:
            todo = [
                (s, s.position, self._start(s))
                for s in self._channels.values()
                if s.confirmed and not s.live
            ]
        for state, position, start in todo:
            after = position or start
            snap = self._snapshot(shards, state.key, after, entries=after is not None)
            if snap.entries and not self._replicated(shards, state.key):
                continue
            self._go_live(state, position, after, snap)
        with self._lock:
            return any(s.confirmed and not s.live for s in self._channels.values())

    def _start(self, state: _Channel) -> Position | None:
        """Where a channel new to this process starts: at the oldest position
        of a new stream waiting for it, so that the events published since
        that stream subscribed are announced here once (they reach the
        stream itself in its replay); else at its newest event. Lock held."""
        oldest: Position | None = None
        for pending in self._pending:
            if pending.resume or isinstance(pending.since, Stale):
                continue
            since = pending.since.get(state.name)
            if since is not None and (oldest is None or since < oldest):
                oldest = since
        return oldest

    def _snapshot(
        self, shards: _Shards, key: str, after: Position | None, *, entries: bool
    ) -> Snapshot:
        if after is None:
            args = ["0", ""] if not entries else ["0", "0"]
        else:
            args = [str(after.epoch), str(after.offset) if entries else ""]
        reply = self._snapshot_script(keys=[key], args=args, client=shards.client)
        if not reply:
            return Snapshot(None, None, [])
        top = _position(reply[0])
        first = _position(reply[1]).offset
        found: list[Entry] = []
        for raw_id, raw_fields in reply[2] if len(reply) > 2 else ():
            fields = _fields(raw_fields)
            found.append(
                Entry(_position(raw_id).offset, int(fields.get("w", 0)), fields)
            )
        return Snapshot(top, first, found)

    def _go_live(
        self,
        state: _Channel,
        expected: Position | None,
        since: Position | None,
        snap: Snapshot,
    ) -> None:
        frames: list[Frame] = []
        cut = False
        with self._lock:
            if (
                self._channels.get(state.name) is not state
                or not state.confirmed
                or state.live
                or state.position != expected
            ):
                return
            top = snap.top or Position(0, 0)
            position = since
            if position is None:
                position = top
            elif expected is None and position.epoch not in (0, top.epoch):
                position = top
            elif position.epoch == top.epoch and position.offset > top.offset:
                # This history lost its newest events (a failover to a
                # replica that had not received them), and new ones will
                # take their offsets: end the streams, which resume and are
                # told.
                cut = True
                position = top
            else:
                if position.epoch not in (0, top.epoch):
                    # The history was lost and maybe created again: the
                    # streams go on with the new one, from its start.
                    position = Position(top.epoch, 0)
                for entry in snap.entries:
                    if entry.offset != position.offset + 1:
                        cut = entry.offset > position.offset + 1
                        if cut:
                            position = top
                            break
                        continue
                    position = Position(top.epoch, entry.offset)
                    frames += self._frames(state.name, position, entry.fields)
            if cut:
                self._cut_off(state)
            # What came meanwhile, after the snapshot.
            for msg_position, _, fields in state.buffer:
                if msg_position.epoch != position.epoch and position.epoch:
                    continue  # another history: the next sync sorts it out
                if msg_position.offset <= position.offset:
                    continue
                if msg_position.offset != position.offset + 1:
                    break
                position = msg_position
                frames += self._frames(state.name, position, fields)
            else:
                state.buffer.clear()
                state.position = position
                state.live = True
            if not state.live:
                state.buffer = [
                    m for m in state.buffer if m[0].offset > position.offset
                ]
                state.position = position
            for frame in frames:
                self._broker.deliver(state.name, frame)
        for frame in frames:
            self._announce(frame)

    def _frames(
        self, channel: str, position: Position, fields: dict[str, str]
    ) -> list[Frame]:
        event = _event(position, fields, True)
        if event is None:
            return []
        return [_frame(channel, position, event)]

    def _announce(self, frame: Frame) -> None:
        on_delivered = self._broker.on_delivered
        origin = frame.origin
        if on_delivered is None or not isinstance(origin, _Origin):
            return
        try:
            on_delivered(origin.channel, origin.event)
        except Exception:
            # A receiver of event_published failed; the subscribers had the
            # event already.
            log.exception("Delivering event %s failed.", origin.event.id)

    def _cut_off(self, state: _Channel) -> None:
        """Events of ``state``'s channel after its position are gone from
        Redis (trimmed before this process read them, or the history was
        lost): end its streams, which resume and are told. Lock held."""
        subs = set(state.subs)
        for sub in subs:
            for other in sub.channels:
                other_state = self._channels.get(other)
                if other_state is not None:
                    other_state.subs.discard(sub)
            self._broker.disconnect(sub)
            sub.overflowed = True
            sub.waker.set()
        if subs:
            log.warning(
                "Events on channel %r after %s are no longer in Redis and this"
                " process had not read them; ending its %d streams so that"
                " they resume.",
                state.name,
                state.position,
                len(subs),
            )

    def _register(self, shards: _Shards) -> bool:
        """Register the pending subscriptions whose channels are live."""
        with self._lock:
            ready = [
                p
                for p in self._pending
                if all(self._channels[c].live for c in p.sub.channels)
            ]
        for pending in ready:
            self._register_one(shards, pending)
        with self._lock:
            return bool(self._pending)

    def _register_one(self, shards: _Shards, pending: _Pending) -> None:
        sub = pending.sub
        since = pending.since
        with self._lock:
            live = {c: self._channels[c].position for c in sub.channels}
        snapshots: dict[str, Snapshot] = {}
        for channel in sub.channels:
            after = None if isinstance(since, Stale) else since.get(channel)
            if after is not None and after.epoch and after == live[channel]:
                # Nothing missed so far (a new stream on a channel this
                # process reads): no need to ask Redis.
                snapshots[channel] = Snapshot(after, None, [])
                continue
            snapshots[channel] = self._snapshot(
                shards, self._key(channel), after or Position(0, 0), entries=True
            )
        for channel, snap in snapshots.items():
            if snap.entries and not self._replicated(shards, self._key(channel)):
                return  # next round
        with self._lock:
            if pending not in self._pending:
                return  # detached meanwhile
            joins: dict[str, Position] = {}
            for channel in sub.channels:
                state = self._channels[channel]
                if not state.live or state.position is None:
                    return  # not live any more: next round
                top = snapshots[channel].top or Position(0, 0)
                if state.position.epoch != top.epoch or state.position > top:
                    return  # the reader is past the snapshot: next round
                joins[channel] = state.position
            self._pending.remove(pending)
            if sub.closed:
                return
            plan = plan_replay(
                since,
                snapshots,
                joins,
                resume=pending.resume,
                history=bool(self._history),
            )
            single = len(sub.channels) == 1
            ids: _Ids | None = None
            if not single:
                ids = _Ids(
                    sub.channels, {c: since_or_start(since, c) for c in sub.channels}
                )
            replay: list[Frame] = []
            if plan.reset is not None:
                reset = Event(
                    data={"reason": plan.reset, "last_event_id": pending.last_id},
                    event="eventstream-reset",
                    id=format_positions(sub.channels, plan.positions),
                )
                replay.append(Frame(encode(reset)))
            for channel, entry in plan.replay:
                position = Position(joins[channel].epoch, entry.offset)
                event = _event(position, entry.fields, single)
                if event is None:
                    continue
                if ids is None:
                    replay.append(Frame(encode(event)))
                else:
                    ids.positions[channel] = position
                    replay.append(Frame(ids.label(encode(event))))
            if ids is not None:
                ids.positions.update(plan.positions)
                sub.relabel = ids
            sub.replay(replay)
            for channel in sub.channels:
                self._channels[channel].subs.add(sub)
            self._broker.connect(sub)

    # -- readers --

    def _read(self, reader: _Reader) -> None:
        failures = 0
        conn: t.Any | None = None
        try:
            while not self._closed and self._pid == os.getpid():
                try:
                    conn = self._client().connection(
                        reader.node, f"flask-eventstream:reader:{os.getpid()}"
                    )
                    conn.connect()
                    with reader.lock:
                        reader.conn = conn
                    with self._lock:
                        keys = [
                            s.key
                            for s in self._channels.values()
                            if s.node == reader.node
                        ]
                    if keys:
                        conn.send_packed_command(
                            conn.pack_commands([("SSUBSCRIBE", k) for k in keys]),
                            check_health=False,
                        )
                    failures = 0
                    self._listen(reader, conn)
                    return
                except _LOST as e:
                    failures += 1
                    with reader.lock:
                        reader.conn = None
                    if conn is not None:
                        conn.disconnect()
                    if not self._lost(reader, e, failures):
                        return
                    low, high = BACKOFF
                    _gevent.sleep(min(low * 2 ** (failures - 1), high))
        finally:
            with reader.lock:
                reader.conn = None
                reader.running = False
            if conn is not None:
                conn.disconnect()
            with self._lock:
                if self._readers.get(reader.node) is reader:
                    del self._readers[reader.node]
                for state in self._channels.values():
                    if state.node == reader.node:
                        state.node = None
                        state.confirmed = state.live = False
                wakeup = self._wakeup
            if wakeup is not None:
                wakeup.set()

    def _lost(self, reader: _Reader, error: Exception, failures: int) -> bool:
        """A reader lost its master: its channels go back to the manager,
        which routes them again (a replica may have taken over). Returns
        whether the reader should try its master again."""
        with self._lock:
            mine = [s for s in self._channels.values() if s.node == reader.node]
            for state in mine:
                state.confirmed = state.live = False
            wakeup = self._wakeup
        if self._closed or not reader.running:
            return False
        if failures == 1 and mine:
            log.warning(
                "Lost Redis at %s (%s); open streams stay connected and resume"
                " where they were when it is back.",
                reader.node if self._target.cluster else self._where,
                error,
            )
        if self._target.cluster:
            # Another master may serve these slots now: the manager asks,
            # and routes those channels to its reader.
            self._refresh = True
        if wakeup is not None:
            wakeup.set()
        return bool(mine) and not self._closed

    def _listen(self, reader: _Reader, conn: t.Any) -> None:
        pinged = False
        while not self._closed and reader.running:
            if not conn.can_read(timeout=READER_PING):
                with self._lock:
                    mine = any(s.node == reader.node for s in self._channels.values())
                if not mine:
                    now = time.monotonic()
                    if reader.idle_since is None:
                        reader.idle_since = now
                    elif now - reader.idle_since > IDLE:
                        return
                if pinged:
                    raise RedisTimeoutError(f"{reader.node} stopped answering")
                pinged = True
                self._send(reader, "PING")
                continue
            pinged = False
            try:
                reply = conn.read_response()
            except MovedError as e:
                self._moved(reader, e.slot_id)
                continue
            self._on_reply(reader, reply)

    def _moved(self, reader: _Reader, slot: int) -> None:
        """A SSUBSCRIBE was answered MOVED: route that slot's channels again."""
        from redis.crc import key_slot

        with self._lock:
            for state in self._channels.values():
                if state.node == reader.node and not state.confirmed:
                    if key_slot(state.key.encode()) == slot:
                        state.node = None
            self._refresh = True
            wakeup = self._wakeup
        if wakeup is not None:
            wakeup.set()

    def _on_reply(self, reader: _Reader, reply: t.Any) -> None:
        if not isinstance(reply, list) or len(reply) < 3:
            return
        kind = reply[0]
        key = reply[1].decode("utf-8") if isinstance(reply[1], bytes) else str(reply[1])
        channel = key[len(self._prefix) + 1 : -1]
        if kind == b"smessage":
            self._on_message(reader, channel, reply[2])
            return
        wake = False
        with self._lock:
            reader.idle_since = None
            state = self._channels.get(channel)
            if state is None or state.node != reader.node:
                return
            if kind == b"ssubscribe":
                if not state.confirmed:
                    state.confirmed = wake = True
            elif kind == b"sunsubscribe" and state.confirmed:
                # Not asked for: the slot moved to another master.
                state.node = None
                state.confirmed = state.live = False
                self._refresh = wake = True
            wakeup = self._wakeup
        if wake and wakeup is not None:
            wakeup.set()

    def _on_message(self, reader: _Reader, channel: str, payload: bytes) -> None:
        try:
            raw = json.loads(payload)
            position = _position(raw[0])
            when = int(raw[1])
            fields = dict(zip(raw[2::2], raw[3::2], strict=True))
        except (ValueError, TypeError, IndexError) as e:
            log.error("Skipping a malformed message on %r: %s", channel, e)
            return
        frame: Frame | None = None
        wake = False
        with self._lock:
            state = self._channels.get(channel)
            if state is None or state.node != reader.node or not state.confirmed:
                return
            current = state.position
            if not state.live or current is None:
                if len(state.buffer) < BUFFER_LIMIT:
                    state.buffer.append((position, when, fields))
                return
            if position.epoch == current.epoch or current.epoch == 0:
                if position.offset <= current.offset:
                    return
                if position.offset == current.offset + 1:
                    state.position = position
                    frames = self._frames(channel, position, fields)
                    if frames:
                        frame = frames[0]
                        self._broker.deliver(channel, frame)
            if frame is None and state.position != position:
                # A gap, or another history: read what is missing.
                state.live = False
                state.buffer.append((position, when, fields))
                wake = True
            wakeup = self._wakeup
        if frame is not None:
            self._announce(frame)
        if wake and wakeup is not None:
            wakeup.set()

    def _stop_reader(self, reader: _Reader) -> None:
        reader.running = False
        with reader.lock:
            conn = reader.conn
        if conn is not None:
            try:
                # Shut the socket down: the reader's read returns at once.
                sock = conn._sock
                if sock is not None:
                    import socket

                    sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._closed = True
        with self._lock:
            wakeup = self._wakeup
            self._pending = []
            readers = list(self._readers.values())
        if wakeup is not None:
            wakeup.set()
        if self._pid != os.getpid():
            return
        for reader in readers:
            self._stop_reader(reader)
        for shards in list(self._shards.values()):
            try:
                shards.disconnect()
            except Exception:  # a socket of another thread's hub
                log.debug("Closing a Redis pool failed.", exc_info=True)


def since_or_start(since: dict[str, Position | None] | Stale, channel: str) -> Position:
    if isinstance(since, Stale):
        return Position(0, 0)
    return since.get(channel) or Position(0, 0)


def _retryable(error: RedisError) -> bool:
    """Errors of a cluster in motion (a failover or a slot that moves), after
    redis-py followed its redirections."""
    from redis.exceptions import ClusterDownError
    from redis.exceptions import ClusterError
    from redis.exceptions import TryAgainError

    return isinstance(error, (ClusterDownError, ClusterError, TryAgainError))
