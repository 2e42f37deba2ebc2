"""redis-py clients for an ``EVENTSTREAM_REDIS_URL`` and
``EVENTSTREAM_REDIS_OPTIONS``: one server (``from_url``) or the master that
Sentinel names (``master_for``), with the library's own pool limits,
timeouts and client names on top of the user's options.
"""

from __future__ import annotations

import functools
import ssl
import typing as t

import redis
from redis.cluster import ClusterNode
from redis.cluster import RedisCluster
from redis.sentinel import Sentinel as RedisSentinel
from redis.sentinel import SentinelConnectionPool

from .url import check_options
from .url import Cluster
from .url import FORMS
from .url import OPTIONS_KEY
from .url import parse_url
from .url import Sentinel
from .url import Target

__all__ = ["Connector", "tls_failure"]


#: Timeout of a Sentinel's answer (seconds), unless sentinel_kwargs says.
SENTINEL_TIMEOUT = 1.0


class _BlockingSentinelPool(SentinelConnectionPool, redis.BlockingConnectionPool):
    """A Sentinel-managed pool that waits (bounded) for a free connection
    instead of failing at once when all are in use."""


class Connector:
    """Makes the clients of one backend.

    :param url: ``EVENTSTREAM_REDIS_URL``.
    :param options: ``EVENTSTREAM_REDIS_OPTIONS``.
    :raises ValueError, TypeError: for a malformed URL, or options that
        redis-py does not take; the message names the key.
    """

    def __init__(self, url: str, options: t.Mapping[str, t.Any] | None = None) -> None:
        self.target: Target = parse_url(url)
        self.options = check_options(options or {}, self.target)
        self._check_with_redis()

    def _check_with_redis(self) -> None:
        """Build (without connecting) a connection of each kind the options
        go to, so that redis-py rejects unknown names and bad values now."""
        options = dict(self.options)
        sentinel_kwargs = options.pop("sentinel_kwargs", None)
        checks: list[tuple[str, t.Callable[[], object]]] = []
        target = self.target
        if isinstance(target, Cluster):
            cluster_kind = (
                redis.SSLConnection
                if target.tls or options.pop("ssl", False)
                else redis.Connection
            )
            options.pop("ssl", None)
            checks.append(("", lambda: cluster_kind(**options)))
        elif isinstance(target, Sentinel):
            kind = (
                redis.SSLConnection if options.pop("ssl", False) else redis.Connection
            )
            checks.append(("", lambda: kind(**options)))
            if sentinel_kwargs is not None:
                # redis-py gives each Sentinel a client of its own, which
                # takes "ssl" as the nodes' connections do.
                to_sentinels = dict(sentinel_kwargs)
                sentinel_kind = (
                    redis.SSLConnection
                    if to_sentinels.pop("ssl", False)
                    else redis.Connection
                )
                checks.append(
                    (
                        "sentinel_kwargs: ",
                        lambda: t.cast(t.Any, sentinel_kind)(**to_sentinels),
                    )
                )
        else:
            url = target.url

            def from_url() -> object:
                pool = redis.ConnectionPool.from_url(url, **options)
                return pool.connection_class(**pool.connection_kwargs)

            checks.append(("", from_url))
        for where, check in checks:
            try:
                check()
            except (TypeError, ValueError, redis.RedisError) as e:
                forms = "".join(f"\n  {form}" for form in FORMS)
                raise ValueError(
                    f"{OPTIONS_KEY} {where}redis-py does not take these options"
                    f" ({type(e).__name__}: {e}). Accepted forms of"
                    f" EVENTSTREAM_REDIS_URL:{forms}"
                ) from None

    def client(
        self,
        name: str,
        *,
        max_connections: int,
        pool_timeout: float | None = None,
        **overrides: t.Any,
    ) -> redis.Redis:
        """A client with a pool of at most ``max_connections``; with
        ``pool_timeout``, a blocking pool that waits that long for a free
        connection. ``overrides`` (timeouts, retry, client_name) are the
        library's and win over the user's options."""
        kwargs = {**self.options, **overrides}
        target = self.target
        if isinstance(target, Cluster):
            raise TypeError("a Redis Cluster is reached with cluster_client()")
        if isinstance(target, Sentinel):
            sentinel_kwargs = kwargs.pop("sentinel_kwargs", None)
            if target.username is not None:
                kwargs.setdefault("username", target.username)
            if target.password is not None:
                kwargs.setdefault("password", target.password)
            # The Sentinels answer at once: a short timeout, and no retry of
            # redis-py's own (ours are bounded).
            defaults = {
                k: v
                for k, v in kwargs.items()
                if k in ("retry", "socket_connect_timeout", "socket_keepalive")
            }
            defaults["socket_timeout"] = SENTINEL_TIMEOUT
            if sentinel_kwargs is None:
                # The URL's credentials work for the Sentinels too
                # (python-socketio's reading of this URL).
                for k in ("username", "password"):
                    if k in kwargs:
                        defaults[k] = kwargs[k]
            sentinel_kwargs = {**defaults, **(sentinel_kwargs or {})}
            pool_class: type[SentinelConnectionPool] = SentinelConnectionPool
            if pool_timeout is not None:
                pool_class = _BlockingSentinelPool
                kwargs["timeout"] = pool_timeout
            sentinel: t.Any = t.cast(t.Any, RedisSentinel)(
                list(target.sentinels), sentinel_kwargs=sentinel_kwargs
            )
            return t.cast(
                redis.Redis,
                sentinel.master_for(
                    target.service,
                    connection_pool_class=pool_class,
                    max_connections=max_connections,
                    db=target.db,
                    **kwargs,
                ),
            )
        pool: redis.ConnectionPool
        if pool_timeout is not None:
            pool = redis.BlockingConnectionPool.from_url(
                target.url,
                max_connections=max_connections,
                timeout=pool_timeout,
                **kwargs,
            )
        else:
            pool = redis.ConnectionPool.from_url(
                target.url, max_connections=max_connections, **kwargs
            )
        return redis.Redis(connection_pool=pool)

    def cluster_client(
        self,
        name: str,
        *,
        max_connections: int,
        pool_timeout: float,
        **overrides: t.Any,
    ) -> t.Any:
        """A ``RedisCluster`` with a blocking pool of at most
        ``max_connections`` per node; ``overrides`` win over the user's
        options. Redirections (MOVED, ASK) are followed; connection failures
        are left to the caller (``retry``)."""
        target = self.target
        assert isinstance(target, Cluster)
        kwargs = {**self.options, **overrides}
        if target.tls:
            kwargs["ssl"] = True
        if target.username is not None:
            kwargs.setdefault("username", target.username)
        if target.password is not None:
            kwargs.setdefault("password", target.password)
        node: t.Any = ClusterNode
        return RedisCluster(
            startup_nodes=[node(h, p) for h, p in target.nodes],
            connection_pool_class=functools.partial(
                redis.BlockingConnectionPool, timeout=pool_timeout
            ),
            max_connections=max_connections,
            **kwargs,
        )


def tls_failure(error: BaseException) -> bool:
    """Whether ``error`` comes from a failed TLS handshake (a certificate
    that the configured CA did not sign, a plain server): retrying will
    not help."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLError):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    text = str(error)
    return "CERTIFICATE_VERIFY_FAILED" in text or "WRONG_VERSION_NUMBER" in text
