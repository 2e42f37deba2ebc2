"""A third-party SSE client (httpx + httpx-sse) reads the example's streams
from a real server and gets exactly the published events."""

from __future__ import annotations

import datetime
import json
import typing as t

import pytest

from tests.support.servers import Server

httpx = pytest.importorskip("httpx")
httpx_sse = pytest.importorskip("httpx_sse")

pytestmark = pytest.mark.server

StartServer = t.Callable[..., Server]

#: Values whose wire form is easy to get wrong: line breaks of every kind,
#: the characters str.splitlines() wrongly breaks on, JSON, empty data.
PAYLOADS: list[tuple[str | None, t.Any, str]] = [
    ("chat", {"text": "hi", "user": "ann"}, '{"text":"hi","user":"ann"}'),
    (None, "plain text", "plain text"),
    ("chat", "two\nlines", "two\nlines"),
    ("chat", "crlf\r\nand lone\rcr", "crlf\nand lone\ncr"),
    (
        "odd",
        "u2028\u2028u2029\u2029nel\x85vt\x0bff\x0c",
        "u2028\u2028u2029\u2029nel\x85vt\x0bff\x0c",
    ),
    (None, "", ""),
    ("list", [1, "two", None], '[1,"two",null]'),
    ("num", 42, "42"),
    (None, "trailing newline\n", "trailing newline\n"),
    ("unicode", "žluťoučký 🐎", "žluťoučký 🐎"),
]


def read(source: t.Any, count: int) -> list[t.Any]:
    """``count`` events from an httpx-sse source. httpx-sse dispatches a
    block that only sets ``retry`` as an event with empty data (browsers do
    not); those are skipped."""
    events = []
    for sse in source.iter_sse():
        if sse.retry is not None and sse.data == "":
            continue
        events.append(sse)
        if len(events) == count:
            break
    return events


@pytest.mark.parametrize("kind", ["example", "gunicorn"])
def test_httpx_sse_reads_exactly_the_published_events(
    start_server: StartServer, kind: str
):
    server = start_server(kind, app="example_app")
    base = f"http://127.0.0.1:{server.port}"
    timeout = httpx.Timeout(5.0)
    with httpx.Client(base_url=base, timeout=timeout) as client:
        with httpx_sse.connect_sse(client, "GET", "/stream/lobby") as source:
            assert source.response.status_code == 200
            assert source.response.headers["content-type"].startswith(
                "text/event-stream"
            )
            expected = []
            # The subscription exists once the head arrived: publish now.
            with httpx.Client(base_url=base, timeout=timeout) as publisher:
                for event, data, text in PAYLOADS:
                    body: dict[str, t.Any] = {"data": data}
                    if event is not None:
                        body["event"] = event
                    sent = publisher.post("/publish/lobby", json=body)
                    assert sent.status_code == 202, sent.text
                    assert sent.json()["channel"] == "lobby"
                    expected.append((event or "message", text, sent.json()["id"]))
            got = read(source, len(expected))
            assert [(e.event, e.data, e.id) for e in got] == expected
            assert json.loads(got[0].data) == PAYLOADS[0][1]
        last_id = expected[-1][2]
        # Resume with httpx-sse sending Last-Event-ID.
        with httpx.Client(base_url=base, timeout=timeout) as publisher:
            missed = publisher.post("/publish/lobby", json={"data": "missed"})
        with httpx_sse.connect_sse(
            client, "GET", "/stream/lobby", headers={"Last-Event-ID": last_id}
        ) as source:
            [event] = read(source, 1)
            assert (event.event, event.data, event.id) == (
                "message",
                "missed",
                missed.json()["id"],
            )


@pytest.mark.parametrize("kind", ["example", "gunicorn"])
def test_httpx_sse_reads_the_clock(start_server: StartServer, kind: str):
    server = start_server(
        kind, app="example_app", env={"EXAMPLE_CLOCK_INTERVAL": "0.2"}
    )
    base = f"http://127.0.0.1:{server.port}"
    with httpx.Client(base_url=base, timeout=httpx.Timeout(5.0)) as client:
        with httpx_sse.connect_sse(client, "GET", "/clock") as source:
            events = read(source, 3)
    assert [(e.event, e.id) for e in events] == [("message", "")] * 3
    values = [json.loads(e.data) for e in events]
    assert [v["n"] for v in values] == [1, 2, 3]
    times = [datetime.datetime.fromisoformat(v["time"]) for v in values]
    assert all(
        t.tzinfo is not None and t.utcoffset() == datetime.timedelta(0) for t in times
    )
    gaps = [(b - a).total_seconds() for a, b in zip(times, times[1:], strict=False)]
    assert all(0.1 <= gap <= 1.0 for gap in gaps), gaps
