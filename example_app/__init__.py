"""The flask-eventstream example: a live chat on channel ``lobby``, a clock,
channel subscriptions with resume, and (see :mod:`example_app.people`) who
is online, private messages through grants, and revocation.

Run it with ``python -m example_app`` (gevent, in-memory broker) or
``gunicorn -k gevent 'example_app:create_app()'``.
"""

from __future__ import annotations

import datetime
import hmac
import json
import os
import typing as t

from flask import abort
from flask import Flask
from flask import g
from flask import jsonify
from flask import render_template
from flask import request

from flask_eventstream import Event
from flask_eventstream import EventStream
from flask_eventstream import eventstream
from flask_eventstream import PublishError

from . import ops
from . import people

__all__ = ["create_app", "stream"]

stream = EventStream()


def boolean(value: str) -> bool:
    """``1``/``true``/``yes``/``on`` or ``0``/``false``/``no``/``off``."""
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


_ENV_KEYS: dict[str, t.Callable[[str], t.Any]] = {
    "EVENTSTREAM_REDIS_URL": str,
    "EVENTSTREAM_REDIS_OPTIONS": json.loads,
    "EVENTSTREAM_REDIS_PREFIX": str,
    "EVENTSTREAM_REDIS_MIN_REPLICAS": int,
    "EVENTSTREAM_HEARTBEAT": float,
    "EVENTSTREAM_RETRY": int,
    "EVENTSTREAM_HISTORY": int,
    "EVENTSTREAM_QUEUE_SIZE": int,
    "EVENTSTREAM_MAX_CONNECTIONS": int,
    "EVENTSTREAM_MAX_EVENT_SIZE": int,
    "EVENTSTREAM_SEND_TIMEOUT": float,
    "EVENTSTREAM_MAX_LIFETIME": float,
    "EVENTSTREAM_METRICS": boolean,
    "EVENTSTREAM_PARK_STREAMS": boolean,
    "EXAMPLE_PRIVATE_TOKEN": str,
    "EXAMPLE_CLOCK_INTERVAL": float,
    # Grants and presence (example_app.people).
    "EVENTSTREAM_PRESENCE_EVENTS": boolean,
    "EVENTSTREAM_PRESENCE_TIMEOUT": float,
    "EXAMPLE_SECRET_KEY": str,
    "EXAMPLE_GRANT_EXPIRES": float,
}


def _config_from_env() -> dict[str, t.Any]:
    config: dict[str, t.Any] = {}
    for key, kind in _ENV_KEYS.items():
        value = os.environ.get(key)
        if value is None or value == "":
            continue
        try:
            config[key] = kind(value)
        except ValueError:
            what = "JSON" if kind is json.loads else f"a {kind.__name__}"
            raise ValueError(
                f"Environment variable {key}={value!r} is not {what}"
            ) from None
    return config


def _token_ok(expected: str | None) -> bool:
    if not expected:
        return False
    given = request.args.get("token", "")
    auth = request.headers.get("Authorization", "")
    if auth.startswith("Bearer "):
        given = auth[len("Bearer ") :]
    return hmac.compare_digest(given.encode(), expected.encode())


def _error(status: int, message: str) -> t.Any:
    return jsonify(error=message), status


def create_app(config: t.Mapping[str, t.Any] | None = None) -> Flask:
    """Build the example app. Configuration comes from ``EVENTSTREAM_*`` and
    ``EXAMPLE_*`` environment variables; ``config`` wins over them."""
    app = Flask(__name__)
    app.config.update(EXAMPLE_PRIVATE_TOKEN=None, EXAMPLE_CLOCK_INTERVAL=2.0)
    app.config.update(
        EVENTSTREAM_PRESENCE_EVENTS=True,
        EXAMPLE_SECRET_KEY=None,
        EXAMPLE_GRANT_EXPIRES=people.DEFAULT_GRANT_EXPIRES,
    )
    app.config.update(_config_from_env())
    if config:
        app.config.update(config)
    if not app.config.get("SECRET_KEY"):
        app.config["SECRET_KEY"] = people.secret_key(app.config["EXAMPLE_SECRET_KEY"])
    stream.init_app(app)
    interval = float(app.config["EXAMPLE_CLOCK_INTERVAL"])

    @app.get("/")
    def index() -> str:
        return render_template("index.html")

    @app.get("/stream/<channel>")
    @eventstream
    def subscribe(channel: str) -> t.Any:
        # Several channels joined by "+" (never part of a channel name)
        # share one stream: browsers keep few connections per server.
        channels = channel.split("+")
        grant = request.args.get("grant")
        if (
            grant is None
            and any(c.startswith("private-") for c in channels)
            and not _token_ok(app.config["EXAMPLE_PRIVATE_TOKEN"])
        ):
            abort(403)
        try:
            if grant is not None:
                # The grant decides, for any channel; a refusal is a 403.
                return stream.subscribe(*channels, grant=grant)
            return stream.subscribe(*channels)
        except ValueError:
            abort(400)

    @app.post("/publish/<channel>")
    def publish(channel: str) -> t.Any:
        body = request.get_json(silent=True)
        if not isinstance(body, dict) or "data" not in body:
            return _error(400, 'Expected a JSON object {"data": ..., "event": "name"}.')
        event = body.get("event")
        if event is not None and not isinstance(event, str):
            return _error(400, "'event' must be a string.")
        try:
            sent = stream.publish(channel, body["data"], event=event)
        except (ValueError, TypeError) as e:
            return _error(400, str(e))
        except PublishError as e:
            return _error(503, str(e))
        return jsonify(channel=channel, id=sent.id), 202

    @app.get("/clock")
    @eventstream(interval=interval)
    def clock() -> Event:
        # g lives as long as the stream: each client counts from 1.
        g.clock_n = g.get("clock_n", 0) + 1
        now = datetime.datetime.now(datetime.timezone.utc)
        return Event(data={"n": g.clock_n, "time": now.isoformat()}, event="message")

    people.register(
        app,
        stream,
        admin_ok=lambda: _token_ok(app.config["EXAMPLE_PRIVATE_TOKEN"]),
        error=_error,
    )

    @app.get("/healthz")
    def healthz() -> t.Any:
        return jsonify(stream.stats())

    ops.register(app, stream)

    return app
