"""Who is online, private messages and revocation in the example: grants for
EventSource, presence, and the admin's revoke route.

There is no real login: anyone may ask ``/grant/<channel>?user=NAME`` for a
grant, except for another user's ``private-<name>`` channel, or for a user
the admin revoked (remembered by this process only: a demo).
"""

from __future__ import annotations

import logging
import secrets
import threading
import typing as t

from flask import Flask
from flask import jsonify
from flask import request

from flask_eventstream import EventStream
from flask_eventstream import PublishError

__all__ = ["register", "secret_key"]

log = logging.getLogger(__name__)

#: Seconds a grant of the example is valid [3600]; a test sets it short.
DEFAULT_GRANT_EXPIRES = 3600.0


def secret_key(configured: str | None) -> str:
    """The app's ``SECRET_KEY``: ``EXAMPLE_SECRET_KEY``, else a random key
    that only this process knows (grants then open streams on it alone)."""
    if configured:
        return configured
    log.warning(
        "EXAMPLE_SECRET_KEY is not set: using a random key. Grants issued by"
        " this process are refused by any other; set the same"
        " EXAMPLE_SECRET_KEY on every worker and host."
    )
    return secrets.token_urlsafe(32)


def register(
    app: Flask,
    stream: EventStream,
    *,
    admin_ok: t.Callable[[], bool],
    error: t.Callable[[int, str], t.Any],
) -> None:
    """Add ``/grant/<channel>``, ``/presence/<channel>`` and
    ``/revoke/<user>`` to ``app``.

    :param admin_ok: whether the current request carries the admin's token.
    :param error: builds a JSON error response.
    """
    revoked: set[str] = set()
    lock = threading.Lock()

    @app.get("/grant/<channel>")
    def grant(channel: str) -> t.Any:
        """A grant for one channel, or several joined by "+"."""
        user = request.args.get("user", "")
        if not user:
            return error(400, "Give a user: /grant/<channel>?user=NAME.")
        channels = channel.split("+")
        for name in channels:
            if name.startswith("private-") and name != f"private-{user}":
                return error(403, "A private channel is granted to its owner only.")
        with lock:
            if user in revoked:
                return error(403, f"User {user!r} was revoked.")
        expires_in = float(app.config["EXAMPLE_GRANT_EXPIRES"])
        try:
            token = stream.grant(*channels, user=user, expires_in=expires_in)
        except (TypeError, ValueError) as e:
            return error(400, str(e))
        response = jsonify(grant=token, expires_in=expires_in)
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.get("/presence/<channel>")
    def presence(channel: str) -> t.Any:
        try:
            users = stream.presence(channel)
        except ValueError as e:
            return error(400, str(e))
        except PublishError as e:
            return error(503, str(e))
        return jsonify(users=users)

    @app.post("/revoke/<user>")
    def revoke(user: str) -> t.Any:
        if not admin_ok():
            return error(403, "Revoking needs the admin token (Authorization: Bearer).")
        try:
            stream.revoke(user=user)
        except (TypeError, ValueError) as e:
            return error(400, str(e))
        except PublishError as e:
            return error(503, str(e))
        with lock:
            revoked.add(user)
        return "", 204
