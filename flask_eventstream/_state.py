"""Per-application state and settings, shared by the extension, the views,
the command line and the streams.

This module imports nothing of the package's Flask layer (as Flask's
``globals.py`` imports nothing of Flask's): the modules above it import it,
never the other way round. The application object is only ever a key here.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import typing as t
import weakref

from . import _gevent
from . import signals
from .broker import Backend
from .broker import Broker
from .broker import Sink
from .sse import encode_retry
from .sse import Event

if t.TYPE_CHECKING:
    from .metrics import Metrics

__all__ = ["AppState", "Settings", "all_states", "register", "state_for"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The ``EVENTSTREAM_*`` configuration of one application, read once."""

    redis_url: str | None = None
    redis_options: t.Mapping[str, t.Any] = dataclasses.field(default_factory=dict)
    redis_prefix: str = "eventstream:"
    redis_min_replicas: int = 0
    heartbeat: float = 15.0
    retry: int = 3000
    history: int = 1000
    queue_size: int = 1000
    max_connections: int | None = None
    max_event_size: int = 1048576
    send_timeout: float = 30.0
    max_lifetime: float | None = None
    presence_events: bool = False
    presence_timeout: float = 30.0
    metrics: bool = False
    park_streams: bool = True

    KEYS: t.ClassVar[dict[str, str]] = {
        "redis_url": "EVENTSTREAM_REDIS_URL",
        "redis_options": "EVENTSTREAM_REDIS_OPTIONS",
        "redis_prefix": "EVENTSTREAM_REDIS_PREFIX",
        "redis_min_replicas": "EVENTSTREAM_REDIS_MIN_REPLICAS",
        "heartbeat": "EVENTSTREAM_HEARTBEAT",
        "retry": "EVENTSTREAM_RETRY",
        "history": "EVENTSTREAM_HISTORY",
        "queue_size": "EVENTSTREAM_QUEUE_SIZE",
        "max_connections": "EVENTSTREAM_MAX_CONNECTIONS",
        "max_event_size": "EVENTSTREAM_MAX_EVENT_SIZE",
        "send_timeout": "EVENTSTREAM_SEND_TIMEOUT",
        "max_lifetime": "EVENTSTREAM_MAX_LIFETIME",
        "presence_events": "EVENTSTREAM_PRESENCE_EVENTS",
        "presence_timeout": "EVENTSTREAM_PRESENCE_TIMEOUT",
        "metrics": "EVENTSTREAM_METRICS",
        "park_streams": "EVENTSTREAM_PARK_STREAMS",
    }

    def __post_init__(self) -> None:
        for name in ("heartbeat", "send_timeout", "presence_timeout"):
            _positive(name, getattr(self, name))
        if not isinstance(self.presence_events, bool):
            raise TypeError(
                "EVENTSTREAM_PRESENCE_EVENTS must be True or False,"
                f" not {self.presence_events!r}"
            )
        for name in ("history", "queue_size", "max_event_size"):
            _positive(name, getattr(self, name), integer=True, zero=name == "history")
        _positive("retry", self.retry, integer=True, zero=True)
        if self.max_connections is not None:
            _positive("max_connections", self.max_connections, integer=True)
        if self.max_lifetime is not None:
            _positive("max_lifetime", self.max_lifetime)
        _positive(
            "redis_min_replicas", self.redis_min_replicas, integer=True, zero=True
        )
        if not isinstance(self.redis_options, t.Mapping):
            raise TypeError(
                "EVENTSTREAM_REDIS_OPTIONS must be a dict of redis-py connection"
                f" options, not {self.redis_options!r}"
            )
        prefix = self.redis_prefix
        if not isinstance(prefix, str):
            raise TypeError(
                f"EVENTSTREAM_REDIS_PREFIX must be a string, not {prefix!r}"
            )
        if not 0 < len(prefix) <= 128:
            raise ValueError(
                f"EVENTSTREAM_REDIS_PREFIX must be 1 to 128 characters, not {prefix!r}"
            )
        for name in ("metrics", "park_streams"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(
                    f"{self.KEYS[name]} must be True or False,"
                    f" not {getattr(self, name)!r}"
                )

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


def _make_backend(settings: Settings) -> t.Callable[[Sink], Backend]:
    size = settings.max_event_size
    if settings.redis_url:
        try:
            from .backends.redis import RedisBackend
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                "EVENTSTREAM_REDIS_URL is set but the redis package is missing:"
                " pip install 'flask-eventstream[redis]'"
            ) from e

        url = settings.redis_url
        return lambda sink: RedisBackend(
            sink,
            url,
            history=settings.history,
            max_event_size=size,
            prefix=settings.redis_prefix,
            options=settings.redis_options,
            min_replicas=settings.redis_min_replicas,
            presence_timeout=settings.presence_timeout,
        )

    from .backends.memory import MemoryBackend

    return lambda sink: MemoryBackend(
        sink, history=settings.history, max_event_size=size
    )


class Stream(_gevent._Watched, t.Protocol):
    """What the state and its watchdog need of an open stream (a
    :class:`~.connection.Connection`)."""

    def end(self, reason: str, *, kill: bool = False) -> None: ...


class AppState:
    """Everything one application holds on one process: its settings, its
    broker, its open streams and the watchdog that sweeps them.

    :param app: the application, or ``None`` for the broker of a script
        that publishes through Redis without one.
    :param on_term: what SIGTERM runs under gunicorn's gevent worker.
    """

    def __init__(
        self,
        app: t.Any,
        settings: Settings,
        on_term: t.Callable[[], None] | None = None,
    ) -> None:
        self.app = app
        self.settings = settings
        self.retry_bytes = encode_retry(settings.retry)
        self.live: weakref.WeakSet[Stream] = weakref.WeakSet()
        self.closing = False
        ticks = [0.5, settings.heartbeat / 4, settings.send_timeout / 4]
        if settings.max_lifetime:
            ticks.append(settings.max_lifetime / 20)
        #: The process's metrics, with ``EVENTSTREAM_METRICS``.
        self.metrics: Metrics | None = None
        if settings.metrics:
            from .metrics import get_metrics

            self.metrics = get_metrics()
        self.watchdog = _gevent.Watchdog(
            self.live,
            tick=min(ticks),
            # On gevent, streams add up their deliveries between ticks.
            on_tick=None if self.metrics is None else self.metrics.flush,
        )
        self._on_term = on_term
        self._warned_server = False
        on_delivered = self._send_published if app is not None else None
        self.broker = Broker(
            _make_backend(settings),
            queue_size=settings.queue_size,
            on_delivered=on_delivered,
            defer=_gevent.deferrer,
            on_presence=self._presence_changed,
        )
        if self.metrics is not None:
            self.broker.observer = self.metrics

    def _presence_changed(self, channel: str, user: str, joined: bool) -> None:
        if not self.settings.presence_events:
            return
        name = "eventstream-join" if joined else "eventstream-leave"
        try:
            self.broker.publish(channel, Event(data={"user": user}, event=name))
        except Exception as e:
            log.warning("Could not publish %s of a user on %r: %s", name, channel, e)

    def grant_keys(self) -> list[str | bytes]:
        """The keys grants are verified with, the signing key last."""
        config = self.app.config if self.app is not None else {}
        key = config.get("SECRET_KEY")
        if not key:
            raise RuntimeError(
                "Grants are signed with the app's SECRET_KEY, which is not set:"
                " set app.config['SECRET_KEY'] (the same on every worker and"
                " host) to use stream.grant() and subscribe(grant=...)."
            )
        fallbacks = config.get("SECRET_KEY_FALLBACKS") or []
        return [*fallbacks, key]

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
            if self._on_term is not None:
                _gevent.install_term_handler(self._on_term)
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


_states: weakref.WeakKeyDictionary[t.Any, AppState] = weakref.WeakKeyDictionary()


def register(app: t.Any, state: AppState) -> None:
    """Keep ``state`` as ``app``'s (for as long as the app lives)."""
    _states[app] = state


def all_states() -> list[AppState]:
    """The state of every application alive."""
    return list(_states.values())


def state_for(app: t.Any) -> AppState:
    """The state of ``app``.

    :raises RuntimeError: if no :class:`~flask_eventstream.EventStream` was
        registered on it.
    """
    state = _states.get(app)
    if state is None:
        raise RuntimeError(
            "The current Flask app is not registered with an EventStream."
            " Did you forget to call 'stream.init_app(app)'?"
        )
    return state
