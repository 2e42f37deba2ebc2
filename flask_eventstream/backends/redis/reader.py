"""Reading channels from Redis, for one process.

A *manager* (one greenlet, or a daemon thread without gevent) routes each
channel with local subscribers to the reader of the master that serves its
slot, brings channels *live* (reads what a channel missed from its stream:
at first, after a reconnection, a failover, a slot that moved, or a gap in
the offsets), and registers new subscriptions once their channels are live,
with what they missed replayed up to the position from which live events
reach them. A *link* per master ``SSUBSCRIBE``\\ s to the shard channels of
its channels and hands each event, encoded once, to the local subscribers;
while a channel is not live its messages wait in a buffer.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import threading
import time
import typing as t

from redis.exceptions import MovedError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ... import _gevent
from ...broker import Frame
from ...broker import Sink
from ...broker import Subscription
from ...broker import Waker
from ...sse import encode
from ...sse import Event
from ..positions import format_position
from ..positions import format_positions
from ..positions import plan_replay
from ..positions import Position
from ..positions import Snapshot
from ..positions import Stale
from .client import Client
from .client import LOST
from .client import position_of
from .client import Shards
from .client import SIZE_LINE

__all__ = ["Pending", "Reader"]

log = logging.getLogger(__name__)

#: A reader that heard nothing for this long (seconds) PINGs its master, and
#: reconnects if that gets no answer within as long again.
READER_PING = 5.0
#: Reconnection delays of readers and the manager (seconds).
BACKOFF = (0.05, 1.0)
#: Readers and the manager of a process without subscriptions stop after this.
IDLE = 30.0
#: While a process has streams, the reader of the control stream's master
#: is subscribed to its shard channel, on which every control message
#: (revoke, disconnect) is announced, and the manager reads the stream when
#: one is; it also reads it this often (seconds), in case an announcement
#: was missed while a reader reconnected.
CONTROL_POLL = 5.0
#: Messages buffered per channel while it is brought live.
BUFFER_LIMIT = 10000
#: Channels whose newest position a process remembers after it stopped
#: reading them.
SEEN_LIMIT = 10000


def _event(position: Position, fields: dict[str, str], single: bool) -> Event | None:
    """The event of a stream entry; ``None`` (logged) for a malformed one."""
    try:
        retry = fields.get("r")
        event = Event(
            event=fields.get("e"),
            id=format_position(position) if single else None,
            retry=int(retry) if retry is not None else None,
            comment=fields.get("c"),
        )
        data = fields.get("d")
        if data is None:
            # No "d" field: a block without data (comment, id or retry only).
            return event
        return dataclasses.replace(event, data=data)
    except (ValueError, TypeError) as e:
        log.error("Skipping malformed stream entry %s: %s", position, e)
        return None


def _without(data: bytes, line: bytes) -> tuple[bytes, int] | None:
    """``data`` without its ``line`` (an ``id:`` line), and where it was.

    The id line follows only comment and event lines, which cannot contain a
    line break: its first occurrence at the start of a line is the one."""
    if data.startswith(line):
        return data[len(line) :], 0
    at = data.find(b"\n" + line)
    if at < 0:
        return None
    at += 1
    return data[:at] + data[at + len(line) :], at


class _Origin:
    """An event of one channel, as a frame's origin: what a stream on several
    channels needs to give the frame its own id."""

    __slots__ = ("channel", "position", "event", "_data", "_bare")

    def __init__(
        self, channel: str, position: Position, event: Event, data: bytes
    ) -> None:
        self.channel = channel
        self.position = position
        self.event = event
        self._data = data
        self._bare: bytes | None = None

    def bare(self) -> bytes:
        """The event without its id line."""
        if self._bare is None:
            line = f"id: {format_position(self.position)}\n".encode()
            cut = _without(self._data, line)
            self._bare = (
                cut[0]
                if cut is not None
                else encode(dataclasses.replace(self.event, id=None))
            )
        return self._bare


def _frame(
    channel: str, position: Position, event: Event, kept: bytes | None = None
) -> Frame:
    """The frame of an event with the channel's position as id: ``kept``
    (the publishing process's encoding, with :data:`SIZE_ID` as id) with the
    real id, or a new encoding."""
    data = None
    if kept is not None:
        cut = _without(kept, SIZE_LINE)
        if cut is not None:
            rest, at = cut
            line = f"id: {format_position(position)}\n".encode()
            data = rest[:at] + line + rest[at:]
    if data is None:
        data = encode(event)
    return Frame(data, None, origin=_Origin(channel, position, event, data))


class _Ids:
    """Gives the frames of a stream on several channels an id with every
    channel's position (installed as the subscription's relabel hook; the
    readers deliver under the backend's lock, so one at a time)."""

    __slots__ = ("channels", "positions")

    def __init__(self, channels: tuple[str, ...], positions: dict[str, Position]):
        self.channels = channels
        self.positions = positions

    def __call__(self, frame: Frame) -> Frame | None:
        origin = frame.origin
        if not isinstance(origin, _Origin):
            return frame
        current = self.positions.get(origin.channel)
        if (
            current is not None
            and current.epoch == origin.position.epoch
            and origin.position.offset <= current.offset
        ):
            return None  # it had this one already
        self.positions[origin.channel] = origin.position
        return Frame(self.label(origin.bare()))

    def label(self, bare: bytes) -> bytes:
        value = format_positions(self.channels, self.positions)
        return b"id: " + value.encode("ascii") + b"\n" + bare


class _Channel:
    """A channel with local subscribers."""

    __slots__ = (
        "name",
        "key",
        "position",
        "node",
        "confirmed",
        "live",
        "buffer",
    )

    def __init__(self, name: str, key: str) -> None:
        self.name = name
        self.key = key
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
class Pending:
    sub: Subscription
    #: Per channel, what to send after (None: from when it is registered).
    since: dict[str, Position | None] | Stale
    #: The client asked to resume (a reset is possible).
    resume: bool
    last_id: str | None


class _Link:
    """A reader: the subscriber connection to one master."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.conn: t.Any | None = None
        self.lock = threading.Lock()
        self.running = True
        self.idle_since: float | None = None


class Reader:
    """The manager, the links and the state of the channels with local
    subscribers, for one process."""

    def __init__(
        self,
        client: Client,
        sink: Sink,
        prefix: str,
        history: int,
        kept: dict[str, bytes],
        control_key: str | None = None,
        on_control: t.Callable[[t.Any], None] | None = None,
    ) -> None:
        self._client = client
        self._sink = sink
        #: Events encoded by this process when it published them, by token.
        self._kept = kept
        #: The stream of control messages (revoke, disconnect), read while
        #: there are streams, and what to do with its entries.
        self._control_key = control_key
        self._on_control = on_control
        #: The id after which control messages are read; set at first read.
        self._control_position: str | None = None
        #: The master whose reader is subscribed to the control stream's
        #: announcements (None: none is, or it is to be routed again).
        self._control_node: str | None = None
        self._prefix = prefix
        self._history = history
        self._lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()
        self._channels: dict[str, _Channel] = {}
        self._pending: list[Pending] = []
        self._readers: dict[str, _Link] = {}
        self._manager_running = False
        self._wakeup: Waker | None = None
        self._refresh = False
        #: The newest position seen per channel, for streams that subscribe
        #: while Redis is away (bounded: the most recently seen channels).
        self._seen: dict[str, Position] = {}

    def _key(self, channel: str) -> str:
        return f"{self._prefix}{{{channel}}}"

    def add(self, pending: Pending) -> None:
        """Register ``pending.sub`` once its channels are live."""
        with self._lock:
            self._pending.append(pending)
            for channel in pending.sub.channels:
                if channel not in self._channels:
                    self._channels[channel] = _Channel(channel, self._key(channel))
            self._start_manager()

    def remember(self, channel: str, position: Position) -> None:
        """Note the newest position seen of ``channel`` (it was published)."""
        with self._lock:
            self._remember(channel, position)

    def forget(self, sub: Subscription) -> None:
        with self._lock:
            self._pending = [p for p in self._pending if p.sub is not sub]
            wakeup = self._wakeup
        if wakeup is not None:
            wakeup.set()

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

    def _remember(self, channel: str, position: Position) -> None:
        """Note the newest position seen of ``channel``. Lock held."""
        seen = self._seen
        seen.pop(channel, None)
        seen[channel] = position
        if len(seen) > SEEN_LIMIT:
            del seen[next(iter(seen))]

    def positions_now(self, channels: tuple[str, ...]) -> dict[str, Position | None]:
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
            client = self._client.shards().client
            try:
                pipe = client.pipeline(transaction=False)
                for channel in ask:
                    pipe.xrevrange(self._key(channel), count=1)
                replies = pipe.execute()
            except LOST:
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
                    now[channel] = position_of(reply[0][0])
                else:
                    now[channel] = Position(0, 0)
        return now

    def _start_manager(self) -> None:
        """Start the manager, or wake it (with the lock held)."""
        if self._manager_running:
            assert self._wakeup is not None
            self._wakeup.set()
            return
        self._manager_running = True
        self._wakeup = _gevent.background_event()
        _gevent.spawn_background(self._manage, "flask-eventstream redis manager")

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
                        log.warning("Redis at %s is back.", self._client.where)
                    failures = 0
                except LOST as e:
                    failures += 1
                    self._refresh = True
                    if failures == 1:
                        log.warning(
                            "Lost Redis at %s (%s); open streams stay connected"
                            " and resume where they were when it is back.",
                            self._client.where,
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
                if not empty and self._control_key is not None:
                    idle_since = None
                    wakeup.wait(CONTROL_POLL)
                    continue
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
        shards = self._client.shards()
        if self._refresh:
            self._refresh = False
            shards.refresh()
            self._reroute(shards)
        self._drop_unused()
        waiting = self._route(shards)
        waiting |= self._bring_live(shards)
        waiting |= self._register(shards)
        self._read_control(shards)
        return waiting

    def _read_control(self, shards: Shards) -> None:
        """Apply the control messages sent since the last look, while this
        process has streams (the manager looks when a reader hears one
        announced, and every :data:`CONTROL_POLL` seconds)."""
        key = self._control_key
        if key is None:
            return
        with self._lock:
            active = bool(self._channels or self._pending)
        if not active:
            self._control_position = None
            return
        client = shards.client
        if self._control_position is None:
            # Control messages from now on: a stream opened before this
            # checked revocations in Redis itself.
            top: t.Any = client.xrevrange(key, count=1)
            self._control_position = top[0][0].decode("ascii") if top else "0-0"
            return
        reply: t.Any = client.xread({key: self._control_position}, count=100)
        pairs = reply.items() if isinstance(reply, dict) else reply or ()
        for _, entries in pairs:
            if not entries:
                continue
            self._control_position = entries[-1][0].decode("ascii")
            if self._on_control is not None:
                try:
                    self._on_control(entries)
                except Exception:
                    log.exception("Applying control messages failed.")

    def _reroute(self, shards: Shards) -> None:
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
        control = self._control_key
        if control is not None:
            with self._lock:
                was = self._control_node
                if was is not None and shards.node_of(control) != was:
                    self._control_node = None
                    reader = self._readers.get(was)
                    if reader is not None:
                        readers.append((reader, control))
        for reader, key in readers:
            self._send(reader, "SUNSUBSCRIBE", key)

    def _drop_unused(self) -> None:
        """Stop reading channels without subscribers."""
        with self._lock:
            wanted = {c for p in self._pending for c in p.sub.channels}
            dropped = [
                s
                for s in self._channels.values()
                if not self._sink.subscribers(s.name) and s.name not in wanted
            ]
            for state in dropped:
                del self._channels[state.name]
                if state.position is not None:
                    self._remember(state.name, state.position)
            readers = dict(self._readers)
            control = None
            if self._control_node is not None and not self._channels and not wanted:
                control = readers.get(self._control_node)
                self._control_node = None
        for state in dropped:
            reader = readers.get(state.node) if state.node else None
            if reader is not None:
                self._send(reader, "SUNSUBSCRIBE", state.key)
        if control is not None and self._control_key is not None:
            self._send(control, "SUNSUBSCRIBE", self._control_key)

    def _route(self, shards: Shards) -> bool:
        """Subscribe each channel on the reader of its master, and the
        control stream's announcements on the reader of its master."""
        with self._lock:
            unrouted = [s for s in self._channels.values() if s.node is None]
        for state in unrouted:
            node = shards.node_of(state.key)
            with self._lock:
                if self._channels.get(state.name) is not state:
                    continue
                state.node = node
                state.confirmed = state.live = False
                reader = self._link(node)
                if reader is None:
                    continue  # a new reader subscribes its channels
            self._send(reader, "SSUBSCRIBE", state.key)
        control = self._control_key
        if control is not None:
            link = None
            with self._lock:
                if self._control_node is None and (self._channels or self._pending):
                    self._control_node = shards.node_of(control)
                    link = self._link(self._control_node)
            if link is not None:
                self._send(link, "SSUBSCRIBE", control)
        with self._lock:
            return any(not s.confirmed for s in self._channels.values())

    def _link(self, node: str) -> _Link | None:
        """The running reader of ``node``; ``None`` when one was started
        now (it subscribes what is routed to it when it connects). Lock
        held."""
        reader = self._readers.get(node)
        if reader is not None and reader.running:
            return reader
        self._readers[node] = _Link(node)
        _gevent.spawn_background(
            functools.partial(self._read, self._readers[node]),
            f"flask-eventstream redis reader {node}",
        )
        return None

    def _send(self, reader: _Link, *command: str) -> None:
        """Send a command on a reader's connection (its replies come to the
        reader); nothing if it is not connected (it subscribes every channel
        routed to it when it connects) or is being stopped.

        The bytes go straight to the socket: redis-py's own send disconnects
        the connection when it fails, under the reader's read in another
        thread. The reader alone ends its connection; it sees a broken one
        too."""
        with reader.lock:
            conn = reader.conn
            sock = getattr(conn, "_sock", None)
            if conn is None or sock is None or not reader.running:
                return
            try:
                sock.sendall(b"".join(conn.pack_command(*command)))
            except OSError:
                pass

    def _bring_live(self, shards: Shards) -> bool:
        """Read what each confirmed, not yet live channel missed."""
        with self._lock:
            todo = [
                (s, s.position, self._start(s))
                for s in self._channels.values()
                if s.confirmed and not s.live
            ]
        for state, position, start in todo:
            after = position or start
            snap = self._client.snapshot(
                shards, state.key, after, entries=after is not None
            )
            if snap.entries and not self._client.replicated(shards, state.key):
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
            counts = [self._sink.send(state.name, frame) for frame in frames]
        for frame, count in zip(frames, counts, strict=True):
            self._announce(frame, count)

    def _frames(
        self, channel: str, position: Position, fields: dict[str, str]
    ) -> list[Frame]:
        event = _event(position, fields, True)
        if event is None:
            return []
        token = fields.get("t")
        kept = self._kept.pop(token, None) if token else None
        return [_frame(channel, position, event, kept)]

    def _announce(self, frame: Frame, count: int) -> None:
        origin = frame.origin
        if not isinstance(origin, _Origin):
            return
        try:
            self._sink.announce(origin.channel, origin.event, count)
        except Exception:
            # A receiver of event_published failed; the subscribers had the
            # event already.
            log.exception("Delivering event %s failed.", origin.event.id)

    def _cut_off(self, state: _Channel) -> None:
        """Events of ``state``'s channel after its position are gone from
        Redis (trimmed before this process read them, or the history was
        lost): end its streams, which resume and are told. Lock held."""
        subs = self._sink.subscribers(state.name)
        for sub in subs:
            sub.cut_off()
        if subs:
            log.warning(
                "Events on channel %r after %s are no longer in Redis and this"
                " process had not read them; ending its %d streams so that"
                " they resume.",
                state.name,
                state.position,
                len(subs),
            )

    def _register(self, shards: Shards) -> bool:
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

    def _register_one(self, shards: Shards, pending: Pending) -> None:
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
            snapshots[channel] = self._client.snapshot(
                shards, self._key(channel), after or Position(0, 0), entries=True
            )
        for channel, snap in snapshots.items():
            if snap.entries and not self._client.replicated(shards, self._key(channel)):
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
            sub.start(replay, None, plan.reset)

    def _read(self, reader: _Link) -> None:
        failures = 0
        conn: t.Any | None = None
        try:
            while not self._closed and self._pid == os.getpid():
                try:
                    conn = self._client.shards().connection(
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
                        if self._control_node == reader.node and self._control_key:
                            keys.append(self._control_key)
                    if keys:
                        conn.send_packed_command(
                            conn.pack_commands([("SSUBSCRIBE", k) for k in keys]),
                            check_health=False,
                        )
                    failures = 0
                    self._listen(reader, conn)
                    return
                except LOST as e:
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
                if self._control_node == reader.node:
                    self._control_node = None
                wakeup = self._wakeup
            if wakeup is not None:
                wakeup.set()

    def _lost(self, reader: _Link, error: Exception, failures: int) -> bool:
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
                reader.node if self._client.cluster else self._client.where,
                error,
            )
        if self._client.cluster:
            # Another master may serve these slots now: the manager asks,
            # and routes those channels to its reader.
            self._refresh = True
        if wakeup is not None:
            wakeup.set()
        return bool(mine) and not self._closed

    def _listen(self, reader: _Link, conn: t.Any) -> None:
        pinged = False
        while not self._closed and reader.running:
            if not conn.can_read(timeout=READER_PING):
                with self._lock:
                    mine = self._control_node == reader.node or any(
                        s.node == reader.node for s in self._channels.values()
                    )
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

    def _moved(self, reader: _Link, slot: int) -> None:
        """A SSUBSCRIBE was answered MOVED: route that slot's channels again."""
        from redis.crc import key_slot

        with self._lock:
            for state in self._channels.values():
                if state.node == reader.node and not state.confirmed:
                    if key_slot(state.key.encode()) == slot:
                        state.node = None
            control = self._control_key
            if control is not None and self._control_node == reader.node:
                if key_slot(control.encode()) == slot:
                    self._control_node = None
            self._refresh = True
            wakeup = self._wakeup
        if wakeup is not None:
            wakeup.set()

    def _on_reply(self, reader: _Link, reply: t.Any) -> None:
        if not isinstance(reply, list) or len(reply) < 3:
            return
        kind = reply[0]
        key = reply[1].decode("utf-8") if isinstance(reply[1], bytes) else str(reply[1])
        if key == self._control_key:
            self._on_control_reply(reader, kind)
            return
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

    def _on_control_reply(self, reader: _Link, kind: bytes) -> None:
        """A control message was announced: the manager reads the stream now.
        An unsubscription not asked for (the slot moved) routes it again."""
        with self._lock:
            reader.idle_since = None
            if kind == b"sunsubscribe" and self._control_node == reader.node:
                self._control_node = None
                self._refresh = True
            elif kind != b"smessage":
                return
            wakeup = self._wakeup
        if wakeup is not None:
            wakeup.set()

    def _on_message(self, reader: _Link, channel: str, payload: bytes) -> None:
        try:
            raw = json.loads(payload)
            position = position_of(raw[0])
            when = int(raw[1])
            fields = dict(zip(raw[3::2], raw[4::2], strict=True))
            fields["t"] = raw[2]
        except (ValueError, TypeError, IndexError) as e:
            log.error("Skipping a malformed message on %r: %s", channel, e)
            return
        frame: Frame | None = None
        count = 0
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
                        count = self._sink.send(channel, frame)
            if frame is None and state.position != position:
                # A gap, or another history: read what is missing.
                state.live = False
                state.buffer.append((position, when, fields))
                wake = True
            wakeup = self._wakeup
        if frame is not None:
            self._announce(frame, count)
        if wake and wakeup is not None:
            wakeup.set()

    def _stop_reader(self, reader: _Link) -> None:
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


def since_or_start(since: dict[str, Position | None] | Stale, channel: str) -> Position:
    if isinstance(since, Stale):
        return Position(0, 0)
    return since.get(channel) or Position(0, 0)
