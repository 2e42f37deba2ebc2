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
a single server is, with replicas, behind Sentinel (:mod:`.connect`) and with
``min_replicas`` acknowledging every event.

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
from ...broker import Key
from ...broker import Sink
from ...broker import Subscription
from ...exceptions import PublishError
from ...presence import PresenceTable
from ...sse import Event
from .client import Client
from .presence import RedisPresence
from .presence import Transition
from .reader import Encoded
from .reader import Pending
from .reader import Reader
from .reader import SIZE_ID

__all__ = ["RedisBackend"]

log = logging.getLogger(__name__)

#: Keys: ``PREFIX + channel`` for streams, ``PREFIX + "~meta"`` for the
#: counter ("~" cannot appear in a channel name).
PREFIX = "eventstream:"
#: Events this process published and its reader has not taken yet, at most.
_LOCAL_EVENTS = 4096
#: Seconds the presence task waits after a change for more to come.
PRESENCE_BATCH = 0.05
#: Delays of the presence task after a failure (seconds).
PRESENCE_BACKOFF = (0.05, 1.0)


class RedisBackend:
    """A :class:`~flask_eventstream.broker.Backend` on a Redis server.

    :param sink: where events read from Redis go (the broker of this process).
    :param url: a ``redis://``, ``rediss://``, ``unix://`` or
        ``redis+sentinel://`` URL.
    :param history: entries kept per channel (approximately: Redis trims
        whole nodes of a stream, so a few more may be kept).
    :param max_event_size: largest encoded event in bytes.
    :param prefix: the prefix of every key this backend uses.
    :param options: more keyword arguments for redis-py's connections.
    :param min_replicas: replicas that must hold an event before
        :meth:`publish` returns it (Redis ``WAIT``); readers hand out only
        events that this many replicas hold.
    :raises ValueError: for a malformed URL or options redis-py rejects.
    :param presence_timeout: seconds after which the presence of a worker
        that stopped refreshing it is dropped.
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
        self._client = Client(url, prefix, options, min_replicas)
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
        # Presence and control messages.
        self._origin = secrets.token_hex(8)
        self._table = PresenceTable()
        self._store = RedisPresence(self._prefix, self._presence_timeout)
        self._presence_lock = threading.Lock()
        self._presence_task: t.Any = None
        self._presence_wakeup: t.Any = None
        self._reader = Reader(
            self._client,
            self._sink,
            self._prefix,
            self._history,
            self._encoded,
            control_key=self._store.control_key,
            on_control=self._on_control,
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
        replicas = str(self._client.min_replicas)
        args: list[str] = [self._maxlen, token, "0", replicas]
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
