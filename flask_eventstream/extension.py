"""The :class:`EventStream` extension: configuration, publish and subscribe."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import typing as t
import weakref

import click
from flask import current_app
from flask import Flask
from flask import has_app_context
from flask.cli import AppGroup

from . import _gevent
from . import signals
from .broker import Backend
from .broker import Broker
from .broker import Subscription
from .exceptions import EventStreamError
from .request import last_event_id as request_last_event_id
from .sse import encode_retry
from .sse import Event
from .views import Connection
from .views import current_connection

__all__ = ["EventStream", "Settings"]

log = logging.getLogger(__name__)

_FROM_REQUEST: t.Any = object()


@dataclasses.dataclass(frozen=True)
class Settings:
    """The ``EVENTSTREAM_*`` configuration of one application, read once."""

    redis_url: str | None = None
    heartbeat: float = 15.0
    retry: int = 3000
    history: int = 1000
    queue_size: int = 1000
    max_connections: int | None = None
    max_event_size: int = 1048576
    send_timeout: float = 30.0
    max_lifetime: float | None = None

    KEYS: t.ClassVar[dict[str, str]] = {
        "redis_url": "EVENTSTREAM_REDIS_URL",
        "heartbeat": "EVENTSTREAM_HEARTBEAT",
        "retry": "EVENTSTREAM_RETRY",
        "history": "EVENTSTREAM_HISTORY",
        "queue_size": "EVENTSTREAM_QUEUE_SIZE",
        "max_connections": "EVENTSTREAM_MAX_CONNECTIONS",
        "max_event_size": "EVENTSTREAM_MAX_EVENT_SIZE",
        "send_timeout": "EVENTSTREAM_SEND_TIMEOUT",
        "max_lifetime": "EVENTSTREAM_MAX_LIFETIME",
    }

    def __post_init__(self) -> None:
        for name in ("heartbeat", "send_timeout"):
            _positive(name, getattr(self, name))
        for name in ("history", "queue_size", "max_event_size"):
            _positive(name, getattr(self, name), integer=True, zero=name == "history")
        _positive("retry", self.retry, integer=True, zero=True)
        if self.max_connections is not None:
            _positive("max_connections", self.max_connections, integer=True)
        if self.max_lifetime is not None:
            _positive("max_lifetime", self.max_lifetime)

    @classmethod
    def from_config(cls, config: t.Mapping[str, t.Any]) -> Settings:
        return cls(**{name: config[key] for name, key in cls.KEYS.items()})

    @property
    def retry_after(self) -> int:
        """Seconds for a ``Retry-After`` header."""
        return max(1, math.ceil(self.retry / 1000))


def _positive(
    name: str, value: object, *, integer: bool = False, zero: bool = False
) -> None:
    key = Settings.KEYS[name]
    kinds: tuple[type, ...] = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise TypeError(
            f"{key} must be a{'n int' if integer else ' number'}, not {value!r}"
        )
    number = t.cast(float, value)
    if number < 0 or (number == 0 and not zero):
        raise ValueError(
            f"{key} must be {'>= 0' if zero else 'positive'}, not {value!r}"
        )


def _make_backend(settings: Settings) -> t.Callable[[Broker], Backend]:
    if settings.redis_url:
        try:
            from .backends.redis import RedisBackend
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                "EVENTSTREAM_REDIS_URL is set but the redis package is missing:"
                " pip install 'flask-eventstream[redis]'"
            ) from e

        url = settings.redis_url
        return lambda broker: RedisBackend(broker, url, history=settings.history)

    from .backends.memory import MemoryBackend

    return lambda broker: MemoryBackend(broker, history=settings.history)


class _State:
    """Per-application state, kept in ``app.extensions["eventstream"]``."""

    def __init__(
        self, owner: EventStream, app: Flask | None, settings: Settings
    ) -> None:
        self.owner = owner
        self.app = app
        self.settings = settings
        self.retry_bytes = encode_retry(settings.retry)
        self.live: weakref.WeakSet[Connection] = weakref.WeakSet()
        self.closing = False
        ticks = [0.5, settings.heartbeat / 4, settings.send_timeout / 4]
        if settings.max_lifetime:
            ticks.append(settings.max_lifetime / 20)
        self.watchdog = _gevent.Watchdog(tick=min(ticks))
        self._warned_server = False
        on_delivered = self._send_published if app is not None else None
        self.broker = Broker(
            _make_backend(settings),
            queue_size=settings.queue_size,
            max_event_size=settings.max_event_size,
            on_delivered=on_delivered,
            defer=_gevent.deferrer,
        )

    def _send_published(self, channel: str, event: Event) -> None:
        if signals.event_published.receivers:
            signals.event_published.send(self.app, channel=channel, event=event)

    def send_connected(self, **kwargs: t.Any) -> None:
        if signals.client_connected.receivers:
            signals.client_connected.send(self.app, **kwargs)

    def send_disconnected(self, **kwargs: t.Any) -> None:
        if signals.client_disconnected.receivers:
            signals.client_disconnected.send(self.app, **kwargs)

    def check_server(self, environ: t.Mapping[str, t.Any]) -> None:
        """Warn once when streams run on a server that gives each one a whole
        worker, and make SIGTERM end streams under gunicorn."""
        if self._warned_server:
            return
        self._warned_server = True
        software = str(environ.get("SERVER_SOFTWARE", ""))
        if not software.startswith("gunicorn"):
            return
        if _gevent.in_gevent():
            _gevent.install_term_handler(self.owner.shutdown)
        elif not environ.get("wsgi.multithread"):
            log.warning(
                "flask-eventstream is running under a synchronous gunicorn worker:"
                " each open event stream blocks a whole worker process. Run"
                " gunicorn with -k gevent."
            )

    def shutdown(self) -> None:
        self.closing = True
        for conn in list(self.live):
            conn.end("shutdown", kill=True)


def _state_for_request() -> _State:
    state = current_app.extensions.get("eventstream")
    if state is None:
        raise RuntimeError(
            "The current Flask app is not registered with an EventStream."
            " Did you forget to call 'stream.init_app(app)'?"
        )
    return t.cast(_State, state)


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
        self._states: weakref.WeakSet[_State] = weakref.WeakSet()
        self._standalone: _State | None = None
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Register the extension on ``app`` and read its configuration."""
        if "eventstream" in app.extensions:
            raise RuntimeError(
                "An EventStream is already registered on this app. Create one"
                " EventStream per app and call init_app once; use the existing"
                " one from app.extensions['eventstream'].owner."
            )
        defaults = Settings(redis_url=self.redis_url)
        for name, key in Settings.KEYS.items():
            app.config.setdefault(key, getattr(defaults, name))
        settings = Settings.from_config(app.config)
        state = _State(self, app, settings)
        app.extensions["eventstream"] = state
        self._states.add(state)
        app.cli.add_command(_cli)

    # -- resolving the application --

    def _state(self) -> _State:
        if has_app_context():
            state = current_app.extensions.get("eventstream")
            if state is None:
                raise RuntimeError(
                    "The current Flask app is not registered with this"
                    " EventStream. Did you forget to call 'stream.init_app(app)'?"
                )
            return t.cast(_State, state)
        states = list(self._states)
        if len(states) == 1:
            return states[0]
        if not states and self.redis_url:
            if self._standalone is None:
                self._standalone = _State(
                    self, None, Settings(redis_url=self.redis_url)
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


@click.group("eventstream", cls=AppGroup)
def _cli() -> None:
    """Server-Sent Events commands."""


@_cli.command("publish")
@click.argument("channel")
@click.argument("data")
@click.option("--event", "event_name", default=None, help="The event type.")
@click.option(
    "--string",
    "as_string",
    is_flag=True,
    help="Send DATA as a string even if it parses as JSON.",
)
def _publish_command(
    channel: str, data: str, event_name: str | None, as_string: bool
) -> None:
    """Publish DATA to CHANNEL.

    DATA is parsed as JSON when it is valid JSON ('{"a": 1}', '42', '"text"'),
    and sent as a plain string otherwise; --string always sends it as a string.
    Prints the assigned event id.
    """
    payload: t.Any = data
    if not as_string:
        try:
            payload = json.loads(data)
        except ValueError:
            payload = data
    state = _state_for_request()
    if not state.settings.redis_url:
        click.echo(
            "Warning: EVENTSTREAM_REDIS_URL is not set; the in-memory broker of"
            " this command reaches no server's subscribers.",
            err=True,
        )
    try:
        event = state.owner.publish(channel, payload, event=event_name)
    except (ValueError, TypeError) as e:
        raise click.UsageError(str(e)) from None
    except EventStreamError as e:
        raise click.ClickException(str(e)) from None
    click.echo(event.id)
