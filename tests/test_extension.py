"""The EventStream extension: registration, configuration, publish and
subscribe, stats and signals."""

from __future__ import annotations

import contextlib
import threading
import time
import typing as t

import pytest
from flask import Flask
from flask import has_app_context
from flask import jsonify

from flask_eventstream import Event
from flask_eventstream import EventStream
from flask_eventstream import eventstream
from flask_eventstream import signals
from flask_eventstream import testing
from flask_eventstream.broker import Frame
from flask_eventstream.broker import parse_id
from flask_eventstream.broker import Subscription
from flask_eventstream.testing import parse
from flask_eventstream.testing import read_events
from flask_eventstream.testing import ReceivedEvent
from tests.support.servers import make_app

DOCUMENTED_DEFAULTS = {
    "EVENTSTREAM_REDIS_URL": None,
    "EVENTSTREAM_HEARTBEAT": 15,
    "EVENTSTREAM_RETRY": 3000,
    "EVENTSTREAM_HISTORY": 1000,
    "EVENTSTREAM_QUEUE_SIZE": 1000,
    "EVENTSTREAM_MAX_CONNECTIONS": None,
    "EVENTSTREAM_MAX_EVENT_SIZE": 1048576,
    "EVENTSTREAM_SEND_TIMEOUT": 30,
    "EVENTSTREAM_MAX_LIFETIME": None,
}


def ext_of(app: Flask) -> EventStream:
    return t.cast(EventStream, app.extensions["eventstream"])


@contextlib.contextmanager
def subscriptions(
    ext: EventStream, *channel_sets: tuple[str, ...]
) -> t.Iterator[list[Subscription]]:
    subs = [ext.subscribe(*channels) for channels in channel_sets]
    try:
        yield subs
    finally:
        for sub in subs:
            sub.close()


def queued(sub: Subscription) -> list[Frame]:
    return list(sub.queued)


def received(sub: Subscription) -> list[ReceivedEvent]:
    frame = sub.drain()
    return parse(frame.data) if frame is not None else []


# -- registration and configuration --


def test_app_passed_to_the_constructor() -> None:
    app = Flask(__name__)
    ext = EventStream(app)
    assert app.extensions["eventstream"] is ext
    # The app's own state: its events are sent as the app's.
    senders: list[object] = []

    def on_published(sender: object, **kwargs: object) -> None:
        senders.append(sender)

    with signals.event_published.connected_to(on_published), app.app_context():
        ext.publish("lobby", "hi")
    assert senders == [app]


def test_init_app_in_an_app_factory() -> None:
    ext = EventStream()

    def create_app() -> Flask:
        app = Flask(__name__)
        ext.init_app(app)
        return app

    app = create_app()
    assert app.extensions["eventstream"] is ext
    with app.app_context():
        sent = ext.publish("lobby", "hi")
    assert sent.id is not None and parse_id(sent.id) is not None


def test_config_defaults_are_the_documented_table() -> None:
    app = Flask(__name__)
    EventStream(app)
    assert {k: app.config[k] for k in DOCUMENTED_DEFAULTS} == DOCUMENTED_DEFAULTS
    settings = testing.settings(app)
    assert settings.heartbeat == 15
    assert settings.retry == 3000
    assert settings.redis_url is None
    assert settings.max_connections is None
    assert settings.max_lifetime is None


def test_app_config_wins_over_defaults_and_is_read_at_init_app() -> None:
    app = Flask(__name__)
    app.config.update(EVENTSTREAM_RETRY=500, EVENTSTREAM_HISTORY=0)
    EventStream(app)
    assert app.config["EVENTSTREAM_RETRY"] == 500
    settings = testing.settings(app)
    assert (settings.retry, settings.history, settings.queue_size) == (500, 0, 1000)

    @app.get("/r")
    @eventstream
    def r() -> t.Any:
        yield Event(data="x")

    assert app.test_client().get("/r").data == b"retry: 500\n\ndata: x\n\n"


@pytest.mark.parametrize(
    ("key", "value", "error"),
    [
        ("EVENTSTREAM_HEARTBEAT", 0, ValueError),
        ("EVENTSTREAM_HEARTBEAT", "15", TypeError),
        ("EVENTSTREAM_RETRY", -1, ValueError),
        ("EVENTSTREAM_RETRY", 1.5, TypeError),
        ("EVENTSTREAM_QUEUE_SIZE", 0, ValueError),
        ("EVENTSTREAM_MAX_CONNECTIONS", 0, ValueError),
        ("EVENTSTREAM_MAX_EVENT_SIZE", True, TypeError),
        ("EVENTSTREAM_MAX_LIFETIME", -5, ValueError),
        ("EVENTSTREAM_SEND_TIMEOUT", None, TypeError),
    ],
)
def test_bad_config_values_are_rejected_naming_the_key(
    key: str, value: object, error: type[Exception]
) -> None:
    app = Flask(__name__)
    app.config[key] = value
    with pytest.raises(error, match=key):
        EventStream(app)
    assert "eventstream" not in app.extensions


def test_double_init_app_says_what_to_do() -> None:
    app = Flask(__name__)
    ext = EventStream(app)
    with pytest.raises(RuntimeError, match="already registered") as info:
        ext.init_app(app)
    assert "init_app once" in str(info.value)
    with pytest.raises(RuntimeError, match="already registered"):
        EventStream(app)
    assert app.extensions["eventstream"] is ext


def test_two_apps_in_one_process_have_separate_brokers() -> None:
    ext = EventStream()
    app1 = make_app(ext)[0]
    app2 = make_app(ext)[0]
    assert testing.broker(app1) is not testing.broker(app2)
    r1 = app1.test_client().get("/s?c=lobby", buffered=False)
    r2 = app2.test_client().get("/s?c=lobby", buffered=False)
    with app1.app_context():
        ext.publish("lobby", "to app1")
        assert ext.stats() == {"connections": 1, "channels": {"lobby": 1}}
    with app2.app_context():
        ext.publish("lobby", "to app2")
    assert [e.data for e in read_events(r1, 1)] == ["to app1"]
    assert [e.data for e in read_events(r2, 1)] == ["to app2"]


def test_unregistered_app_is_a_clear_error() -> None:
    ext = EventStream()
    EventStream(Flask(__name__))  # another app, another extension
    app = Flask(__name__)
    with app.app_context():
        with pytest.raises(RuntimeError, match="init_app"):
            ext.publish("x", 1)


# -- publish --


def test_publish_returns_the_event_with_its_id() -> None:
    app = make_app()[0]
    ext = ext_of(app)
    with app.app_context():
        sent = ext.publish("lobby", {"text": "hi"}, event="chat")
    assert isinstance(sent, Event)
    assert (sent.data, sent.event, sent.text) == (
        {"text": "hi"},
        "chat",
        '{"text":"hi"}',
    )
    assert sent.id is not None
    assert parse_id(sent.id) is not None


def test_publish_an_event_object_keeps_its_fields_but_not_its_id() -> None:
    app = make_app()[0]
    ext = ext_of(app)
    with app.app_context(), subscriptions(ext, ("c",)) as [sub]:
        sent = ext.publish("c", Event("x", event="e", id="mine", retry=5))
        renamed = ext.publish("c", Event("y", event="e"), event="other")
        events = received(sub)
    assert sent.id != "mine"
    assert (sent.event, sent.retry) == ("e", 5)
    assert events == [
        ReceivedEvent("e", "x", sent.id, 5),
        ReceivedEvent("other", "y", t.cast(str, renamed.id), None),
    ]


def test_publish_inside_a_request() -> None:
    app = make_app()[0]
    ext = ext_of(app)

    @app.post("/send")
    def send() -> t.Any:
        return jsonify(id=ext.publish("lobby", "from a view").id)

    client = app.test_client()
    response = client.get("/s?c=lobby", buffered=False)
    sent_id = client.post("/send").get_json()["id"]
    assert read_events(response, 1) == [
        ReceivedEvent("message", "from a view", sent_id)
    ]


def test_publish_in_an_app_context() -> None:
    app = make_app()[0]
    ext = ext_of(app)
    response = app.test_client().get("/s?c=jobs", buffered=False)
    with app.app_context():
        sent = ext.publish("jobs", "from a job", event="done")
    assert read_events(response, 1) == [
        ReceivedEvent("done", "from a job", t.cast(str, sent.id))
    ]


def test_publish_without_app_context_when_one_app_is_registered() -> None:
    app = make_app()[0]
    ext = ext_of(app)
    response = app.test_client().get("/s?c=jobs", buffered=False)
    assert not has_app_context()
    sent = ext.publish("jobs", "no context")
    assert read_events(response, 1) == [
        ReceivedEvent("message", "no context", t.cast(str, sent.id))
    ]


def test_publish_without_app_context_and_several_apps_is_a_clear_error() -> None:
    ext = EventStream()
    app1 = make_app(ext)[0]
    app2 = make_app(ext)[0]
    with pytest.raises(RuntimeError, match="several apps") as info:
        ext.publish("x", 1)
    assert "app_context" in str(info.value)
    assert "redis_url" in str(info.value)
    with pytest.raises(RuntimeError, match="several apps"):
        ext.stats()
    assert app1 is not app2


def test_publish_without_any_app_or_redis_url_is_a_clear_error() -> None:
    ext = EventStream()
    with pytest.raises(RuntimeError, match="no app and no redis_url"):
        ext.publish("x", 1)


def test_publish_from_another_thread_reaches_a_waiting_stream() -> None:
    app = make_app()[0]
    ext = ext_of(app)
    response = app.test_client().get("/s?c=t", buffered=False)

    def later() -> None:
        time.sleep(0.1)
        with app.app_context():
            for i in range(3):
                ext.publish("t", i)

    thread = threading.Thread(target=later)
    thread.start()
    try:
        events = read_events(response, 3)
    finally:
        thread.join(5)
    assert [e.data for e in events] == ["0", "1", "2"]


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda ext: ext.publish("bad channel", 1), ValueError, "channel"),
        (lambda ext: ext.publish("", 1), ValueError, "channel"),
        (lambda ext: ext.publish("x" * 129, 1), ValueError, "channel"),
        (lambda ext: ext.publish("caf\xe9", 1), ValueError, "channel"),
        (lambda ext: ext.publish(b"c", 1), TypeError, "channel"),
        (lambda ext: ext.publish("c", 1, event="a\nb"), ValueError, "event"),
        (lambda ext: ext.publish("c", 1, event="a\rb"), ValueError, "event"),
        (lambda ext: ext.publish("c", {1, 2}), TypeError, "set"),
        (lambda ext: ext.publish("c", b"\xff"), ValueError, "UTF-8"),
    ],
)
def test_bad_publish_raises_and_sends_nothing(
    call: t.Callable[[EventStream], t.Any], error: type[Exception], match: str
) -> None:
    app = make_app()[0]
    ext = ext_of(app)
    published: list[t.Any] = []
    with app.app_context(), subscriptions(ext, ("c",)) as [sub]:
        with signals.event_published.connected_to(
            lambda sender, **kw: published.append(kw), sender=app
        ):
            with pytest.raises(error, match=match):
                call(ext)
        assert queued(sub) == []
    assert published == []


def test_valid_channel_names() -> None:
    app = make_app()[0]
    ext = ext_of(app)
    names = ["a", "A-Z_0.9:x", "x" * 128, "private-room", "user:42"]
    with app.app_context(), subscriptions(ext, tuple(names)) as [sub]:
        for name in names:
            ext.publish(name, name)
        assert [e.data for e in received(sub)] == names


def test_ids_increase_in_publish_order_per_channel() -> None:
    app = make_app()[0]
    ext = ext_of(app)
    with app.app_context():
        ids = {"a": [], "b": []}  # type: dict[str, list[tuple[int, int]]]
        for i in range(300):
            channel = "ab"[i % 3 == 0]
            sent = ext.publish(channel, i)
            key = parse_id(sent.id)
            assert key is not None
            ids[channel].append(key)
    for keys in ids.values():
        assert keys == sorted(keys)
        assert len(set(keys)) == len(keys)


def test_ids_follow_publish_order_across_threads() -> None:
    app = make_app()[0]
    ext = ext_of(app)
    with app.app_context(), subscriptions(ext, ("race",)) as [sub]:

        def publisher(n: int) -> None:
            with app.app_context():
                for i in range(50):
                    ext.publish("race", f"{n}-{i}")

        threads = [threading.Thread(target=publisher, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        keys = [frame.key for frame in queued(sub)]
        events = received(sub)
    assert len(events) == 200
    assert keys == sorted(keys)  # type: ignore[type-var]
    assert [parse_id(e.id) for e in events] == keys
    for n in range(4):
        mine = [e.data for e in events if e.data.startswith(f"{n}-")]
        assert mine == [f"{n}-{i}" for i in range(50)]


def test_each_event_is_encoded_once_for_many_subscribers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import flask_eventstream.broker as broker_module

    calls: list[Event] = []
    real_encode = broker_module.encode

    def counting_encode(event: Event) -> bytes:
        calls.append(event)
        return real_encode(event)

    monkeypatch.setattr(broker_module, "encode", counting_encode)
    app = make_app()[0]
    ext = ext_of(app)
    with app.app_context(), subscriptions(ext, *[("fan",)] * 50) as subs:
        for i in range(3):
            ext.publish("fan", {"i": i})
        assert len(calls) == 3
        for i in range(3):
            first = queued(subs[0])[i].data
            assert all(queued(sub)[i].data is first for sub in subs)
        assert all(len(queued(sub)) == 3 for sub in subs)


# -- subscribe --


def test_subscribe_registers_at_once() -> None:
    app = make_app()[0]
    ext = ext_of(app)
    with app.app_context():
        sub = ext.subscribe("eager")
        try:
            assert ext.stats()["channels"] == {"eager": 1}
            sent = ext.publish("eager", "before iterating")
            frame = next(iter(sub))
        finally:
            sub.close()
    assert parse(frame.data) == [
        ReceivedEvent("message", "before iterating", t.cast(str, sent.id))
    ]


def test_view_subscribes_then_sends_a_snapshot_without_missing_events() -> None:
    app = Flask(__name__)
    ext = EventStream(app)
    state = {"count": 0}

    @app.get("/room")
    @eventstream
    def room() -> t.Iterator[t.Any]:
        sub = ext.subscribe("room")
        snapshot = dict(state)
        # an event published between the snapshot and the iteration
        ext.publish("room", "in between")
        yield Event(snapshot, event="snapshot")
        yield from sub

    response = app.test_client().get("/room", buffered=False)
    ext.publish("room", "after")
    events = read_events(response, 3)
    assert [(e.event, e.data) for e in events] == [
        ("snapshot", '{"count":0}'),
        ("message", "in between"),
        ("message", "after"),
    ]


def test_subscribe_to_several_channels() -> None:
    app = make_app()[0]
    ext = ext_of(app)
    response = app.test_client().get("/s?c=a&c=b", buffered=False)
    assert ext.stats() == {"connections": 1, "channels": {"a": 1, "b": 1}}
    ext.publish("a", "to a")
    ext.publish("c", "to c")
    ext.publish("b", "to b")
    assert [e.data for e in read_events(response, 2)] == ["to a", "to b"]


def test_subscribe_to_the_same_channel_twice_delivers_once() -> None:
    app = make_app()[0]
    ext = ext_of(app)
    with app.app_context(), subscriptions(ext, ("a", "a", "b")) as [sub]:
        assert sub.channels == ("a", "b")
        assert ext.stats()["channels"] == {"a": 1, "b": 1}
        ext.publish("a", 1)
        ext.publish("a", 2)
        assert [e.data for e in received(sub)] == ["1", "2"]


def test_subscribe_validates_channels() -> None:
    app = make_app()[0]
    ext = ext_of(app)
    with app.app_context():
        with pytest.raises(ValueError, match="channel"):
            ext.subscribe("ok", "not ok")
        with pytest.raises(TypeError, match="at least one channel"):
            ext.subscribe()
        assert ext.stats()["channels"] == {}


def test_stats_count_connections_and_channels_and_return_to_zero() -> None:
    app = make_app()[0]
    ext = ext_of(app)
    client = app.test_client()
    assert ext.stats() == {"connections": 0, "channels": {}}
    r1 = client.get("/s?c=a", buffered=False)
    r2 = client.get("/s?c=a&c=b", buffered=False)
    r3 = client.get("/s?c=c", buffered=False)
    assert ext.stats() == {"connections": 3, "channels": {"a": 2, "b": 1, "c": 1}}
    r2.close()
    assert ext.stats() == {"connections": 2, "channels": {"a": 1, "c": 1}}
    r1.close()
    r3.close()
    assert ext.stats() == {"connections": 0, "channels": {}}


def test_sleep_outside_a_stream() -> None:
    ext = EventStream()
    start = time.monotonic()
    ext.sleep(0.05)
    assert 0.04 < time.monotonic() - start < 2.0


# -- signals --


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[t.Any, dict[str, t.Any]]] = []

    def __call__(self, sender: t.Any, **kwargs: t.Any) -> None:
        self.calls.append((sender, kwargs))


def test_event_published_is_sent_once_per_event_with_the_app() -> None:
    app = make_app()[0]
    ext = ext_of(app)
    recorder = Recorder()
    with signals.event_published.connected_to(recorder):
        with app.app_context(), subscriptions(ext, ("p",), ("p",), ("p", "q")):
            first = ext.publish("p", "one", event="e")
            second = ext.publish("q", {"two": 2})
            nobody = ext.publish("empty", "three")
    assert recorder.calls == [
        (app, {"channel": "p", "event": first}),
        (app, {"channel": "q", "event": second}),
        (app, {"channel": "empty", "event": nobody}),
    ]
    assert recorder.calls[0][0] is app
    assert first.id is not None and first.event == "e"


def test_client_connected_and_disconnected() -> None:
    app = make_app()[0]
    ext = ext_of(app)
    connected, disconnected = Recorder(), Recorder()
    with (
        signals.client_connected.connected_to(connected, sender=app),
        signals.client_disconnected.connected_to(disconnected, sender=app),
    ):
        response = app.test_client().get("/s?c=a&c=b", buffered=False)
        [(sender, info)] = connected.calls
        assert sender is app
        assert info["channels"] == ("a", "b")
        assert isinstance(info["connection_id"], int)
        assert disconnected.calls == []
        ext.publish("a", "x")
        read_events(response, 1)
    [(sender, gone)] = disconnected.calls
    assert sender is app
    assert gone["channels"] == ("a", "b")
    assert gone["connection_id"] == info["connection_id"]
    assert gone["reason"] == "client"
    assert ext.stats()["connections"] == 0


def test_disconnect_reason_when_the_view_finishes() -> None:
    app = Flask(__name__)
    EventStream(app)

    @app.get("/short")
    @eventstream
    def short() -> t.Iterator[str]:
        yield "only"

    disconnected = Recorder()
    with signals.client_disconnected.connected_to(disconnected, sender=app):
        response = app.test_client().get("/short", buffered=False)
        assert read_events(response, 1)[0].data == "only"
        # the view is finished but the response is read to its end
        list(response.response)
        response.close()
    [(_, gone)] = disconnected.calls
    assert gone["channels"] == ()
    assert gone["reason"] in ("closed", "client")


def test_disconnect_reason_error() -> None:
    app = Flask(__name__)
    EventStream(app)

    @app.get("/err")
    @eventstream
    def err() -> t.Iterator[str]:
        yield "a"
        raise RuntimeError("boom")

    disconnected = Recorder()
    with signals.client_disconnected.connected_to(disconnected, sender=app):
        response = app.test_client().get("/err", buffered=False)
        chunks = list(response.response)
        response.close()
    assert parse(b"".join(chunks))[0].data == "a"
    [(_, gone)] = disconnected.calls
    assert gone["reason"] == "error"


def test_no_connection_signals_for_a_request_that_never_streamed() -> None:
    app = Flask(__name__)
    EventStream(app)

    @app.get("/denied")
    @eventstream
    def denied() -> t.Any:
        from flask import abort

        abort(403)

    connected, disconnected = Recorder(), Recorder()
    with (
        signals.client_connected.connected_to(connected, sender=app),
        signals.client_disconnected.connected_to(disconnected, sender=app),
    ):
        assert app.test_client().get("/denied").status_code == 403
    assert connected.calls == []
    assert disconnected.calls == []


def test_signals_of_another_app_are_not_received() -> None:
    ext = EventStream()
    app1 = make_app(ext)[0]
    app2 = make_app(ext)[0]
    recorder = Recorder()
    with signals.event_published.connected_to(recorder, sender=app1):
        with app2.app_context():
            ext.publish("x", 1)
        with app1.app_context():
            sent = ext.publish("x", 2)
    assert recorder.calls == [(app1, {"channel": "x", "event": sent})]


# -- shutdown --


def test_shutdown_ends_open_streams_and_new_ones_end_at_once() -> None:
    app = make_app(EVENTSTREAM_RETRY=700)[0]
    ext = ext_of(app)
    client = app.test_client()
    disconnected = Recorder()
    with signals.client_disconnected.connected_to(disconnected, sender=app):
        open_stream = client.get("/s?c=a", buffered=False)
        ext.shutdown()
        # the stream ends by itself, after what it had already sent
        assert list(open_stream.response) == [b"retry: 700\n\n"]
        open_stream.close()
        assert [kw["reason"] for _, kw in disconnected.calls] == ["shutdown"]
        late = client.get("/s?c=a", buffered=False)
        assert late.status_code == 200
        assert late.mimetype == "text/event-stream"
        assert list(late.response) == [b"retry: 700\n\n"]
        late.close()
    assert ext.stats() == {"connections": 0, "channels": {}}
