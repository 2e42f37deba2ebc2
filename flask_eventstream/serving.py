"""Serving an app on gevent's WSGIServer with prompt disconnect detection.

gevent's :class:`~gevent.pywsgi.WSGIHandler` does not put the client socket in
the WSGI environ (gunicorn does, as ``gunicorn.socket``). :class:`WSGIHandler`
adds it as ``eventstream.socket`` so that streams notice a client that went
away within milliseconds instead of at the next heartbeat.

This module does not monkey-patch; the program that calls :func:`run` decides.
"""

from __future__ import annotations

import signal
import typing as t

import gevent
from gevent.pywsgi import WSGIHandler as _WSGIHandler
from gevent.pywsgi import WSGIServer

from .grants import redact

__all__ = ["WSGIHandler", "make_server", "run"]


class WSGIHandler(_WSGIHandler):  # type: ignore[misc]
    """A pywsgi handler that exposes the client socket to the application,
    and keeps grants (``?grant=``) out of its access log."""

    def get_environ(self) -> dict[str, t.Any]:
        environ: dict[str, t.Any] = super().get_environ()
        environ["eventstream.socket"] = self.socket
        return environ

    def format_request(self) -> str:
        return redact(str(super().format_request()))


def make_server(
    app: t.Any, host: str = "127.0.0.1", port: int = 5000, **kwargs: t.Any
) -> t.Any:
    """A :class:`gevent.pywsgi.WSGIServer` for ``app`` using :class:`WSGIHandler`."""
    kwargs.setdefault("handler_class", WSGIHandler)
    return WSGIServer((host, port), app, **kwargs)


def run(
    app: t.Any,
    host: str = "127.0.0.1",
    port: int = 5000,
    *,
    stop_timeout: float = 5.0,
    **kwargs: t.Any,
) -> None:
    """Serve ``app`` until SIGTERM or SIGINT, then end every open stream and
    stop within ``stop_timeout`` seconds."""
    server = make_server(app, host, port, **kwargs)

    def stop() -> None:
        stream = app.extensions.get("eventstream")
        if stream is not None:
            stream.shutdown()
        gevent.spawn(server.stop, timeout=stop_timeout)

    handlers = [
        gevent.signal_handler(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)
    ]
    try:
        server.serve_forever()
    finally:
        for handler in handlers:
            handler.cancel()
