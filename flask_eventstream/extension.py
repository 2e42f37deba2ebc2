"""The :class:`EventStream` extension: configuration, publish and subscribe."""

from __future__ import annotations

import dataclasses
import typing as t
import weakref

from flask import current_app
from flask import Flask
from flask import has_app_context

from . import _gevent
from ._state import AppState
from ._state import register
from ._state import Settings
from ._state import state_for
from .broker import Subscription
from .cli import cli
from .connection import current_connection
from .request import last_event_id as request_last_event_id
from .sse import Event

__all__ = ["EventStream", "Settings"]

_FROM_REQUEST: t.Any = object()


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
        self, *channels: str, last_event_id: str | None = _FROM_REQUEST
    ) -> Subscription:
        """Subscribe to ``channels`` now and return the subscription, to be
        returned from an ``@eventstream`` view or iterated with ``yield from``.

        Events published after this call are kept for the subscriber even
        before it is iterated. In a request, the client's ``Last-Event-ID``
        header (or ``?lastEventId=``) resumes it: what it missed is sent
        first, or an ``eventstream-reset`` event when that is not possible.

        :param last_event_id: resume from this id instead of the request's.
        :raises ValueError: for a bad channel name.
        """
        state = self._state()
        if last_event_id is _FROM_REQUEST:
            last_event_id = request_last_event_id()
        conn = current_connection.get()
        if conn is not None and conn.state is state and not conn.released:
            sub = state.broker.subscribe(
                channels, last_event_id, conn.waker, conn.follow
            )
            conn.subscriptions.append(sub)
            return sub
        return state.broker.subscribe(channels, last_event_id, _gevent.make_waker())

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
