"""The Redis backend when Redis goes away: publishing fails loudly after a
bounded retry, open streams stay open, and when Redis is back the readers
continue where they were, with nothing that Redis accepted lost or sent
twice."""

from __future__ import annotations

import json
import threading
import time
import typing as t

import pytest
from flask import Flask

from flask_eventstream import PublishError
from flask_eventstream.testing import EventParser
from flask_eventstream.testing import read_events
from tests.support.redis import ids_of
from tests.support.redis import Publisher
from tests.support.redis import RedisServer
from tests.support.redis import stream_entries
from tests.support.servers import open_clients
from tests.support.servers import pump
from tests.support.servers import Server

pytestmark = [pytest.mark.redis]

MakeApp = t.Callable[..., Flask]
HEARTBEAT = b":\n\n"


def post(client: t.Any, channel: str, data: t.Any) -> str:
    response = client.post(f"/publish/{channel}", json={"data": data})
    assert response.status_code == 202, response.get_data(as_text=True)
    return str(response.get_json()["id"])


# -- publishing --


def test_publish_error_after_bounded_retry(
    redis_app: MakeApp, redis_server: RedisServer
):
    app = redis_app()
    stream = app.extensions["eventstream"]
    with app.app_context():
        stream.publish("p", "before")
        redis_server.stop()
        for _ in range(2):
            start = time.monotonic()
            with pytest.raises(PublishError) as info:
                stream.publish("p", "lost")
            assert 0.5 < time.monotonic() - start < 2.0
            assert "unreachable" in str(info.value) and "127.0.0.1" in str(info.value)
        redis_server.start()
        after = stream.publish("p", "after")
    assert [d for _, d in stream_entries(redis_server, "p")] == ["after"]
    assert after.id is not None


def test_publish_retries_through_a_short_outage(
    redis_app: MakeApp, redis_server_aof: RedisServer
):
    server = redis_server_aof
    app = redis_app(server=server)
    stream = app.extensions["eventstream"]
    with app.app_context():
        stream.publish("r", "before")
    # Redis is stopped (its pooled connections die) and back within the
    # retry window: publish() succeeds without an error, once.
    server.stop()
    restart = threading.Timer(0.1, server.start)
    restart.start()
    try:
        with app.app_context():
            event = stream.publish("r", "during")
    finally:
        restart.join(15)
    assert stream_entries(server, "r")[1:] == [(event.id, "during")]


def test_publishing_across_a_restart_adds_nothing_twice(
    redis_app: MakeApp, redis_server_aof: RedisServer
):
    server = redis_server_aof
    app = redis_app(server=server)
    stream = app.extensions["eventstream"]
    client = app.test_client()
    response = client.get("/stream/x", buffered=False)
    accepted: list[tuple[str, str]] = []
    refused: list[str] = []
    done = threading.Event()

    def publish() -> None:
        n = 0
        with app.app_context():
            while not done.is_set():
                data = f"x{n}"
                n += 1
                try:
                    accepted.append((t.cast(str, stream.publish("x", data).id), data))
                except PublishError:
                    refused.append(data)

    thread = threading.Thread(target=publish)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while len(accepted) < 200:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        server.restart()
        mark = len(accepted)
        while len(accepted) < mark + 200:
            assert time.monotonic() < deadline + 20
            time.sleep(0.01)
    finally:
        done.set()
        thread.join(30)
    entries = stream_entries(server, "x")
    datas = [d for _, d in entries]
    assert len(set(datas)) == len(datas), "an event was added twice"
    # Every accepted event is there, in order, with the id publish() gave.
    assert [e for e in entries if e in set(accepted)] == accepted
    # Anything else is an event whose publish() raised (its reply was lost
    # and Redis stayed away for the whole retry).
    assert {d for _, d in entries} - {d for _, d in accepted} <= set(refused)
    events = read_events(response, len(entries), timeout=20)
    assert [(e.id, e.data) for e in events] == entries


# -- reading --


def test_test_client_stream_continues_after_restart(
    redis_app: MakeApp, redis_server_aof: RedisServer
):
    server = redis_server_aof
    app = redis_app({"EVENTSTREAM_HEARTBEAT": 0.2}, server=server)
    client = app.test_client()
    response = client.get("/stream/c", buffered=False)
    before = [post(client, "c", f"b{i}") for i in range(3)]
    chunks = iter(response.response)
    parser = EventParser()
    got: list[t.Any] = []
    while len(got) < 3:
        got.extend(parser.feed(next(chunks)))
    server.stop()
    assert client.post("/publish/c", json={"data": "x"}).status_code == 503
    # The stream stays open: heartbeats go on while Redis is away.
    assert next(chunks) == HEARTBEAT
    server.start()
    after = [post(client, "c", f"a{i}") for i in range(3)]
    while len(got) < 6:
        got.extend(parser.feed(next(chunks)))
    response.close()
    assert [(e.id, e.data) for e in got] == list(
        zip(before + after, ["b0", "b1", "b2", "a0", "a1", "a2"], strict=True)
    )


def test_subscribe_while_redis_is_down(
    redis_app: MakeApp, redis_server_aof: RedisServer
):
    server = redis_server_aof
    config = {"EVENTSTREAM_HEARTBEAT": 0.2, "EVENTSTREAM_MAX_LIFETIME": 15}
    app = redis_app(config, server=server)
    client = app.test_client()
    ids = [post(client, "d", f"d{i}") for i in range(3)]
    server.stop()
    # Both open with a 200 and heartbeats.
    fresh = client.get("/stream/d", buffered=False)
    resumed = client.get("/stream/d", headers={"Last-Event-ID": ids[0]}, buffered=False)
    assert fresh.status_code == resumed.status_code == 200
    fresh_chunks = iter(fresh.response)
    assert next(fresh_chunks) == b"retry: 3000\n\n"
    assert next(fresh_chunks) == HEARTBEAT
    server.start()
    # Published by another process as soon as Redis is back, before this
    # one's reader is: neither stream misses it.
    other = redis_app(server=server).test_client()
    live = post(other, "d", "live")
    assert [e.id for e in read_events(resumed, 3)] == [*ids[1:], live]
    parser = EventParser()
    got: list[t.Any] = []
    while live not in [e.id for e in got]:
        got.extend(parser.feed(next(fresh_chunks)))
    fresh.close()
    # It may also get events from just before it subscribed (its position
    # is estimated while Redis is away), but nothing twice or out of order.
    published = [*ids, live]
    got_ids = [e.id for e in got]
    assert got_ids == published[published.index(got_ids[0]) :]


def test_redis_restart_without_persistence(
    redis_app: MakeApp, redis_server: RedisServer
):
    app = redis_app()
    client = app.test_client()
    response = client.get("/stream/v", buffered=False)
    old = post(client, "v", "old")
    chunks = iter(response.response)
    parser = EventParser()
    got: list[t.Any] = []
    while not got:
        got.extend(parser.feed(next(chunks)))
    redis_server.restart()  # --save '': everything is gone
    new = post(client, "v", "new")
    while len(got) < 2:
        got.extend(parser.feed(next(chunks)))
    response.close()
    assert [(e.id, e.data) for e in got] == [(old, "old"), (new, "new")]
    # A client resuming from before the loss is told to refetch.
    resumed = client.get("/stream/v", headers={"Last-Event-ID": old}, buffered=False)
    reset, event = read_events(resumed, 2)
    assert reset.event == "eventstream-reset"
    assert json.loads(reset.data) == {"reason": "unknown", "last_event_id": old}
    assert event.id == new


# -- real servers --


@pytest.mark.server
def test_streams_stay_open_through_a_redis_restart(
    start_server: t.Callable[..., Server], redis_server_aof: RedisServer
):
    redis = redis_server_aof
    server = start_server(
        "gunicorn",
        env={"EVENTSTREAM_REDIS_URL": redis.url, "EVENTSTREAM_HEARTBEAT": "0.3"},
    )
    clients = open_clients(server.port, "/gen/lobby", 20, record=True)
    try:
        pump(clients, lambda: all(c.events for c in clients), 10)
        publisher = Publisher(server, "lobby")
        publisher.start()
        try:
            publisher.wait_for(30, 20)
            redis.stop()
            down_at = time.monotonic()
            publisher.wait_refused(1, 20)
            pump(clients, lambda: time.monotonic() - down_at > 1.0, 5)
            up_at = time.monotonic()
            redis.start()
            mark = len(publisher.accepted)
            publisher.wait_for(mark + 30, 20)
        finally:
            publisher.stop()
        assert publisher.errors == []
        entries = stream_entries(redis, "lobby")
        assert set(publisher.accepted) <= set(entries)
        expected = [i for i, _ in entries]
        pump(clients, lambda: all(len(ids_of(c)) >= len(expected) for c in clients), 20)
        for client in clients:
            assert not client.eof, "a stream was closed during the outage"
            assert ids_of(client) == expected
            # Heartbeats went on while Redis was away.
            beats = [
                at for at, chunk in client.chunks if chunk == HEARTBEAT and at > down_at
            ]
            assert any(at < up_at for at in beats)
    finally:
        for client in clients:
            client.close()
