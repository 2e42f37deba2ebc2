"""What the library reads from the client's request."""

from __future__ import annotations

from flask import has_request_context
from flask import request

__all__ = ["last_event_id"]


def last_event_id() -> str | None:
    """The id of the last event the client of the current request received,
    for resuming a stream: the ``Last-Event-ID`` header that browsers send
    when they reconnect, else the ``lastEventId`` query argument (for a
    page's first connection), else ``None``. Outside a request, ``None``.

    Browsers send the header as UTF-8, while WSGI servers hand headers over
    as latin-1 text; the header is decoded as UTF-8, so an id such as
    ``"café-1"`` comes back as it was sent. A header that is not valid UTF-8
    is returned as the server decoded it (one character per byte), never
    dropped and never an error.

    .. versionadded:: 0.2
    """
    if not has_request_context():
        return None
    header = request.headers.get("Last-Event-ID")
    if header:
        return _utf8(header)
    return request.args.get("lastEventId") or None


def _utf8(value: str) -> str:
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        # Not latin-1 text (a server that already decoded it), or bytes
        # that are not UTF-8: keep what the server gave.
        return value
