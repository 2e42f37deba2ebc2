"""Signed grants: what lets a browser's ``EventSource``, which cannot send
headers, open private channels.

A grant is an :class:`itsdangerous.URLSafeTimedSerializer` token, signed with
the application's ``SECRET_KEY`` (and verified with its
``SECRET_KEY_FALLBACKS`` too) and a salt of this library, that names the
channels it opens, the user it was issued to, when it was issued and when it
expires. Nothing here touches Flask's request or a network: the extension
supplies the keys and the revocation times.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from collections.abc import Iterable
from collections.abc import Sequence

from itsdangerous import BadData
from itsdangerous import URLSafeTimedSerializer

from .broker import validate_channel

__all__ = [
    "MAX_GRANT_LENGTH",
    "SALT",
    "Grant",
    "GrantInvalid",
    "RedactGrants",
    "check_user",
    "load_grant",
    "redact",
    "sign_grant",
]

#: The salt of every grant: a token signed for anything else with the same
#: key (a session cookie, another extension's token) is not a grant.
SALT = "flask-eventstream.grant"

#: Longer tokens are refused without being decoded. A grant for ten channels
#: of 128 characters and a long user name is well under this.
MAX_GRANT_LENGTH = 4096

#: Longest user name or id, in characters.
MAX_USER_LENGTH = 256

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class GrantInvalid(ValueError):
    """A token is not a grant that opens what was asked. :attr:`reason` is
    ``"missing"``, ``"invalid"``, ``"expired"``, ``"revoked"`` or
    ``"channels"``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Grant:
    """A verified grant."""

    #: The channels it opens.
    channels: frozenset[str]
    #: The user it was issued to, or ``None``.
    user: str | None
    #: When it was issued (Unix time, seconds, millisecond precision).
    issued: float
    #: When it expires (Unix time, seconds).
    expires: float

    def covers(self, channels: Iterable[str]) -> bool:
        """Whether every one of ``channels`` is granted."""
        return self.channels.issuperset(channels)


def check_user(user: object) -> str:
    """Return ``user`` as the string that identifies it, or raise.

    :raises TypeError: unless it is a ``str`` or an ``int``.
    :raises ValueError: if it is empty, longer than 256 characters, or
        contains control characters.
    """
    if isinstance(user, bool) or not isinstance(user, (str, int)):
        raise TypeError(f"user must be a str or an int, not {type(user).__name__}")
    text = str(user)
    if not text or len(text) > MAX_USER_LENGTH or _CONTROL.search(text):
        raise ValueError(
            f"Invalid user {text[:40]!r}: use 1 to {MAX_USER_LENGTH} characters"
            " without control characters"
        )
    return text


def _serializer(keys: Sequence[str | bytes]) -> URLSafeTimedSerializer:
    # Bytes throughout: itsdangerous takes a list of one kind.
    return URLSafeTimedSerializer(
        [k.encode("utf-8") if isinstance(k, str) else k for k in keys], salt=SALT
    )


def sign_grant(
    keys: Sequence[str | bytes],
    channels: Sequence[str],
    user: str | None,
    expires_in: float,
    *,
    now: float | None = None,
) -> str:
    """Sign a grant with the last of ``keys``.

    :raises TypeError, ValueError: for no channel, a bad channel name or user,
        or an ``expires_in`` that is not a positive number of seconds.
    """
    if not channels:
        raise TypeError("grant() needs at least one channel")
    names = list(dict.fromkeys(validate_channel(c) for c in channels))
    if user is not None:
        user = check_user(user)
    if (
        isinstance(expires_in, bool)
        or not isinstance(expires_in, (int, float))
        or not math.isfinite(expires_in)
        or expires_in <= 0
    ):
        raise ValueError(
            f"expires_in must be a positive number of seconds, not {expires_in!r}"
        )
    issued = round((time.time() if now is None else now) * 1000)
    payload = {"c": names, "u": user, "i": issued, "e": math.ceil(expires_in * 1000)}
    token = _serializer(keys).dumps(payload)
    return token if isinstance(token, str) else token.decode("ascii")


def load_grant(
    keys: Sequence[str | bytes], token: object, *, now: float | None = None
) -> Grant:
    """Verify ``token`` and return the grant.

    :raises GrantInvalid: with ``reason`` ``"missing"`` (no token),
        ``"invalid"`` (malformed, too long, tampered, or signed with another
        key) or ``"expired"``.
    """
    if token is None or token == "":
        raise GrantInvalid("missing")
    if not isinstance(token, str) or len(token) > MAX_GRANT_LENGTH:
        raise GrantInvalid("invalid")
    try:
        payload = _serializer(keys).loads(token)
    except BadData:
        raise GrantInvalid("invalid") from None
    grant = _parse(payload)
    if grant is None:
        raise GrantInvalid("invalid")
    if (time.time() if now is None else now) >= grant.expires:
        raise GrantInvalid("expired")
    return grant


def _parse(payload: object) -> Grant | None:
    """The grant in a payload that carries a valid signature; ``None`` if it
    is not shaped like one of ours (which only another version could sign)."""
    if not isinstance(payload, dict):
        return None
    channels, user = payload.get("c"), payload.get("u")
    issued, expires_in = payload.get("i"), payload.get("e")
    if not isinstance(channels, list) or not all(isinstance(c, str) for c in channels):
        return None
    if user is not None and not isinstance(user, str):
        return None
    if type(issued) is not int or type(expires_in) is not int:
        return None
    return Grant(
        channels=frozenset(channels),
        user=user,
        issued=issued / 1000,
        expires=(issued + expires_in) / 1000,
    )


_GRANT_PARAM = re.compile(r"(?<![^?&;\s\"'])(grant=)[^&;\s\"']*")


def redact(text: str) -> str:
    """``text`` (a request line, a URL, a log message) with the value of any
    ``grant=`` query parameter replaced, so that grants stay out of logs."""
    if "grant=" not in text:
        return text
    return _GRANT_PARAM.sub(r"\1[redacted]", text)


class RedactGrants(logging.Filter):
    """A logging filter that replaces ``grant=`` values in a record's message
    and arguments: servers log request lines, and a grant in a query string
    would land in their logs. :meth:`EventStream.init_app()
    <flask_eventstream.EventStream.init_app>` puts one on the loggers of
    Werkzeug's development server and of gunicorn's access log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        args = record.args
        if isinstance(args, dict):
            # In place: gunicorn's atoms are a dict subclass of its own.
            for key, value in list(args.items()):
                if isinstance(value, str) and "grant=" in value:
                    args[key] = redact(value)
        elif isinstance(args, tuple):
            record.args = tuple(_redact_arg(v) for v in args)
        return True


def _redact_arg(value: object) -> object:
    return redact(value) if isinstance(value, str) else value


#: The loggers that write request lines: Werkzeug's development server, and
#: gunicorn's access log (``%(r)s`` and ``%(q)s`` hold the query string).
REQUEST_LOGGERS = ("werkzeug", "gunicorn.access")


def redact_request_logs() -> None:
    """Put a :class:`RedactGrants` filter on :data:`REQUEST_LOGGERS` (once)."""
    for name in REQUEST_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactGrants) for f in logger.filters):
            logger.addFilter(RedactGrants())
