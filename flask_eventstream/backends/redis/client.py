"""Connections of the Redis backend: which Redis a URL names (one server, or
the seed nodes of a cluster), the publishing client of each OS thread, and
the commands other than a reader's."""

from __future__ import annotations

import logging
import os
import threading
import time
import typing as t

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
from .connect import Connector
from .connect import tls_failure
from .scripts import PUBLISH
from .scripts import SNAPSHOT
from .url import Cluster
from .url import redact
from .url import Sentinel

__all__ = [
    "LOST",
    "SIZE_ID",
    "SIZE_LINE",
    "Client",
    "Shards",
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
#: With min_replicas, for this long once an attempt may have reached Redis
#: (its reply was lost, or too few replicas acknowledged it): the retries
#: find out, through the event's token, whether it was added, across a
#: failover.
PUBLISH_UNSURE_TIME = 10.0
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


def where(connector: Connector) -> str:
    """Where Redis is, without credentials, for messages."""
    target = connector.target
    if isinstance(target, Sentinel):
        hosts = ",".join(f"{h}:{p}" for h, p in target.sentinels)
        return f"the master {target.service!r} of the Sentinels at {hosts}"
    if isinstance(target, Cluster):
        scheme = "rediss+cluster" if target.tls else "redis+cluster"
        return f"{scheme}://" + ",".join(f"{h}:{p}" for h, p in target.nodes)
    return redact(target.url).split("?")[0]


class Shards:
    """The publishing client of one OS thread, and where each key lives."""

    def __init__(self, connector: Connector, options: dict[str, t.Any]) -> None:
        self.connector = connector
        self.cluster = isinstance(connector.target, Cluster)
        self.client: t.Any
        if self.cluster:
            # Redirections are followed; failures are ours to retry.
            self.client = connector.cluster_client(
                "pub", max_connections=2, pool_timeout=POOL_TIMEOUT, **options
            )
        else:
            self.client = connector.client(
                "pub", max_connections=2, pool_timeout=POOL_TIMEOUT, **options
            )

    def node_of(self, key: str) -> str:
        """The name (``host:port``) of the master that serves ``key``."""
        if not self.cluster:
            return "main"
        client = self.client
        node = client.nodes_manager.get_node_from_slot(client.keyslot(key))
        return str(node.name)

    def refresh(self) -> None:
        """Ask the cluster again which master serves which slots."""
        if self.cluster:
            self.client.nodes_manager.initialize()

    def connection(self, node: str, name: str) -> t.Any:
        """A new connection to ``node``, for a reader."""
        overrides: dict[str, t.Any] = {
            "protocol": 2,
            "client_name": name,
            "socket_timeout": READER_TIMEOUT,
            "retry": Retry(NoBackoff(), 0),
        }
        if not self.cluster:
            # Through the connector: a Sentinel's master is found as the
            # connection connects.
            reader = self.connector.client("reader", max_connections=1, **overrides)
            return reader.connection_pool.make_connection()
        found = self.client.get_node(node_name=node)
        if found is None:
            raise RedisConnectionError(f"{node} is no longer in the cluster")
        pool = self.client.get_redis_connection(found).connection_pool
        kwargs = dict(pool.connection_kwargs)
        # A plain RESP2 connection: pushes other than ours are not wanted.
        for option in list(kwargs):
            if option == "redis_connect_func" or "maint_notifications" in option:
                del kwargs[option]
        kwargs.update(overrides)
        conn: t.Any = pool.connection_class(**kwargs)
        return conn

    def disconnect(self) -> None:
        if self.cluster:
            self.client.close()
        else:
            self.client.connection_pool.disconnect()


class Client:
    """The publishing side of one process: a client per OS thread (under
    gevent a socket belongs to the hub of its thread, and a native thread,
    such as one of gevent's thread pool, has its own), the scripts, and the
    commands of publishing and bookkeeping.

    :param url: ``EVENTSTREAM_REDIS_URL``.
    :param options: ``EVENTSTREAM_REDIS_OPTIONS``.
    :param min_replicas: replicas that must hold an event before it is
        acknowledged and announced.
    """

    def __init__(
        self,
        url: str,
        options: t.Mapping[str, t.Any] | None = None,
        min_replicas: int = 0,
    ) -> None:
        self.connector = Connector(url, options)
        self.cluster = isinstance(self.connector.target, Cluster)
        self.where = where(self.connector)
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
                self.connector, self.options("pub", socket_timeout=COMMAND_TIMEOUT)
            )
            if self._publish_script is None:
                self._publish_script = shards.client.register_script(PUBLISH)
                self._snapshot_script = shards.client.register_script(SNAPSHOT)
            self._shards[thread] = shards
        return shards

    def publish(self, channel: str, key: str, args: list[str]) -> Position:
        """Run the publish script on ``key``, retrying for about a second
        (with ``args[2]``, the retry flag, set: a retry never adds the event
        twice); raise :class:`PublishError` past that.

        With ``min_replicas``, once an attempt may have added the event
        (its reply was lost, or too few replicas acknowledged it), the
        retries go on for :data:`PUBLISH_UNSURE_TIME` to find out, through
        the event's token, across a failover."""
        start = time.monotonic()
        deadline = start + PUBLISH_RETRY_TIME
        # At once first: a pooled connection that Redis closed fails once.
        delay = 0.0
        while True:
            error: BaseException
            #: Whether this attempt reached Redis (an error after that may
            #: come after the script ran).
            sent = [False]
            try:
                # Inside the retries: a cluster client connects as it is made
                # (a wrong CA, no seed node reachable).
                shards = self.shards()
                if self._min_replicas:
                    raw = self._publish_replicated(shards, key, args, sent)
                else:
                    raw = self._publish_script(
                        keys=[key], args=args, client=shards.client
                    )
                break
            except TooFewReplicas as e:
                # The event is in Redis, but not announced: a retry finds it,
                # and announces it once the replicas have it.
                error, problem = e, str(e)
                args[2] = "1"
                deadline = max(deadline, start + PUBLISH_UNSURE_TIME)
            except (
                RedisConnectionError,
                RedisTimeoutError,
                RedisClusterException,
                OSError,
            ) as e:
                if tls_failure(e):
                    raise PublishError(
                        f"Could not publish to channel {channel!r}: the TLS"
                        f" handshake with Redis at {self.where} failed ({e})."
                        " Check the URL's scheme and ssl_ca_certs in"
                        " EVENTSTREAM_REDIS_OPTIONS."
                    ) from e
                # The script may have run (a reply lost in a restart): the
                # retry finds the entry by its token instead of adding another.
                error, problem = e, f"is unreachable ({e})"
                args[2] = "1"
                if sent[0]:
                    deadline = max(deadline, start + PUBLISH_UNSURE_TIME)
            except RedisError as e:
                if str(e).startswith("NOREPLICAS"):
                    # Nothing was written: a master without its replicas yet.
                    error, problem = e, f"has too few replicas ({e})"
                elif retryable(e):
                    # A cluster in motion (a failover, a slot that moves).
                    error, problem = e, f"is unavailable ({e})"
                    args[2] = "1"
                else:
                    raise PublishError(
                        f"Could not publish to channel {channel!r}: Redis at"
                        f" {self.where} refused it ({e})."
                    ) from e
            if time.monotonic() + delay > deadline:
                raise PublishError(
                    f"Could not publish to channel {channel!r}: Redis at"
                    f" {self.where} {problem}."
                ) from error
            if delay:
                _gevent.sleep(delay)
            delay = min(delay * 2, 0.4) if delay else 0.05
        return position_of(raw)

    def _publish_replicated(
        self, shards: Shards, key: str, args: list[str], sent: list[bool]
    ) -> t.Any:
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
                # Connected first: an error from here on may come after the
                # script ran.
                conn.connect()
                sent[0] = True
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
                        f"has only {acked} of {need} replicas acknowledging"
                        f" within {WAIT_MS} ms"
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

    def publisher(self) -> t.Any:
        """The publishing client of this thread (presence and control
        messages use it too)."""
        return self.shards().client

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
