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
import urllib.parse

import redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from ... import _gevent
from ...broker import Key
from ...broker import parse_id
from ...exceptions import PublishError
from . import scripts

__all__ = ["Client", "as_key"]

log = logging.getLogger(__name__)

#: Publishing retries for about this long (seconds) before PublishError.
PUBLISH_RETRY_TIME = 1.0
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


def where(url: str) -> str:
    """The URL without credentials, for messages."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or parts.path or "localhost"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path if parts.hostname else ''}"


class Client:
    """The publishing side of one process.

    :param url: a ``redis://`` (or ``rediss://``, ``unix://``) URL.
    :param meta: the key of the counter hash.
    """

    def __init__(self, url: str, meta: str) -> None:
        self.url = url
        self.where = where(url)
        self.meta = meta
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
        """Connection options of this library's connections."""
        kwargs.setdefault("socket_connect_timeout", CONNECT_TIMEOUT)
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
            pool = redis.BlockingConnectionPool.from_url(
                self.url,
                max_connections=2,
                timeout=POOL_TIMEOUT,
                **self.options("pub", socket_timeout=COMMAND_TIMEOUT),
            )
            client = redis.Redis(connection_pool=pool)
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
        deadline = time.monotonic() + PUBLISH_RETRY_TIME
        # At once first: a pooled connection that Redis closed fails once.
        delay = 0.0
        while True:
            try:
                raw = self._publish(keys=keys, args=args, client=client)
                break
            except (RedisConnectionError, RedisTimeoutError, OSError) as e:
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
            except RedisError as e:
                raise PublishError(
                    f"Could not publish to channel {channel!r}: Redis at"
                    f" {self.where} refused it ({e})."
                ) from e
        event_id = raw.decode("ascii") if isinstance(raw, bytes) else str(raw)
        key = parse_id(event_id)
        if key is not None:
            self.clock = (key[0], time.monotonic())
        return event_id

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
