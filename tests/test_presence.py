"""Presence: the per-process table, and (below) presence across streams,
workers and backends."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import redis

from flask_eventstream.backends.redis.presence import RedisPresence
from flask_eventstream.presence import PresenceTable
from tests.support.redis import RedisServer


def test_counts_and_transitions() -> None:
    table = PresenceTable()
    assert table.add(["lobby", "private-alice"], "alice") == ["lobby", "private-alice"]
    assert table.add(["lobby"], "alice") == []
    assert table.add(["lobby"], "bob") == ["lobby"]
    assert table.users("lobby") == {"alice": 2, "bob": 1}
    assert table.users("private-alice") == {"alice": 1}
    assert table.users("nowhere") == {}
    assert table.remove(["lobby"], "alice") == []
    assert table.remove(["lobby", "private-alice"], "alice") == [
        "lobby",
        "private-alice",
    ]
    assert table.users("lobby") == {"bob": 1}
    assert table.users("private-alice") == {}
    assert len(table) == 1
    assert list(table) == [("lobby", "bob", 1)]


def test_removing_what_is_not_there_changes_nothing() -> None:
    table = PresenceTable()
    table.add(["lobby"], "alice")
    table.take_changes()
    assert table.remove(["lobby"], "bob") == []
    assert table.remove(["other"], "alice") == []
    assert table.users("lobby") == {"alice": 1}
    assert table.take_changes() == {}


def test_changes_are_net_and_taken_once() -> None:
    table = PresenceTable()
    table.add(["lobby"], "alice")
    table.add(["lobby"], "alice")
    table.add(["lobby"], "bob")
    table.remove(["lobby"], "bob")
    assert table.pending
    assert table.take_changes() == {("lobby", "alice"): 2}
    assert not table.pending
    assert table.take_changes() == {}
    table.remove(["lobby"], "alice")
    changes = table.take_changes()
    assert changes == {("lobby", "alice"): -1}
    # Could not be applied: back, merged with what happened since.
    table.add(["lobby"], "carol")
    table.remove(["lobby"], "alice")
    table.give_back(changes)
    assert table.take_changes() == {("lobby", "alice"): -2, ("lobby", "carol"): 1}
    assert table.snapshot() == {("lobby", "carol"): 1}


def test_threads() -> None:
    table = PresenceTable()
    users = [f"u{i}" for i in range(8)]

    def churn(user: str) -> None:
        for _ in range(2000):
            table.add(["lobby", "b"], user)
        for _ in range(1999):
            table.remove(["lobby", "b"], user)

    threads = [threading.Thread(target=churn, args=(u,)) for u in users]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert table.users("lobby") == dict.fromkeys(users, 1)
    assert table.take_changes() == {
        (channel, user): 1 for channel in ("lobby", "b") for user in users
    }


# -- the shared store on a real Redis --


@pytest.fixture
def store_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server.client()
    yield client
    client.close()


def worker(timeout: float = 30.0) -> tuple[PresenceTable, RedisPresence]:
    return PresenceTable(), RedisPresence("eventstream:", timeout)


def flush(
    client: redis.Redis, table: PresenceTable, store: RedisPresence
) -> list[tuple[str, str, bool]]:
    return store.sync(client, table.take_changes(), table.snapshot)


@pytest.mark.redis
def test_store_sums_workers_and_reports_first_and_last(
    store_client: redis.Redis,
) -> None:
    (ta, a), (tb, b) = worker(), worker()
    ta.add(["lobby", "private-alice"], "alice")
    ta.add(["lobby"], "alice")
    assert sorted(flush(store_client, ta, a)) == [
        ("lobby", "alice", True),
        ("private-alice", "alice", True),
    ]
    tb.add(["lobby"], "alice")
    tb.add(["lobby"], "bob")
    assert flush(store_client, tb, b) == [("lobby", "bob", True)]
    assert a.users(store_client, "lobby") == {"alice": 3, "bob": 1}
    assert b.users(store_client, "private-alice") == {"alice": 1}
    # Alice closes everything on A: she is still on B.
    ta.remove(["lobby", "private-alice"], "alice")
    ta.remove(["lobby"], "alice")
    assert flush(store_client, ta, a) == [("private-alice", "alice", False)]
    assert a.users(store_client, "lobby") == {"alice": 1, "bob": 1}
    tb.remove(["lobby"], "alice")
    assert flush(store_client, tb, b) == [("lobby", "alice", False)]
    assert a.users(store_client, "lobby") == {"bob": 1}
    assert a.users(store_client, "private-alice") == {}
    # Nothing to do: a heartbeat, no transitions.
    assert flush(store_client, tb, b) == []


@pytest.mark.redis
def test_dead_worker_is_swept_after_its_timeout(store_client: redis.Redis) -> None:
    (ta, a), (tb, b) = worker(timeout=0.3), worker(timeout=30)
    ta.add(["lobby"], "alice")
    ta.add(["lobby"], "bob")
    flush(store_client, ta, a)
    tb.add(["lobby"], "bob")
    flush(store_client, tb, b)
    assert b.users(store_client, "lobby") == {"alice": 1, "bob": 2}
    # A stops (as if killed): within its timeout nothing changes ...
    assert b.sweep(store_client) == []
    assert b.users(store_client, "lobby") == {"alice": 1, "bob": 2}
    time.sleep(0.35)
    # ... after it, whoever looks first takes its counts away.
    assert b.sweep(store_client) == [("lobby", "alice", False)]
    assert b.users(store_client, "lobby") == {"bob": 1}
    assert store_client.zrange("eventstream:~workers", 0, -1) == [b.worker_id.encode()]
    assert not store_client.exists("eventstream:~w:" + a.worker_id)
    # A comes back (it had only stalled): it registers again, in full.
    old = a.worker_id
    assert flush(store_client, ta, a) == [("lobby", "alice", True)]
    assert a.worker_id != old
    assert b.users(store_client, "lobby") == {"alice": 1, "bob": 2}


@pytest.mark.redis
def test_worker_registers_again_after_redis_lost_everything(
    store_client: redis.Redis,
) -> None:
    table, store = worker()
    table.add(["lobby"], "alice")
    flush(store_client, table, store)
    store_client.flushall()
    assert store.users(store_client, "lobby") == {}
    # The next heartbeat finds the worker unknown and puts everything back.
    assert flush(store_client, table, store) == [("lobby", "alice", True)]
    assert store.users(store_client, "lobby") == {"alice": 1}


@pytest.mark.redis
def test_after_a_failed_call_the_worker_resyncs_without_leave_and_join(
    store_client: redis.Redis, redis_server: RedisServer
) -> None:
    table, store = worker()
    table.add(["lobby"], "alice")
    table.add(["lobby"], "bob")
    flush(store_client, table, store)
    table.remove(["lobby"], "bob")
    changes = table.take_changes()
    broken = redis_server.client(socket_timeout=0.2)
    broken.connection_pool.connection_kwargs["port"] = 1  # nothing listens
    with pytest.raises(redis.ConnectionError):
        store.sync(broken, changes, table.snapshot)
    broken.close()
    assert not store.synced
    # Unknown whether it applied: the next call starts over from the table,
    # and only the real change shows.
    assert flush(store_client, table, store) == [("lobby", "bob", False)]
    assert store.users(store_client, "lobby") == {"alice": 1}
    assert store_client.zcard("eventstream:~workers") == 1


@pytest.mark.redis
def test_clean_leave(store_client: redis.Redis) -> None:
    table, store = worker()
    table.add(["lobby"], "alice")
    flush(store_client, table, store)
    assert store.leave(store_client) == [("lobby", "alice", False)]
    assert store.users(store_client, "lobby") == {}
    assert store_client.keys("eventstream:~w:*") == []
    assert store_client.zcard("eventstream:~workers") == 0


@pytest.mark.redis
def test_revocations_keep_the_latest(store_client: redis.Redis) -> None:
    _, store = worker()
    assert store.revoked_at(store_client, "alice") is None
    assert store.revoke(store_client, "alice", 2000) == 2000
    assert store.revoke(store_client, "alice", 1000) == 2000
    assert store.revoked_at(store_client, "alice") == 2000
    assert store.revoked_at(store_client, "bob") is None
