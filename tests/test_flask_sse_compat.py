"""``flask_eventstream.compat.flask_sse``: flask-sse's blueprint API, in
process (Flask's test client); the quickstart app in a browser is in
test_flask_sse_quickstart.py."""

from __future__ import annotations

import json
import typing as t

import pytest
from flask import abort
from flask import Flask
from flask import request
from flask import url_for

from flask_eventstream import Event
from flask_eventstream import EventStream
from flask_eventstream.compat.flask_sse import ServerSentEventsBlueprint
from flask_eventstream.compat.flask_sse import sse
from flask_eventstream.testing import parse
from flask_eventstream.testing import read_events
from flask_eventstream.testing import ReceivedEvent


def make_app(**config: t.Any) -> Flask:
    app = Flask(__name__)
    app.config.update(config)
    app.register_blueprint(sse, url_prefix="/stream")
    return app


def pub(app: Flask, *args: t.Any, **kwargs: t.Any) -> Event:
    """``sse.publish`` in an app context of ``app``."""
    with app.app_context():
        return sse.publish(*args, **kwargs)


def rec(event: Event) -> ReceivedEvent:
    return ReceivedEvent(event.event or "message", event.text, t.cast(str, event.id))


@pytest.mark.parametrize(
    ("kwargs", "expected_event", "expected_data"),
    [
        # Not a str: the application's JSON provider, as flask-sse does.
        ({"data": {"message": "Hello!"}, "type": "greeting"}, "greeting", None),
        ({"data": {"b": 1, "a": [1, 2]}}, "message", None),
        ({"data": [1, "two", None]}, "message", None),
        ({"data": 42}, "message", "42"),
        # A str is sent as it is.
        ({"data": "plain text"}, "message", "plain text"),
        ({"data": '{"already": "json"}'}, "message", '{"already": "json"}'),
        ({"data": "two\nlines"}, "message", "two\nlines"),
        # flask-sse omits an empty type.
        ({"data": "x", "type": ""}, "message", "x"),
    ],
)
def test_publish_encodes_like_flask_sse(
    kwargs: dict[str, t.Any], expected_event: str, expected_data: str | None
) -> None:
    app = make_app()
    with app.app_context():
        expected = expected_data or app.json.dumps(kwargs["data"])
    response = app.test_client().get("/stream", buffered=False)
    sent = pub(app, **kwargs)
    assert sent.text == expected
    events = read_events(response, 1)
    assert events == [ReceivedEvent(expected_event, expected, t.cast(str, sent.id))]


def test_json_uses_the_app_json_provider() -> None:
    app = make_app()
    response = app.test_client().get("/stream", buffered=False)
    pub(app, {"z": 1, "a": "é"}, type="greeting")
    [event] = read_events(response, 1)
    # Flask's provider: sorted keys, ASCII escapes, default separators.
    assert event.data == '{"a": "\\u00e9", "z": 1}'
    assert json.loads(event.data) == {"a": "é", "z": 1}


def test_retry_is_sent_with_the_event() -> None:
    app = make_app()
    response = app.test_client().get("/stream", buffered=False)
    sent = pub(app, "r", retry=1234)
    [event] = read_events(response, 1)
    assert event == ReceivedEvent("message", "r", t.cast(str, sent.id), retry=1234)


def test_channels_are_chosen_with_the_query_parameter() -> None:
    app = make_app()
    client = app.test_client()
    default = client.get("/stream", buffered=False)
    garden = client.get("/stream?channel=garden", buffered=False)
    a = pub(app, "to sse")
    b = pub(app, "to garden", channel="garden")
    c = pub(app, "sse again", channel="sse")
    assert read_events(default, 2) == [rec(a), rec(c)]
    assert read_events(garden, 1) == [rec(b)]
    with app.test_request_context():
        assert url_for("sse.stream", channel="garden") == "/stream?channel=garden"


def test_resumes_from_last_event_id() -> None:
    app = make_app()
    client = app.test_client()
    first = pub(app, {"n": 1})
    missed = [pub(app, {"n": n}, type="greeting") for n in (2, 3)]
    response = client.get(
        "/stream", headers={"Last-Event-ID": t.cast(str, first.id)}, buffered=False
    )
    assert read_events(response, 2) == [rec(e) for e in missed]


def test_publish_with_id_warns_and_the_library_assigns_it() -> None:
    app = make_app()
    response = app.test_client().get("/stream", buffered=False)
    with pytest.warns(UserWarning, match="assigns every event's id"):
        sent = pub(app, "x", id="my-id")
    assert sent.id != "my-id"
    assert read_events(response, 1) == [rec(sent)]


@pytest.mark.parametrize("channel", ["a b", "x" * 129, "caf\xe9", "a/b"])
def test_bad_channel_is_a_400_not_a_500(channel: str) -> None:
    app = make_app()
    response = app.test_client().get("/stream", query_string={"channel": channel})
    assert response.status_code == 400
    assert b"Invalid channel name" in response.data
    with app.app_context(), pytest.raises(ValueError, match="Invalid channel name"):
        sse.publish("x", channel=channel)


def test_before_request_access_control_on_the_blueprint() -> None:
    bp = ServerSentEventsBlueprint("guarded", __name__)
    bp.add_url_rule(rule="", endpoint="stream", view_func=bp.stream)

    @bp.before_request
    def check_access() -> None:
        if request.args.get("channel") == "analytics":
            abort(403)

    app = Flask(__name__)
    app.register_blueprint(bp, url_prefix="/sse")
    client = app.test_client()
    assert client.get("/sse?channel=analytics").status_code == 403
    response = client.get("/sse?channel=users.social", buffered=False)
    with app.app_context():
        sent = bp.publish("hi", channel="users.social")
    assert read_events(response, 1) == [rec(sent)]


def test_redis_url_keys_in_order() -> None:
    url = "redis://127.0.0.1:1/0"
    for config, expected in [
        ({"REDIS_URL": url}, url),
        ({"REDIS_URL": "redis://other:1", "SSE_REDIS_URL": url}, url),
        ({"SSE_REDIS_URL": "redis://other:1", "EVENTSTREAM_REDIS_URL": url}, url),
        ({}, None),
    ]:
        app = make_app(**config)
        assert app.config["EVENTSTREAM_REDIS_URL"] == expected
        with app.app_context():
            assert sse.eventstream.redis_url == expected


def test_an_existing_eventstream_is_used() -> None:
    app = Flask(__name__)
    ext = EventStream(app)
    app.register_blueprint(sse, url_prefix="/stream")
    with app.app_context():
        assert sse.eventstream is ext
    response = app.test_client().get("/stream?channel=lobby", buffered=False)
    sent = ext.publish("lobby", "from the extension")
    via_sse = pub(app, "from the blueprint", channel="lobby")
    assert read_events(response, 2) == [rec(sent), rec(via_sse)]


def test_publish_outside_a_registered_app_says_so() -> None:
    app = Flask(__name__)
    with app.app_context(), pytest.raises(RuntimeError, match="register_blueprint"):
        sse.publish("x")


def test_stream_starts_with_retry_and_heartbeats() -> None:
    app = make_app(EVENTSTREAM_HEARTBEAT=0.05, EVENTSTREAM_RETRY=1500)
    response = app.test_client().get("/stream", buffered=False)
    chunks = iter(response.response)
    first = next(chunks)
    assert first == b"retry: 1500\n\n"
    beat = next(chunks)
    assert beat == b":\n\n"
    assert parse(first + beat) == []
    response.close()
