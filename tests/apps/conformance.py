"""Serves the conformance table (tests/support/conformance.py) to a browser.

``python -m tests.apps.serve tests.apps.conformance:create_app``

``GET /``
    An empty page, for the origin the ``EventSource`` objects need.
``GET /raw/<row>?run=<token>``
    The row's raw bytes, as is, with the row's Content-Type.
``GET /encoded/<row>?run=<token>``
    The row's ``sends``, yielded by an ``@eventstream`` generator view.
``GET /cafe?run=<token>``
    A generator view that sends one event with a non-ASCII id, ``café-<n>``
    on the n-th request, and ends, so the browser reconnects; its data is
    what :func:`flask_eventstream.last_event_id` read from the request
    (``null`` when none).
``GET /reconnects?run=<token>``
    For each stream above, what :func:`flask_eventstream.last_event_id` read
    when the browser came back (``""`` when it sent none).

For ``/raw`` and ``/encoded``, the first request (per path and token) gets
the stream; the browser's reconnection gets ``204 No Content``, which ends
the ``EventSource``, after the id it sent back is recorded.
"""

from __future__ import annotations

import threading
import typing as t

from flask import Flask
from flask import request
from flask import Response

from flask_eventstream import Event
from flask_eventstream import EventStream
from flask_eventstream import eventstream
from flask_eventstream import last_event_id
from tests.support.conformance import ROWS

__all__ = ["create_app"]

PAGE = "<!doctype html><meta charset=utf-8><title>conformance</title>"

_lock = threading.Lock()
#: (token, path) -> requests seen
_requests: dict[tuple[str, str], int] = {}
#: token -> {path: id sent back on reconnection}
_reconnects: dict[str, dict[str, str]] = {}


def _first_time() -> bool:
    """Count this request; on a reconnection, record the id it sent back."""
    token = request.args.get("run", "")
    key = (token, request.path)
    with _lock:
        seen = _requests[key] = _requests.get(key, 0) + 1
        if seen == 1:
            return True
        _reconnects.setdefault(token, {})[request.path] = last_event_id() or ""
        return False


def create_app() -> Flask:
    app = Flask(__name__)
    app.config["EVENTSTREAM_RETRY"] = 100
    EventStream(app)

    @app.get("/healthz")
    def healthz() -> t.Any:
        return {"ok": True}

    @app.get("/")
    def page() -> t.Any:
        return PAGE

    @app.get("/raw/<int:row>")
    def raw(row: int) -> t.Any:
        if not _first_time():
            return "", 204
        return Response(ROWS[row].wire, content_type=ROWS[row].content_type)

    @app.get("/encoded/<int:row>")
    @eventstream
    def encoded(row: int) -> t.Any:
        if not _first_time():
            return "", 204
        return (event for event in ROWS[row].sends)

    @app.get("/cafe")
    @eventstream
    def cafe() -> t.Iterator[Event]:
        key = (request.args.get("run", ""), request.path)
        with _lock:
            n = _requests[key] = _requests.get(key, 0) + 1
        yield Event(data={"got": last_event_id()}, id=f"caf\u00e9-{n}")

    @app.get("/reconnects")
    def reconnects() -> t.Any:
        with _lock:
            return dict(_reconnects.get(request.args.get("run", ""), {}))

    return app
