"""The Redis backend (placeholder until the Redis issue lands)."""

from __future__ import annotations

from ..broker import Broker
from ..broker import Key
from ..broker import Subscription
from ..sse import Event

__all__ = ["RedisBackend"]


class RedisBackend:
    def __init__(self, broker: Broker, url: str, history: int = 1000) -> None:
        raise NotImplementedError("The Redis backend is not implemented yet.")

    def publish(self, channel: str, event: Event) -> Event:
        raise NotImplementedError

    def attach(self, sub: Subscription, last: Key | None) -> None:
        raise NotImplementedError

    def detach(self, sub: Subscription) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError
