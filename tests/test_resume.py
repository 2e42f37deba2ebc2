"""Resume with Last-Event-ID on the in-memory broker: exactly the missed
events, in order, once, then live events; eventstream-reset when that cannot
be done; hostile ids are treated as absent."""

from __future__ import annotations

import json
import threading
import time
import typing as t
import urllib.parse

import pytest
from flask import Flask

from flask_eventstream import Event
from flask_eventstream import EventStream
from flask_eventstream import eventstream
from flask_eventstream.broker import format_id
from flask_eventstream.broker import parse_id
from flask_eventstream.testing import parse
from flask_eventstream.testing import read_events
from flask_eventstream.testing import ReceivedEvent
from tests.support.servers import make_app
from tests.support.servers import rec


def reset(reason: str, last: str, newest: str) -> ReceivedEvent:
    return ReceivedEvent(
        "eventstream-reset",
        json.dumps({"reason": reason, "last_event_id": last}, separators=(",", ":")),
        newest,
    )


def with_id(event: ReceivedEvent, id: str) -> ReceivedEvent:
    return ReceivedEvent(event.event, event.data, id, event.retry)


def publish_many(
    ext: EventStream, channel: str, n: int, prefix: str = "e"
) -> list[Event]:
    return [ext.publish(channel, f"{prefix}{i}") for i in range(1, n + 1)]


# -- exact resume --


def test_last_event_id_header_gives_the_missed_events_then_live() -> None:
    app, ext = make_app()
    sent = publish_many(ext, "lobby", 5)
    response = app.test_client().get(
        "/s?c=lobby", headers={"Last-Event-ID": sent[1].id}, buffered=False
    )
    live = ext.publish("lobby", "live")
    end = ext.publish("lobby", "end")
    assert read_events(response, 5) == [rec(e) for e in sent[2:] + [live, end]]


def test_last_event_id_query_parameter() -> None:
    app, ext = make_app()
    sent = publish_many(ext, "lobby", 4)
    response = app.test_client().get(
        f"/s?c=lobby&lastEventId={sent[0].id}", buffered=False
    )
    end = ext.publish("lobby", "end")
    assert read_events(response, 4) == [rec(e) for e in sent[1:] + [end]]


def test_header_wins_over_query_parameter() -> None:
    app, ext = make_app()
    sent = publish_many(ext, "lobby", 4)
    response = app.test_client().get(
        f"/s?c=lobby&lastEventId={sent[0].id}",
        headers={"Last-Event-ID": sent[2].id},
        buffered=False,
    )
    end = ext.publish("lobby", "end")
    assert read_events(response, 2) == [rec(sent[3]), rec(end)]


def test_replay_is_sent_at_once_with_the_retry_field() -> None:
    app, ext = make_app(EVENTSTREAM_RETRY=100)
    sent = publish_many(ext, "lobby", 3)
    response = app.test_client().get(
        "/s?c=lobby", headers={"Last-Event-ID": sent[0].id}, buffered=False
    )
    try:
        first = next(iter(response.response))
    finally:
        response.close()
    assert first.startswith(b"retry: 100\n\n")
    assert parse(first) == [rec(sent[1]), rec(sent[2])]


def test_resume_from_the_newest_id_replays_nothing() -> None:
    app, ext = make_app()
    sent = publish_many(ext, "lobby", 3)
    response = app.test_client().get(
        "/s?c=lobby", headers={"Last-Event-ID": sent[-1].id}, buffered=False
    )
    live = ext.publish("lobby", "live")
    assert read_events(response, 1) == [rec(live)]


def test_resume_on_a_channel_without_history_is_live_only() -> None:
    app, ext = make_app()
    other = publish_many(ext, "other", 2)
    response = app.test_client().get(
        "/s?c=quiet", headers={"Last-Event-ID": other[0].id}, buffered=False
    )
    live = ext.publish("quiet", "live")
    assert read_events(response, 1) == [rec(live)]


def test_multi_channel_resume_merges_in_publish_order() -> None:
    app, ext = make_app()
    a1 = ext.publish("a", "a1")
    b1 = ext.publish("b", "b1")
    a2 = ext.publish("a", "a2")
    ext.publish("c", "c1")
    b2 = ext.publish("b", "b2")
    a3 = ext.publish("a", "a3")
    response = app.test_client().get(
        "/s?c=a&c=b", headers={"Last-Event-ID": a1.id}, buffered=False
    )
    live_b = ext.publish("b", "live b")
    ext.publish("c", "not subscribed")
    live_a = ext.publish("a", "live a")
    assert read_events(response, 6) == [
        rec(e) for e in (b1, a2, b2, a3, live_b, live_a)
    ]
    assert b1.id is not None


def test_multi_channel_resume_from_an_id_of_the_other_channel() -> None:
    app, ext = make_app()
    a1 = ext.publish("a", "a1")
    b1 = ext.publish("b", "b1")
    a2 = ext.publish("a", "a2")
    b2 = ext.publish("b", "b2")
    response = app.test_client().get(
        "/s?c=b&c=a", headers={"Last-Event-ID": b1.id}, buffered=False
    )
    end = ext.publish("a", "end")
    assert read_events(response, 3) == [rec(a2), rec(b2), rec(end)]
    assert a1.id is not None


def test_resume_is_exact_while_events_are_published_concurrently() -> None:
    app, ext = make_app()
    sent: list[Event] = []
    started = threading.Event()

    def publisher() -> None:
        for i in range(200):
            sent.append(ext.publish("busy", i))
            if i == 20:
                started.set()
            time.sleep(0.0005)

    thread = threading.Thread(target=publisher)
    thread.start()
    try:
        assert started.wait(10)
        resume_from = sent[10]
        response = app.test_client().get(
            "/s?c=busy", headers={"Last-Event-ID": resume_from.id}, buffered=False
        )
        events = read_events(response, 189, timeout=20)
    finally:
        thread.join(20)
    assert [e.data for e in events] == [str(i) for i in range(11, 200)]
    assert [e.id for e in events] == [e.id for e in sent[11:]]


# -- reset --


def test_id_older_than_history_gets_a_reset_then_retained_events_then_live() -> None:
    app, ext = make_app(EVENTSTREAM_HISTORY=3)
    sent = publish_many(ext, "lobby", 6)
    response = app.test_client().get(
        "/s?c=lobby", headers={"Last-Event-ID": sent[0].id}, buffered=False
    )
    live = ext.publish("lobby", "live")
    events = read_events(response, 5)
    assert events == [
        reset("expired", t.cast(str, sent[0].id), t.cast(str, sent[-1].id)),
        rec(sent[3]),
        rec(sent[4]),
        rec(sent[5]),
        rec(live),
    ]


def test_id_of_the_newest_dropped_event_resumes_exactly() -> None:
    # e1..e3 fell out of a history of 3; a client that saw e3 lost nothing.
    app, ext = make_app(EVENTSTREAM_HISTORY=3)
    sent = publish_many(ext, "lobby", 6)
    response = app.test_client().get(
        "/s?c=lobby", headers={"Last-Event-ID": sent[2].id}, buffered=False
    )
    end = ext.publish("lobby", "end")
    assert read_events(response, 4) == [rec(e) for e in sent[3:] + [end]]


def test_id_one_before_the_newest_dropped_event_gets_a_reset() -> None:
    app, ext = make_app(EVENTSTREAM_HISTORY=3)
    sent = publish_many(ext, "lobby", 6)
    response = app.test_client().get(
        "/s?c=lobby", headers={"Last-Event-ID": sent[1].id}, buffered=False
    )
    events = read_events(response, 4)
    assert events == [
        reset("expired", t.cast(str, sent[1].id), t.cast(str, sent[-1].id)),
        *[rec(e) for e in sent[3:]],
    ]


def test_expired_on_one_of_several_channels_resets_once() -> None:
    app, ext = make_app(EVENTSTREAM_HISTORY=2)
    a1 = ext.publish("a", "a1")
    a2 = ext.publish("a", "a2")
    b1 = ext.publish("b", "b1")
    a3 = ext.publish("a", "a3")
    a4 = ext.publish("a", "a4")
    response = app.test_client().get(
        "/s?c=a&c=b", headers={"Last-Event-ID": a1.id}, buffered=False
    )
    end = ext.publish("b", "end")
    events = read_events(response, 5)
    assert events == [
        reset("expired", t.cast(str, a1.id), t.cast(str, a4.id)),
        rec(b1),
        rec(a3),
        rec(a4),
        rec(end),
    ]
    assert a2.id is not None


def test_no_history_at_all_gets_a_reset() -> None:
    app, ext = make_app(EVENTSTREAM_HISTORY=0)
    sent = publish_many(ext, "lobby", 2)
    response = app.test_client().get(
        "/s?c=lobby", headers={"Last-Event-ID": sent[0].id}, buffered=False
    )
    live = ext.publish("lobby", "live")
    assert read_events(response, 2) == [
        reset("expired", t.cast(str, sent[0].id), t.cast(str, sent[1].id)),
        rec(live),
    ]


def test_id_from_the_future_gets_a_reset_then_live() -> None:
    app, ext = make_app()
    sent = publish_many(ext, "lobby", 2)
    future = "99999999999999-0"
    response = app.test_client().get(
        "/s?c=lobby", headers={"Last-Event-ID": future}, buffered=False
    )
    live = ext.publish("lobby", "live")
    assert read_events(response, 2) == [
        reset("unknown", future, t.cast(str, sent[-1].id)),
        rec(live),
    ]


def test_id_from_before_the_broker_started_gets_a_reset_then_everything() -> None:
    # The server restarted: the in-memory ids of the old process are unknown.
    app, ext = make_app()
    sent = publish_many(ext, "lobby", 3)
    old = "1000-5"
    response = app.test_client().get(
        "/s?c=lobby", headers={"Last-Event-ID": old}, buffered=False
    )
    live = ext.publish("lobby", "live")
    assert read_events(response, 5) == [
        reset("unknown", old, t.cast(str, sent[-1].id)),
        *[rec(e) for e in sent],
        rec(live),
    ]


def test_reset_id_is_a_valid_resume_point() -> None:
    # A client that reconnects with the reset's id misses nothing after it.
    app, ext = make_app()
    publish_many(ext, "lobby", 2)
    client = app.test_client()
    response = client.get(
        "/s?c=lobby", headers={"Last-Event-ID": "1-0"}, buffered=False
    )
    [got_reset] = read_events(response, 1)
    assert got_reset.event == "eventstream-reset"
    later = ext.publish("lobby", "later")
    response = client.get(
        "/s?c=lobby", headers={"Last-Event-ID": got_reset.id}, buffered=False
    )
    end = ext.publish("lobby", "end")
    assert read_events(response, 2) == [rec(later), rec(end)]


def test_reset_before_any_event_was_published() -> None:
    app, ext = make_app()
    response = app.test_client().get(
        "/s?c=lobby", headers={"Last-Event-ID": "1-0"}, buffered=False
    )
    live = ext.publish("lobby", "live")
    [first, second] = read_events(response, 2)
    assert first.event == "eventstream-reset"
    assert json.loads(first.data) == {"reason": "unknown", "last_event_id": "1-0"}
    assert parse_id(first.id) is not None
    assert parse_id(first.id) < parse_id(live.id)  # type: ignore[operator]
    assert second == rec(live)


# -- hostile Last-Event-ID: treated as absent, never a 500 --

HOSTILE_HEADERS = [
    "garbage",
    "x" * 10_000,
    "1" * 41,
    "-1-0",
    "1-",
    "-0",
    "1-2-3",
    "1.5-0",
    "0x10-0",
    "1e3-0",
    "1234567890123456-0",
    "1-12345678901234567890",
    "\u00e9\u00e8",
    "1-0\x00",
    "1-0\t;",
    "' OR 1=1 --",
    "%0d%0a",
    " ",
]

HOSTILE_QUERIES = [
    "1-0\r\n",
    "1-0\n",
    "\r\n1-0",
    "1-0\rdata: x",
    "\u0661-\u0661",
    "\uff11-\uff10",
    "\U0001f600",
    "1-0\x00",
    "x" * 10_000,
    "1-0\u2028",
]


def _absent(app: Flask, ext: EventStream, **kwargs: t.Any) -> None:
    response = app.test_client().get(buffered=False, **kwargs)
    assert response.status_code == 200, kwargs
    live = ext.publish("lobby", "live")
    assert read_events(response, 1) == [rec(live)], kwargs


def test_hostile_last_event_id_header_is_treated_as_absent() -> None:
    app, ext = make_app()
    publish_many(ext, "lobby", 3)
    for value in HOSTILE_HEADERS:
        _absent(app, ext, path="/s?c=lobby", headers={"Last-Event-ID": value})


def test_hostile_last_event_id_query_is_treated_as_absent() -> None:
    app, ext = make_app()
    publish_many(ext, "lobby", 3)
    for value in HOSTILE_QUERIES:
        query = urllib.parse.urlencode({"c": "lobby", "lastEventId": value})
        _absent(app, ext, path=f"/s?{query}")


def test_empty_header_falls_back_to_the_query_parameter() -> None:
    app, ext = make_app()
    sent = publish_many(ext, "lobby", 3)
    response = app.test_client().get(
        f"/s?c=lobby&lastEventId={sent[1].id}",
        headers={"Last-Event-ID": ""},
        buffered=False,
    )
    assert read_events(response, 1) == [rec(sent[2])]


@pytest.mark.parametrize(
    ("value", "key"),
    [
        ("0-0", (0, 0)),
        ("1700000000000-3", (1700000000000, 3)),
        ("999999999999999-9999999999999999999", (999999999999999, 9999999999999999999)),
        (None, None),
        ("", None),
        ("1-0\n", None),
        ("\n1-0", None),
        ("\u0661-\u0661", None),
    ],
)
def test_parse_id(value: str | None, key: tuple[int, int] | None) -> None:
    assert parse_id(value) == key
    if key is not None:
        assert format_id(key) == value


def test_parse_id_drops_only_header_whitespace() -> None:
    assert parse_id(" 12-3\t") == (12, 3)
    assert parse_id("12-3\r") is None
    assert parse_id("12-3\u00a0") is None


def test_subscribe_with_an_explicit_last_event_id() -> None:
    app, ext = make_app()
    sent = publish_many(ext, "lobby", 3)
    with app.app_context():
        sub = ext.subscribe("lobby", last_event_id=sent[0].id)
        try:
            frame = sub.drain()
        finally:
            sub.close()
    assert frame is not None
    assert parse(frame.data) == [rec(sent[1]), rec(sent[2])]


def test_explicit_last_event_id_none_ignores_the_request() -> None:
    app = Flask(__name__)
    ext = EventStream(app)

    @app.get("/fresh")
    @eventstream
    def fresh() -> t.Any:
        return ext.subscribe("lobby", last_event_id=None)

    sent = publish_many(ext, "lobby", 2)
    response = app.test_client().get(
        "/fresh", headers={"Last-Event-ID": sent[0].id}, buffered=False
    )
    live = ext.publish("lobby", "live")
    assert read_events(response, 1) == [rec(live)]
