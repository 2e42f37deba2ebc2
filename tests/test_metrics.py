"""Prometheus metrics in one process (``EVENTSTREAM_METRICS``), counted at
the place each thing happens. The sums over gunicorn workers are in
test_metrics_workers.py."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import typing as t
from collections.abc import Iterator

import pytest
from flask import Flask
from flask import Response

from flask_eventstream import EventStream
from flask_eventstream import PublishError
from flask_eventstream.metrics import DISCONNECT_REASONS
from flask_eventstream.metrics import exposition
from flask_eventstream.testing import EventParser
from flask_eventstream.testing import ReceivedEvent
from tests.support.redis import close_app
from tests.support.redis import RedisServer
from tests.support.servers import make_app
from tests.support.servers import ROOT

prometheus_client = pytest.importorskip("prometheus_client")

NAMES = [
    "eventstream_connections",
    "eventstream_connections_opened_total",
    "eventstream_events_published_total",
    "eventstream_deliveries_total",
    "eventstream_publish_errors_total",
    *[f'eventstream_disconnects_total{{reason="{r}"}}' for r in DISCONNECT_REASONS],
    'eventstream_resumes_total{result="replayed"}',
    'eventstream_resumes_total{result="reset"}',
]


def values() -> dict[str, float]:
    """Every eventstream_* sample of the default registry."""
    found: dict[str, float] = {}
    for name in NAMES:
        metric, _, labels = name.partition("{")
        label_dict = {}
        if labels:
            key, _, value = labels.rstrip("}").partition("=")
            label_dict[key] = value.strip('"')
        sample = prometheus_client.REGISTRY.get_sample_value(metric, label_dict)
        found[name] = 0.0 if sample is None else sample
    return found


class Counts:
    """Changes of the metrics since it was made."""

    def __init__(self) -> None:
        self.start = values()

    def delta(self) -> dict[str, float]:
        now = values()
        return {k: now[k] - self.start[k] for k in NAMES if now[k] != self.start[k]}


class Reader:
    """Steps a test-client streaming response chunk by chunk, as a server
    does: each step asks for the next chunk after the previous one was
    "written"."""

    def __init__(self, response: Response) -> None:
        self.response = response
        self.chunks: Iterator[bytes] = iter(
            t.cast(t.Iterable[bytes], response.response)
        )
        self.parser = EventParser()
        self.events: list[ReceivedEvent] = []

    def step(self) -> list[ReceivedEvent]:
        events = self.parser.feed(next(self.chunks))
        self.events += events
        return events

    def ended(self) -> bool:
        """One more step; whether the stream ended."""
        try:
            self.step()
        except StopIteration:
            return True
        return False

    def close(self) -> None:
        self.response.close()


def test_metrics_count_streams_events_resumes_and_reasons() -> None:
    counts = Counts()
    app, ext = make_app(
        EVENTSTREAM_METRICS=True,
        EVENTSTREAM_QUEUE_SIZE=3,
        EVENTSTREAM_MAX_LIFETIME=0.5,
        EVENTSTREAM_HEARTBEAT=0.05,
    )
    client = app.test_client()
    a = Reader(client.get("/s?c=m", buffered=False))
    b = Reader(client.get("/s?c=m", buffered=False))
    slow = Reader(client.get("/s?c=m", buffered=False))
    for reader in (a, b, slow):
        assert reader.step() == []  # the retry field
    assert counts.delta() == {
        "eventstream_connections": 3,
        "eventstream_connections_opened_total": 3,
    }

    sent = [ext.publish("m", n) for n in range(2)]
    for reader in (a, b):
        assert [e.data for e in reader.step()] == ["0", "1"]
    # A write counts once it is done: when the server asks for the next
    # chunk (a real server does after every successful write).
    assert "eventstream_deliveries_total" not in counts.delta()
    sent += [ext.publish("m", n) for n in range(2, 5)]  # the slow one overflows
    for reader in (a, b):
        assert [e.data for e in reader.step()] == ["2", "3", "4"]
    assert counts.delta()["eventstream_deliveries_total"] == 2 + 2
    assert slow.ended()  # it fell behind
    a.close()  # the client leaves (its last chunk is not known to be written)
    for _ in range(1000):  # heartbeats, then the end at its lifetime
        if b.ended():
            break
    assert counts.delta() == {  # eventstream_connections is back to its start
        "eventstream_connections_opened_total": 3,
        "eventstream_events_published_total": 5,
        "eventstream_deliveries_total": 2 + 2 + 3,
        'eventstream_disconnects_total{reason="client"}': 1,
        'eventstream_disconnects_total{reason="overflow"}': 1,
        'eventstream_disconnects_total{reason="lifetime"}': 1,
    }
    for reader in (slow, b):
        reader.close()

    # Resumes: exact, and reset for an id from before this process.
    counts = Counts()
    replayed = Reader(
        client.get("/s?c=m", headers={"Last-Event-ID": str(sent[2].id)}, buffered=False)
    )
    assert [e.data for e in replayed.step()] == ["3", "4"]
    reset = Reader(
        client.get("/s?c=m", headers={"Last-Event-ID": "1-0"}, buffered=False)
    )
    assert [e.event for e in reset.step()][0] == "eventstream-reset"
    malformed = Reader(
        client.get("/s?c=m", headers={"Last-Event-ID": "nonsense"}, buffered=False)
    )
    assert malformed.step() == []
    for reader in (replayed, reset, malformed):
        reader.close()
    delta = counts.delta()
    assert delta['eventstream_resumes_total{result="replayed"}'] == 1
    assert delta['eventstream_resumes_total{result="reset"}'] == 1
    assert delta["eventstream_connections_opened_total"] == 3


def test_exposition_has_the_names_and_no_channel_labels() -> None:
    app, ext = make_app(EVENTSTREAM_METRICS=True)
    response = app.test_client().get("/s?c=secret-channel-name", buffered=False)
    ext.publish("secret-channel-name", "x")
    response.close()
    body, content_type = exposition()
    assert content_type.startswith("text/plain")
    text = body.decode()
    for name in NAMES:
        assert name.partition("{")[0] in text
    assert "secret-channel-name" not in text
    lines = [line for line in text.splitlines() if line.startswith("eventstream_")]
    labels = {line.partition("{")[2].partition("=")[0] for line in lines if "{" in line}
    assert labels == {"reason", "result"}


@pytest.mark.redis
def test_publish_errors_are_counted(redis_server: RedisServer) -> None:
    app = Flask(__name__)
    app.config.update(EVENTSTREAM_METRICS=True, EVENTSTREAM_REDIS_URL=redis_server.url)
    ext = EventStream(app)
    try:
        with app.app_context():
            ext.publish("c", "fine")
            counts = Counts()
            redis_server.stop(kill=True)
            with pytest.raises(PublishError):
                ext.publish("c", "lost")
            assert counts.delta() == {"eventstream_publish_errors_total": 1}
    finally:
        close_app(app)


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_prometheus_client_is_not_imported_when_metrics_are_off() -> None:
    result = _run(
        """
        import sys
        from tests.support.servers import make_app
        app, ext = make_app()
        with app.app_context():
            ext.publish("c", "x")
        app.test_client().get("/healthz")
        assert "prometheus_client" not in sys.modules, "imported"
        print("ok")
        """
    )
    assert result.stdout == "ok\n", result.stderr


def test_missing_prometheus_client_names_the_extra() -> None:
    result = _run(
        """
        import sys
        sys.modules["prometheus_client"] = None  # not installed
        from tests.support.servers import make_app
        try:
            make_app(EVENTSTREAM_METRICS=True)
        except ImportError as e:
            print(e)
        """
    )
    assert result.stdout == (
        "EVENTSTREAM_METRICS is on but prometheus_client is missing:"
        " pip install 'flask-eventstream[metrics]'\n"
    ), result.stderr


def test_example_app_serves_metrics_only_when_enabled() -> None:
    from example_app import create_app

    off = create_app({"EVENTSTREAM_METRICS": False}).test_client().get("/metrics")
    assert off.status_code == 404
    app = create_app({"EVENTSTREAM_METRICS": True})
    response = app.test_client().get("/metrics")
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain")
    assert b"\neventstream_connections " in response.data
