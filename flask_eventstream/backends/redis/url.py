"""Which Redis an ``EVENTSTREAM_REDIS_URL`` names, and the checks on
``EVENTSTREAM_REDIS_OPTIONS`` that need no connection.

Plain functions on strings and dicts: nothing here imports :mod:`redis` or
opens a socket, so a malformed URL is reported when the application starts,
with the accepted forms, whatever the state of the network.

Each scheme has its parser in :data:`PARSERS`; a new kind of deployment adds
its scheme there and its form to :data:`FORMS`.
"""

from __future__ import annotations

import dataclasses
import os
import typing as t
import urllib.parse

__all__ = [
    "FORMS",
    "OPTIONS_KEY",
    "PARSERS",
    "RESERVED_OPTIONS",
    "URL_KEY",
    "Cluster",
    "Sentinel",
    "Server",
    "Target",
    "check_options",
    "parse_url",
    "redact",
]

URL_KEY = "EVENTSTREAM_REDIS_URL"
OPTIONS_KEY = "EVENTSTREAM_REDIS_OPTIONS"

#: The accepted forms, as the error messages show them.
FORMS = (
    "redis://[[user]:password@]host[:port][/db]",
    "rediss://[[user]:password@]host[:port][/db] (TLS)",
    "unix:///path/to/redis.sock[?db=N]",
    "redis+sentinel://[[user]:password@]host1:port1[,host2:port2...]/db/service_name",
    "redis+cluster://[[user]:password@]host:port[,host:port...] (a Redis Cluster)",
    "rediss+cluster://... (a Redis Cluster over TLS)",
)

#: Options the library sets itself: its connections must not decode replies,
#: retry on their own (a retried script could run twice), be pooled by the
#: caller, or time out a blocking read early.
RESERVED_OPTIONS = frozenset(
    {
        "client_name",
        "connection_class",
        "connection_pool",
        "connection_pool_class",
        "decode_responses",
        "host",
        "max_connections",
        "path",
        "port",
        "retry",
        "retry_on_error",
        "retry_on_timeout",
        "single_connection_client",
        "socket_timeout",
        "unix_socket_path",
    }
)

#: Options that name files, checked for existence at start.
_FILE_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_ca_path")


@dataclasses.dataclass(frozen=True)
class Server:
    """One server, reached through redis-py's ``from_url``."""

    url: str


@dataclasses.dataclass(frozen=True)
class Sentinel:
    """The master that the Sentinels at ``sentinels`` name ``service``."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)


@dataclasses.dataclass(frozen=True)
class Cluster:
    """A Redis Cluster, found through any of ``nodes``."""

    nodes: tuple[tuple[str, int], ...]
    tls: bool = False
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)


Target = Server | Sentinel | Cluster


class _Malformed(ValueError):
    """A reason, completed by :func:`parse_url` into the full message."""


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***``, for messages."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc, slash, tail = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if not at:
        return url
    user, colon, _ = userinfo.partition(":")
    userinfo = f"{user}:***" if colon else "***"
    return f"{scheme}://{userinfo}@{hosts}{slash}{tail}"


def parse_url(url: object, key: str = URL_KEY) -> Target:
    """The :data:`Target` that ``url`` names.

    :raises TypeError: if ``url`` is not a string.
    :raises ValueError: if it is not one of :data:`FORMS`; the message names
        ``key``, the problem and the accepted forms, never the password.
    """
    if not isinstance(url, str):
        raise TypeError(f"{key} must be a string, not {url!r}")
    try:
        scheme = url.partition("://")[0].lower() if "://" in url else ""
        parser = PARSERS.get(scheme)
        if parser is None:
            known = ", ".join(f"{s}://" for s in PARSERS)
            raise _Malformed(
                f"the scheme must be one of {known}"
                if scheme
                else "it has no scheme (such as redis://)"
            )
        return parser(url)
    except _Malformed as e:
        forms = "".join(f"\n  {form}" for form in FORMS)
        raise ValueError(
            f"{key} {redact(url)!r} is not a Redis URL: {e}. Accepted forms:{forms}"
        ) from None


class _Parts(t.NamedTuple):
    scheme: str
    netloc: str
    path: str
    query: str


def _split(url: str) -> _Parts:
    """``scheme://netloc/path?query``, split by hand: a Sentinel or Cluster
    URL names several hosts, which :func:`urllib.parse.urlsplit` rejects
    when one is an IPv6 address (``[::1]``) on Pythons with its stricter
    host check. Each host is checked by :func:`_host_port`."""
    if any(c.isspace() for c in url):
        raise _Malformed("it contains whitespace")
    scheme, _, rest = url.partition("://")
    rest, hash_, _ = rest.partition("#")
    if hash_:
        raise _Malformed("it has a #fragment")
    rest, _, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    return _Parts(scheme, netloc, slash + path, query)


def _db(text: str, what: str) -> int:
    if not text.isdigit() or not text.isascii():
        raise _Malformed(f"the database must be a number, not {what} {text!r}")
    return int(text)


def _port(text: str) -> int:
    if not text.isdigit() or not text.isascii() or not 0 < int(text) < 65536:
        raise _Malformed(f"the port must be a number from 1 to 65535, not {text!r}")
    return int(text)


def _host_port(text: str, default_port: int | None) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` (and without the port if it has a default)."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not host:
            raise _Malformed(f"{text!r} is not a host")
        if rest and not rest.startswith(":"):
            raise _Malformed(f"{text!r} is not host:port")
        port_text = rest[1:] if rest else ""
        has_port = bool(rest)
    else:
        host, colon, port_text = text.rpartition(":")
        has_port = bool(colon)
        if not has_port:
            host = text
        if ":" in host:
            raise _Malformed(f"write an IPv6 address in brackets: [{host}]")
    if not host or "/" in host or "@" in host:
        raise _Malformed(f"{text!r} is not a host" + ("" if text else " (empty)"))
    if not has_port:
        if default_port is None:
            raise _Malformed(f"{text!r} has no port")
        return host, default_port
    return host, _port(port_text)


def _credentials(netloc: str) -> tuple[str | None, str | None, str]:
    """(user, password, what follows the ``@``), percent-decoded."""
    userinfo, at, hosts = netloc.rpartition("@")
    if not at:
        return None, None, netloc
    user, colon, password = userinfo.partition(":")
    return (
        urllib.parse.unquote(user) or None,
        urllib.parse.unquote(password) if colon and password else None,
        hosts,
    )


def _server(url: str) -> Target:
    """``redis://`` and ``rediss://``: one server, as redis-py reads it."""
    parts = _split(url)
    _, _, hosts = _credentials(parts.netloc)
    if not hosts:
        raise _Malformed("it names no host")
    if "," in hosts:
        raise _Malformed("it names several hosts; for Sentinel use redis+sentinel://")
    _host_port(hosts, 6379)
    path = parts.path.strip("/")
    if path:
        _db(path, "path")
    _query_db(parts.query)
    return Server(url)


def _unix(url: str) -> Target:
    parts = _split(url)
    if parts.netloc.rpartition("@")[2]:
        raise _Malformed("a unix:// URL has no host: unix:///path/to/redis.sock")
    if not parts.path.startswith("/") or parts.path.endswith("/"):
        raise _Malformed("it names no socket file")
    _query_db(parts.query)
    return Server(url)


def _query_db(query: str) -> None:
    for name, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if name == "db":
            _db(value, "db=")


def _sentinel(url: str) -> Target:
    parts = _split(url)
    if parts.query:
        raise _Malformed(
            f"a redis+sentinel:// URL takes no ?query; put options in {OPTIONS_KEY}"
        )
    user, password, hosts = _credentials(parts.netloc)
    if not hosts:
        raise _Malformed("it names no Sentinel")
    sentinels = tuple(_host_port(h, None) for h in hosts.split(","))
    segments = parts.path.split("/")
    if len(segments) != 3 or not segments[2]:
        raise _Malformed("the path must be /db/service_name, such as /0/mymaster")
    db = _db(segments[1], "path")
    service = urllib.parse.unquote(segments[2])
    return Sentinel(sentinels, service, db, user, password)


def _cluster(url: str) -> Target:
    parts = _split(url)
    if parts.query or parts.path.strip("/"):
        raise _Malformed(
            f"a redis+cluster:// URL takes no /db or ?query (a cluster has one"
            f" database); put options in {OPTIONS_KEY}"
        )
    user, password, hosts = _credentials(parts.netloc)
    if not hosts:
        raise _Malformed("it names no node")
    nodes = tuple(_host_port(h, None) for h in hosts.split(","))
    return Cluster(nodes, parts.scheme.lower() == "rediss+cluster", user, password)


#: Parsers by scheme (lower case).
PARSERS: dict[str, t.Callable[[str], Target]] = {
    "redis": _server,
    "rediss": _server,
    "unix": _unix,
    "redis+sentinel": _sentinel,
    "redis+cluster": _cluster,
    "rediss+cluster": _cluster,
}


def check_options(
    options: object, target: Target | None = None, key: str = OPTIONS_KEY
) -> dict[str, t.Any]:
    """``options`` as a dict, after the checks that need no redis-py: a
    mapping with string keys, no option the library sets itself, files that
    exist. (:mod:`.redis` then lets redis-py check the names and values.)

    :raises TypeError: for something other than a mapping.
    :raises ValueError: for a reserved option or a missing file.
    """
    if not isinstance(options, t.Mapping) or not all(
        isinstance(k, str) for k in options
    ):
        raise TypeError(
            f"{key} must be a dict of redis-py connection options (such as"
            f' {{"ssl_ca_certs": "/path/ca.pem"}}), not {options!r}'
        )
    result = dict(options)
    reserved = sorted(RESERVED_OPTIONS & set(result))
    if reserved:
        raise ValueError(
            f"{key} may not set {', '.join(reserved)}: the library sets"
            " these itself (the host and port come from EVENTSTREAM_REDIS_URL)"
        )
    sentinel_kwargs = result.get("sentinel_kwargs")
    if "sentinel_kwargs" in result:
        if not isinstance(target, Sentinel):
            raise ValueError(
                f"{key}: sentinel_kwargs applies only to a redis+sentinel:// URL"
            )
        if not isinstance(sentinel_kwargs, t.Mapping):
            raise TypeError(
                f"{key}: sentinel_kwargs must be a dict, not {sentinel_kwargs!r}"
            )
    for where, opts in (("", result), ("sentinel_kwargs.", sentinel_kwargs or {})):
        for name in _FILE_OPTIONS:
            path = opts.get(name)
            if path is None:
                continue
            if not isinstance(path, str):
                raise TypeError(f"{key}: {where}{name} must be a path, not {path!r}")
            exists = os.path.isdir if name == "ssl_ca_path" else os.path.isfile
            if not exists(path):
                raise ValueError(f"{key}: {where}{name} {path!r} does not exist")
    return result
