"""The :class:`EventStream` extension: configuration, publish and subscribe."""

from __future__ import annotations

import dataclasses
import logging
import time
import typing as t
import weakref

from flask import current_app
from flask import Flask
from flask import has_app_context
from werkzeug.exceptions import Forbidden

from . import _gevent
from ._state import AppState
from ._state import register
from ._state import Settings
from ._state import state_for
from .broker import Subscription
from .broker import validate_channel
from .cli import cli
from .connection import current_connection
from .exceptions import EventStreamError
from .grants import check_user
from .grants import Grant
from .grants import GrantInvalid
from .grants import load_grant
from .grants import redact_request_logs
from .grants import sign_grant
from .request import last_event_id as request_last_event_id
from .sse import Event

__all__ = ["EventStream", "GrantRefused", "Settings"]

log = logging.getLogger(__name__)


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
        super().__init__(
            description=f"Event stream refused: {self.REASONS.get(reason, reason)}."
        )

    def get_body(self, environ: t.Any = None, scope: t.Any = None) -> str:
        return f"403 Forbidden: {self.description}\n"

    def get_headers(
        self, environ: t.Any = None, scope: t.Any = None
    ) -> list[tuple[str, str]]:
        return [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Cache-Control", "no-store"),
        ]


_FROM_REQUEST: t.Any = object()
_NO_GRANT: t.Any = object()


class EventStream:
    """Server-Sent Events for a Flask application.

    :param app: the application; or call :meth:`init_app` later.
    :param redis_url: a Redis URL, used when the application does not set
        ``EVENTSTREAM_REDIS_URL``, and by :meth:`publish` outside any app
        (from a script or a job).

    .. versionadded:: 0.1
    """

    def __init__(
        self, app: Flask | None = None, *, redis_url: str | None = None
    ) -> None:
        self.redis_url = redis_url
        self._states: weakref.WeakSet[AppState] = weakref.WeakSet()
        self._standalone: AppState | None = None
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Register the extension on ``app`` and read its configuration."""
        if "eventstream" in app.extensions:
            raise RuntimeError(
                "An EventStream is already registered on this app. Create one"
                " EventStream per app and call init_app once; use the existing"
                " one from app.extensions['eventstream']."
            )
        defaults = Settings(redis_url=self.redis_url)
        for name, key in Settings.KEYS.items():
            app.config.setdefault(key, getattr(defaults, name))
        settings = Settings.from_config(app.config)
        state = AppState(app, settings, on_term=self.shutdown)
        register(app, state)
        app.extensions["eventstream"] = self
        self._states.add(state)
        app.cli.add_command(cli)
        # Grants travel in query strings: keep them out of request logs.
        redact_request_logs()

    # -- resolving the application --

    def _state(self) -> AppState:
        if has_app_context():
            return state_for(current_app._get_current_object())  # type: ignore[attr-defined]
        states = list(self._states)
        if len(states) == 1:
            return states[0]
        if not states and self.redis_url:
            if self._standalone is None:
                self._standalone = AppState(
                    None, Settings(redis_url=self.redis_url), on_term=self.shutdown
                )
            return self._standalone
        raise RuntimeError(
            "Working outside of application context with "
            + ("several apps registered" if states else "no app and no redis_url")
            + ": push an app context (with app.app_context():), or create"
            " EventStream(redis_url=...) to publish from a script or job."
        )

    # -- the API --

    def publish(self, channel: str, data: t.Any, event: str | None = None) -> Event:
        """Publish an event to every subscriber of ``channel``, on every
        process that shares the broker.

        :param channel: 1 to 128 characters of ``A-Z a-z 0-9 _ - . :``.
        :param data: ``str``, UTF-8 ``bytes``, JSON-serialisable data, or an
            :class:`Event` (whose ``id`` is replaced).
        :param event: the event type.
        :return: the :class:`Event` as sent, with the id assigned to it.
        :raises ValueError: for a bad channel or event name, or an event
            larger than ``EVENTSTREAM_MAX_EVENT_SIZE``.
        :raises TypeError: if ``data`` cannot be serialised.
        :raises PublishError: if the broker could not take the event.
        """
        if isinstance(data, Event):
            ev = data if event is None else dataclasses.replace(data, event=event)
        else:
            ev = Event(data=data, event=event)
        return self._state().broker.publish(channel, ev)

    def subscribe(
        self,
        *channels: str,
        last_event_id: str | None = _FROM_REQUEST,
        grant: str | None = _NO_GRANT,
        user: str | int | None = None,
    ) -> Subscription:
        """Subscribe to ``channels`` now and return the subscription, to be
        returned from an ``@eventstream`` view or iterated with ``yield from``.

        Events published after this call are kept for the subscriber even
        before it is iterated. In a request, the client's ``Last-Event-ID``
        header (or ``?lastEventId=``) resumes it: what it missed is sent
        first, or an ``eventstream-reset`` event when that is not possible.

        :param last_event_id: resume from this id instead of the request's.
        :param grant: a token from :meth:`grant` that must cover every one of
            ``channels``; given (even as ``None``, a missing grant), it is
            checked before anything else, and the stream is refused unless
            it is valid. Its user becomes the stream's user, and the stream
            ends when it expires.
        :param user: the stream's user, for :meth:`presence`,
            :meth:`revoke` and :meth:`disconnect`, when the application
            authenticated the request itself (a ``str`` or an ``int``).
        :raises GrantRefused: (a ``403``) for a missing, invalid, expired or
            revoked grant, or one that does not cover every channel.
        :raises ValueError: for a bad channel name or user.

        .. versionchanged:: 0.2
            The ``grant`` and ``user`` parameters.
        """
        state = self._state()
        checked: Grant | None = None
        if grant is not _NO_GRANT:
            if user is not None:
                raise TypeError(
                    "subscribe() takes grant= or user=, not both: a grant names"
                    " its user."
                )
            checked = _check_grant(state, grant, channels)
            user = checked.user
        elif user is not None:
            user = check_user(user)
        if last_event_id is _FROM_REQUEST:
            last_event_id = request_last_event_id()
        conn = current_connection.get()
        if conn is not None and conn.state is state and not conn.released:
            sub = state.broker.subscribe(
                channels, last_event_id, conn.waker, conn, user
            )
            conn.adopt(sub, user)
            if checked is not None:
                conn.set_deadline(time.monotonic() + checked.expires - time.time())
        else:
            sub = state.broker.subscribe(
                channels, last_event_id, _gevent.make_waker(), user=user
            )
        if checked is not None and checked.user is not None:
            # A revocation heard while the grant was being checked.
            revoked = state.broker.revoked_here(checked.user)
            if revoked is not None and revoked >= round(checked.issued * 1000):
                sub.close()
                raise GrantRefused("revoked")
        return sub

    # -- grants, revocation and presence --

    def grant(
        self, *channels: str, user: str | int | None = None, expires_in: float = 3600
    ) -> str:
        """A signed token that lets a client open ``channels`` (all of them
        or some) with :meth:`subscribe(..., grant=token) <subscribe>`, as
        ``user``, for ``expires_in`` seconds: for ``EventSource``, which
        cannot send headers, in the stream's URL.

        Signed with the app's ``SECRET_KEY`` (itsdangerous); any of its
        ``SECRET_KEY_FALLBACKS`` verify too. Every process that serves the
        streams must share the key.

        :raises RuntimeError: if the app has no ``SECRET_KEY``.
        :raises ValueError: for a bad channel name or user, or an
            ``expires_in`` that is not a positive number.

        .. versionadded:: 0.2
        """
        state = self._state()
        keys = state.grant_keys()
        name = check_user(user) if user is not None else None
        now = time.time()
        if name is not None:
            # Grants issued after a revocation must not look older than it.
            revoked = state.broker.revoked_here(name)
            if revoked is not None and now * 1000 <= revoked:
                now = (revoked + 1) / 1000
        return sign_grant(keys, channels, name, expires_in, now=now)

    def revoke(self, *, user: str | int) -> None:
        """End ``user``'s streams on every process and host that shares the
        broker (within a second), and refuse from now on the grants issued
        to them before this call. Their streams end with the reason
        ``"revoked"``.

        :raises PublishError: if the broker could not take it (Redis
            unreachable).

        .. versionadded:: 0.2
        """
        name = check_user(user)
        self._state().broker.backend.revoke(name, int(time.time() * 1000))

    def disconnect(
        self, *, channel: str | None = None, user: str | int | None = None
    ) -> None:
        """End the streams on ``channel``, or of ``user``, or of ``user`` on
        ``channel``, on every process and host that shares the broker
        (within a second). Nothing is refused afterwards: clients reconnect.

        :raises TypeError: with neither ``channel`` nor ``user``.
        :raises PublishError: if the broker could not take it.

        .. versionadded:: 0.2
        """
        if channel is None and user is None:
            raise TypeError("disconnect() needs a channel, a user, or both")
        if channel is not None:
            validate_channel(channel)
        name = check_user(user) if user is not None else None
        self._state().broker.backend.disconnect(channel, name)

    def presence(self, channel: str) -> dict[str, int]:
        """``{user: open streams}`` on ``channel`` over every process and
        host, for the streams opened with a user (by a grant, or
        :meth:`subscribe`'s ``user=``).

        :raises PublishError: if Redis cannot be reached.

        .. versionadded:: 0.2
        """
        validate_channel(channel)
        return dict(sorted(self._state().broker.backend.presence(channel).items()))

    def sleep(self, seconds: float) -> None:
        """Sleep cooperatively (a gevent sleep under gevent). Inside a stream
        it returns early when the client went away, so the view reaches its
        next ``yield`` and its ``finally`` runs at once."""
        conn = current_connection.get()
        if conn is not None and not conn.released:
            conn.sleep(seconds)
        else:
            _gevent.sleep(seconds)

    def stats(self) -> dict[str, t.Any]:
        """Open streams on this process and subscribers per channel."""
        state = self._state()
        return {
            "connections": len(state.live),
            "channels": state.broker.channels(),
        }

    def shutdown(self) -> None:
        """End every open stream of every app of this extension at once, for
        a graceful worker exit; new streams end right after they open.
        Under gunicorn's gevent worker this runs on SIGTERM by itself."""
        for state in list(self._states):
            state.shutdown()


def _check_grant(state: AppState, token: object, channels: tuple[str, ...]) -> Grant:
    """The grant, if it is valid, not revoked and covers ``channels``."""
    try:
        grant = load_grant(state.grant_keys(), token)
    except GrantInvalid as e:
        raise GrantRefused(e.reason) from None
    if not channels or not grant.covers(channels):
        raise GrantRefused("channels")
    if grant.user is not None:
        revoked = state.broker.backend.revoked_at(grant.user)
        if revoked is not None and revoked >= round(grant.issued * 1000):
            raise GrantRefused("revoked")
    log.debug("Grant for %s accepted.", grant.user)
    return grant
