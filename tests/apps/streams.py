"""The example app plus routes that let tests see inside the server process.

Served in a subprocess by the server tests (``tests/support/servers.py``)::

    python -m tests.apps.serve                          # gevent WSGIServer
    gunicorn -k gevent 'tests.apps.streams:create_app()'
    flask --app tests.apps.streams run                  # Werkzeug, threads

Extra routes:

``GET /gen/<channel>``
    A generator view that subscribes, yields a ``subscribed`` event, then
    follows the channel. Its ``finally:`` counts in ``/counters``.
``GET /multi?ch=a&ch=b``
    One stream on several channels.
``GET /sleeper``
    A generator view that yields ``hello`` and then sleeps with
    ``stream.sleep()``; its ``finally:`` counts too.
``GET /counters``
    ``{"gen_started", "gen_finally", "sleep_started", "sleep_finally", "pid"}``.
``POST /publish-bg/<channel>?via=greenlet|thread|threadpool&n=N``
    Publishes N events from another greenlet or thread than the request's,
    waits for it, and returns their ids.
``POST /bulk/<channel>?n=N&batch=B&size=S``
    Publishes N events of about S bytes, yielding to the hub every B
    events; returns the first and last ids and the seconds it took.
``GET /writers``
    ``{"direct": N, "server": M}``: open streams whose frames are written
    straight to their socket, and those the server writes.
``GET /served-by``
    ``{"greenlet": N, "hub": M, "thread": K}``: what serves the open streams.

With ``TEST_WRAP_BODY=1`` in the environment, the app is behind a WSGI
middleware that wraps every response body in an iterator of its own. With
``TEST_DISCONNECT_LOG=<path>``, every ended stream appends a line
``<reason> <channels>`` to that file (from ``client_disconnected``), and
with ``TEST_DISCONNECT_BLOCK=1`` as well that receiver then never returns.
"""

from __future__ import annotations

import os
import threading
import time
import typing as t

from flask import Flask
from flask import jsonify
from flask import request

from example_app import create_app as create_example_app
from example_app import stream
from flask_eventstream import Event
from flask_eventstream import eventstream
from flask_eventstream.signals import client_disconnected

__all__ = ["create_app"]

_lock = threading.Lock()
_counters = {"gen_started": 0, "gen_finally": 0, "sleep_started": 0, "sleep_finally": 0}


def _count(name: str) -> None:
    with _lock:
        _counters[name] += 1


def _in_gevent() -> bool:
    import greenlet

    return greenlet.getcurrent().parent is not None


def create_app(config: t.Mapping[str, t.Any] | None = None) -> Flask:
    app = create_example_app(config)

    @app.get("/gen/<channel>")
    @eventstream
    def gen(channel: str) -> t.Iterator[t.Any]:
        _count("gen_started")
        try:
            sub = stream.subscribe(channel)
            yield Event(data=channel, event="subscribed")
            yield from sub
        finally:
            _count("gen_finally")

    @app.get("/multi")
    @eventstream
    def multi() -> t.Any:
        return stream.subscribe(*request.args.getlist("ch"))

    @app.get("/sleeper")
    @eventstream
    def sleeper() -> t.Iterator[t.Any]:
        _count("sleep_started")
        try:
            yield Event(data="awake", event="hello")
            while True:
                stream.sleep(3600)
                yield None
        finally:
            _count("sleep_finally")

    @app.get("/writers")
    def writers() -> t.Any:
        from flask_eventstream import testing

        return jsonify(testing.direct_writes(app))

    @app.get("/served-by")
    def served_by() -> t.Any:
        from flask_eventstream import testing

        return jsonify(testing.served_by(app))

    @app.get("/counters")
    def counters() -> t.Any:
        with _lock:
            return jsonify(dict(_counters, pid=os.getpid()))

    @app.post("/publish-bg/<channel>")
    def publish_background(channel: str) -> t.Any:
        via = request.args.get("via", "thread")
        n = int(request.args.get("n", "3"))
        ids: list[str] = []
        caller = threading.get_ident()
        seen: list[int] = []

        def publish_all() -> None:
            seen.append(threading.get_ident())
            with app.app_context():
                for i in range(n):
                    event = stream.publish(channel, {"i": i, "via": via}, event="bg")
                    assert event.id is not None
                    ids.append(event.id)

        if via == "greenlet":
            import gevent

            gevent.spawn(publish_all).join(10)
        elif via == "threadpool":
            # A native thread even when threading is monkey-patched.
            import gevent

            gevent.get_hub().threadpool.apply(publish_all)
        elif via == "thread":
            thread = threading.Thread(target=publish_all)
            thread.start()
            thread.join(10)
        else:
            return jsonify(error=f"unknown via {via!r}"), 400
        return jsonify(
            ids=ids,
            gevent=_in_gevent(),
            same_thread=seen == [caller],
        ), 202

    @app.post("/bulk/<channel>")
    def bulk(channel: str) -> t.Any:
        n = int(request.args.get("n", "100"))
        batch = max(int(request.args.get("batch", "1")), 1)
        size = int(request.args.get("size", "0"))
        pad = "x" * size
        first = last = None
        start = time.perf_counter()
        for i in range(n):
            event = stream.publish(channel, {"i": i, "pad": pad} if size else i)
            last = event.id
            if first is None:
                first = last
            if (i + 1) % batch == 0:
                stream.sleep(0)
        return jsonify(first=first, last=last, seconds=time.perf_counter() - start), 202

    if os.environ.get("TEST_WRAP_BODY") == "1":
        app.wsgi_app = _WrapBody(app.wsgi_app)  # type: ignore[method-assign]
    disconnect_log = os.environ.get("TEST_DISCONNECT_LOG")
    if disconnect_log:
        # Kept by the app: blinker holds receivers weakly.
        app.extensions["test_disconnect_log"] = _log_disconnects(app, disconnect_log)
    return app


def _log_disconnects(app: Flask, path: str) -> t.Callable[..., None]:
    """A ``client_disconnected`` receiver that appends a line per ended
    stream to ``path``: ``<reason> <channels>``."""

    def receiver(sender: Flask, **kwargs: t.Any) -> None:
        with open(path, "a") as f:
            f.write(f"{kwargs['reason']} {','.join(kwargs['channels'])}\n")
        if os.environ.get("TEST_DISCONNECT_BLOCK") == "1":
            # A receiver that never returns (time.sleep is gevent's here).
            time.sleep(3600)

    client_disconnected.connect(receiver, app)
    return receiver


class _WrapBody:
    """A WSGI middleware that iterates every response body itself (as
    error-reporting and compression middlewares do)."""

    def __init__(self, app: t.Any) -> None:
        self.app = app

    def __call__(self, environ: t.Any, start_response: t.Any) -> t.Any:
        body = self.app(environ, start_response)
        try:
            yield from body
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()
