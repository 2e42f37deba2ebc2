"""Limits and bad clients with Flask's test client: queue cut-off, connection
cap, event size, stream lifetime, and the example app's bad inputs."""

from __future__ import annotations

import logging
import time
import typing as t

import pytest
from flask import Flask

from example_app import create_app
from flask_eventstream import Event
from flask_eventstream import eventstream
from flask_eventstream import signals
from flask_eventstream.sse import EventParser
from flask_eventstream.testing import connection
from flask_eventstream.testing import read_events
from flask_eventstream.testing import ReceivedEvent
from tests.support.servers import make_app
from tests.support.servers import rec


class Reader:
    """Reads a test-client stream chunk by chunk (only when a chunk is due)."""

    def __init__(self, response: t.Any) -> None:
        self.response = response
        self.chunks = iter(response.response)
        self.parser = EventParser()
        self.events: list[ReceivedEvent] = []

    def step(self) -> list[ReceivedEvent]:
        new = self.parser.feed(next(self.chunks))
        self.events.extend(new)
        return new

    def rest(self) -> list[bytes]:
        """Everything until the stream ends (it must end by itself)."""
        chunks = list(self.chunks)
        for chunk in chunks:
            self.events.extend(self.parser.feed(chunk))
        self.response.close()
        return chunks


# -- EVENTSTREAM_QUEUE_SIZE --


def test_a_subscriber_that_falls_behind_is_cut_off_and_resumes_from_history(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, ext = make_app(EVENTSTREAM_QUEUE_SIZE=5, EVENTSTREAM_RETRY=0)
    client = app.test_client()
    reasons: list[str] = []

    def on_disconnect(sender: t.Any, **kwargs: t.Any) -> None:
        reasons.append(kwargs["reason"])

    with signals.client_disconnected.connected_to(on_disconnect, sender=app):
        slow = Reader(client.get("/s?c=feed", buffered=False))
        fast = Reader(client.get("/s?c=feed", buffered=False))
        assert slow.step() == [] and fast.step() == []  # the retry field
        sent: list[Event] = []
        # both read the first two events
        for i in range(2):
            sent.append(ext.publish("feed", i))
            assert slow.step() == [rec(sent[-1])]
            assert fast.step() == [rec(sent[-1])]
        # then the slow one stops reading; the fast one keeps up
        for i in range(2, 30):
            sent.append(ext.publish("feed", i))
            assert fast.step() == [rec(sent[-1])]
        sub = connection(slow.response).subscriptions[0]  # type: ignore[union-attr]
        assert sub.overflowed
        # nothing is kept for it: memory stays bounded
        assert len(sub.queued) == 0
        with caplog.at_level(logging.WARNING, logger="flask_eventstream"):
            # its stream ends without sending anything more (no event after a gap)
            assert slow.rest() == []
        assert "fell more than 5 events behind" in caplog.text
        assert reasons == ["overflow"]
        # the other subscriber is unaffected
        assert fast.events == [rec(e) for e in sent]
        assert ext.stats()["channels"] == {"feed": 1}
        fast.response.close()

    # the slow client reconnects with the last id it got and loses nothing
    response = client.get(
        "/s?c=feed", headers={"Last-Event-ID": slow.events[-1].id}, buffered=False
    )
    live = ext.publish("feed", "live")
    assert read_events(response, 29) == [rec(e) for e in sent[2:] + [live]]


def test_overflow_clears_the_queue_and_keeps_it_empty() -> None:
    app, ext = make_app(EVENTSTREAM_QUEUE_SIZE=3)
    response = app.test_client().get("/s?c=q", buffered=False)
    sub = connection(response).subscriptions[0]  # type: ignore[union-attr]
    for i in range(3):
        ext.publish("q", i)
    assert len(sub.queued) == 3 and not sub.overflowed
    ext.publish("q", "one too many")
    assert sub.overflowed and len(sub.queued) == 0
    for i in range(100):
        ext.publish("q", i)
    assert len(sub.queued) == 0
    response.close()


# -- EVENTSTREAM_MAX_CONNECTIONS --


def test_max_connections_gives_503_with_retry_after() -> None:
    app, ext = make_app(EVENTSTREAM_MAX_CONNECTIONS=2, EVENTSTREAM_RETRY=4500)
    client = app.test_client()
    r1 = client.get("/s?c=a", buffered=False)
    r2 = client.get("/s?c=a", buffered=False)
    assert (r1.status_code, r2.status_code) == (200, 200)
    refused = client.get("/s?c=a", buffered=False)
    assert refused.status_code == 503
    assert refused.headers["Retry-After"] == "5"
    assert refused.mimetype != "text/event-stream"
    assert b"retry:" not in refused.get_data()
    assert ext.stats() == {"connections": 2, "channels": {"a": 2}}
    r2.close()
    r3 = client.get("/s?c=a", buffered=False)
    assert r3.status_code == 200
    r3.close()
    r1.close()
    assert ext.stats() == {"connections": 0, "channels": {}}


def test_retry_after_is_at_least_one_second() -> None:
    app, _ = make_app(EVENTSTREAM_MAX_CONNECTIONS=1, EVENTSTREAM_RETRY=0)
    client = app.test_client()
    first = client.get("/s?c=a", buffered=False)
    refused = client.get("/s?c=a", buffered=False)
    assert (refused.status_code, refused.headers["Retry-After"]) == (503, "1")
    first.close()


# -- EVENTSTREAM_MAX_EVENT_SIZE --


def test_max_event_size_is_a_value_error_from_publish() -> None:
    app, ext = make_app(EVENTSTREAM_MAX_EVENT_SIZE=100)
    response = app.test_client().get("/s?c=big", buffered=False)
    small = ext.publish("big", "x" * 50)
    with pytest.raises(ValueError, match="EVENTSTREAM_MAX_EVENT_SIZE") as info:
        ext.publish("big", "x" * 101)
    assert "(100)" in str(info.value)
    # multi-line data counts its framing too
    with pytest.raises(ValueError, match="EVENTSTREAM_MAX_EVENT_SIZE"):
        ext.publish("big", "\n" * 20)
    end = ext.publish("big", "end")
    assert read_events(response, 2) == [rec(small), rec(end)]


def test_max_event_size_boundary() -> None:
    app, ext = make_app(EVENTSTREAM_MAX_EVENT_SIZE=64)
    with app.app_context():
        probe = ext.publish("b", "")
        # an event of exactly the maximum passes; one byte more does not
        overhead = len(f"id: {probe.id}\ndata: \n\n")
        room = 64 - overhead - 2  # the id may grow by a digit or two
        ext.publish("b", "y" * room)
        with pytest.raises(ValueError, match="EVENTSTREAM_MAX_EVENT_SIZE"):
            ext.publish("b", "y" * (64 - overhead + 1))


def test_oversized_event_yielded_by_a_view_ends_its_stream(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, _ = make_app(EVENTSTREAM_MAX_EVENT_SIZE=50)

    @app.get("/big")
    @eventstream
    def big() -> t.Iterator[str]:
        yield "small"
        yield "z" * 100
        yield "never"

    response = app.test_client().get("/big", buffered=False)
    with caplog.at_level(logging.ERROR, logger="flask_eventstream"):
        reader = Reader(response)
        reader.rest()
    assert [e.data for e in reader.events] == ["small"]
    assert "EVENTSTREAM_MAX_EVENT_SIZE" in caplog.text


# -- EVENTSTREAM_MAX_LIFETIME --


@pytest.mark.parametrize("lifetime", [0.3, 1])
def test_max_lifetime_ends_a_subscription_and_the_client_resumes(
    lifetime: float,
) -> None:
    app, ext = make_app(EVENTSTREAM_MAX_LIFETIME=lifetime, EVENTSTREAM_HEARTBEAT=0.05)
    client = app.test_client()
    reasons: list[str] = []

    def on_disconnect(sender: t.Any, **kwargs: t.Any) -> None:
        reasons.append(kwargs["reason"])

    with signals.client_disconnected.connected_to(on_disconnect, sender=app):
        start = time.monotonic()
        reader = Reader(client.get("/s?c=l", buffered=False))
        first = ext.publish("l", "first")
        reader.rest()
        elapsed = time.monotonic() - start
    assert reader.events == [rec(first)]
    assert reasons == ["lifetime"]
    assert lifetime * 0.9 - 0.02 <= elapsed <= lifetime * 1.1 + 0.25
    # published while the client was away: it resumes without loss
    missed = [ext.publish("l", f"missed {i}") for i in range(3)]
    response = client.get(
        "/s?c=l", headers={"Last-Event-ID": reader.parser.last_event_id}, buffered=False
    )
    live = ext.publish("l", "live")
    assert read_events(response, 4) == [rec(e) for e in missed + [live]]


def test_max_lifetime_ends_a_generator_view_that_sleeps() -> None:
    app, ext = make_app(EVENTSTREAM_MAX_LIFETIME=0.3)
    finished: list[bool] = []

    @app.get("/count")
    @eventstream
    def count() -> t.Iterator[int]:
        try:
            n = 0
            while True:
                n += 1
                yield n
                ext.sleep(10)
        finally:
            finished.append(True)

    start = time.monotonic()
    reader = Reader(app.test_client().get("/count", buffered=False))
    reader.rest()
    elapsed = time.monotonic() - start
    assert [e.data for e in reader.events] == ["1"]
    assert finished == [True]
    assert 0.25 <= elapsed <= 0.33 + 0.25


def test_max_lifetime_ends_a_periodic_view() -> None:
    app, _ = make_app(EVENTSTREAM_MAX_LIFETIME=0.3)

    @app.get("/tick")
    @eventstream(interval=0.1)
    def tick() -> str:
        return "tick"

    start = time.monotonic()
    reader = Reader(app.test_client().get("/tick", buffered=False))
    reader.rest()
    elapsed = time.monotonic() - start
    assert 2 <= len(reader.events) <= 4
    assert all(e.data == "tick" for e in reader.events)
    assert 0.25 <= elapsed <= 0.33 + 0.25


def test_max_lifetime_has_jitter_within_ten_percent() -> None:
    app, _ = make_app(EVENTSTREAM_MAX_LIFETIME=100)
    client = app.test_client()
    spans = []
    for _ in range(20):
        start = time.monotonic()
        response = client.get("/s?c=j", buffered=False)
        conn = connection(response)
        assert conn is not None and conn.timing.deadline is not None
        spans.append(conn.timing.deadline - start)
        response.close()
    assert all(90 - 0.5 <= span <= 110 for span in spans)
    assert max(spans) - min(spans) > 1  # not all the same


# -- the example app's bad inputs --


@pytest.fixture
def example() -> Flask:
    return create_app(
        {
            "EXAMPLE_PRIVATE_TOKEN": "s3cret",
            "EVENTSTREAM_MAX_EVENT_SIZE": 200,
            "EVENTSTREAM_HEARTBEAT": 5,
        }
    )


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ({"data": "x", "event": "a\nb"}, "event"),
        ({"data": "x", "event": "a\rb"}, "event"),
        ({"data": "x", "event": "a\r\nevent: forged"}, "event"),
        ({"data": "x", "event": "a\0b"}, "event"),
        ({"data": "x", "event": 12}, "event"),
        ({"data": "x" * 500}, "EVENTSTREAM_MAX_EVENT_SIZE"),
        ({"event": "no data"}, "data"),
        ([1, 2], "data"),
        ("just a string", "data"),
        (None, "data"),
    ],
)
def test_example_publish_bad_body_is_400_json(
    example: Flask, body: t.Any, match: str
) -> None:
    client = example.test_client()
    stream_response = client.get("/stream/lobby", buffered=False)
    response = client.post("/publish/lobby", json=body)
    assert response.status_code == 400
    assert response.is_json
    assert match in response.get_json()["error"]
    sent = client.post("/publish/lobby", json={"data": "ok"})
    assert sent.status_code == 202
    # nothing of the bad request reached the subscriber
    [event] = read_events(stream_response, 1)
    assert (event.data, event.id) == ("ok", sent.get_json()["id"])


@pytest.mark.parametrize(
    ("data", "content_type"),
    [
        (b"{not json", "application/json"),
        (b"", "application/json"),
        (b'{"data": 1', "application/json"),
        (b'{"data": "x"}', "text/plain"),
        (b"\xff\xfe", "application/json"),
    ],
)
def test_example_publish_malformed_body_is_400_json(
    example: Flask, data: bytes, content_type: str
) -> None:
    response = example.test_client().post(
        "/publish/lobby", data=data, content_type=content_type
    )
    assert response.status_code == 400
    assert "error" in response.get_json()


@pytest.mark.parametrize(
    "channel", ["bad%20channel", "x" * 129, "caf%C3%A9", "a%0Ab", "a;b", "%00"]
)
def test_example_bad_channel_is_400(example: Flask, channel: str) -> None:
    client = example.test_client()
    response = client.post(f"/publish/{channel}", json={"data": 1})
    assert response.status_code == 400
    assert "channel" in response.get_json()["error"].lower()
    response = client.get(f"/stream/{channel}", buffered=False)
    assert response.status_code in (400, 404)
    assert b"retry:" not in response.get_data()


def test_example_publish_returns_202_with_channel_and_id(example: Flask) -> None:
    client = example.test_client()
    stream_response = client.get("/stream/news", buffered=False)
    response = client.post("/publish/news", json={"data": {"a": 1}, "event": "post"})
    assert response.status_code == 202
    body = response.get_json()
    assert body["channel"] == "news"
    assert read_events(stream_response, 1) == [
        ReceivedEvent("post", '{"a":1}', body["id"])
    ]


@pytest.mark.parametrize(
    ("query", "headers"),
    [
        ("", {}),
        ("?token=wrong", {}),
        ("?token=", {}),
        ("", {"Authorization": "Bearer wrong"}),
        ("", {"Authorization": "Basic s3cret"}),
        ("", {"Authorization": "bearer"}),
    ],
)
def test_example_private_channel_without_token_is_403_before_any_byte(
    example: Flask, query: str, headers: dict[str, str]
) -> None:
    response = example.test_client().get(
        f"/stream/private-room{query}", headers=headers, buffered=False
    )
    assert response.status_code == 403
    assert response.mimetype != "text/event-stream"
    assert b"retry:" not in response.get_data()
    with example.app_context():
        assert example.extensions["eventstream"].stats()["connections"] == 0


@pytest.mark.parametrize(
    ("query", "headers"),
    [("?token=s3cret", {}), ("", {"Authorization": "Bearer s3cret"})],
)
def test_example_private_channel_with_token_streams(
    example: Flask, query: str, headers: dict[str, str]
) -> None:
    client = example.test_client()
    response = client.get(
        f"/stream/private-room{query}", headers=headers, buffered=False
    )
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    sent = client.post("/publish/private-room", json={"data": "secret"})
    assert read_events(response, 1) == [
        ReceivedEvent("message", "secret", sent.get_json()["id"])
    ]


def test_example_private_channel_without_configured_token_is_403() -> None:
    app = create_app({"EXAMPLE_PRIVATE_TOKEN": None})
    client = app.test_client()
    for query in ("", "?token=", "?token=None"):
        response = client.get(f"/stream/private-x{query}", buffered=False)
        assert response.status_code == 403


def test_example_healthz_reports_stats(example: Flask) -> None:
    client = example.test_client()
    response = client.get("/stream/lobby", buffered=False)
    assert client.get("/healthz").get_json() == {
        "connections": 1,
        "channels": {"lobby": 1},
    }
    response.close()
    assert client.get("/healthz").get_json() == {"connections": 0, "channels": {}}
