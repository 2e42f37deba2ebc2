"""Exceptions raised by flask-eventstream."""

from __future__ import annotations

import typing as t

from werkzeug.exceptions import Forbidden

__all__ = ["EventStreamError", "GrantRefused", "PublishError"]


class EventStreamError(Exception):
    """Base class of the errors this library raises itself.

    .. versionadded:: 0.1
    """


class PublishError(EventStreamError):
    """An event could not be handed to the broker, for example because Redis
    stayed unreachable through the bounded retry. The event is not known to be
    published: when Redis went away after storing it but before answering, it
    is delivered once all the same, so retrying may publish it twice. Nothing
    is ever dropped silently.

    .. versionadded:: 0.1
    """


class GrantRefused(EventStreamError, Forbidden):
    """A stream was refused for its grant: raised by
    :meth:`EventStream.subscribe() <flask_eventstream.EventStream.subscribe>`
    before the stream starts. It is a :class:`werkzeug.exceptions.Forbidden`,
    so raised from a view it becomes a plain ``403`` response (or whatever the
    application's ``errorhandler(403)`` makes of it).

    :attr:`reason` says why: ``"missing"`` (no grant), ``"invalid"``
    (malformed, tampered with, or signed with another key), ``"expired"``,
    ``"revoked"`` (issued to a user before :meth:`EventStream.revoke()
    <flask_eventstream.EventStream.revoke>`), or ``"channels"`` (it does not
    cover every channel asked for).

    .. versionadded:: 0.2
    """

    REASONS: t.ClassVar[dict[str, str]] = {
        "missing": "no grant was given",
        "invalid": "the grant is not valid",
        "expired": "the grant has expired",
        "revoked": "the grant was revoked",
        "channels": "the grant does not cover every channel asked for",
    }

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"Event stream refused: {self.REASONS.get(reason, reason)}.")

    def get_body(self, environ: t.Any = None, scope: t.Any = None) -> str:
        return f"403 Forbidden: {self.description}\n"

    def get_headers(
        self, environ: t.Any = None, scope: t.Any = None
    ) -> list[tuple[str, str]]:
        return [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Cache-Control", "no-store"),
        ]
