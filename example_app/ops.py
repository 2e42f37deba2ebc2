"""The operator's side of the example: a live dashboard of this process
(``/dashboard``, fed by the ``/stats/stream`` event stream) and Prometheus
metrics (``/metrics``, with ``EVENTSTREAM_METRICS`` on)."""

from __future__ import annotations

import datetime
import threading
import typing as t

from flask import abort
from flask import Flask
from flask import g
from flask import render_template
from flask import Response

from flask_eventstream import Event
from flask_eventstream import EventStream
from flask_eventstream import eventstream
from flask_eventstream import signals

__all__ = ["register"]


class _EventCounter:
    """Events delivered on this process, from the ``event_published``
    signal (which fires once per event, whatever the number of clients)."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def __call__(self, sender: Flask, **kwargs: t.Any) -> None:
        with self._lock:
            self.count += 1


def register(app: Flask, stream: EventStream) -> None:
    """Add ``/dashboard``, ``/stats/stream`` and ``/metrics`` to ``app``."""
    events = _EventCounter()
    signals.event_published.connect(events, sender=app, weak=False)

    @app.get("/dashboard")
    def dashboard() -> str:
        return render_template("dashboard.html")

    @app.get("/stats/stream")
    @eventstream(interval=1.0)
    def stats_stream() -> Event:
        # Every second: open streams on this process (this one included),
        # events delivered here in total, and since the last tick.
        total = events.count
        previous = g.get("stats_events", total)
        g.stats_events = total
        now = datetime.datetime.now(datetime.timezone.utc)
        data = {
            "connections": stream.stats()["connections"],
            "events": total,
            "rate": total - previous,
            "time": now.isoformat(timespec="seconds"),
        }
        return Event(data=data, event="stats")

    @app.get("/metrics")
    def metrics() -> Response:
        if not app.config.get("EVENTSTREAM_METRICS"):
            abort(404)
        from flask_eventstream.metrics import exposition

        body, content_type = exposition()
        return Response(body, content_type=content_type)
