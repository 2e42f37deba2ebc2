"""Receivers of the public signals may call the library: a receiver that
publishes runs under no lock of the library, on the in-memory and the Redis
backend, and the event it publishes arrives."""

from __future__ import annotations

import time
import typing as t

import pytest
from flask import Flask

from flask_eventstream import EventStream
from flask_eventstream import signals
from flask_eventstream.testing import read_events
from tests.support.redis import close_app
from tests.support.servers import make_app

BACKENDS = ["memory", pytest.param("redis", marks=pytest.mark.redis)]


@pytest.fixture(params=BACKENDS)
def app(request: pytest.FixtureRequest) -> t.Iterator[Flask]:
    config: dict[str, t.Any] = {}
    if request.param == "redis":
        url = request.getfixturevalue("redis_server").url
        config["EVENTSTREAM_REDIS_URL"] = url
    app, _ = make_app(**config)
    yield app
    close_app(app)


def ext(app: Flask) -> EventStream:
    return t.cast(EventStream, app.extensions["eventstream"])


def wait_subscribed(app: Flask, channel: str, count: int = 1) -> None:
    """Until ``count`` streams of ``channel`` take live events (on Redis the
    reader registers them between two reads)."""
    deadline = time.monotonic() + 5
    with app.app_context():
        while ext(app).stats()["channels"].get(channel, 0) < count:
            assert time.monotonic() < deadline, ext(app).stats()
            time.sleep(0.005)


def pairs(events: t.Iterable[t.Any]) -> list[tuple[str, str]]:
    return [(e.event, e.data) for e in events]


@pytest.mark.timeout(30)
def test_an_event_published_receiver_may_publish(app: Flask) -> None:
    def audit(sender: Flask, channel: str, event: t.Any) -> None:
        if channel == "orders":
            ext(sender).publish("audit", f"seen {event.id}", event="audit")

    response = app.test_client().get("/s?c=orders&c=audit", buffered=False)
    wait_subscribed(app, "audit")
    with signals.event_published.connected_to(audit, sender=app):
        with app.app_context():
            sent = ext(app).publish("orders", "one")
        events = read_events(response, 2)
    assert pairs(events) == [("message", "one"), ("audit", f"seen {sent.id}")]
    assert events[0].id == sent.id


@pytest.mark.timeout(30)
def test_a_client_connected_receiver_may_publish(app: Flask) -> None:
    def announce(sender: Flask, channels: tuple[str, ...], **kwargs: t.Any) -> None:
        ext(sender).publish("presence", "joined " + ",".join(channels))

    client = app.test_client()
    watcher = client.get("/s?c=presence", buffered=False)
    wait_subscribed(app, "presence")
    with signals.client_connected.connected_to(announce, sender=app):
        joiner = client.get("/s?c=room", buffered=False)
        first = next(iter(joiner.response))  # the stream starts
    joiner.close()
    assert first.startswith(b"retry:")
    assert pairs(read_events(watcher, 1)) == [("message", "joined room")]


@pytest.mark.timeout(30)
def test_a_client_disconnected_receiver_may_publish(app: Flask) -> None:
    def announce(
        sender: Flask, channels: tuple[str, ...], reason: str, **kwargs: t.Any
    ) -> None:
        ext(sender).publish("presence", f"left {','.join(channels)} ({reason})")

    client = app.test_client()
    watcher = client.get("/s?c=presence", buffered=False)
    wait_subscribed(app, "presence")
    joiner = client.get("/s?c=room", buffered=False)
    next(iter(joiner.response))  # the stream starts
    with signals.client_disconnected.connected_to(announce, sender=app):
        joiner.close()
    assert pairs(read_events(watcher, 1)) == [("message", "left room (client)")]
