"""The Redis backend against a real redis-server (tests/support/redis.py):
publish and subscribe through Redis, stream ids, resume over one and several
channels, reset when trimmed, publishing from a script and from the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import typing as t

import pytest
from flask import Flask

from flask_eventstream import PublishError
from flask_eventstream.testing import parse
from flask_eventstream.testing import read_events
from tests.support.redis import close_app
from tests.support.redis import RedisServer
from tests.support.servers import make_app

pytestmark = pytest.mark.redis

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MakeApp = t.Callable[..., Flask]


def key(event_id: str) -> tuple[int, int]:
    ms, seq = event_id.split("-")
    return int(ms), int(seq)


def triples(events: t.Iterable[t.Any]) -> list[tuple[str, str, str]]:
    return [(e.event, e.data, e.id) for e in events]


def post(client: t.Any, channel: str, data: t.Any, event: str | None = None) -> str:
    body: dict[str, t.Any] = {"data": data}
    if event is not None:
        body["event"] = event
    response = client.post(f"/publish/{channel}", json=body)
    assert response.status_code == 202, response.get_data(as_text=True)
    return str(response.get_json()["id"])


def stream_ids(server: RedisServer, channel: str) -> list[str]:
    entries = server.client().xrange(f"eventstream:{channel}")
    return [raw_id.decode() for raw_id, _ in entries]


def wait_registered(app: Flask, channel: str, count: int = 1) -> None:
    """Wait until ``count`` subscribers of ``channel`` are registered with
    the reader (it registers them between two reads of Redis)."""
    stream = app.extensions["eventstream"]
    deadline = time.monotonic() + 5
    with app.app_context():
        while stream.stats()["channels"].get(channel, 0) < count:
            assert time.monotonic() < deadline, stream.stats()
            time.sleep(0.005)


# -- publish and subscribe --


def test_publish_reaches_subscriber_with_stream_ids(
    redis_app: MakeApp, redis_server: RedisServer
):
    app = redis_app()
    client = app.test_client()
    response = client.get("/stream/lobby", buffered=False)
    sent = []
    for i in range(5):
        data: t.Any = {"n": i, "text": "α\nβ"} if i % 2 else f"m{i}"
        event = "chat" if i % 2 else None
        event_id = post(client, "lobby", data, event)
        wire = (
            data
            if isinstance(data, str)
            else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        )
        sent.append((event or "message", wire, event_id))
    assert triples(read_events(response, 5)) == sent
    ids = [event_id for _, _, event_id in sent]
    # The ids are the entries' ids in the channel's stream, increasing.
    assert stream_ids(redis_server, "lobby") == ids
    assert sorted(ids, key=key) == ids and len(set(ids)) == 5


def test_ids_increase_across_channels(redis_app: MakeApp, redis_server: RedisServer):
    client = redis_app().test_client()
    ids = [post(client, ("a", "b", "c")[i % 3], i) for i in range(30)]
    assert sorted(ids, key=key) == ids and len(set(ids)) == 30
    meta = redis_server.client().hget("eventstream:~meta", "last")
    assert meta is not None and meta.decode() == ids[-1]


def test_event_fields_survive_redis(redis_app: MakeApp):
    app = redis_app()
    stream = app.extensions["eventstream"]
    client = app.test_client()
    response = client.get("/stream/fields", buffered=False)
    from flask_eventstream import Event

    with app.app_context():
        sent = stream.publish(
            "fields", Event(data="a\r\nb\rc\n", retry=0, comment="note")
        )
        empty = stream.publish("fields", "", event="empty")
    raw = b""
    for chunk in response.response:
        raw += chunk
        if raw.count(b"\n\n") >= 3:
            break
    response.close()
    assert raw == (
        b"retry: 3000\n\n"
        + f": note\nid: {sent.id}\nretry: 0\n".encode()
        + b"data: a\ndata: b\ndata: c\ndata: \n\n"
        + f"event: empty\nid: {empty.id}\ndata: \n\n".encode()
    )


def test_fanout_to_many_subscribers_on_one_process(redis_app: MakeApp):
    app = redis_app()
    client = app.test_client()
    responses = [client.get("/stream/room", buffered=False) for _ in range(20)]
    ids = [post(client, "room", i) for i in range(10)]
    for response in responses:
        assert [e.id for e in read_events(response, 10)] == ids


def test_each_event_is_encoded_once_on_the_publishing_process(
    redis_app: MakeApp, monkeypatch: pytest.MonkeyPatch
):
    import flask_eventstream.backends.redis.reader as reader_module
    import flask_eventstream.broker as broker_module
    from flask_eventstream.sse import encode

    encoded: list[str | None] = []

    def counting(event: t.Any) -> bytes:
        encoded.append(event.text)
        return encode(event)

    app = redis_app()
    client = app.test_client()
    responses = [client.get("/stream/once", buffered=False) for _ in range(3)]
    wait_registered(app, "once", 3)
    monkeypatch.setattr(broker_module, "encode", counting)
    monkeypatch.setattr(reader_module, "encode", counting)
    ids = [post(client, "once", f"e{i}") for i in range(4)]
    for response in responses:
        events = read_events(response, 4)
        assert [(e.id, e.data) for e in events] == [
            (event_id, f"e{i}") for i, event_id in enumerate(ids)
        ]
    # Once to check the size; the reader sends those bytes, with the id.
    assert encoded == ["e0", "e1", "e2", "e3"]


def test_publish_returns_id_and_rejects_bad_input(
    redis_app: MakeApp, redis_server: RedisServer
):
    app = redis_app({"EVENTSTREAM_MAX_EVENT_SIZE": 200})
    stream = app.extensions["eventstream"]
    with app.app_context():
        with pytest.raises(ValueError, match="EVENTSTREAM_MAX_EVENT_SIZE"):
            stream.publish("big", "x" * 300)
        with pytest.raises(ValueError, match="channel"):
            stream.publish("bad channel", "x")
        with pytest.raises(ValueError):
            stream.publish("ok", "x", event="a\nb")
        event = stream.publish("ok", "x")
    assert stream_ids(redis_server, "big") == []
    assert stream_ids(redis_server, "ok") == [event.id]


def test_stats_count_subscribers(redis_app: MakeApp):
    app = redis_app()
    stream = app.extensions["eventstream"]
    client = app.test_client()
    responses = [client.get("/stream/s1", buffered=False) for _ in range(3)]
    with app.app_context():
        deadline = time.monotonic() + 5
        while stream.stats()["channels"] != {"s1": 3}:
            assert time.monotonic() < deadline, stream.stats()
            time.sleep(0.01)
        assert stream.stats()["connections"] == 3
    for response in responses:
        response.close()


# -- resume --


def test_resume_one_channel_exactly_once_in_order(redis_app: MakeApp):
    app = redis_app()
    client = app.test_client()
    ids = [post(client, "news", f"n{i}") for i in range(6)]
    response = client.get(
        "/stream/news", headers={"Last-Event-ID": ids[2]}, buffered=False
    )
    live = post(client, "news", "live")
    events = read_events(response, 4)
    assert [(e.data, e.id) for e in events] == [
        ("n3", ids[3]),
        ("n4", ids[4]),
        ("n5", ids[5]),
        ("live", live),
    ]


def test_resume_with_query_parameter_and_on_another_app(
    redis_app: MakeApp, redis_server: RedisServer
):
    # Two apps on one Redis stand for two worker processes.
    first = redis_app().test_client()
    second = redis_app().test_client()
    ids = [post(first, "q", i) for i in range(4)]
    response = second.get(f"/stream/q?lastEventId={ids[0]}", buffered=False)
    assert [e.id for e in read_events(response, 3)] == ids[1:]


def test_resume_from_newest_id_replays_nothing(redis_app: MakeApp):
    client = redis_app().test_client()
    ids = [post(client, "z", i) for i in range(3)]
    response = client.get(
        "/stream/z", headers={"Last-Event-ID": ids[-1]}, buffered=False
    )
    live = post(client, "z", "after")
    assert triples(read_events(response, 1)) == [("message", "after", live)]


def test_resume_several_channels_exactly_once_in_order(redis_server: RedisServer):
    app = make_app(EVENTSTREAM_REDIS_URL=redis_server.url)[0]
    try:
        client = app.test_client()
        sent = []
        for i in range(12):
            channel = ("a", "b", "c")[i % 3]
            response = client.post(f"/pub/{channel}", json=f"{channel}{i}")
            sent.append((f"{channel}{i}", response.get_json()["id"]))
        # Resume a subscription to a and b from an event on c.
        stream = client.get(
            "/s?c=a&c=b", headers={"Last-Event-ID": sent[5][1]}, buffered=False
        )
        live = client.post("/pub/b", json="live").get_json()["id"]
        events = read_events(stream, 5)
        expected = [s for s in sent[6:] if s[0][0] in "ab"] + [("live", live)]
        assert [(e.data, e.id) for e in events] == expected
    finally:
        close_app(app)


def test_new_subscriber_gets_only_events_after_subscribing(redis_server: RedisServer):
    app = make_app(EVENTSTREAM_REDIS_URL=redis_server.url)[0]
    try:
        client = app.test_client()
        client.post("/pub/a", json="before")
        stream = client.get("/s?c=a&c=b", buffered=False)
        ids = [client.post(f"/pub/{c}", json=c).get_json()["id"] for c in "abab"]
        assert [(e.data, e.id) for e in read_events(stream, 4)] == list(
            zip("abab", ids, strict=True)
        )
    finally:
        close_app(app)


def test_reset_when_history_was_trimmed(start_redis: t.Callable[..., RedisServer]):
    # Small stream nodes make Redis' approximate trimming close to exact.
    server = start_redis(extra=["--stream-node-max-entries", "4"])
    from example_app import create_app

    app = create_app({"EVENTSTREAM_REDIS_URL": server.url, "EVENTSTREAM_HISTORY": 5})
    try:
        client = app.test_client()
        ids = [post(client, "t", i) for i in range(30)]
        kept = stream_ids(server, "t")
        assert 5 <= len(kept) < 12 and kept == ids[-len(kept) :]
        response = client.get(
            "/stream/t", headers={"Last-Event-ID": ids[3]}, buffered=False
        )
        wait_registered(app, "t")
        live = post(client, "t", "live")
        events = read_events(response, len(kept) + 2)
        reset = events[0]
        assert reset.event == "eventstream-reset"
        assert json.loads(reset.data) == {"reason": "expired", "last_event_id": ids[3]}
        assert reset.id == ids[-1]
        assert [e.id for e in events[1:]] == [*kept, live]
        # An id still inside the history: no reset.
        response = client.get(
            "/stream/t", headers={"Last-Event-ID": kept[0]}, buffered=False
        )
        assert [e.id for e in read_events(response, len(kept))] == [*kept[1:], live]
    finally:
        close_app(app)


def test_reset_for_unknown_ids(redis_app: MakeApp):
    app = redis_app()
    client = app.test_client()
    ids = [post(client, "u", i) for i in range(3)]
    newer = f"{key(ids[-1])[0] + 100000}-0"
    response = client.get("/stream/u", headers={"Last-Event-ID": newer}, buffered=False)
    # The reset's id is the newest id when the reader registers the stream.
    wait_registered(app, "u")
    live = post(client, "u", "live")
    reset, event = read_events(response, 2)
    assert (reset.event, reset.id) == ("eventstream-reset", ids[-1])
    assert json.loads(reset.data) == {"reason": "unknown", "last_event_id": newer}
    assert (event.data, event.id) == ("live", live)
    # Older than anything this Redis has seen: its data was lost since.
    response = client.get("/stream/u", headers={"Last-Event-ID": "1-0"}, buffered=False)
    events = read_events(response, 5)
    assert events[0].event == "eventstream-reset"
    assert json.loads(events[0].data)["reason"] == "unknown"
    assert [e.id for e in events[1:]] == [*ids, live]


@pytest.mark.parametrize("value", ["garbage", "1-2-3", "9" * 50, " "])
def test_malformed_last_event_id_is_ignored(redis_app: MakeApp, value: str):
    client = redis_app().test_client()
    post(client, "m", "old")
    response = client.get("/stream/m", headers={"Last-Event-ID": value}, buffered=False)
    live = post(client, "m", "new")
    assert triples(read_events(response, 1)) == [("message", "new", live)]


def test_no_history_resume_gets_a_reset(redis_app: MakeApp):
    app = redis_app({"EVENTSTREAM_HISTORY": 0})
    client = app.test_client()
    ids = [post(client, "h0", i) for i in range(3)]
    response = client.get(
        "/stream/h0", headers={"Last-Event-ID": ids[0]}, buffered=False
    )
    wait_registered(app, "h0")
    live = post(client, "h0", "live")
    reset, event = read_events(response, 2)
    assert (reset.event, reset.id) == ("eventstream-reset", ids[-1])
    assert json.loads(reset.data)["reason"] == "expired"
    assert (event.data, event.id) == ("live", live)


# -- the reader --


def test_reader_picks_up_a_new_channel_at_once(redis_app: MakeApp):
    app = redis_app()
    client = app.test_client()
    first = client.get("/stream/one", buffered=False)
    post(client, "one", "x")
    assert read_events(first, 1)[0].data == "x"
    # The reader is now blocked on "one"; a subscription to "two" must not
    # wait for that read to time out.
    second = client.get("/stream/two", buffered=False)
    start = time.monotonic()
    event_id = post(client, "two", "y")
    assert [e.id for e in read_events(second, 1, timeout=10)] == [event_id]
    assert time.monotonic() - start < 2.0


def test_one_reader_per_process_and_events_read_once(
    redis_app: MakeApp, redis_server: RedisServer
):
    app = redis_app()
    client = app.test_client()
    responses = [client.get(f"/stream/c{i % 5}", buffered=False) for i in range(25)]
    for i in range(5):
        post(client, f"c{i}", i)
    for i, response in enumerate(responses):
        assert [e.data for e in read_events(response, 1)] == [str(i % 5)]
    names = [c["name"] for c in redis_server.client().client_list()]
    pid = os.getpid()
    assert names.count(f"flask-eventstream:reader:{pid}") == 1
    assert names.count(f"flask-eventstream:pub:{pid}") <= 2


def test_event_published_signal_on_the_reading_process(redis_app: MakeApp):
    from flask_eventstream import signals

    app = redis_app()
    client = app.test_client()
    seen: list[tuple[str, str | None]] = []

    def receiver(sender: Flask, channel: str, event: t.Any) -> None:
        seen.append((channel, event.id))

    with signals.event_published.connected_to(receiver, app):
        # Published right after subscribing: the reader may register the
        # stream before or after it reads the event; it is announced once.
        response = client.get("/stream/sig", buffered=False)
        first = post(client, "sig", "x")
        read_events(response, 1)
        response = client.get("/stream/sig", buffered=False)
        wait_registered(app, "sig")
        second = post(client, "sig", "y")
        read_events(response, 1)
    assert seen == [("sig", first), ("sig", second)]


def test_reader_cuts_off_streams_that_fell_behind_trimming(
    start_redis: t.Callable[..., RedisServer],
):
    from flask_eventstream.backends.redis.scripts import PUBLISH

    server = start_redis(extra=["--stream-node-max-entries", "2"])
    from example_app import create_app

    app = create_app(
        {
            "EVENTSTREAM_REDIS_URL": server.url,
            "EVENTSTREAM_HISTORY": 1,
            "EVENTSTREAM_MAX_LIFETIME": 20,
        }
    )
    try:
        client = app.test_client()
        response = client.get("/stream/g", buffered=False)
        first = post(client, "g", "first")
        chunks = iter(response.response)
        events = []
        while not events or events[-1].id != first:
            events.extend(parse(next(chunks)))
        # 40 events in one transaction: trimmed to about 2 before the
        # reader can see them.
        admin = server.client()
        script = admin.register_script(PUBLISH)
        pipe = admin.pipeline(transaction=True)
        for i in range(40):
            script(
                keys=["eventstream:g", "eventstream:~meta"],
                args=["1", f"tok{i}", "0", "0", "d", f"burst{i}"],
                client=pipe,
            )
        burst = [raw.decode() for raw in pipe.execute()]
        start = time.monotonic()
        for chunk in chunks:
            events.extend(parse(chunk))
        response.close()
        # The stream ended after "first" instead of skipping events.
        assert [e.id for e in events] == [first]
        assert time.monotonic() - start < 5
        resumed = client.get(
            "/stream/g", headers={"Last-Event-ID": first}, buffered=False
        )
        kept = stream_ids(server, "g")
        got = read_events(resumed, 1 + len(kept))
        assert got[0].event == "eventstream-reset"
        assert [e.id for e in got[1:]] == kept == burst[-len(kept) :]
    finally:
        close_app(app)


# -- publishing from outside the app --


def test_publish_from_a_script_without_app(
    redis_app: MakeApp, redis_server: RedisServer
):
    app = redis_app()
    client = app.test_client()
    response = client.get("/stream/jobs", buffered=False)
    code = (
        "import sys\n"
        "from flask_eventstream import EventStream\n"
        "stream = EventStream(redis_url=sys.argv[1])\n"
        "event = stream.publish('jobs', {'done': 1}, event='job')\n"
        "print(event.id)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, redis_server.url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    event_id = result.stdout.strip()
    assert triples(read_events(response, 1)) == [("job", '{"done":1}', event_id)]


def test_flask_cli_publish(redis_app: MakeApp, redis_server: RedisServer):
    app = redis_app()
    client = app.test_client()
    response = client.get("/stream/cli", buffered=False)
    env = dict(os.environ, EVENTSTREAM_REDIS_URL=redis_server.url)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "flask",
                "--app",
                "example_app",
                "eventstream",
                *args,
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    json_run = run("publish", "cli", '{"a": [1, 2]}', "--event", "note")
    text_run = run("publish", "cli", "plain words")
    forced = run("publish", "cli", "42", "--string")
    for result in (json_run, text_run, forced):
        assert result.returncode == 0, result.stderr
        assert "Warning" not in result.stderr
    assert triples(read_events(response, 3)) == [
        ("note", '{"a":[1,2]}', json_run.stdout.strip()),
        ("message", "plain words", text_run.stdout.strip()),
        ("message", "42", forced.stdout.strip()),
    ]
    bad = run("publish", "bad channel!", "x")
    assert bad.returncode != 0 and "channel" in bad.stderr


def test_redis_is_imported_only_when_configured():
    code = (
        "import sys\n"
        "from example_app import create_app\n"
        "app = create_app()\n"
        "app.test_client().post('/publish/x', json={'data': 1})\n"
        "assert 'redis' not in sys.modules, 'redis imported'\n"
        "assert 'flask_eventstream.backends.redis' not in sys.modules\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "EVENTSTREAM_REDIS_URL"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_publish_error_when_redis_is_down(
    redis_app: MakeApp, redis_server: RedisServer
):
    app = redis_app()
    client = app.test_client()
    post(client, "down", "before")
    redis_server.stop()
    stream = app.extensions["eventstream"]
    with app.app_context():
        start = time.monotonic()
        with pytest.raises(PublishError, match="unreachable"):
            stream.publish("down", "lost")
        elapsed = time.monotonic() - start
    assert 0.5 < elapsed < 2.0, elapsed
    response = client.post("/publish/down", json={"data": "x"})
    assert response.status_code == 503
    assert "unreachable" in response.get_json()["error"]


def test_without_client_unblock_permission(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
):
    # An ACL user that may not run CLIENT UNBLOCK: the reader polls instead.
    admin = redis_server.client()
    admin.acl_setuser(
        "limited",
        enabled=True,
        passwords=["+secret"],
        keys=["*"],
        channels=["*"],
        commands=["+@all", "-client|unblock"],
    )
    url = f"redis://limited:secret@127.0.0.1:{redis_server.port}/0"
    from example_app import create_app

    app = create_app({"EVENTSTREAM_REDIS_URL": url})
    try:
        client = app.test_client()
        first = client.get("/stream/acl1", buffered=False)
        wait_registered(app, "acl1")
        second = client.get("/stream/acl2", buffered=False)
        ids = [post(client, "acl1", 1), post(client, "acl2", 2)]
        assert [e.id for e in read_events(first, 1)] == ids[:1]
        assert [e.id for e in read_events(second, 1)] == ids[1:]
        assert "CLIENT UNBLOCK is not allowed" in caplog.text
        assert "secret" not in caplog.text
    finally:
        close_app(app)


def test_a_retried_publish_is_added_once(redis_server: RedisServer):
    # publish() retries with the same token after an error that may have
    # come after Redis ran the script (a reply lost in a restart).
    from flask_eventstream.backends.redis.scripts import PUBLISH

    admin = redis_server.client()
    script = admin.register_script(PUBLISH)
    keys = ["eventstream:once", "eventstream:~meta"]
    first = script(keys=keys, args=["10", "tok-a", "0", "0", "d", "x"])
    other = script(keys=keys, args=["10", "tok-b", "0", "0", "d", "y"])
    again = script(keys=keys, args=["10", "tok-a", "1", "0", "d", "x"])
    assert again == first != other
    assert stream_ids(redis_server, "once") == [first.decode(), other.decode()]
    # Without the retry flag, the same token adds an event (no lookup cost
    # on the normal path).
    assert script(keys=keys, args=["10", "tok-a", "0", "0", "d", "x"]) not in (
        first,
        other,
    )
