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
import logging
import os
import secrets
import threading
import typing as t

from redis.exceptions import RedisError

from ... import _gevent
from ...broker import encode_frame
from ...broker import Sink
from ...broker import Subscription
from ...exceptions import PublishError
from ...presence import PresenceTable
from ...sse import Event
from ..positions import format_position
from ..positions import parse_positions
from ..positions import Position
from ..positions import Stale
from .client import Client
from .client import SIZE_ID
from .presence import RedisPresence
from .presence import Transition
from .reader import Pending
from .reader import Reader

__all__ = ["RedisBackend"]

log = logging.getLogger(__name__)

#: Keys: ``PREFIX + "{" + channel + "}"``.
PREFIX = "eventstream:"
#: Events this process published and its reader has not taken yet, at most.
_KEPT = 4096
#: Seconds the presence task waits after a change for more to come.
PRESENCE_BATCH = 0.05
#: Delays of the presence task after a failure (seconds).
PRESENCE_BACKOFF = (0.05, 1.0)


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
    :param options: more keyword arguments for redis-py's connections.
    :param min_replicas: replicas that must hold an event before
        :meth:`publish` returns it (Redis ``WAIT``), and before the readers
        hear of it.
    :param presence_timeout: seconds after which the presence of a worker
        that stopped refreshing it is dropped.
    :raises ValueError: for a malformed URL or options redis-py rejects.
    """

    def __init__(
        self,
        sink: Sink,
        url: str,
        history: int = 1000,
        *,
        max_event_size: int = 1 << 20,
        prefix: str = PREFIX,
        options: t.Mapping[str, t.Any] | None = None,
        min_replicas: int = 0,
        presence_timeout: float = 30.0,
    ) -> None:
        self._sink = sink
        self._presence_timeout = presence_timeout
        self._max_event_size = max_event_size
        self._history = max(history, 0)
        # Readers must find an entry before it is trimmed, even when no
        # history is kept; resume then replays nothing.
        self._maxlen = str(max(history, 1))
        self._prefix = prefix
        self._min_replicas = min_replicas
        self._client = Client(url, options, min_replicas)
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
        # Presence and control messages.
        self._origin = secrets.token_hex(8)
        self._table = PresenceTable()
        # One hash tag for presence, revocations and control messages: their
        # scripts stay in one slot of a cluster.
        self._store = RedisPresence(self._prefix + "{~}", self._presence_timeout)
        self._presence_lock = threading.Lock()
        self._presence_task: t.Any = None
        self._presence_wakeup: t.Any = None
        self._reader = Reader(
            self._client,
            self._sink,
            self._prefix,
            self._history,
            self._kept,
            control_key=self._store.control_key,
            on_control=self._on_control,
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
        args = [self._maxlen, token, "0", announce, str(self._min_replicas)]
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
        # A resume is an id of this backend's forms (the broker reads only
        # the in-memory broker's).
        sub.resuming = parsed is not None
        since: dict[str, Position | None] | Stale
        if parsed is None:
            # Events published from now on are the subscriber's.
            since = self._reader.positions_now(sub.channels)
        else:
            since = parsed
        self._reader.add(Pending(sub, since, parsed is not None, last_id))

    def detach(self, sub: Subscription) -> None:
        self._reader.forget(sub)

    # -- users: presence, revocation, control messages --

    def _on_control(self, entries: t.Any) -> None:
        """Apply control messages that other processes sent (the reader
        calls this)."""
        sink = self._sink
        for _, raw in entries:
            fields = {k.decode(): v.decode("utf-8") for k, v in raw.items()}
            if fields.get("o") == self._origin:
                continue  # sent from here, and applied here at once
            op, user = fields.get("op"), fields.get("u") or None
            try:
                if op == "revoke" and user is not None:
                    sink.note_revoked(user, int(fields.get("a", "0")))
                    sink.control("revoke", None, user)
                elif op == "disconnect":
                    sink.control("disconnect", fields.get("c") or None, user)
            except Exception:
                log.exception("Applying control message %s failed.", fields)

    def track(self, channels: tuple[str, ...], user: str, delta: int) -> None:
        self._check_fork()
        table = self._table
        if delta > 0:
            table.add(channels, user)
        else:
            table.remove(channels, user)
        if self._closed:
            return
        with self._lock:
            start = self._presence_task is None
            if start:
                self._presence_wakeup = _gevent.background_event()
                self._presence_task = True
            wakeup = self._presence_wakeup
        if start:
            self._presence_task = _gevent.spawn_background(
                self._presence_run, "flask-eventstream presence"
            )
        elif wakeup is not None:
            wakeup.set()

    def _presence_run(self) -> None:
        """Hand presence changes to Redis as they come, and refresh this
        worker's heartbeat every ``timeout / 3`` seconds."""
        wakeup = self._presence_wakeup
        assert wakeup is not None
        failures = 0
        pid = self._pid
        while not self._closed and pid == os.getpid():
            if wakeup.is_set():
                # Woken by a change: gather the ones that follow it, so that
                # a burst of streams costs a few calls, not one each.
                _gevent.sleep(PRESENCE_BATCH)
            wakeup.clear()
            try:
                self._presence_sync()
                if failures:
                    log.warning("Presence is in Redis at %s again.", self._client.where)
                failures = 0
                wait = self._store.interval
            except (RedisError, OSError) as e:
                failures += 1
                if failures == 1:
                    log.warning(
                        "Could not update presence in Redis at %s (%s); retrying.",
                        self._client.where,
                        e,
                    )
                low, high = PRESENCE_BACKOFF
                wait = min(low * 2 ** (failures - 1), high, self._store.interval)
            except Exception:
                log.exception("Updating presence failed.")
                wait = PRESENCE_BACKOFF[1]
            wakeup.wait(wait)

    def _presence_sync(self) -> None:
        table = self._table
        with self._presence_lock:
            transitions = self._store.sync(
                self._client.publisher(), table.take_changes(), table.snapshot
            )
        self._announce(transitions)

    def _announce(self, transitions: list[Transition]) -> None:
        for channel, user, joined in transitions:
            try:
                self._sink.presence_changed(channel, user, joined)
            except Exception:
                log.exception("Announcing presence on %r failed.", channel)

    def presence(self, channel: str) -> dict[str, int]:
        self._check_fork()
        try:
            if self._presence_task is not None or self._table.pending:
                # This worker's changes first, so that it sees its own.
                self._presence_sync()
            else:
                with self._presence_lock:
                    transitions = self._store.sweep(self._client.publisher())
                self._announce(transitions)
            return self._store.users(self._client.publisher(), channel)
        except (RedisError, OSError) as e:
            raise PublishError(
                f"Could not read presence on {channel!r}: Redis at"
                f" {self._client.where} is unreachable ({e})."
            ) from e

    def _send_control(self, fields: dict[str, str]) -> None:
        fields["o"] = self._origin
        try:
            self._store.send_control(self._client.publisher(), fields)
        except (RedisError, OSError) as e:
            raise PublishError(
                f"Could not send {fields['op']!r} to the other processes: Redis"
                f" at {self._client.where} is unreachable ({e})."
            ) from e

    def revoke(self, user: str, at_ms: int) -> None:
        self._check_fork()
        try:
            at_ms = self._store.revoke(self._client.publisher(), user, at_ms)
        except (RedisError, OSError) as e:
            raise PublishError(
                f"Could not revoke {user!r}: Redis at {self._client.where} is"
                f" unreachable ({e})."
            ) from e
        self._sink.note_revoked(user, at_ms)
        self._send_control({"op": "revoke", "u": user, "a": str(at_ms)})
        self._sink.control("revoke", None, user)

    def revoked_at(self, user: str) -> int | None:
        self._check_fork()
        try:
            return self._store.revoked_at(self._client.publisher(), user)
        except (RedisError, OSError) as e:
            log.warning(
                "Could not read revocations from Redis at %s (%s); refusing the"
                " grants of users this process heard were revoked.",
                self._client.where,
                e,
            )
            return None

    def disconnect(self, channel: str | None, user: str | None) -> None:
        self._check_fork()
        self._send_control({"op": "disconnect", "c": channel or "", "u": user or ""})
        self._sink.control("disconnect", channel, user)

    def close(self) -> None:
        if (
            not self._closed
            and self._presence_task is not None
            and self._pid == os.getpid()
        ):
            # Leave presence now (announced) rather than after the timeout.
            try:
                with self._presence_lock:
                    transitions = self._store.leave(self._client.publisher())
                self._announce(transitions)
            except Exception as e:
                log.warning("Could not leave presence in Redis: %s", e)
        self._closed = True
        if self._presence_wakeup is not None:
            self._presence_wakeup.set()
        self._reader.close()
        if self._pid == os.getpid():
            self._client.close()
