"""Events without data through both backends: a comment-only block is sent,
stored and replayed without a ``data:`` line, so browsers dispatch nothing
for it; empty data and an event type without data stay events."""

from __future__ import annotations

import typing as t

import pytest
from flask import Flask

from flask_eventstream import Event
from flask_eventstream.testing import EventParser
from flask_eventstream.testing import parse
from flask_eventstream.testing import ReceivedEvent
from tests.support.redis import RedisServer


def read_raw(response: t.Any, blocks: int) -> bytes:
    """The first ``blocks`` blocks of a streaming test-client response."""
    raw = b""
    for chunk in response.response:
        raw += chunk
        if raw.count(b"\n\n") >= blocks:
            break
    response.close()
    return raw


def publish(app: Flask) -> list[Event]:
    """Publish an event, then a comment-only block, an event type without
    data and empty data."""
    stream = app.extensions["eventstream"]
    with app.app_context():
        return [
            stream.publish("quiet", "first"),
            stream.publish("quiet", Event(comment="note")),
            stream.publish("quiet", Event(event="ping")),
            stream.publish("quiet", ""),
        ]


def check_live_and_replayed(app: Flask) -> None:
    client = app.test_client()
    live = client.get("/stream/quiet", buffered=False)
    first, note, ping, empty = publish(app)
    raw = read_raw(live, 5)
    expected = (
        f": note\nid: {note.id}\n\n"
        f"event: ping\nid: {ping.id}\ndata: \n\n"
        f"id: {empty.id}\ndata: \n\n"
    ).encode()
    assert raw == (
        b"retry: 3000\n\n" + f"id: {first.id}\ndata: first\n\n".encode() + expected
    )
    assert note.text is None
    resumed = client.get(
        "/stream/quiet",
        headers={"Last-Event-ID": t.cast(str, first.id)},
        buffered=False,
    )
    replayed = read_raw(resumed, 4)
    assert replayed == b"retry: 3000\n\n" + expected
    # What a browser makes of it: no event for the note, whose id becomes
    # the last event id all the same.
    parser = EventParser()
    assert parser.feed(replayed[: replayed.index(b"event: ping")]) == []
    assert parser.last_event_id == note.id
    assert parse(replayed) == [
        ReceivedEvent("ping", "", t.cast(str, ping.id)),
        ReceivedEvent("message", "", t.cast(str, empty.id)),
    ]


def test_comment_only_event_in_memory() -> None:
    from example_app import create_app

    check_live_and_replayed(create_app({}))


@pytest.mark.redis
def test_comment_only_event_through_redis(
    redis_app: t.Callable[..., Flask], redis_server: RedisServer
) -> None:
    check_live_and_replayed(redis_app())
    entries = redis_server.client().xrange("eventstream:quiet")
    # The comment-only entry has no data field; the others have one.
    assert [b"d" in fields for _, fields in entries] == [True, False, True, True]
