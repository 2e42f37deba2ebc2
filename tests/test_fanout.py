"""The deferred fan-out of a broker: frames published until the publisher
yields go to each subscriber together, each exactly once, and a subscription
that joins meanwhile gets none of them from the fan-out (its replay has
them). Driven by a deferrer whose scheduled fan-outs the test runs by hand,
and, for the frames a backend's reader brings in, which may wait a little
for more after a fan-out, by gevent's hub."""

from __future__ import annotations

import threading
import time
import typing as t

import gevent
import pytest

from flask_eventstream import testing
from flask_eventstream.backends.memory import MemoryBackend
from flask_eventstream.broker import Broker
from flask_eventstream.broker import Frame
from flask_eventstream.broker import linger
from flask_eventstream.broker import LINGER_FACTOR
from flask_eventstream.broker import LINGER_MAX
from flask_eventstream.broker import Sink
from flask_eventstream.broker import Subscription
from flask_eventstream.sse import Event
from tests.support.servers import make_app


class HandDeferrer:
    """Schedules fan-outs in a list; :meth:`run` runs them, as a hub would
    once the publisher yields."""

    def __init__(self) -> None:
        self.scheduled: list[t.Callable[[], None]] = []
        #: The delay asked for each fan-out scheduled.
        self.delays: list[float] = []

    def ident(self) -> int:
        return threading.get_ident()

    def __call__(self, func: t.Callable[[], None], delay: float = 0.0) -> bool:
        self.scheduled.append(func)
        self.delays.append(delay)
        return True

    def run(self) -> None:
        scheduled, self.scheduled = self.scheduled, []
        for func in scheduled:
            func()


def make_broker(defer: HandDeferrer) -> Broker:
    def backend(sink: Sink) -> MemoryBackend:
        return MemoryBackend(sink, history=100)

    return Broker(backend, defer=defer)


def start(broker: Broker, sub: Subscription) -> Subscription:
    """Register ``sub`` as a backend does once it knows what it missed (here:
    nothing, and no floor: its frames have no key)."""
    sub.start([], None)
    return sub


def new_sub(broker: Broker, *channels: str) -> Subscription:
    return Subscription(broker, channels, threading.Event(), 100)


def taken(sub: Subscription) -> bytes:
    frame = sub.take()
    return frame.data if frame is not None else b""


def test_frames_sent_before_a_subscription_joins_reach_only_the_earlier_ones() -> None:
    defer = HandDeferrer()
    broker = make_broker(defer)
    early = start(broker, new_sub(broker, "c"))
    assert broker.registry.send("c", Frame(b"data: 1\n\n")) == 1
    assert broker.registry.send("c", Frame(b"data: 2\n\n")) == 1
    assert len(defer.scheduled) == 1  # one fan-out for both frames
    assert taken(early) == b""  # not yet: the publisher has not yielded
    late = start(broker, new_sub(broker, "c"))
    # Joining let the waiting frames go out to the subscriber that was there.
    assert taken(early) == b"data: 1\n\ndata: 2\n\n"
    assert broker.registry.send("c", Frame(b"data: 3\n\n")) == 2
    defer.run()
    assert taken(early) == b"data: 3\n\n"
    assert taken(late) == b"data: 3\n\n"
    defer.run()
    assert taken(early) == taken(late) == b""


def test_a_subscription_on_another_channel_leaves_the_fan_out_waiting() -> None:
    defer = HandDeferrer()
    broker = make_broker(defer)
    sub = start(broker, new_sub(broker, "c"))
    broker.registry.send("c", Frame(b"data: 1\n\n"))
    start(broker, new_sub(broker, "other"))
    assert taken(sub) == b""
    defer.run()
    assert taken(sub) == b"data: 1\n\n"


def test_published_events_reach_a_subscriber_that_joins_before_the_fan_out_once() -> (
    None
):
    defer = HandDeferrer()
    broker = make_broker(defer)
    early = broker.subscribe(("c",), None, threading.Event())
    first = broker.publish("c", Event("a"))
    late = broker.subscribe(("c",), first.id, threading.Event())
    second = broker.publish("c", Event("b"))
    defer.run()
    assert taken(early) == (
        f"id: {first.id}\ndata: a\n\nid: {second.id}\ndata: b\n\n".encode()
    )
    assert taken(late) == f"id: {second.id}\ndata: b\n\n".encode()


# -- frames a backend's reader brings in --


def test_linger_is_a_multiple_of_the_last_fan_out_up_to_a_limit() -> None:
    # A 1 ms fan-out of 3 frames that ended at t=10: the next waits until
    # 10 ms + LINGER_FACTOR ms.
    wait = 0.001 * LINGER_FACTOR
    assert wait < LINGER_MAX
    assert linger(9.999, 10.0, 3, 10.0) == pytest.approx(wait)
    assert linger(9.999, 10.0, 3, 10.005) == pytest.approx(wait - 0.005)
    assert linger(9.999, 10.0, 3, 10.0 + 0.001 * LINGER_FACTOR + 1e-9) == 0.0
    assert linger(9.999, 10.0, 3, 11.0) == 0.0
    # A 100 ms fan-out: at most LINGER_MAX.
    assert linger(9.9, 10.0, 2, 10.0) == pytest.approx(LINGER_MAX)
    # After a fan-out of one frame, or none yet: no wait.
    assert linger(9.9, 10.0, 1, 10.0) == 0.0
    assert linger(0.0, 0.0, 0, 5.0) == 0.0


def _slow(sub: Subscription, seconds: float) -> None:
    """Make every fan-out to ``sub`` take at least ``seconds``."""

    def relabel(frame: Frame) -> Frame:
        time.sleep(seconds)
        return frame

    sub.relabel = relabel


def test_only_frames_from_a_reader_wait_after_a_slow_fan_out() -> None:
    defer = HandDeferrer()
    broker = make_broker(defer)
    sub = start(broker, new_sub(broker, "c"))
    _slow(sub, 0.002)
    broker.send("c", Frame(b"data: 1\n\n"))
    broker.send("c", Frame(b"data: 1b\n\n"))
    defer.run()
    assert taken(sub) == b"data: 1\n\ndata: 1b\n\n"
    # Right after a fan-out of 2 ms or more: a reader's frame waits (at
    # most LINGER_MAX), a publisher's in this process does not.
    broker.send("c", Frame(b"data: 2\n\n"))
    defer.run()
    broker.registry.send("c", Frame(b"data: 3\n\n"))
    defer.run()
    first, reader, publisher = defer.delays
    assert first == 0.0
    assert 0.0 < reader <= LINGER_MAX
    assert publisher == 0.0
    assert taken(sub) == b"data: 2\n\ndata: 3\n\n"


def _open(app: t.Any, channel: str) -> tuple[t.Any, t.Iterator[bytes], Subscription]:
    """A stream of ``app`` (in this greenlet), its chunks after ``retry``,
    and its subscription."""
    response = app.test_client().get(f"/s?c={channel}", buffered=False)
    chunks = iter(response.response)
    assert next(chunks) == b"retry: 3000\n\n"
    conn = testing.connection(response)
    assert conn is not None
    [sub] = conn.subscriptions
    return response, chunks, sub


def test_frames_from_a_reader_wait_in_the_hub_and_leave_together() -> None:
    """With gevent's hub: after a slow fan-out of several frames, the next
    frames from a reader are not fanned out at the next turn of the loop
    but a little later, together."""
    app, _ = make_app()

    def run() -> tuple[bytes, tuple[Frame, ...], bytes, float]:
        response, chunks, sub = _open(app, "c")
        _slow(sub, 0.003)
        reader = testing.broker(app)
        reader.send("c", Frame(b"data: 1\n\n"))
        reader.send("c", Frame(b"data: 1b\n\n"))
        first = next(chunks)
        sent_at = time.monotonic()
        reader.send("c", Frame(b"data: 2\n\n"))
        reader.send("c", Frame(b"data: 3\n\n"))
        gevent.sleep(0)
        early = sub.queued
        later = next(chunks)
        waited = time.monotonic() - sent_at
        response.close()
        return first, early, later, waited

    first, early, later, waited = gevent.spawn(run).get(timeout=5)
    assert first == b"data: 1\n\ndata: 1b\n\n"
    assert early == ()
    assert later == b"data: 2\n\ndata: 3\n\n"
    # The fan-out took 3 ms or more: the frames waited for about 8 times
    # that, up to LINGER_MAX.
    assert 0.01 <= waited <= 1.0, waited


def test_frames_from_a_reader_after_a_single_frame_fan_out_do_not_wait() -> None:
    app, _ = make_app()

    def run() -> tuple[bytes, tuple[bytes, ...]]:
        response, chunks, sub = _open(app, "c")
        _slow(sub, 0.003)
        reader = testing.broker(app)
        reader.send("c", Frame(b"data: 1\n\n"))
        first = next(chunks)
        reader.send("c", Frame(b"data: 2\n\n"))
        gevent.sleep(0)
        queued = tuple(f.data for f in sub.queued)
        response.close()
        return first, queued

    assert gevent.spawn(run).get(timeout=5) == (b"data: 1\n\n", (b"data: 2\n\n",))
