"""`flask eventstream publish CHANNEL DATA [--event NAME] [--string]`."""

from __future__ import annotations

import typing as t

import pytest
from flask import Flask
from flask import request

from flask_eventstream import EventStream
from flask_eventstream import eventstream
from flask_eventstream.broker import parse_id
from flask_eventstream.testing import read_events
from flask_eventstream.testing import ReceivedEvent


@pytest.fixture
def app() -> Flask:
    app = Flask(__name__)
    ext = EventStream(app)

    @app.get("/s")
    @eventstream
    def s() -> t.Any:
        return ext.subscribe(*request.args.getlist("c"))

    return app


def publish(app: Flask, *args: str) -> t.Any:
    return app.test_cli_runner().invoke(args=["eventstream", "publish", *args])


@pytest.mark.parametrize(
    ("args", "event", "data"),
    [
        (
            ["lobby", '{"a": 1, "b": [true, null]}'],
            "message",
            '{"a":1,"b":[true,null]}',
        ),
        (["lobby", "[1, 2]"], "message", "[1,2]"),
        (["lobby", "42"], "message", "42"),
        (["lobby", '"quoted"'], "message", "quoted"),
        (["lobby", "hello world"], "message", "hello world"),
        (["lobby", "{not json"], "message", "{not json"),
        (["lobby", ""], "message", ""),
        (["lobby", "line one\nline two"], "message", "line one\nline two"),
        (["lobby", '{"a": 1}', "--string"], "message", '{"a": 1}'),
        (["lobby", '"quoted"', "--string"], "message", '"quoted"'),
        (["lobby", "hi", "--event", "chat"], "chat", "hi"),
        (["--event", "chat", "--string", "lobby", "[1]"], "chat", "[1]"),
    ],
)
def test_publish_command_reaches_a_subscriber(
    app: Flask, args: list[str], event: str, data: str
) -> None:
    response = app.test_client().get("/s?c=lobby", buffered=False)
    result = publish(app, *args)
    assert result.exit_code == 0, result.output
    event_id = result.stdout.strip()
    assert parse_id(event_id) is not None
    assert read_events(response, 1) == [ReceivedEvent(event, data, event_id)]


def test_publish_command_prints_increasing_ids(app: Flask) -> None:
    ids = [publish(app, "c", str(i)).stdout.strip() for i in range(3)]
    keys = [parse_id(i) for i in ids]
    assert None not in keys
    assert keys == sorted(keys)  # type: ignore[type-var]
    assert len(set(keys)) == 3


@pytest.mark.parametrize("channel", ["bad channel", "", "x" * 129, "caf\xe9", "a/b"])
def test_publish_command_bad_channel(app: Flask, channel: str) -> None:
    result = publish(app, channel, "data")
    assert result.exit_code != 0
    assert "Invalid channel name" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("name", ["a\nb", "a\rb", "a\0b"])
def test_publish_command_bad_event_name(app: Flask, name: str) -> None:
    response = app.test_client().get("/s?c=lobby", buffered=False)
    result = publish(app, "lobby", "data", "--event", name)
    assert result.exit_code != 0
    assert "Event event" in result.output
    assert "Traceback" not in result.output
    ok = publish(app, "lobby", "ok")
    assert read_events(response, 1) == [
        ReceivedEvent("message", "ok", ok.stdout.strip())
    ]


def test_publish_command_missing_arguments(app: Flask) -> None:
    result = publish(app, "lobby")
    assert result.exit_code == 2
    assert "DATA" in result.output


def test_publish_command_is_listed_in_help(app: Flask) -> None:
    result = app.test_cli_runner().invoke(args=["eventstream", "--help"])
    assert result.exit_code == 0
    assert "publish" in result.output
    result = app.test_cli_runner().invoke(args=["eventstream", "publish", "--help"])
    assert "--event" in result.output and "--string" in result.output
