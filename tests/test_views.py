"""@eventstream with Flask's test client: views, items, errors, headers,
request context, heartbeats and cleanup."""

from __future__ import annotations

import logging
import time
import typing as t

import pytest
from flask import abort
from flask import g
from flask import has_request_context
from flask import request
from flask import session

from flask_eventstream import Event
from flask_eventstream import eventstream
from flask_eventstream.sse import HEARTBEAT
from flask_eventstream.testing import connection
from flask_eventstream.testing import parse
from flask_eventstream.testing import read_events
from flask_eventstream.testing import ReceivedEvent
from tests.support.servers import make_app


def read_chunks(response: t.Any, count: int, timeout: float = 5.0) -> list[bytes]:
    """Read up to ``count`` raw chunks; the stream is told to end after
    ``timeout``. Closes the response."""
    conn = connection(response)
    if conn is not None:
        conn.set_deadline(time.monotonic() + timeout)
    chunks: list[bytes] = []
    try:
        for chunk in response.response:
            chunks.append(chunk)
            if len(chunks) >= count:
                break
    finally:
        response.close()
    return chunks


def ev(
    data: str, event: str = "message", id: str = "", retry: int | None = None
) -> ReceivedEvent:
    return ReceivedEvent(event=event, data=data, id=id, retry=retry)


# -- what a view may yield or return --


def test_generator_view_sends_every_item_type() -> None:
    app, _ = make_app()

    @app.get("/items")
    @eventstream
    def items() -> t.Iterator[t.Any]:
        yield Event("first", event="tick", id="1")
        yield "plain"
        yield None
        yield {"a": 1, "b": [True, None]}
        yield [1, "x"]
        yield b"bytes"
        yield "multi\nline\r\nend"
        yield Event({"k": "v"}, id="custom-id", retry=250)
        yield "last"

    response = app.test_client().get("/items", buffered=False)
    assert response.status_code == 200
    assert read_events(response, 8) == [
        ev("first", "tick", "1", None),
        ev("plain", id="1"),
        ev('{"a":1,"b":[true,null]}', id="1"),
        ev('[1,"x"]', id="1"),
        ev("bytes", id="1"),
        ev("multi\nline\nend", id="1"),
        ev('{"k":"v"}', id="custom-id", retry=250),
        ev("last", id="custom-id"),
    ]


def test_generator_view_exact_bytes_and_none_sends_nothing() -> None:
    app, _ = make_app()

    @app.get("/g")
    @eventstream
    def gen() -> t.Iterator[t.Any]:
        yield None
        yield "a"
        yield None
        yield None
        yield {"b": 2}

    response = app.test_client().get("/g", buffered=False)
    chunks = read_chunks(response, 10)
    assert chunks == [b"retry: 3000\n\n", b"data: a\n\n", b'data: {"b":2}\n\n']


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        (Event("e", event="x", id="9"), b"event: x\nid: 9\ndata: e\n\n"),
        ("text", b"data: text\n\n"),
        ({"a": 1}, b'data: {"a":1}\n\n'),
        ([1, 2], b"data: [1,2]\n\n"),
        (None, b""),
    ],
)
def test_view_returning_one_value_sends_it_and_ends(value: t.Any, wire: bytes) -> None:
    app, _ = make_app()

    @app.get("/one")
    @eventstream
    def one() -> t.Any:
        return value

    response = app.test_client().get("/one", buffered=False)
    assert read_chunks(response, 10) == [b"retry: 3000\n\n" + wire]


def test_view_returning_a_list_of_events_is_one_json_event() -> None:
    # A list is JSON data, not a sequence of events.
    app, _ = make_app()

    @app.get("/l")
    @eventstream
    def lst() -> t.Any:
        return ["a", "b"]

    response = app.test_client().get("/l", buffered=False)
    assert read_events(response, 1) == [ev('["a","b"]')]


def test_view_returning_an_iterable_sends_each_item() -> None:
    app, _ = make_app()

    @app.get("/it")
    @eventstream
    def it() -> t.Any:
        return iter([Event("a", id="1"), "b"])

    response = app.test_client().get("/it", buffered=False)
    assert read_events(response, 2) == [ev("a", id="1"), ev("b", id="1")]


def test_view_returning_a_response_or_tuple_passes_through() -> None:
    app, _ = make_app()

    @app.get("/tuple")
    @eventstream
    def tup() -> t.Any:
        return {"error": "gone"}, 410

    @app.get("/redirect")
    @eventstream
    def redirect() -> t.Any:
        return app.redirect("/elsewhere")

    client = app.test_client()
    response = client.get("/tuple")
    assert response.status_code == 410
    assert response.get_json() == {"error": "gone"}
    response = client.get("/redirect")
    assert response.status_code == 302
    assert response.headers["Location"] == "/elsewhere"


def test_generator_that_yields_nothing_sends_only_retry() -> None:
    app, _ = make_app(EVENTSTREAM_RETRY=10)

    @app.get("/empty")
    @eventstream
    def empty() -> t.Iterator[t.Any]:
        return
        yield

    response = app.test_client().get("/empty", buffered=False)
    assert read_chunks(response, 10) == [b"retry: 10\n\n"]


def test_decorator_with_empty_parentheses() -> None:
    app, _ = make_app()

    @app.get("/p")
    @eventstream()
    def p() -> t.Iterator[str]:
        yield "x"
        yield "y"

    response = app.test_client().get("/p", buffered=False)
    assert read_events(response, 2) == [ev("x"), ev("y")]


def test_view_arguments_are_passed() -> None:
    app, _ = make_app()

    @app.get("/hello/<name>")
    @eventstream
    def hello(name: str) -> t.Iterator[str]:
        yield f"hello {name}"

    response = app.test_client().get("/hello/ann", buffered=False)
    assert read_events(response, 1) == [ev("hello ann")]


# -- periodic views --


def test_periodic_view_is_called_every_interval() -> None:
    app, _ = make_app()
    interval = 0.05

    @app.get("/clock/<name>")
    @eventstream(interval=interval)
    def clock(name: str) -> Event:
        g.n = g.get("n", 0) + 1
        return Event({"n": g.n, "name": name}, event="tick")

    start = time.monotonic()
    response = app.test_client().get("/clock/c", buffered=False)
    events = read_events(response, 4)
    elapsed = time.monotonic() - start
    assert events == [ev(f'{{"n":{n},"name":"c"}}', "tick") for n in (1, 2, 3, 4)]
    # the first call is made at once, then one per interval
    assert elapsed >= 3 * interval * 0.9
    assert elapsed < 3 * interval + 2.0


def test_periodic_view_every_return_type_and_none_sends_nothing() -> None:
    app, _ = make_app()
    values: list[t.Any] = [
        "text",
        None,
        {"a": 1},
        None,
        [1],
        Event("ev", event="named", id="5"),
        None,
        "end",
    ]

    @app.get("/values")
    @eventstream(interval=0.01)
    def values_view() -> t.Any:
        g.i = g.get("i", -1) + 1
        return values[g.i] if g.i < len(values) else None

    response = app.test_client().get("/values", buffered=False)
    assert read_events(response, 5) == [
        ev("text"),
        ev('{"a":1}'),
        ev("[1]"),
        ev("ev", "named", "5"),
        ev("end", id="5"),
    ]


def test_periodic_view_sends_heartbeats_between_long_intervals() -> None:
    app, _ = make_app(EVENTSTREAM_HEARTBEAT=0.05)

    @app.get("/slow")
    @eventstream(interval=30)
    def slow() -> str:
        return "tick"

    response = app.test_client().get("/slow", buffered=False)
    chunks = read_chunks(response, 3)
    assert chunks == [b"retry: 3000\n\ndata: tick\n\n", HEARTBEAT, HEARTBEAT]


def test_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="interval"):
        eventstream(interval=0)
    with pytest.raises(ValueError, match="interval"):
        eventstream(interval=-1.0)


def test_interval_on_a_generator_function_is_a_type_error() -> None:
    def gen() -> t.Iterator[str]:
        yield "x"

    with pytest.raises(TypeError, match="generator"):
        eventstream(interval=1.0)(gen)


# -- errors before the first event are HTTP errors --


def test_abort_before_the_first_event_is_a_real_403() -> None:
    app, stream = make_app()

    @app.get("/private")
    @eventstream
    def private() -> t.Any:
        abort(403)
        return stream.subscribe("x")

    response = app.test_client().get("/private", buffered=False)
    assert response.status_code == 403
    assert not response.mimetype.startswith("text/event-stream")
    body = response.get_data()
    assert b"retry:" not in body
    assert b"Forbidden" in body
    assert stream.stats() == {"connections": 0, "channels": {}}


def test_generator_view_that_aborts_before_its_first_yield() -> None:
    app, stream = make_app()
    ran_finally: list[bool] = []

    @app.get("/gen")
    @eventstream
    def gen() -> t.Iterator[str]:
        try:
            if request.args.get("allow") != "1":
                abort(403)
            yield "welcome"
        finally:
            ran_finally.append(True)

    client = app.test_client()
    response = client.get("/gen", buffered=False)
    assert response.status_code == 403
    assert b"retry:" not in response.get_data()
    assert ran_finally == [True]
    assert stream.stats()["connections"] == 0
    response = client.get("/gen?allow=1", buffered=False)
    assert response.status_code == 200
    assert read_events(response, 1) == [ev("welcome")]
    assert ran_finally == [True, True]


def test_periodic_view_that_aborts_on_its_first_call_is_a_real_403() -> None:
    app, stream = make_app()

    @app.get("/tick")
    @eventstream(interval=0.01)
    def tick() -> str:
        if request.args.get("allow") != "1":
            abort(403)
        return "tick"

    client = app.test_client()
    response = client.get("/tick", buffered=False)
    assert response.status_code == 403
    assert b"retry:" not in response.get_data()
    assert stream.stats()["connections"] == 0
    response = client.get("/tick?allow=1", buffered=False)
    assert read_events(response, 2) == [ev("tick"), ev("tick")]


def test_failed_lookup_before_the_first_yield_is_a_404() -> None:
    app, _ = make_app()
    rooms = {"lobby": "Lobby"}

    @app.get("/room/<name>")
    @eventstream
    def room(name: str) -> t.Iterator[str]:
        title = rooms.get(name)
        if title is None:
            abort(404)
        yield title

    client = app.test_client()
    assert client.get("/room/nope", buffered=False).status_code == 404
    response = client.get("/room/lobby", buffered=False)
    assert read_events(response, 1) == [ev("Lobby")]


def test_exception_before_the_first_event_is_a_500() -> None:
    app, _ = make_app()

    @app.get("/bad")
    @eventstream
    def bad() -> t.Iterator[str]:
        raise LookupError("no such thing")
        yield "never"

    response = app.test_client().get("/bad", buffered=False)
    assert response.status_code == 500
    assert b"retry:" not in response.get_data()


def test_exception_after_the_stream_started_ends_it_cleanly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, _ = make_app()
    ran_finally: list[bool] = []

    @app.get("/boom")
    @eventstream
    def boom() -> t.Iterator[str]:
        try:
            yield "one"
            yield "two"
            raise RuntimeError("secret detail")
        finally:
            ran_finally.append(True)

    response = app.test_client().get("/boom", buffered=False)
    assert response.status_code == 200
    with caplog.at_level(logging.ERROR, logger="flask_eventstream"):
        chunks = read_chunks(response, 10)
    assert chunks == [b"retry: 3000\n\ndata: one\n\n", b"data: two\n\n"]
    assert ran_finally == [True]
    [record] = [r for r in caplog.records if r.name.startswith("flask_eventstream")]
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None
    assert "secret detail" in str(record.exc_info[1])


def test_invalid_item_after_the_stream_started_ends_it_cleanly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, _ = make_app()

    @app.get("/bad-item")
    @eventstream
    def bad_item() -> t.Iterator[t.Any]:
        yield "ok"
        yield {1, 2}  # not JSON serialisable
        yield "never"

    response = app.test_client().get("/bad-item", buffered=False)
    with caplog.at_level(logging.ERROR, logger="flask_eventstream"):
        chunks = read_chunks(response, 10)
    assert chunks == [b"retry: 3000\n\ndata: ok\n\n"]
    assert any("set" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)


def test_exception_in_a_later_periodic_call_ends_the_stream(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, _ = make_app()

    @app.get("/flaky")
    @eventstream(interval=0.01)
    def flaky() -> str:
        g.n = g.get("n", 0) + 1
        if g.n == 3:
            raise RuntimeError("third call fails")
        return str(g.n)

    response = app.test_client().get("/flaky", buffered=False)
    with caplog.at_level(logging.ERROR, logger="flask_eventstream"):
        chunks = read_chunks(response, 10)
    assert parse(b"".join(chunks)) == [ev("1"), ev("2")]
    assert len([r for r in caplog.records if r.exc_info]) == 1


# -- the request context lives as long as the stream --


def test_request_g_and_session_are_available_for_the_life_of_the_stream() -> None:
    app, stream = make_app(SECRET_KEY="test")

    @app.get("/ctx")
    @eventstream
    def ctx() -> t.Iterator[t.Any]:
        g.user = session["user"]
        yield {"arg": request.args["q"], "user": g.user}
        for i in range(3):
            stream.sleep(0.01)
            yield {
                "i": i,
                "path": request.path,
                "arg": request.args["q"],
                "header": request.headers["X-Test"],
                "user": g.user,
                "session": session["user"],
            }

    client = app.test_client()
    with client.session_transaction() as sess:
        sess["user"] = "ann"
    response = client.get("/ctx?q=hello", headers={"X-Test": "yes"}, buffered=False)
    events = read_events(response, 4)
    assert events[0] == ev('{"arg":"hello","user":"ann"}')
    for i, event in enumerate(events[1:]):
        assert event == ev(
            f'{{"i":{i},"path":"/ctx","arg":"hello","header":"yes",'
            '"user":"ann","session":"ann"}'
        )


def test_periodic_view_sees_the_same_request_and_g_every_call() -> None:
    app, _ = make_app()

    @app.get("/who")
    @eventstream(interval=0.01)
    def who() -> dict[str, t.Any]:
        g.calls = g.get("calls", 0) + 1
        return {"who": request.args["name"], "calls": g.calls}

    response = app.test_client().get("/who?name=bo", buffered=False)
    assert read_events(response, 3) == [
        ev(f'{{"who":"bo","calls":{n}}}') for n in (1, 2, 3)
    ]


# -- headers and the first bytes --


def test_headers_are_exactly_the_sse_ones() -> None:
    app, stream = make_app()
    response = app.test_client().get("/s?c=h", buffered=False)
    try:
        assert response.status_code == 200
        assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        assert response.headers["Cache-Control"] == "no-cache"
        assert response.headers["X-Accel-Buffering"] == "no"
        assert sorted(k.lower() for k in response.headers.keys()) == [
            "cache-control",
            "content-type",
            "x-accel-buffering",
        ]
        for hop in ("Connection", "Keep-Alive", "Transfer-Encoding", "Content-Length"):
            assert hop not in response.headers
    finally:
        response.close()


def test_first_chunk_is_the_retry_field() -> None:
    app, stream = make_app(EVENTSTREAM_RETRY=1234)
    response = app.test_client().get("/s?c=r", buffered=False)
    stream.publish("r", "x")
    chunks = read_chunks(response, 2)
    assert chunks[0] == b"retry: 1234\n\n"
    [event] = parse(b"".join(chunks))
    assert (event.data, event.retry) == ("x", None)


def test_first_chunk_carries_the_first_event_with_retry() -> None:
    app, _ = make_app(EVENTSTREAM_RETRY=0)

    @app.get("/g")
    @eventstream
    def gen() -> t.Iterator[str]:
        yield "first"

    response = app.test_client().get("/g", buffered=False)
    assert read_chunks(response, 1) == [b"retry: 0\n\ndata: first\n\n"]


# -- heartbeats --


def test_heartbeat_on_an_idle_subscription() -> None:
    app, stream = make_app(EVENTSTREAM_HEARTBEAT=0.1)

    @app.get("/idle")
    @eventstream
    def idle() -> t.Any:
        return stream.subscribe("quiet")

    response = app.test_client().get("/idle", buffered=False)
    start = time.monotonic()
    it = iter(response.response)
    try:
        assert next(it) == b"retry: 3000\n\n"
        assert next(it) == HEARTBEAT
        first = time.monotonic() - start
        assert next(it) == HEARTBEAT
        second = time.monotonic() - start
    finally:
        response.close()
    assert 0.09 <= first < 2.0
    assert second - first >= 0.09


def test_no_heartbeat_while_events_flow() -> None:
    app, stream = make_app(EVENTSTREAM_HEARTBEAT=0.2)

    @app.get("/busy")
    @eventstream
    def busy() -> t.Iterator[t.Any]:
        for i in range(6):
            stream.sleep(0.05)
            yield str(i)

    response = app.test_client().get("/busy", buffered=False)
    chunks = read_chunks(response, 20)
    assert HEARTBEAT not in chunks
    assert [e.data for e in parse(b"".join(chunks))] == ["0", "1", "2", "3", "4", "5"]


def test_yielding_none_sends_a_heartbeat_when_one_is_due() -> None:
    app, stream = make_app(EVENTSTREAM_HEARTBEAT=0.05)

    @app.get("/poll")
    @eventstream
    def poll() -> t.Iterator[t.Any]:
        yield None  # nothing due yet: nothing sent
        yield "start"
        yield None  # nothing due yet: nothing sent
        stream.sleep(0.1)
        yield None  # idle for longer than the heartbeat: a heartbeat
        yield "done"

    response = app.test_client().get("/poll", buffered=False)
    assert read_chunks(response, 10) == [
        b"retry: 3000\n\n",
        b"data: start\n\n",
        HEARTBEAT,
        b"data: done\n\n",
    ]


# -- cleanup --


def test_generator_finally_runs_when_the_response_is_closed() -> None:
    app, stream = make_app()
    log: list[str] = []

    @app.get("/forever")
    @eventstream
    def forever() -> t.Iterator[str]:
        try:
            n = 0
            while True:
                n += 1
                yield str(n)
                stream.sleep(0.01)
        finally:
            log.append("finally")

    response = app.test_client().get("/forever", buffered=False)
    assert read_events(response, 3) == [ev("1"), ev("2"), ev("3")]
    assert log == ["finally"]
    assert stream.stats()["connections"] == 0


def test_subscribing_generator_finally_runs_when_the_response_is_closed() -> None:
    app, stream = make_app()
    log: list[str] = []

    @app.get("/sub")
    @eventstream
    def sub() -> t.Iterator[t.Any]:
        subscription = stream.subscribe("room")
        try:
            yield Event({"snapshot": True}, event="snapshot")
            yield from subscription
        finally:
            log.append("finally")

    response = app.test_client().get("/sub", buffered=False)
    assert stream.stats() == {"connections": 1, "channels": {"room": 1}}
    stream.publish("room", "live")
    events = read_events(response, 2)
    assert [(e.event, e.data) for e in events] == [
        ("snapshot", '{"snapshot":true}'),
        ("message", "live"),
    ]
    assert log == ["finally"]
    assert stream.stats() == {"connections": 0, "channels": {}}


def test_finally_runs_when_a_response_is_closed_before_it_is_read() -> None:
    app, stream = make_app()
    log: list[str] = []

    @app.get("/unread")
    @eventstream
    def unread() -> t.Iterator[str]:
        try:
            yield "x"
            yield "y"
        finally:
            log.append("finally")

    response = app.test_client().get("/unread", buffered=False)
    assert stream.stats()["connections"] == 1
    response.close()
    assert log == ["finally"]
    assert stream.stats()["connections"] == 0


def test_sleep_returns_early_when_the_stream_is_ended() -> None:
    app, stream = make_app()

    @app.get("/sleepy")
    @eventstream
    def sleepy() -> t.Iterator[str]:
        yield "a"
        stream.sleep(60)
        yield "b"

    response = app.test_client().get("/sleepy", buffered=False)
    start = time.monotonic()
    chunks = read_chunks(response, 10, timeout=0.3)
    assert chunks == [b"retry: 3000\n\ndata: a\n\n"]
    assert time.monotonic() - start < 5.0


def test_read_events_raises_timeout_error_with_what_arrived() -> None:
    app, stream = make_app()

    @app.get("/few")
    @eventstream
    def few() -> t.Any:
        return stream.subscribe("few")

    response = app.test_client().get("/few", buffered=False)
    stream.publish("few", "only one")
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="only one"):
        read_events(response, 2, timeout=0.3)
    assert 0.25 < time.monotonic() - start < 3.0
    assert stream.stats()["connections"] == 0


def test_open_streams_keep_their_own_request_context() -> None:
    # The test client runs every stream in the test's thread: a suspended
    # stream must not leave its request context pushed there, and streams
    # read or closed in any order each see their own request.
    app, stream = make_app()

    @app.get("/me/<name>")
    @eventstream
    def me(name: str) -> t.Iterator[t.Any]:
        yield {"name": name, "arg": request.args["n"]}
        for _ in range(2):
            stream.sleep(0.01)
            yield {"name": name, "arg": request.args["n"], "path": request.path}

    client = app.test_client()
    r1 = client.get("/me/one?n=1", buffered=False)
    assert not has_request_context()
    r2 = client.get("/me/two?n=2", buffered=False)
    r3 = client.get("/me/three?n=3", buffered=False)
    assert not has_request_context()
    assert [e.data for e in read_events(r1, 3)] == [
        '{"name":"one","arg":"1"}',
        '{"name":"one","arg":"1","path":"/me/one"}',
        '{"name":"one","arg":"1","path":"/me/one"}',
    ]
    assert read_events(r3, 1) == [ev('{"name":"three","arg":"3"}')]
    assert [e.data for e in read_events(r2, 2)] == [
        '{"name":"two","arg":"2"}',
        '{"name":"two","arg":"2","path":"/me/two"}',
    ]
    assert not has_request_context()
    assert stream.stats()["connections"] == 0
