"""Connections of the Redis backend: which Redis a URL names (one server, or
the seed nodes of a cluster), the publishing client of each OS thread, and
the commands other than a reader's."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
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

from ... import _gevent
from ...exceptions import PublishError
from ..positions import Entry
from ..positions import Position
from ..positions import Snapshot
from .scripts import PUBLISH
from .scripts import SNAPSHOT

__all__ = [
    "LOST",
    "SIZE_ID",
    "SIZE_LINE",
    "Client",
    "Shards",
    "Target",
    "parse_url",
    "position_of",
]

log = logging.getLogger(__name__)

#: What a lost or moving Redis raises (a cluster client that reaches no node
#: raises RedisClusterException, which is not a RedisError).
LOST = (RedisError, OSError, RedisClusterException)
#: Publishing retries for about this long (seconds) before PublishError.
PUBLISH_RETRY_TIME = 1.0
#: Connection timeouts (seconds).
CONNECT_TIMEOUT = 0.5
COMMAND_TIMEOUT = 2.0
#: Longest wait for a free pooled connection (seconds).
POOL_TIMEOUT = 1.0
#: A reader's socket timeout (seconds): it PINGs when idle for less.
READER_TIMEOUT = 11.0
#: With min_replicas, the longest WAIT (milliseconds) for the replicas.
WAIT_MS = 1000
#: MOVED or ASK redirections followed by one publish.
MAX_REDIRECTIONS = 5
#: A placeholder id as long as a real one: an event is encoded with it before
#: it is published (to check its size), and the real id replaces it.
SIZE_ID = "mil5tqqr.1000000000"
SIZE_LINE = f"id: {SIZE_ID}\n".encode()


def position_of(raw: bytes | str) -> Position:
    """The position of a stream entry id, ``<epoch>-<offset>``."""
    text = raw.decode("ascii") if isinstance(raw, bytes) else raw
    epoch, offset = text.split("-")
    return Position(int(epoch), int(offset))


def fields_of(raw: list[t.Any]) -> dict[str, str]:
    items = [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in raw]
    return dict(zip(items[::2], items[1::2], strict=True))


class TooFewReplicas(RedisError):
    """WAIT returned before enough replicas acknowledged."""


@dataclasses.dataclass
class Target:
    """A parsed URL: one server, or the seed nodes of a cluster."""

    cluster: bool
    url: str
    nodes: list[tuple[str, int]]
    options: dict[str, t.Any]
    where: str


def _parse_url(url: str) -> Target:
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("redis+cluster", "rediss+cluster"):
        host = parts.hostname or parts.path or "localhost"
        port = f":{parts.port}" if parts.port else ""
        path = parts.path if parts.hostname else ""
        return Target(False, url, [], {}, f"{scheme}://{host}{port}{path}")
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
    return Target(True, url, nodes, options, where)


def parse_url(url: str) -> Target:
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("redis+cluster", "rediss+cluster"):
        host = parts.hostname or parts.path or "localhost"
        port = f":{parts.port}" if parts.port else ""
        path = parts.path if parts.hostname else ""
        return Target(False, url, [], {}, f"{scheme}://{host}{port}{path}")
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
    return Target(True, url, nodes, options, where)


class Shards:
    """The publishing client of one OS thread, and where each key lives."""

    def __init__(self, target: Target, options: dict[str, t.Any]) -> None:
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
            socket_timeout=READER_TIMEOUT,
            retry=Retry(NoBackoff(), 0),
        )
        conn: t.Any = pool.connection_class(**kwargs)
        return conn

    def disconnect(self) -> None:
        if self.target.cluster:
            self.client.close()
        else:
            self.client.connection_pool.disconnect()


class Client:
    """The publishing side of one process: a client per OS thread (under
    gevent a socket belongs to the hub of its thread, and a native thread,
    such as one of gevent's thread pool, has its own), the scripts, and the
    commands of publishing and bookkeeping.

    :param target: where Redis is.
    :param min_replicas: replicas that must hold an event before it is
        acknowledged and announced.
    """

    def __init__(self, target: Target, min_replicas: int = 0) -> None:
        self.target = target
        self.cluster = target.cluster
        self.where = target.where
        self._min_replicas = min_replicas
        self.reset()

    def reset(self) -> None:
        """Forget every connection (in a child process after a fork)."""
        self._pid = os.getpid()
        self._shards: dict[int, Shards] = {}
        self._publish_script: t.Any = None
        self._snapshot_script: t.Any = None
        #: Too few replicas were found (warned once until there are enough).
        self._short = False

    def options(self, role: str, **kwargs: t.Any) -> dict[str, t.Any]:
        kwargs.setdefault("socket_connect_timeout", CONNECT_TIMEOUT)
        kwargs.update(client_name=f"flask-eventstream:{role}:{os.getpid()}")
        if not self.cluster:
            # Retries are ours: bounded, and only where they cannot duplicate.
            kwargs["retry"] = Retry(NoBackoff(), 0)
        return kwargs

    def shards(self) -> Shards:
        """The publishing client of this process (of this OS thread, under
        gevent: a gevent socket belongs to the hub of its thread, and a
        native thread, such as one of gevent's thread pool, has its own)."""
        if self._pid != os.getpid():
            self.reset()
        thread = threading.get_native_id() if _gevent.cooperative() else 0
        shards = self._shards.get(thread)
        if shards is None:
            shards = Shards(
                self.target, self.options("pub", socket_timeout=COMMAND_TIMEOUT)
            )
            if self._publish_script is None:
                self._publish_script = shards.client.register_script(PUBLISH)
                self._snapshot_script = shards.client.register_script(SNAPSHOT)
            self._shards[thread] = shards
        return shards

    def publish(self, channel: str, key: str, args: list[str]) -> Position:
        """Run the publish script on ``key``, retrying for about a second
        (with ``args[2]``, the retry flag, set: a retry never adds the event
        twice); raise :class:`PublishError` past that."""
        shards = self.shards()
        deadline = time.monotonic() + PUBLISH_RETRY_TIME
        # At once first: a pooled connection that Redis closed fails once.
        delay = 0.0
        while True:
            try:
                if self._min_replicas:
                    raw = self._publish_replicated(shards, key, args)
                else:
                    raw = self._publish_script(
                        keys=[key], args=args, client=shards.client
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
                        f" {self.where} is unreachable ({e})."
                    ) from e
                if delay:
                    _gevent.sleep(delay)
                delay = min(delay * 2, 0.4) if delay else 0.05
            except TooFewReplicas as e:
                # The event is in Redis, but not yet announced: a retry finds
                # it, and announces it once the replicas have it.
                args[2] = "1"
                if time.monotonic() + delay > deadline:
                    raise PublishError(
                        f"Could not publish to channel {channel!r}: Redis at"
                        f" {self.where} {e}."
                    ) from e
                _gevent.sleep(delay or 0.05)
                delay = min(delay * 2, 0.4) if delay else 0.05
            except RedisError as e:
                if retryable(e) and time.monotonic() + delay <= deadline:
                    args[2] = "1"
                    _gevent.sleep(delay or 0.05)
                    delay = min(delay * 2, 0.4) if delay else 0.05
                    continue
                raise PublishError(
                    f"Could not publish to channel {channel!r}: Redis at"
                    f" {self.where} refused it ({e})."
                ) from e
        return position_of(raw)

    def _publish_replicated(self, shards: Shards, key: str, args: list[str]) -> t.Any:
        """Run the publish script, ``WAIT`` until ``min_replicas`` replicas
        hold the entry, then announce it; all on one connection to the
        master of ``key`` (following MOVED and ASK redirections)."""
        need = self._min_replicas
        client = shards.client
        asking: str | None = None
        for _ in range(MAX_REDIRECTIONS):
            if not self.cluster:
                node_client = client
            else:
                node = (
                    client.get_node(node_name=asking)
                    if asking
                    else client.get_node_from_key(key)
                )
                node_client = client.get_redis_connection(node)
            pool = node_client.connection_pool
            try:
                conn: t.Any = pool.get_connection()
            except (RedisConnectionError, RedisTimeoutError, OSError):
                self._lost_node(shards)
                raise
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
                    raise TooFewReplicas(
                        f"has only {acked} of the {need} replicas that must"
                        f" hold an event acknowledging it within {WAIT_MS} ms"
                    )
                conn.send_command("SPUBLISH", key, message)
                conn.read_response()
                return raw_id
            except TooFewReplicas:
                raise
            except (RedisError, OSError) as e:
                conn.disconnect()
                if isinstance(e, (RedisConnectionError, RedisTimeoutError, OSError)):
                    self._lost_node(shards)
                raise
            finally:
                pool.release(conn)
        raise ClusterError(f"{key!r} was redirected {MAX_REDIRECTIONS} times")

    def _lost_node(self, shards: Shards) -> None:
        """A master did not answer: ask the cluster again who serves what (a
        replica may have taken over), as redis-py does for its own
        commands, so that the retry goes where the slot is now."""
        if not self.cluster:
            return
        try:
            shards.refresh()
        except LOST:
            pass  # no node answers: the retry fails as well, and says so

    def replicated(self, shards: Shards, key: str) -> bool:
        """With ``min_replicas``: whether the replicas hold everything that
        the master of ``key`` has now (a write of its own, then ``WAIT``), so
        that events read from a stream are handed out only once a failover
        cannot lose them."""
        need = self._min_replicas
        if not need:
            return True
        client = shards.client
        if self.cluster:
            client = client.get_redis_connection(client.get_node_from_key(key))
        pipe: t.Any = client.pipeline(transaction=False)
        pipe.execute_command("SPUBLISH", key + ":sync", "")
        pipe.execute_command("WAIT", need, WAIT_MS)
        _, acked = pipe.execute()
        if int(acked) >= need:
            self._short = False
            return True
        if not self._short:
            self._short = True
            log.warning(
                "Redis at %s has %s of the %d replicas that must hold an event"
                " before it is sent; waiting for them.",
                self.where,
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
            conn.send_command("SCRIPT", "LOAD", PUBLISH)
            conn.read_response()
            conn.send_command("EVALSHA", sha, 1, key, *args)
            return conn.read_response()

    def snapshot(
        self, shards: Shards, key: str, after: Position | None, *, entries: bool
    ) -> Snapshot:
        if after is None:
            args = ["0", ""] if not entries else ["0", "0"]
        else:
            args = [str(after.epoch), str(after.offset) if entries else ""]
        reply = self._snapshot_script(keys=[key], args=args, client=shards.client)
        if not reply:
            return Snapshot(None, None, [])
        top = position_of(reply[0])
        first = position_of(reply[1]).offset
        found: list[Entry] = []
        for raw_id, raw_fields in reply[2] if len(reply) > 2 else ():
            fields = fields_of(raw_fields)
            found.append(
                Entry(position_of(raw_id).offset, int(fields.get("w", 0)), fields)
            )
        return Snapshot(top, first, found)

    def close(self) -> None:
        if self._pid != os.getpid():
            return
        for shards in list(self._shards.values()):
            try:
                shards.disconnect()
            except Exception:  # a socket of another thread's hub
                log.debug("Closing a Redis pool failed.", exc_info=True)


def retryable(error: RedisError) -> bool:
    """Errors of a cluster in motion (a failover or a slot that moves), after
    redis-py followed its redirections."""
    from redis.exceptions import ClusterDownError
    from redis.exceptions import ClusterError
    from redis.exceptions import TryAgainError

    return isinstance(error, (ClusterDownError, ClusterError, TryAgainError))
