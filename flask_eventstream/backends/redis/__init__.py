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
one for the *reader* (:mod:`.reader`) and a pool of at most two for
publishing and the subscribe bookkeeping (:mod:`.client`). The Lua scripts
are in :mod:`.scripts`; what a resuming client is sent is planned by plain
functions (:mod:`..planning`, :func:`.reader.plan`).

Each event is encoded once per process: the publishing process encodes it
(to check its size) and its reader reuses those bytes; another process's
reader encodes it once for all its subscribers.

The scripts touch several keys at once, so a Redis Cluster is not supported;
a single server (with replicas) is.

Nothing else in the package imports :mod:`redis`; this package is imported
only when a Redis URL is configured.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import threading

from ...broker import encode_frame
from ...broker import Key
from ...broker import Sink
from ...broker import Subscription
from ...exceptions import PublishError
from ...sse import Event
from .client import Client
from .reader import Encoded
from .reader import Pending
from .reader import Reader
from .reader import SIZE_ID

__all__ = ["RedisBackend"]

#: Keys: ``PREFIX + channel`` for streams, ``PREFIX + "~meta"`` for the
#: counter ("~" cannot appear in a channel name).
PREFIX = "eventstream:"
#: Events this process published and its reader has not taken yet, at most.
_LOCAL_EVENTS = 4096


class RedisBackend:
    """A :class:`~flask_eventstream.broker.Backend` on a Redis server.

    :param sink: where events read from Redis go (the broker of this process).
    :param url: a ``redis://`` (or ``rediss://``, ``unix://``) URL.
    :param history: entries kept per channel (approximately: Redis trims
        whole nodes of a stream, so a few more may be kept).
    :param max_event_size: largest encoded event in bytes.
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
        self._history = max(history, 0)
        # Readers must find an entry before it is trimmed, even when no
        # history is kept; resume then replays nothing.
        self._maxlen = str(max(history, 1))
        self._prefix = prefix
        self._client = Client(url, prefix + "~meta")
        self._lock = threading.Lock()
        self._closed = False
        self._reset_process()

    def _reset_process(self) -> None:
        """(Re)start with nothing but the configuration: at creation, and in
        a child process after a fork (gunicorn ``--preload``)."""
        self._pid = os.getpid()
        self._client.reset()
        #: Events published by this process, for its reader.
        self._encoded: dict[bytes, Encoded] = {}
        self._reader = Reader(
            self._client, self._sink, self._prefix, self._history, self._encoded
        )

    def _check_fork(self) -> None:
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    self._reset_process()

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
        args: list[str] = [self._maxlen, token, "0"]
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
        kept = self._keep(token.encode(), data, channel)
        try:
            event_id = self._client.publish(channel, self._prefix + channel, args)
        except BaseException:
            if kept is not None:
                self._encoded.pop(kept, None)
            raise
        return dataclasses.replace(event, id=event_id)

    def _keep(self, token: bytes, data: bytes, channel: str) -> bytes | None:
        """Keep the encoded event for this process's reader, if it reads the
        channel; return the token it is kept under."""
        if not self._sink.subscribers(channel):
            return None
        encoded = Encoded.of(data)
        if encoded is None:
            return None
        kept = self._encoded
        while len(kept) >= _LOCAL_EVENTS:
            try:
                del kept[next(iter(kept))]
            except (KeyError, RuntimeError, StopIteration):
                break
        kept[token] = encoded
        return token

    # -- subscribing --

    def attach(self, sub: Subscription, last: Key | None) -> None:
        if self._closed:
            raise RuntimeError("The Redis backend is closed.")
        self._check_fork()
        since = last
        if since is None:
            # Events published from now on are the subscriber's.
            since = self._client.counter()
            if since is None:
                since = self._client.estimate(self._reader.cursor)
        self._reader.add(Pending(sub, since, last is not None))

    def detach(self, sub: Subscription) -> None:
        self._reader.forget(sub)

    def close(self) -> None:
        self._closed = True
        self._reader.close()
        if self._pid == os.getpid():
            self._client.close()
