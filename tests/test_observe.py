"""The observer: one call at each point a metric counts, in order."""

from __future__ import annotations

import typing as t

import pytest

from flask_eventstream.observe import Observer
from flask_eventstream.testing import broker
from flask_eventstream.testing import read_events
from tests.support.servers import make_app


class Recorder(Observer):
    def __init__(self) -> None:
        self.calls: list[tuple[t.Any, ...]] = []

    def stream_opened(self, connection_id: int, channels: tuple[str, ...]) -> None:
        self.calls.append(("opened", channels))

    def stream_ended(
        self, connection_id: int, channels: tuple[str, ...], reason: str
    ) -> None:
        self.calls.append(("ended", channels, reason))

    def published(self, channel: str, event: t.Any) -> None:
        self.calls.append(("published", channel, event.data))

    def publish_failed(self, channel: str, error: Exception) -> None:
        self.calls.append(("failed", channel, type(error).__name__))

    def delivered(self, channel: str, event: t.Any, subscribers: int) -> None:
        self.calls.append(("delivered", channel, event.data, subscribers))

    def resumed(self, channels: tuple[str, ...], result: str) -> None:
        self.calls.append(("resumed", channels, result))


def test_the_observer_sees_a_stream_and_its_events_in_order() -> None:
    app, stream = make_app()
    recorder = Recorder()
    broker(app).observer = recorder
    client = app.test_client()
    response = client.get("/s?c=a", buffered=False)
    with app.app_context():
        first = stream.publish("a", "one")
        stream.publish("b", "nobody")
        with pytest.raises(ValueError):
            stream.publish("bad channel", "x")
    [event] = read_events(response, 1)
    assert event.id == first.id
    resumed = client.get("/s?c=a", headers={"Last-Event-ID": "1-0"}, buffered=False)
    [reset] = read_events(resumed, 1)
    assert reset.event == "eventstream-reset"
    # In memory, delivery happens within publish().
    assert recorder.calls == [
        ("opened", ("a",)),
        ("delivered", "a", "one", 1),
        ("published", "a", "one"),
        ("delivered", "b", "nobody", 0),
        ("published", "b", "nobody"),
        ("failed", "bad channel", "ValueError"),
        ("ended", ("a",), "client"),
        ("resumed", ("a",), "unknown"),
        ("opened", ("a",)),
        ("ended", ("a",), "client"),
    ]
