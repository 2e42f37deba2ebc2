"""Prometheus metrics, with the ``metrics`` extra (``prometheus_client``).

Off unless an application sets ``EVENTSTREAM_METRICS = True``; then
``prometheus_client`` is imported (and only then) and the metrics below are
registered in its default registry, once per process, whatever the number
of applications:

=========================================== ======= ===========================
name                                        type    meaning
=========================================== ======= ===========================
``eventstream_connections``                 gauge   open streams
``eventstream_connections_opened_total``    counter streams opened
``eventstream_disconnects_total{reason}``   counter streams ended, by reason
``eventstream_events_published_total``      counter events published here
``eventstream_deliveries_total``            counter events written to clients
``eventstream_resumes_total{result}``       counter ``replayed`` or ``reset``
``eventstream_publish_errors_total``        counter ``PublishError``\\ s raised
=========================================== ======= ===========================

No label carries a channel or a user name: their number is unbounded.

Under a multi-process server (gunicorn with several workers) set
``PROMETHEUS_MULTIPROC_DIR`` to an empty directory before the server starts,
call ``prometheus_client.multiprocess.mark_process_dead(worker.pid)`` from
gunicorn's ``child_exit`` hook (see the deployment docs), and serve
:func:`exposition` at ``/metrics``: one scrape then gives the sums over the
workers, and the open streams of live workers only.
"""

from __future__ import annotations

import os
import threading
import typing as t

from .exceptions import PublishError
from .observe import Observer

if t.TYPE_CHECKING:
    from prometheus_client import Counter
    from prometheus_client import Gauge

    from .sse import Event

__all__ = [
    "DISCONNECT_REASONS",
    "RESUME_RESULTS",
    "Metrics",
    "exposition",
    "get_metrics",
]

#: Values of the ``reason`` label: the view returned (``closed``), the
#: client went away, it fell too far behind, a write blocked past
#: ``EVENTSTREAM_SEND_TIMEOUT``, ``EVENTSTREAM_MAX_LIFETIME`` passed, the
#: worker shut down, its user was revoked or its channel disconnected, or
#: the stream failed.
DISCONNECT_REASONS = (
    "closed",
    "client",
    "overflow",
    "timeout",
    "lifetime",
    "shutdown",
    "revoked",
    "error",
)
#: A greenlet killed from outside (the server stopping) counts as shutdown.
_REASONS = {"killed": "shutdown"}
#: Values of the ``result`` label of resumes.
RESUME_RESULTS = ("replayed", "reset")

_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def _prometheus() -> t.Any:
    try:
        import prometheus_client
    except ImportError as e:
        raise ImportError(
            "EVENTSTREAM_METRICS is on but prometheus_client is missing:"
            " pip install 'flask-eventstream[metrics]'"
        ) from e
    return prometheus_client


class Metrics(Observer):
    """The library's metrics in this process; see :func:`get_metrics`.

    It is the brokers' observer (:mod:`flask_eventstream.observe`), called
    at the one place where each thing it counts happens, plus
    :attr:`pending`, which the streams' write loop adds to.
    """

    __slots__ = (
        "connections",
        "opened_total",
        "disconnects_total",
        "published_total",
        "deliveries_total",
        "resumes_total",
        "publish_errors_total",
        "_disconnects",
        "_resumes",
        "written",
        "pending",
    )

    def __init__(self, registry: t.Any = None) -> None:
        prom = _prometheus()
        kw: dict[str, t.Any] = {} if registry is None else {"registry": registry}
        self.connections: Gauge = prom.Gauge(
            "eventstream_connections",
            "Open event streams.",
            multiprocess_mode="livesum",
            **kw,
        )
        self.opened_total: Counter = prom.Counter(
            "eventstream_connections_opened", "Event streams opened.", **kw
        )
        self.disconnects_total: Counter = prom.Counter(
            "eventstream_disconnects",
            "Event streams ended, by reason.",
            ["reason"],
            **kw,
        )
        self.published_total: Counter = prom.Counter(
            "eventstream_events_published",
            "Events published from this process.",
            **kw,
        )
        self.deliveries_total: Counter = prom.Counter(
            "eventstream_deliveries", "Events written to clients.", **kw
        )
        self.resumes_total: Counter = prom.Counter(
            "eventstream_resumes",
            "Streams resumed from a Last-Event-ID, by result.",
            ["result"],
            **kw,
        )
        self.publish_errors_total: Counter = prom.Counter(
            "eventstream_publish_errors", "PublishErrors raised.", **kw
        )
        # Every label value exists from the start, so a scrape shows zeros
        # rather than missing series.
        self._disconnects = {
            reason: self.disconnects_total.labels(reason)
            for reason in DISCONNECT_REASONS
        }
        self._resumes = {
            result: self.resumes_total.labels(result) for result in RESUME_RESULTS
        }
        #: ``written(n)``: a write of ``n`` events to a client completed.
        self.written: t.Callable[[int], None] = self.deliveries_total.inc
        #: Deliveries not yet added to the counter. Streams on a gevent hub
        #: add theirs here (an integer addition per write, where the counter
        #: costs a lock and, across processes, a write to a memory-mapped
        #: file); :meth:`flush` adds them up at every watchdog tick and
        #: when a stream ends.
        self.pending = 0

    def stream_opened(self, connection_id: int, channels: tuple[str, ...]) -> None:
        """A stream started (its first bytes are being sent)."""
        self.connections.inc()
        self.opened_total.inc()

    def stream_ended(
        self, connection_id: int, channels: tuple[str, ...], reason: str
    ) -> None:
        """A stream that had started was released."""
        self.flush()
        self.connections.dec()
        reason = _REASONS.get(reason, reason)
        counter = self._disconnects.get(reason)
        if counter is None:
            counter = self._disconnects["error"]
        counter.inc()

    def flush(self) -> None:
        """Add the pending deliveries to the counter."""
        pending = self.pending
        if pending:
            self.pending = 0
            self.deliveries_total.inc(pending)

    def published(self, channel: str, event: Event) -> None:
        """An event was accepted by the broker."""
        self.published_total.inc()

    def publish_failed(self, channel: str, error: Exception) -> None:
        """Publishing raised: counted when it is a
        :class:`~flask_eventstream.PublishError` (the broker could not take
        the event), not for bad input."""
        if isinstance(error, PublishError):
            self.publish_errors_total.inc()

    def resumed(self, channels: tuple[str, ...], result: str) -> None:
        """A stream resumed from a client's id: exactly (``replayed``), or
        after an ``eventstream-reset``."""
        self._resumes["replayed" if result == "exact" else "reset"].inc()


_metrics: Metrics | None = None
_lock = threading.Lock()


def get_metrics() -> Metrics:
    """The process's :class:`Metrics`, created (and ``prometheus_client``
    imported) on first use.

    :raises ImportError: if ``prometheus_client`` is not installed.
    """
    global _metrics
    if _metrics is None:
        with _lock:
            if _metrics is None:
                _metrics = Metrics()
    return _metrics


def exposition() -> tuple[bytes, str]:
    """The metrics in Prometheus' text format, and its content type, for a
    ``/metrics`` route.

    With ``PROMETHEUS_MULTIPROC_DIR`` set, the values of every live process
    that shares the directory are summed (a fresh collector per call, as
    ``prometheus_client`` requires); otherwise the default registry, with
    any metrics of the application's own, is rendered.
    """
    prom = _prometheus()
    registry = prom.REGISTRY
    if os.environ.get(_MULTIPROC_ENV):
        from prometheus_client import multiprocess

        registry = prom.CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return prom.generate_latest(registry), str(prom.CONTENT_TYPE_LATEST)
