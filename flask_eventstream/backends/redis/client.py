"""The client side of the Redis backend: connection pools, publishing with a
bounded retry, and the scripts' calls (counter, snapshot).

A process holds a pool of at most two connections for publishing, the
subscribe bookkeeping and ``CLIENT UNBLOCK`` (under gevent, one such pool per
OS thread that publishes: a gevent socket belongs to the hub of one thread),
and the reader's own connection (:mod:`.reader`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import typing as t

import redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import RedisError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from ... import _gevent
from ...broker import Key
from ...broker import parse_id
from ...exceptions import PublishError
from . import scripts
from .connect import Connector
from .connect import tls_failure
from .url import redact
from .url import Sentinel

__all__ = ["Client", "TooFewReplicas", "as_key"]

log = logging.getLogger(__name__)

#: Publishing retries for about this long (seconds) before PublishError.
PUBLISH_RETRY_TIME = 1.0
#: With MIN_REPLICAS, for this long once an attempt may have reached Redis
#: (its reply was lost, or too few replicas acknowledged it): the retries
#: find out, through the event's token, whether it was added, across a
#: failover.
PUBLISH_UNSURE_TIME = 10.0
#: With EVENTSTREAM_REDIS_MIN_REPLICAS, the longest WAIT (milliseconds) for
#: the replicas to acknowledge an event.
WAIT_MS = 1000
#: Connection timeouts of the publishing pool (seconds).
CONNECT_TIMEOUT = 0.5
COMMAND_TIMEOUT = 2.0
#: Longest wait for a free pooled connection (seconds).
POOL_TIMEOUT = 1.0
#: A stream opened while Redis is unreachable gets the events published from
#: this long (ms) before its estimate of Redis' clock: those published after
#: Redis came back and before the reader did.
OUTAGE_MARGIN_MS = 2000


def as_key(value: bytes | str | None) -> Key | None:
    """An id as Redis returns it, as a key."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return parse_id(value)


def where(connector: Connector) -> str:
    """Where Redis is, without credentials, for messages."""
    target = connector.target
    if isinstance(target, Sentinel):
        hosts = ",".join(f"{h}:{p}" for h, p in target.sentinels)
        return f"the master {target.service!r} of the Sentinels at {hosts}"
    return redact(target.url).split("?")[0]


class TooFewReplicas(RedisConnectionError):
    """WAIT returned before enough replicas acknowledged."""


class Client:
    """The publishing side of one process.

    :param url: a ``redis://``, ``rediss://``, ``unix://`` or
        ``redis+sentinel://`` URL.
    :param prefix: the prefix of every key (and channel) used.
    :param options: more keyword arguments for redis-py's connections.
    :param min_replicas: replicas that must hold an event before
        :meth:`publish` returns (Redis ``WAIT``).
    :raises ValueError: for a malformed URL or options redis-py rejects.
    """

    def __init__(
        self,
        url: str,
        prefix: str,
        options: t.Mapping[str, t.Any] | None = None,
        min_replicas: int = 0,
    ) -> None:
        self.connector = Connector(url, options)
        self.where = where(self.connector)
        self.meta = prefix + "~meta"
        self._sync = prefix + "~sync"
        self.min_replicas = min_replicas
        self._short = False
        self.reset()

    def reset(self) -> None:
        """Forget every connection (at creation, and in a child process after
        a fork: gunicorn ``--preload``)."""
        self._clients: dict[int, redis.Redis] = {}
        self._publish: t.Any = None
        self._snapshot: t.Any = None
        self._counter: t.Any = None
        #: Redis' clock when last seen: (milliseconds, local monotonic time).
        self.clock: tuple[int, float] | None = None

    def options(self, name: str, **kwargs: t.Any) -> dict[str, t.Any]:
        """Connection options of this library's connections (over the
        user's)."""
        if "socket_connect_timeout" not in self.connector.options:
            kwargs["socket_connect_timeout"] = CONNECT_TIMEOUT
        kwargs.update(
            # Retries are ours: bounded, and only where they cannot duplicate.
            retry=Retry(NoBackoff(), 0),
            client_name=f"flask-eventstream:{name}:{os.getpid()}",
        )
        return kwargs

    def publisher(self) -> redis.Redis:
        """The publishing client of this process (of this OS thread, under
        gevent: a gevent socket belongs to the hub of its thread, and a
        native thread, such as one of gevent's thread pool, has its own)."""
        thread = threading.get_native_id() if _gevent.cooperative() else 0
        client = self._clients.get(thread)
        if client is None:
            client = self.connector.client(
                "pub",
                max_connections=2,
                pool_timeout=POOL_TIMEOUT,
                **self.options("pub", socket_timeout=COMMAND_TIMEOUT),
            )
            if self._publish is None:
                self._publish = client.register_script(scripts.PUBLISH)
                self._snapshot = client.register_script(scripts.SNAPSHOT)
                self._counter = client.register_script(scripts.COUNTER)
            self._clients[thread] = client
        return client

    def publish(self, channel: str, stream: str, args: list[str]) -> str:
        """Run the publish script with a bounded retry; return the new id.

        ``args[2]`` is the retry flag, which this sets on a retry.

        :raises PublishError: when Redis stays unreachable or refuses.
        """
        client = self.publisher()
        keys = [stream, self.meta]
        start = time.monotonic()
        deadline = start + PUBLISH_RETRY_TIME
        # At once first: a pooled connection that Redis closed fails once.
        delay = 0.0
        while True:
            sent = False
            try:
                # Connected first: an error after this may come after Redis
                # ran the script.
                self._connect(client)
                sent = True
                raw = self._run_publish(client, keys, args)
                break
            except (RedisConnectionError, RedisTimeoutError, OSError) as e:
                error: BaseException = e
                if tls_failure(e):
                    raise PublishError(
                        f"Could not publish to channel {channel!r}: the TLS"
                        f" handshake with Redis at {self.where} failed ({e})."
                        " Check the URL's scheme and ssl_ca_certs in"
                        " EVENTSTREAM_REDIS_OPTIONS."
                    ) from e
                problem = f"is unreachable ({e})"
                if sent:
                    # The script may have run (a reply lost in a restart or
                    # a failover, or not on enough replicas yet): the retry
                    # finds the entry by its token instead of adding another.
                    args[2] = "1"
                    if self.min_replicas:
                        deadline = max(deadline, start + PUBLISH_UNSURE_TIME)
                if isinstance(e, TooFewReplicas):
                    problem = str(e)
            except ResponseError as e:
                if not str(e).startswith("NOREPLICAS"):
                    raise PublishError(
                        f"Could not publish to channel {channel!r}: Redis at"
                        f" {self.where} refused it ({e})."
                    ) from e
                # Nothing was written: a master without its replicas yet.
                error = e
                problem = f"has too few replicas ({e})"
            except RedisError as e:
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
        event_id = raw.decode("ascii") if isinstance(raw, bytes) else str(raw)
        key = parse_id(event_id)
        if key is not None:
            self.clock = (key[0], time.monotonic())
        return event_id

    @staticmethod
    def _connection(client: redis.Redis) -> t.Any:
        pool = client.connection_pool
        try:
            return pool.get_connection()
        except TypeError:  # redis-py before 5.3 wants a command name
            return t.cast(t.Any, pool).get_connection("EVALSHA")

    def _connect(self, client: redis.Redis) -> None:
        """Make sure the pool's next connection is connected (a pool hands
        out its most recent connection first)."""
        client.connection_pool.release(self._connection(client))

    def _run_publish(
        self, client: redis.Redis, keys: list[str], args: list[str]
    ) -> t.Any:
        """Run the publish script; with ``min_replicas``, then ``WAIT`` on
        the same connection (only if the script wrote)."""
        need = self.min_replicas
        if not need:
            return self._publish(keys=keys, args=args, client=client)
        pool = client.connection_pool
        connection = self._connection(client)
        try:
            sha = self._publish.sha
            try:
                connection.send_command("EVALSHA", sha, len(keys), *keys, *args)
                raw = connection.read_response()
            except NoScriptError:
                # Nothing ran; the script is loaded once per server.
                connection.send_command("SCRIPT", "LOAD", scripts.PUBLISH)
                connection.read_response()
                connection.send_command("EVALSHA", sha, len(keys), *keys, *args)
                raw = connection.read_response()
            connection.send_command("WAIT", need, WAIT_MS)
            acked = int(connection.read_response())
        except BaseException:
            connection.disconnect()
            raise
        finally:
            pool.release(connection)
        if acked < need:
            raise TooFewReplicas(
                f"has only {acked} of {need} replicas acknowledging within {WAIT_MS} ms"
            )
        return raw

    def replicated(self, reader: redis.Redis) -> bool:
        """With ``min_replicas``, whether the replicas hold everything the
        reader has read so far (a write of its own, then ``WAIT``), so that
        no event a failover could lose is handed out."""
        need = self.min_replicas
        if not need:
            return True
        pipe: t.Any = reader.pipeline(transaction=False)
        pipe.publish(self._sync, b"")
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

    def counter(self) -> Key | None:
        """The newest id published on this Redis, or None if it cannot be
        reached."""
        client = self.publisher()
        try:
            raw = self._counter(keys=[self.meta], client=client)
        except (RedisError, OSError):
            return None
        return as_key(raw)

    def estimate(self, floor: Key) -> Key | None:
        """With Redis unreachable: an id a little older than any that Redis
        can give once it is back, from its clock when last seen (and not
        older than ``floor``)."""
        clock = self.clock
        if clock is None:
            return None
        ms, at = clock
        now = ms + int((time.monotonic() - at) * 1000)
        return max((max(now - OUTAGE_MARGIN_MS, 0), 0), floor)

    def snapshot(
        self, reader: redis.Redis, streams: list[str], starts: list[str]
    ) -> t.Any:
        """Run the snapshot script on the reader's connection."""
        self.publisher()  # scripts registered
        reply = self._snapshot(keys=[self.meta, *streams], args=starts, client=reader)
        self.clock = (int(reply[2]), time.monotonic())
        return reply

    def close(self) -> None:
        for client in list(self._clients.values()):
            try:
                client.connection_pool.disconnect()
            except Exception:  # a socket of another thread's hub
                log.debug("Closing a Redis pool failed.", exc_info=True)
