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

The Lua scripts are in :mod:`.scripts`, the connections and the commands of
publishing and bookkeeping in :mod:`.client`, the manager and the readers in
:mod:`.reader`; positions, ids and the replay plan are plain functions
(:mod:`..positions`).

Nothing else in the package imports :mod:`redis`; this package is imported
only when a Redis URL is configured.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import threading

from ...broker import encode_frame
from ...broker import Sink
from ...broker import Subscription
from ...exceptions import PublishError
from ...sse import Event
from ..positions import format_position
from ..positions import parse_positions
from ..positions import Position
from ..positions import Stale
from .client import Client
from .client import parse_url
from .client import SIZE_ID
from .reader import Pending
from .reader import Reader

__all__ = ["RedisBackend"]

#: Keys: ``PREFIX + "{" + channel + "}"``.
PREFIX = "eventstream:"
#: Events this process published and its reader has not taken yet, at most.
_KEPT = 4096


class RedisBackend:
    """A :class:`~flask_eventstream.broker.Backend` on Redis.

    :param sink: where events read from Redis go (the broker of this process).
    :param url: ``redis://`` (or ``rediss://``, ``unix://``) for one server,
        ``redis+cluster://host:port[,host:port…]`` (or ``rediss+cluster://``)
        for a Redis Cluster.
    :param history: entries kept per channel (approximately: Redis trims
        whole nodes of a stream, so a few more may be kept).
    :param max_event_size: largest encoded event in bytes.
    :param prefix: the prefix of every key this backend uses.
    :param min_replicas: replicas that must hold an event before
        :meth:`publish` returns it (Redis ``WAIT``), and before the readers
        hear of it.
    """

    def __init__(
        self,
        sink: Sink,
        url: str,
        history: int = 1000,
        *,
        max_event_size: int = 1 << 20,
        prefix: str = PREFIX,
        min_replicas: int = 0,
    ) -> None:
        self._sink = sink
        self._max_event_size = max_event_size
        self._history = max(history, 0)
        # Readers must find an entry before it is trimmed, even when no
        # history is kept; resume then replays nothing.
        self._maxlen = str(max(history, 1))
        self._prefix = prefix
        self._min_replicas = min_replicas
        self._client = Client(parse_url(url), min_replicas)
        self._lock = threading.Lock()
        self._closed = False
        self._reset_process()

    def _reset_process(self) -> None:
        """(Re)start with nothing but the configuration: at creation, and in
        a child process after a fork (gunicorn ``--preload``)."""
        self._pid = os.getpid()
        self._client.reset()
        #: Events encoded by this process when it published them, by token,
        #: for its reader (each event is encoded once per process).
        self._kept: dict[str, bytes] = {}
        self._reader = Reader(
            self._client, self._sink, self._prefix, self._history, self._kept
        )

    def _check_fork(self) -> None:
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    self._reset_process()

    def _key(self, channel: str) -> str:
        return f"{self._prefix}{{{channel}}}"

    # -- publishing --

    def publish(self, channel: str, event: Event) -> Event:
        if self._closed:
            raise PublishError("The Redis backend is closed.")
        self._check_fork()
        # Encoded once, with an id as long as a real one: the size is
        # checked, and this process's reader sends these bytes with the real
        # id in the placeholder's place.
        data = encode_frame(
            dataclasses.replace(event, id=SIZE_ID), None, self._max_event_size
        ).data
        token = secrets.token_hex(8)
        announce = "0" if self._min_replicas else "1"
        args = [self._maxlen, token, "0", announce]
        if event.text is not None:
            args += ["d", event.text]
        if event.event is not None:
            args += ["e", event.event]
        if event.retry is not None:
            args += ["r", str(event.retry)]
        if event.comment is not None:
            args += ["c", event.comment]
        # Kept before publishing: the reader may read the entry before the
        # publish returns.
        kept = self._keep(token, data, channel)
        try:
            position = self._client.publish(channel, self._key(channel), args)
        except BaseException:
            if kept:
                self._kept.pop(token, None)
            raise
        self._reader.remember(channel, position)
        return dataclasses.replace(event, id=format_position(position))

    def _keep(self, token: str, data: bytes, channel: str) -> bool:
        """Keep the encoded event for this process's reader, if it reads the
        channel."""
        if not self._sink.subscribers(channel):
            return False
        kept = self._kept
        while len(kept) >= _KEPT:
            try:
                del kept[next(iter(kept))]
            except (KeyError, RuntimeError, StopIteration):
                break
        kept[token] = data
        return True

    # -- subscribing --

    def attach(self, sub: Subscription, last_id: str | None) -> None:
        if self._closed:
            raise RuntimeError("The Redis backend is closed.")
        self._check_fork()
        parsed = parse_positions(last_id, sub.channels)
        since: dict[str, Position | None] | Stale
        if parsed is None:
            # Events published from now on are the subscriber's.
            since = self._reader.positions_now(sub.channels)
        else:
            since = parsed
        self._reader.add(Pending(sub, since, parsed is not None, last_id))

    def detach(self, sub: Subscription) -> None:
        self._reader.forget(sub)

    def close(self) -> None:
        self._closed = True
        self._reader.close()
        self._client.close()
