"""Channels, subscriptions and local fan-out, independent of Flask and gevent.

A :class:`Broker` belongs to one application on one process. Its backend (in
memory, or Redis) assigns ids, keeps history and brings events in through
one narrow :class:`Sink`; the broker hands each event's bytes, encoded once,
to every local subscriber of its channel (one :class:`Registry` per broker
says who). Delivery only appends to a bounded queue and wakes the
subscriber: nothing on the publishing side blocks. The application's
receivers run after that, never under a lock of the library, so that a
receiver may publish in turn.
"""

from __future__ import annotations

import re
import threading
import time
import typing as t

from blinker import Signal

from .observe import Observer
from .sse import encode
from .sse import Event

__all__ = [
    "Backend",
    "Broker",
    "DirectWriter",
    "Frame",
    "Registry",
    "Sink",
    "Subscription",
    "Waker",
    "encode_frame",
    "format_id",
    "linger",
    "parse_id",
    "validate_channel",
]

_CHANNEL = re.compile(r"[A-Za-z0-9_\-.:]{1,128}")

#: An event id as a sortable key: (milliseconds, sequence).
Key = tuple[int, int]

_ID = re.compile(r"([0-9]{1,15})-([0-9]{1,19})")


def validate_channel(channel: object) -> str:
    """Return ``channel`` if it is a valid channel name, else raise.

    :raises ValueError: unless it is 1 to 128 characters of ``A-Z a-z 0-9 _ - . :``.
    """
    if not isinstance(channel, str):
        raise TypeError(f"channel must be a str, not {type(channel).__name__}")
    if _CHANNEL.fullmatch(channel) is None:
        raise ValueError(
            f"Invalid channel name {channel[:140]!r}: use 1 to 128 characters"
            " of A-Z a-z 0-9 _ - . :"
        )
    return channel


def format_id(key: Key) -> str:
    """Render a key as the id sent to clients: ``<milliseconds>-<sequence>``."""
    return f"{key[0]}-{key[1]}"


def parse_id(value: str | None) -> Key | None:
    """Parse an id sent back by a client; ``None`` when it is absent,
    malformed or oversized (all of which are treated alike)."""
    if not value or len(value) > 40:
        return None
    # Only the optional whitespace of an HTTP header value (space, tab) is
    # dropped: an id with CR, LF or other characters around it is malformed.
    match = _ID.fullmatch(value.strip(" \t"))
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2))


class Frame:
    """Encoded bytes ready to be written, with the key of the newest event
    they contain (``None`` for heartbeats and events without a channel id).

    ``wire`` is for the writer that puts frames on the wire: the bytes as
    framed for the transport, made once per frame however many subscribers
    it goes to."""

    __slots__ = ("data", "key", "count", "origin", "wire")

    def __init__(
        self,
        data: bytes,
        key: Key | None = None,
        count: int = 1,
        origin: t.Any = None,
    ) -> None:
        self.data = data
        self.key = key
        #: How many events the bytes hold (0 for a heartbeat).
        self.count = count
        #: What the backend knows of the event, for a subscription's
        #: :attr:`~Subscription.relabel` hook.
        self.origin = origin
        self.wire: bytes | None = None

    def __repr__(self) -> str:
        return f"Frame({self.data!r}, key={self.key!r})"


class Waker(t.Protocol):
    """What a subscriber sleeps on: ``threading.Event`` in a thread, a
    one-waiter flag of ``flask_eventstream._gevent`` in a greenlet."""

    def set(self) -> None: ...
    def clear(self) -> None: ...
    def is_set(self) -> bool: ...
    def wait(self, timeout: float | None = None) -> bool: ...


class DirectWriter(t.Protocol):
    """Writes frames straight to a waiting subscriber's client (see
    :attr:`Subscription.send`)."""

    def send(self, frame: Frame, now: float, thread: int) -> bool:
        """Write ``frame`` without blocking, from OS thread ``thread``, at
        monotonic time ``now``; whether it was taken (if not, it goes
        through :meth:`Subscription.deliver`)."""
        ...


class Deferrer(t.Protocol):
    """Runs a fan-out later in the current thread's event loop, so that the
    events published until then go out together."""

    def ident(self) -> int:
        """The current OS thread."""
        ...

    def __call__(self, func: t.Callable[[], None], delay: float = 0.0) -> bool:
        """Schedule ``func`` soon (after ``delay`` seconds, if positive) in
        this thread's loop; ``False`` when this thread has none (the fan-out
        then happens at once)."""
        ...


class Sink(t.Protocol):
    """How a backend hands events back to the broker of its process: the only
    way it reaches the broker. The broker calls the backend
    (:class:`Backend`); the backend never calls anything else of the broker,
    and changes a subscription only through the subscription's own methods
    (:meth:`Subscription.start`, :meth:`Subscription.cut_off`)."""

    def deliver(self, channel: str, frame: Frame, event: Event) -> None:
        """Hand ``frame`` to the live local subscribers of ``channel``, then
        tell the application that ``event`` arrived. Runs the application's
        receivers: call it holding no lock, once per event, in id order."""
        ...

    def subscribers(self, channel: str) -> tuple[Subscription, ...]:
        """The live local subscribers of ``channel``."""
        ...

    def send(self, channel: str, frame: Frame) -> int:
        """Hand ``frame`` to the live local subscribers of ``channel``; return
        how many there were. Runs no application code, so a backend that
        orders deliveries from several threads may call it holding its lock;
        it then calls :meth:`announce`, holding none.

        For a backend's reader, which brings in events published elsewhere:
        the fan-out may wait briefly for more of them (see :func:`linger`)."""
        ...

    def announce(self, channel: str, event: Event, count: int) -> None:
        """Tell the application that ``event`` arrived (after :meth:`send`
        handed it to ``count`` subscribers)."""
        ...

    def control(self, op: str, channel: str | None, user: str | None) -> int:
        """A control message (``"revoke"``, ``"disconnect"``) reached this
        process: end the local streams that match; return how many."""
        ...

    def note_revoked(self, user: str, at_ms: int) -> None:
        """Remember that ``user``'s grants up to ``at_ms`` were revoked."""
        ...

    def presence_changed(self, channel: str, user: str, joined: bool) -> None:
        """``user``'s first stream on ``channel`` opened (``joined``), or
        their last one closed, over every process. Call it holding no lock."""
        ...


class Backend(t.Protocol):
    """What a broker needs from the engine behind it."""

    def publish(self, channel: str, event: Event) -> Event:
        """Assign the id, store history, deliver; return the event with its id."""
        ...

    def attach(self, sub: Subscription, last_id: str | None) -> None:
        """Start ``sub`` (:meth:`Subscription.start`), now or soon, with what
        it missed after the client's ``last_id`` (as the client sent it; with
        a reset marker if that cannot be done exactly) and the floor under
        which live events are already its."""
        ...

    def detach(self, sub: Subscription) -> None:
        """Forget ``sub`` (it closed, perhaps before it started)."""
        ...

    def close(self) -> None: ...

    # -- users: presence and revocation --

    def track(self, channels: tuple[str, ...], user: str, delta: int) -> None:
        """Count one stream more (``delta`` 1) or fewer (-1) of ``user`` on
        ``channels``; users who joined or left over every process are told
        to :meth:`Sink.presence_changed`, soon."""
        ...

    def presence(self, channel: str) -> dict[str, int]:
        """``{user: open streams}`` on ``channel``, over every process."""
        ...

    def revoke(self, user: str, at_ms: int) -> None:
        """Refuse ``user``'s grants issued up to ``at_ms`` (Unix ms), and end
        their streams on every process (:meth:`Sink.control`)."""
        ...

    def revoked_at(self, user: str) -> int | None:
        """When ``user``'s grants were last revoked (Unix ms), if ever."""
        ...

    def disconnect(self, channel: str | None, user: str | None) -> None:
        """End the matching streams on every process (:meth:`Sink.control`)."""
        ...


def encode_frame(event: Event, key: Key | None, max_size: int) -> Frame:
    """Encode ``event`` once and check its size.

    :raises ValueError: if it exceeds ``max_size`` bytes.
    """
    data = encode(event)
    if len(data) > max_size:
        raise ValueError(
            f"Encoded event is {len(data)} bytes, more than"
            f" EVENTSTREAM_MAX_EVENT_SIZE ({max_size})."
        )
    return Frame(data, key)


class Owner(t.Protocol):
    """The stream a subscription feeds (a view's connection)."""

    def follow(self, sub: Subscription) -> t.Iterator[Frame | None]:
        """Drive the iteration of ``sub``: with heartbeats, lifetime and
        disconnect handling."""
        ...

    def revoke(self, reason: str) -> None:
        """End the stream (from any greenlet), with ``reason``."""
        ...


class Subscription:
    """A live subscription to one or more channels.

    Created by :meth:`flask_eventstream.EventStream.subscribe`; registered at
    once, so events published after that call are queued even before the
    subscription is iterated. Iterating it yields :class:`Frame` objects.
    """

    __slots__ = (
        "__weakref__",
        "broker",
        "channels",
        "floor",
        "overflowed",
        "closed",
        "started",
        "resuming",
        "woken",
        "relabel",
        "send",
        "user",
        "owner",
        "_queue",
        "_limit",
        "_waker",
    )

    def __init__(
        self,
        broker: Broker,
        channels: tuple[str, ...],
        waker: Waker,
        limit: int,
        owner: Owner | None = None,
        user: str | None = None,
    ) -> None:
        self.broker = broker
        self.channels = channels
        #: Whose stream this is (for presence and revocation), if known.
        self.user = user
        #: The stream this subscription feeds, which iterating it follows
        #: and :meth:`end` ends; ``None`` for a subscription iterated on its
        #: own (closing it ends it). One reference, not two bound methods:
        #: an idle stream keeps this for as long as it is open.
        self.owner = owner
        #: Live frames with a key at or below this were already replayed.
        self.floor: Key | None = None
        self.overflowed = False
        self.closed = False
        #: Registered for live frames (by :meth:`start`).
        self.started = False
        #: The client asked to resume from an id.
        self.resuming = False
        #: Set when the waker was set for frames not yet drained; spares a
        #: wake-up per event for a subscriber that is already awake.
        self.woken = False
        #: Set by a backend whose event ids depend on the subscription (a
        #: position per channel): gives each live frame its id, or drops it
        #: (``None``) when the subscription had it already.
        self.relabel: t.Callable[[Frame], Frame | None] | None = None
        #: While the subscriber waits with nothing queued, what writes a
        #: frame straight to its client (see :meth:`.Connection.wait`);
        #: ``None`` otherwise. Only a deferred fan-out (:class:`_Fanout`)
        #: uses it, and never for a subscription whose frames are relabelled.
        self.send: DirectWriter | None = None
        # A list, not a deque: an idle subscriber's empty list is 56 bytes,
        # an empty deque about 600. drain() takes a slice and deletes it,
        # each one atomic under the GIL, so publishing threads lose nothing.
        self._queue: list[Frame] = []
        self._limit = limit
        self._waker = waker

    # -- publishing side: called from any greenlet or thread, never blocks --

    def deliver(self, frame: Frame) -> None:
        """Queue ``frame`` and wake the subscriber; never blocks."""
        if self.overflowed:
            return
        floor = self.floor
        if floor is not None and frame.key is not None and frame.key <= floor:
            return
        if self.relabel is not None:
            relabelled = self.relabel(frame)
            if relabelled is None:
                return
            frame = relabelled
        queue = self._queue
        if len(queue) >= self._limit:
            # Cut off: release the backlog now; the client resumes from
            # history when it reconnects.
            self.overflowed = True
            queue.clear()
            self._waker.set()
            return
        queue.append(frame)
        # Queued frames go out before any later frame is sent.
        self.send = None
        if not self.woken:
            self.woken = True
            self._waker.set()

    def start(
        self, frames: list[Frame], floor: Key | None, reset: str | None = None
    ) -> None:
        """Queue the missed ``frames`` ahead of any live ones, as one chunk,
        and register for live frames newer than ``floor`` (and than the
        replay). The backend calls this once, when it knows what was missed;
        ``reset`` is the reason of the reset among ``frames``, if any."""
        if self.closed or self.started:
            return
        if self.resuming:
            self.broker.observer.resumed(self.channels, reset or "exact")
        if frames:
            key = frames[-1].key
            queue = self._queue
            if key is not None:
                self.floor = key
                queue[:] = [f for f in queue if f.key is None or f.key > key]
            data = b"".join([f.data for f in frames])
            queue.insert(0, Frame(data, key, sum([f.count for f in frames])))
            self.woken = True
            self._waker.set()
        if floor is not None and (self.floor is None or self.floor < floor):
            self.floor = floor
        self.started = True
        self.broker.registry.add(self)

    def cut_off(self) -> None:
        """End the subscription as if it fell behind: it missed events that
        cannot be sent any more, and resumes (and is told) when it reconnects."""
        self.overflowed = True
        self.broker.registry.discard(self)
        self._waker.set()

    # -- subscriber side --

    def take(self) -> Frame | None:
        """Take everything queued, after clearing the waker: ``None`` when
        nothing is queued or the subscription was cut off."""
        self.woken = False
        self._waker.clear()
        if self.overflowed:
            return None
        return self.drain()

    @property
    def queued(self) -> tuple[Frame, ...]:
        """The frames waiting to be taken."""
        return tuple(self._queue)

    def drain(self) -> Frame | None:
        """Take everything queued as one frame, or ``None`` if empty.

        :meth:`take` clears the waker first."""
        queue = self._queue
        n = len(queue)
        if n == 0:
            return None
        frames = queue[:n]
        del queue[:n]
        if n == 1:
            return frames[0]
        data = b"".join([f.data for f in frames])
        return Frame(data, frames[-1].key, sum([f.count for f in frames]))

    @property
    def waker(self) -> Waker:
        return self._waker

    def close(self) -> None:
        """Unregister; idempotent. Queued frames are released."""
        if self.closed:
            return
        self.closed = True
        self._queue.clear()
        self.broker.detach(self)
        self._waker.set()

    def end(self, reason: str) -> None:
        """End the stream this subscription feeds (from any greenlet)."""
        if self.owner is not None:
            self.owner.revoke(reason)
        else:
            self.close()

    def __iter__(self) -> t.Iterator[Frame | None]:
        if self.owner is not None:
            return self.owner.follow(self)
        return self._standalone()

    def _standalone(self) -> t.Iterator[Frame]:
        try:
            while not self.closed:
                self.woken = False
                self._waker.clear()
                frame = self.drain()
                if frame is not None:
                    yield frame
                elif self.overflowed:
                    return
                else:
                    self._waker.wait(None)
        finally:
            self.close()

    def __repr__(self) -> str:
        return f"<Subscription {self.channels!r}>"


#: A channel's fan-out of events that a backend's reader brought in waits
#: until this many times as long as the channel's previous fan-out took has
#: passed since that one ended...
LINGER_FACTOR = 16
#: ...or this many seconds, whichever is shorter.
LINGER_MAX = 0.04


def linger(last_start: float, last_end: float, last_frames: int, now: float) -> float:
    """Seconds that a fan-out due at ``now`` waits, after one of
    ``last_frames`` frames that ran from ``last_start`` to ``last_end``
    (monotonic seconds).

    In-process publishers batch by themselves: their events wait for the
    publisher to yield, and the publishes of one turn of the loop leave
    together. Events that a reader brings in from Redis come one message
    at a time, from publishers whose next publish waits for a round trip
    to Redis; under load, fanning each out at once writes one or two
    events per write and takes the CPU the publishes need. Waiting a
    multiple of the last fan-out's duration keeps a channel's fan-outs to
    a fraction of the time, and the events of that wait go out in one
    write per subscriber. Only after a fan-out that carried several frames
    (events come faster than they are fanned out): a channel whose events
    come one at a time, and one between bursts, waits for nothing."""
    if last_frames < 2:
        return 0.0
    wait = min((last_end - last_start) * LINGER_FACTOR, LINGER_MAX)
    return max(last_end + wait - now, 0.0)


class _Fanout:
    """The blinker receiver of one channel: hands a frame to each of the
    channel's local subscribers, and says to how many.

    One receiver per channel rather than per subscriber keeps blinker's
    per-receiver work out of the per-delivery cost. A dict makes adding and
    removing O(1); delivery iterates a snapshot of its keys (one C-level
    copy), so a thread may subscribe while another publishes.

    With a :class:`Deferrer`, frames published in an event loop's thread are
    collected and fanned out once the publisher yields to the loop: the
    frames of every publish until then go to each subscriber as one frame;
    a subscriber that waits with nothing queued takes it through its
    ``send`` (straight to its client, without a wake-up), the others through
    :meth:`Subscription.deliver`, frame by frame, in order.
    """

    __slots__ = (
        "subs",
        "defer",
        "_pending",
        "_thread",
        "_started",
        "_ended",
        "_frames",
    )

    def __init__(self, defer: Deferrer | None = None) -> None:
        self.subs: dict[Subscription, None] = {}
        self.defer = defer
        self._pending: list[Frame] | None = None
        self._thread = 0
        #: When the last fan-out with frames started and ended, and how many.
        self._started = self._ended = 0.0
        self._frames = 0

    def __call__(self, sender: str, frame: Frame, from_reader: bool = False) -> int:
        defer = self.defer
        if defer is not None:
            thread = defer.ident()
            pending = self._pending
            if pending is not None:
                if self._thread == thread:
                    pending.append(frame)
                    return len(self.subs)
            else:
                delay = 0.0
                if from_reader:
                    delay = linger(
                        self._started, self._ended, self._frames, time.monotonic()
                    )
                if defer(self._flush, delay):
                    self._pending = [frame]
                    self._thread = thread
                    return len(self.subs)
        subs = tuple(self.subs)
        for sub in subs:
            sub.deliver(frame)
        return len(subs)

    def settle(self) -> None:
        """Fan out what waits for the publisher to yield now, if it waits in
        this thread: called before a subscription joins, whose replay holds
        every event published until then, so that the frames waiting reach
        only the subscribers that were there before it."""
        defer = self.defer
        if self._pending is not None and defer is not None:
            if self._thread == defer.ident():
                self._flush()

    def _flush(self) -> None:
        frames = self._pending
        self._pending = None
        if not frames:
            return
        if len(frames) == 1:
            frame = frames[0]
        else:
            data = b"".join([f.data for f in frames])
            frame = Frame(data, frames[-1].key, sum([f.count for f in frames]))
        first = frames[0].key
        now = self._started = time.monotonic()
        self._frames = len(frames)
        thread = self._thread
        for sub in tuple(self.subs):
            direct = sub.send
            # A relabelled subscription gives each frame its own id: frame by
            # frame, through deliver().
            if direct is not None and sub.relabel is None:
                floor = sub.floor
                if (
                    floor is None or (first is not None and first > floor)
                ) and direct.send(frame, now, thread):
                    continue
                # Queued frames go out before any later frame is sent.
                sub.send = None
            for f in frames:
                sub.deliver(f)
        # The framed copy is for this fan-out only: a frame kept in history
        # does not keep it.
        frame.wire = None
        self._ended = time.monotonic()


class Registry:
    """The live subscriptions of one broker, per channel: the only record of
    who is subscribed to what, and the fan-out to them.

    Events reach a channel's subscribers through a blinker signal whose
    sender is the channel name; each channel with local subscribers has one
    receiver (a :class:`_Fanout`), connected with its first subscriber and
    disconnected with its last. Only this class connects or disconnects it.
    """

    __slots__ = ("_channels", "_lock", "_signal", "_defer")

    def __init__(self, defer: Deferrer | None = None) -> None:
        self._defer = defer
        self._channels: dict[str, _Fanout] = {}
        self._lock = threading.Lock()
        self._signal = Signal("flask_eventstream.fanout")

    def add(self, sub: Subscription) -> None:
        with self._lock:
            for channel in sub.channels:
                fanout = self._channels.get(channel)
                if fanout is None:
                    fanout = self._channels[channel] = _Fanout(self._defer)
                    self._signal.connect(fanout, sender=channel, weak=False)
                else:
                    fanout.settle()
                fanout.subs[sub] = None

    def discard(self, sub: Subscription) -> None:
        with self._lock:
            for channel in sub.channels:
                fanout = self._channels.get(channel)
                if fanout is None or sub not in fanout.subs:
                    continue
                del fanout.subs[sub]
                if not fanout.subs:
                    del self._channels[channel]
                    self._signal.disconnect(fanout, sender=channel)

    def send(self, channel: str, frame: Frame, *, from_reader: bool = False) -> int:
        """Hand ``frame`` to every local subscriber of ``channel``; return
        how many there were. Receivers only queue: this never blocks.
        For a frame that a backend's reader brought in (``from_reader``), a
        deferred fan-out may wait a little for more (see :func:`linger`).

        The fan-out may wait for the publisher to yield (see
        :class:`_Fanout`); it reaches the subscribers registered at this
        moment all the same: a subscription that registers meanwhile, in the
        same thread, first lets the waiting frames go out to the others
        (its replay has them)."""
        if channel not in self._channels:
            return 0
        sent = self._signal.send(channel, frame=frame, from_reader=from_reader)
        return sum(n for _, n in sent)

    def of(self, channel: str) -> tuple[Subscription, ...]:
        fanout = self._channels.get(channel)
        return tuple(fanout.subs) if fanout is not None else ()

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {name: len(f.subs) for name, f in self._channels.items()}


class Broker:
    """Local fan-out for one application on one process; the :class:`Sink`
    of its backend.

    :param backend_factory: builds the backend, given its sink (this broker).
    :param queue_size: frames buffered per subscriber before it is cut off.
    :param on_delivered: called as ``on_delivered(channel, event)`` once per
        event delivered to this process (for the public signal).
    :param defer: lets a fan-out wait for the publisher to yield to its event
        loop (see :class:`_Fanout`).
    :param on_presence: called as ``on_presence(channel, user, joined)`` when
        a user's first stream on a channel opened, or their last one closed,
        over every process.
    """

    def __init__(
        self,
        backend_factory: t.Callable[[Sink], Backend],
        *,
        queue_size: int = 1000,
        on_delivered: t.Callable[[str, Event], None] | None = None,
        on_presence: t.Callable[[str, str, bool], None] | None = None,
        defer: Deferrer | None = None,
    ) -> None:
        self.registry = Registry(defer)
        self.on_presence = on_presence
        self._lock = threading.Lock()
        #: Every open subscription, started or not (for control messages).
        self._open: dict[Subscription, None] = {}
        #: user -> when their grants were revoked (Unix ms), as heard here.
        self._revoked: dict[str, int] = {}
        #: Told of every publish and delivery (see :mod:`.observe`).
        self.observer = Observer()
        self.queue_size = queue_size
        self.on_delivered = on_delivered
        self.backend = backend_factory(self)

    # -- the sink --

    def deliver(self, channel: str, frame: Frame, event: Event) -> None:
        self.announce(channel, event, self.registry.send(channel, frame))

    def send(self, channel: str, frame: Frame) -> int:
        # What a backend's reader brings in, from publishers elsewhere.
        return self.registry.send(channel, frame, from_reader=True)

    def announce(self, channel: str, event: Event, count: int) -> None:
        self.observer.delivered(channel, event, count)
        if self.on_delivered is not None:
            self.on_delivered(channel, event)

    def subscribers(self, channel: str) -> tuple[Subscription, ...]:
        return self.registry.of(channel)

    def control(self, op: str, channel: str | None, user: str | None) -> int:
        if channel is None and user is None:
            return 0
        with self._lock:
            matching = [
                sub
                for sub in self._open
                if (user is None or sub.user == user)
                and (channel is None or channel in sub.channels)
            ]
        for sub in matching:
            sub.end("revoked")
        return len(matching)

    def note_revoked(self, user: str, at_ms: int) -> None:
        with self._lock:
            if at_ms > self._revoked.get(user, 0):
                self._revoked[user] = at_ms

    def presence_changed(self, channel: str, user: str, joined: bool) -> None:
        if self.on_presence is not None:
            self.on_presence(channel, user, joined)

    def revoked_here(self, user: str) -> int | None:
        """The revocation of ``user`` this process heard of, if any."""
        return self._revoked.get(user)

    # -- the API --

    def publish(self, channel: str, event: Event) -> Event:
        try:
            validate_channel(channel)
            sent = self.backend.publish(channel, event)
        except Exception as e:
            self.observer.publish_failed(channel, e)
            raise
        self.observer.published(channel, sent)
        return sent

    def subscribe(
        self,
        channels: tuple[str, ...],
        last_id: str | None,
        waker: Waker,
        owner: Owner | None = None,
        user: str | None = None,
    ) -> Subscription:
        if not channels:
            raise TypeError("subscribe() needs at least one channel")
        for channel in channels:
            validate_channel(channel)
        channels = tuple(dict.fromkeys(channels))
        sub = Subscription(self, channels, waker, self.queue_size, owner, user)
        last = parse_id(last_id)
        # A malformed or oversized id is no resume: it is treated as absent.
        sub.resuming = last is not None
        with self._lock:
            self._open[sub] = None
        try:
            self.backend.attach(sub, last_id)
        except BaseException:
            with self._lock:
                self._open.pop(sub, None)
            raise
        if user is not None:
            self.backend.track(channels, user, 1)
        return sub

    def detach(self, sub: Subscription) -> None:
        # The backend first: one that is starting ``sub`` meanwhile has
        # registered it by the time it lets go.
        self.backend.detach(sub)
        self.registry.discard(sub)
        with self._lock:
            was_open = self._open.pop(sub, 0) is None
        if was_open and sub.user is not None:
            self.backend.track(sub.channels, sub.user, -1)

    def channels(self) -> dict[str, int]:
        """``{channel: local subscriber count}``."""
        return self.registry.counts()

    def close(self) -> None:
        self.backend.close()


def reset_frame(reason: str, last_id: str, newest: Key | None) -> Frame:
    """The ``eventstream-reset`` event: the client's position could not be
    resumed exactly. Its id is the newest id known, so that the client does
    not keep sending a stale one."""
    event = Event(
        data={"reason": reason, "last_event_id": last_id},
        event="eventstream-reset",
        id=format_id(newest) if newest is not None else None,
    )
    return Frame(encode(event), newest)
