"""The deferred fan-out of a broker: frames published until the publisher
yields go to each subscriber together, each exactly once, and a subscription
that joins meanwhile gets none of them from the fan-out (its replay has
them). Driven by a deferrer whose scheduled fan-outs the test runs by hand."""

from __future__ import annotations

import threading
import typing as t

from flask_eventstream.backends.memory import MemoryBackend
from flask_eventstream.broker import Broker
from flask_eventstream.broker import Frame
from flask_eventstream.broker import Sink
from flask_eventstream.broker import Subscription
from flask_eventstream.sse import Event


class HandDeferrer:
    """Schedules fan-outs in a list; :meth:`run` runs them, as a hub would
    once the publisher yields."""

    def __init__(self) -> None:
        self.scheduled: list[t.Callable[[], None]] = []

    def ident(self) -> int:
        return threading.get_ident()

    def __call__(self, func: t.Callable[[], None]) -> bool:
        self.scheduled.append(func)
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
