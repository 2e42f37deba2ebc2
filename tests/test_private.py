"""Private channels in one process (Flask's test client, in-memory broker):
grants checked before the first byte, users without grants, revoke and
disconnect, presence and its events. Redis and several workers:
test_private_redis.py; the page in Chromium: test_browser_private.py."""

from __future__ import annotations

import logging
import time
import typing as t

import pytest
from flask import Flask
from flask import request
from itsdangerous import URLSafeTimedSerializer

from flask_eventstream import EventStream
from flask_eventstream import eventstream
from flask_eventstream import EventStreamError
from flask_eventstream import GrantRefused
from flask_eventstream import signals
from flask_eventstream.grants import SALT
from flask_eventstream.testing import EventParser
from flask_eventstream.testing import read_events
from flask_eventstream.testing import ReceivedEvent

KEY = "test-secret-key"


def private_app(**config: t.Any) -> tuple[Flask, EventStream]:
    """``/s/<channels>?grant=…`` (channels joined by ``+``) and
    ``/u/<channel>?user=…`` (a user named by the app, no grant)."""
    app = Flask(__name__)
    app.config.update({"SECRET_KEY": KEY, **config})
    ext = EventStream(app)

    @app.get("/s/<channels>")
    @eventstream
    def granted(channels: str) -> t.Any:
        return ext.subscribe(*channels.split("+"), grant=request.args.get("grant"))

    @app.get("/u/<channel>")
    @eventstream
    def named(channel: str) -> t.Any:
        return ext.subscribe(channel, user=request.args["user"])

    return app, ext


def open_stream(app: Flask, path: str, **kwargs: t.Any) -> t.Any:
    response = app.test_client().get(path, buffered=False, **kwargs)
    return response


def status_of(app: Flask, path: str) -> tuple[int, str, str]:
    """Status, type and body of a refusal; a stream is closed unread."""
    response = app.test_client().get(path, buffered=False)
    try:
        if response.mimetype == "text/event-stream":
            return response.status_code, response.mimetype, ""
        return response.status_code, response.mimetype, response.get_data(as_text=True)
    finally:
        response.close()


def opens(app: Flask, path: str) -> bool:
    """Whether ``path`` opens a stream."""
    return status_of(app, path)[:2] == (200, "text/event-stream")


REFUSED = (403, "text/plain")


def refused(app: Flask, path: str) -> str:
    status, mimetype, body = status_of(app, path)
    assert (status, mimetype) == REFUSED, (status, mimetype, body)
    assert body.startswith("403 Forbidden: Event stream refused: ")
    return body


@pytest.fixture
def disconnects() -> t.Iterator[list[tuple[str | None, str]]]:
    seen: list[tuple[str | None, str]] = []

    def on_disconnected(sender: Flask, **kwargs: t.Any) -> None:
        seen.append((kwargs["user"], kwargs["reason"]))

    signals.client_disconnected.connect(on_disconnected)
    yield seen
    signals.client_disconnected.disconnect(on_disconnected)


# -- grants --


def test_a_grant_opens_its_channels_and_names_the_user() -> None:
    app, ext = private_app()
    with app.app_context():
        token = ext.grant("private-alice", "lobby", user="alice")
    response = open_stream(app, f"/s/private-alice+lobby?grant={token}")
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    with app.app_context():
        assert ext.presence("lobby") == {"alice": 1}
        a = ext.publish("private-alice", "for alice")
        b = ext.publish("lobby", "for all")
    events = read_events(response, 2)
    assert [(e.data, e.id) for e in events] == [("for alice", a.id), ("for all", b.id)]


@pytest.mark.parametrize("path", ["/s/b", "/s/a+b", "/s/b+a", "/s/a+a+b"])
def test_a_grant_for_a_opens_neither_b_nor_a_and_b(path: str) -> None:
    app, ext = private_app()
    with app.app_context():
        token = ext.grant("a", user="alice")
    assert "does not cover every channel" in refused(app, f"{path}?grant={token}")
    assert opens(app, f"/s/a?grant={token}")


def test_refusals_are_plain_403s_never_500s_nor_streams(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, ext = private_app()
    other, other_ext = private_app(SECRET_KEY="another-apps-key")
    with app.app_context():
        good = ext.grant("a", user="alice")
        short = ext.grant("a", user="alice", expires_in=0.05)
    with other.app_context():
        foreign = other_ext.grant("a", user="alice")
    payload, _, signature = good.rpartition(".")
    flipped = payload + "." + signature[:5] + chr(ord(signature[5]) ^ 1) + signature[6:]
    salted = URLSafeTimedSerializer(KEY, salt=SALT + "x").dumps(
        {"c": ["a"], "u": "alice", "i": int(time.time() * 1000), "e": 60000}
    )
    time.sleep(0.06)
    cases = {
        "missing": "/s/a",
        "empty": "/s/a?grant=",
        "flipped signature byte": f"/s/a?grant={flipped}",
        "another app's key": f"/s/a?grant={foreign}",
        "another salt": f"/s/a?grant={salted}",
        "expired": f"/s/a?grant={short}",
        "grant as the channel name": f"/s/{good[:128]}?grant={good}",
        "10 KB grant": "/s/a?grant=" + "A" * 10240,
        "10 KB grant made of a real one": "/s/a?grant=" + (good * 100)[:10240],
        "not base64": "/s/a?grant=%00%ff%fe",
        "bad channel name": f"/s/no%20spaces?grant={good}",
    }
    caplog.set_level(logging.DEBUG)
    bodies = {name: refused(app, path) for name, path in cases.items()}
    assert bodies["missing"].endswith("no grant was given.\n")
    assert bodies["expired"].endswith("the grant has expired.\n")
    assert bodies["another app's key"].endswith("the grant is not valid.\n")
    assert bodies["grant as the channel name"].endswith(
        "does not cover every channel asked for.\n"
    )
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    with app.app_context():
        assert ext.stats()["connections"] == 0


def test_grant_passed_as_a_channel_opens_nothing_private() -> None:
    app, ext = private_app()
    with app.app_context():
        token = ext.grant("private-alice", user="alice")
        with pytest.raises(GrantRefused) as info:
            ext.subscribe(token[:128], grant=token)
        assert info.value.reason == "channels"


def test_grant_without_secret_key_is_a_clear_error() -> None:
    app = Flask(__name__)
    ext = EventStream(app)
    with app.app_context(), pytest.raises(RuntimeError, match="SECRET_KEY"):
        ext.grant("a", user="alice")


def test_secret_key_fallbacks_verify() -> None:
    old, old_ext = private_app(SECRET_KEY="old-key")
    app, ext = private_app(SECRET_KEY="new-key", SECRET_KEY_FALLBACKS=["old-key"])
    with old.app_context():
        token = old_ext.grant("a", user="alice")
    assert opens(app, f"/s/a?grant={token}")
    assert not opens(private_app(SECRET_KEY="new-key")[0], f"/s/a?grant={token}")


def test_grant_and_user_together_is_an_error() -> None:
    app, ext = private_app()
    with app.app_context():
        token = ext.grant("a", user="alice")
        with pytest.raises(TypeError, match="grant= or user="):
            ext.subscribe("a", grant=token, user="bob")


def test_a_stream_ends_when_its_grant_expires(
    disconnects: list[tuple[str | None, str]],
) -> None:
    app, ext = private_app()
    with app.app_context():
        token = ext.grant("a", user="alice", expires_in=0.5)
    start = time.monotonic()
    response = open_stream(app, f"/s/a?grant={token}")
    assert response.status_code == 200
    body = b"".join(response.response)
    response.close()
    elapsed = time.monotonic() - start
    assert 0.3 < elapsed < 3, elapsed
    assert [e.event for e in EventParser().feed(body)] == []
    assert disconnects == [("alice", "lifetime")]
    # The browser's reconnect with the same grant is refused.
    refused(app, f"/s/a?grant={token}")


def test_refusal_is_a_plain_403_and_an_eventstream_error() -> None:
    error = GrantRefused("expired")
    assert isinstance(error, EventStreamError)
    response = error.get_response()
    assert response.status_code == 403
    assert response.mimetype == "text/plain"
    assert response.get_data(as_text=True) == (
        "403 Forbidden: Event stream refused: the grant has expired.\n"
    )


def test_apps_403_handler_applies() -> None:
    app, ext = private_app()

    @app.errorhandler(403)
    def forbidden(e: Exception) -> t.Any:
        return {"error": "forbidden", "reason": getattr(e, "reason", None)}, 403

    response = app.test_client().get("/s/a")
    assert response.status_code == 403
    assert response.json == {"error": "forbidden", "reason": "missing"}


# -- users without grants, presence --


def test_presence_counts_streams_with_a_user_and_returns_to_zero() -> None:
    app, ext = private_app()
    responses = [
        open_stream(app, "/u/lobby?user=alice"),
        open_stream(app, "/u/lobby?user=alice"),
        open_stream(app, "/u/lobby?user=42"),
        open_stream(app, "/u/other?user=bob"),
    ]
    with app.test_request_context():
        token = ext.grant("lobby", user="carol")
    responses.append(open_stream(app, f"/s/lobby?grant={token}"))
    responses.append(app.test_client().get("/s/lobby", buffered=False))  # 403
    with app.app_context():
        ext.subscribe("lobby").close()  # no user: not counted
        assert ext.presence("lobby") == {"42": 2 - 1, "alice": 2, "carol": 1}
        assert ext.presence("other") == {"bob": 1}
        assert ext.presence("nobody") == {}
        with pytest.raises(ValueError):
            ext.presence("bad name")
    for response in responses:
        response.close()
    with app.app_context():
        assert ext.presence("lobby") == {}
        assert ext.presence("other") == {}


def test_user_is_checked() -> None:
    app, ext = private_app()
    with app.app_context():
        with pytest.raises(ValueError, match="Invalid user"):
            ext.subscribe("a", user="line\nbreak")
        with pytest.raises(TypeError):
            ext.subscribe("a", user=["alice"])  # type: ignore[arg-type]


def events_of(response: t.Any, count: int) -> list[tuple[str, str]]:
    return [(e.event, e.data) for e in read_events(response, count)]


def test_presence_events_on_first_and_last_stream() -> None:
    app, ext = private_app(EVENTSTREAM_PRESENCE_EVENTS=True)
    watcher = open_stream(app, "/u/lobby?user=watcher")
    alice1 = open_stream(app, "/u/lobby?user=alice")
    alice2 = open_stream(app, "/u/lobby?user=alice")
    bob = open_stream(app, "/u/lobby?user=bob")
    alice1.close()
    bob.close()
    alice2.close()
    assert events_of(watcher, 5) == [
        ("eventstream-join", '{"user":"watcher"}'),
        ("eventstream-join", '{"user":"alice"}'),
        ("eventstream-join", '{"user":"bob"}'),
        ("eventstream-leave", '{"user":"bob"}'),
        ("eventstream-leave", '{"user":"alice"}'),
    ]


def test_no_presence_events_by_default() -> None:
    app, ext = private_app()
    watcher = open_stream(app, "/u/lobby?user=watcher")
    open_stream(app, "/u/lobby?user=alice").close()
    with app.app_context():
        sent = ext.publish("lobby", "only this")
    assert read_events(watcher, 1) == [ReceivedEvent("message", "only this", sent.id)]


def test_presence_events_are_resumable() -> None:
    app, ext = private_app(EVENTSTREAM_PRESENCE_EVENTS=True)
    with app.app_context():
        first = ext.publish("lobby", "before")
    open_stream(app, "/u/lobby?user=alice").close()
    resumed = open_stream(app, "/u/lobby?user=bob", headers={"Last-Event-ID": first.id})
    assert events_of(resumed, 3) == [
        ("eventstream-join", '{"user":"alice"}'),
        ("eventstream-leave", '{"user":"alice"}'),
        ("eventstream-join", '{"user":"bob"}'),
    ]


# -- revoke and disconnect --


def test_revoke_ends_the_users_streams_and_refuses_older_grants(
    disconnects: list[tuple[str | None, str]],
) -> None:
    app, ext = private_app()
    with app.app_context():
        old = ext.grant("lobby", user="alice")
        bobs = ext.grant("lobby", user="bob")
    alice_granted = open_stream(app, f"/s/lobby?grant={old}")
    alice_named = open_stream(app, "/u/lobby?user=alice")
    bob = open_stream(app, f"/s/lobby?grant={bobs}")
    with app.app_context():
        ext.revoke(user="alice")
        sent = ext.publish("lobby", "after")
    # Alice's streams end without the event; Bob's goes on.
    for response in (alice_granted, alice_named):
        assert [e.data for e in EventParser().feed(b"".join(response.response))] == []
        response.close()
    assert read_events(bob, 1) == [ReceivedEvent("message", "after", sent.id)]
    assert sorted(disconnects) == [
        ("alice", "revoked"),
        ("alice", "revoked"),
        ("bob", "client"),
    ]
    assert refused(app, f"/s/lobby?grant={old}").endswith("the grant was revoked.\n")
    # Grants issued after the revocation work; bob's were never touched.
    with app.app_context():
        new = ext.grant("lobby", user="alice")
    assert opens(app, f"/s/lobby?grant={new}")
    assert opens(app, f"/s/lobby?grant={bobs}")


def test_revoke_ends_a_subscription_outside_a_view() -> None:
    app, ext = private_app()
    with app.app_context():
        sub = ext.subscribe("lobby", user="alice")
        ext.revoke(user="alice")
        assert sub.closed
        assert list(sub) == []


@pytest.mark.parametrize(
    ("target", "ended"),
    [
        ({"channel": "lobby"}, ["alice@lobby", "anon@lobby", "bob@lobby"]),
        ({"user": "alice"}, ["alice@lobby", "alice@other"]),
        ({"channel": "lobby", "user": "alice"}, ["alice@lobby"]),
    ],
)
def test_disconnect_ends_what_matches_and_refuses_nothing(
    target: dict[str, str], ended: list[str]
) -> None:
    app, ext = private_app()
    paths = {
        "alice@lobby": "/u/lobby?user=alice",
        "alice@other": "/u/other?user=alice",
        "bob@lobby": "/u/lobby?user=bob",
        "anon@lobby": "/u/lobby?user=anon",
    }
    streams = {name: open_stream(app, path) for name, path in paths.items()}
    with app.app_context():
        anon = ext.subscribe("lobby")  # no user
        ext.disconnect(**target)
    anon_ended = anon.closed
    anon.close()
    assert anon_ended == ("user" not in target)
    # The streams that were told to end end (here, as the test client reads
    # them), with nothing sent; the others stay counted.
    for name in ended:
        assert b"".join(streams[name].response).count(b"data:") == 0
    with app.app_context():
        assert sorted(
            f"{u}@{c}" for c in ("lobby", "other") for u in ext.presence(c)
        ) == sorted(name for name in paths if name not in ended)
    for response in streams.values():
        response.close()
    with app.app_context():
        token = ext.grant("lobby", user="alice")
    assert opens(app, f"/s/lobby?grant={token}")


def test_disconnect_needs_a_target() -> None:
    app, ext = private_app()
    with app.app_context(), pytest.raises(TypeError, match="channel, a user"):
        ext.disconnect()


# -- logs --


def test_werkzeug_and_gunicorn_access_loggers_redact_grants() -> None:
    private_app()
    for name in ("werkzeug", "gunicorn.access"):
        logger = logging.getLogger(name)
        record = logger.makeRecord(
            name,
            logging.INFO,
            __file__,
            1,
            '"GET /s/a?grant=%s HTTP/1.1" 200',
            ("x",),
            None,
        )
        record.msg = '"GET /s/a?grant=SECRET.TOKEN HTTP/1.1" %s'
        record.args = (200,)
        assert all(f.filter(record) for f in logger.filters)
        assert record.getMessage() == '"GET /s/a?grant=[redacted] HTTP/1.1" 200'


def test_presence_settings_are_checked() -> None:
    with pytest.raises(TypeError, match="EVENTSTREAM_PRESENCE_EVENTS"):
        private_app(EVENTSTREAM_PRESENCE_EVENTS="yes")
    with pytest.raises(ValueError, match="EVENTSTREAM_PRESENCE_TIMEOUT"):
        private_app(EVENTSTREAM_PRESENCE_TIMEOUT=0)
    app, _ = private_app()
    assert app.config["EVENTSTREAM_PRESENCE_EVENTS"] is False
    assert app.config["EVENTSTREAM_PRESENCE_TIMEOUT"] == 30


def test_metrics_hook_sees_the_reason_revoked() -> None:
    from flask_eventstream.observe import Observer
    from flask_eventstream.testing import broker

    ended: list[str] = []

    class Record(Observer):
        def stream_ended(
            self, connection_id: int, channels: tuple[str, ...], reason: str
        ) -> None:
            ended.append(reason)

    app, ext = private_app()
    broker(app).observer = Record()
    alice = open_stream(app, "/u/lobby?user=alice")
    bob = open_stream(app, "/u/lobby?user=bob")
    next(iter(alice.response))  # started
    next(iter(bob.response))
    with app.app_context():
        ext.revoke(user="alice")
        ext.disconnect(user="bob")
    for response in (alice, bob):
        b"".join(response.response)
        response.close()
    assert ended == ["revoked", "revoked"]
