"""Several gunicorn gevent workers sharing one Redis: every client on every
worker gets every event, in publish order, through a Redis restart and a
worker killed with SIGKILL (each over plain TCP and over TLS with the run's
own CA); SIGTERM ends everything within seconds; and a worker holds a small
fixed number of Redis connections."""

from __future__ import annotations

import os
import signal
import time
import typing as t

import pytest

from tests.support.redis import ids_of
from tests.support.redis import Publisher
from tests.support.redis import redis_clients
from tests.support.redis import RedisServer
from tests.support.redis import stream_entries
from tests.support.servers import open_clients
from tests.support.servers import pump
from tests.support.servers import Server
from tests.support.servers import SSEClient
from tests.support.servers import wait_for

pytestmark = [pytest.mark.redis, pytest.mark.server]

StartServer = t.Callable[..., Server]
WORKERS = 3


@pytest.fixture(params=["plain", "tls"])
def any_redis(
    request: pytest.FixtureRequest, start_redis: t.Callable[..., RedisServer]
) -> RedisServer:
    """A Redis server, over plain TCP or TLS only (rediss://, the CA in
    EVENTSTREAM_REDIS_OPTIONS)."""
    return start_redis(tls=request.param == "tls")


@pytest.fixture(params=["plain", "tls"])
def any_redis_aof(
    request: pytest.FixtureRequest, start_redis: t.Callable[..., RedisServer]
) -> RedisServer:
    return start_redis(appendonly=True, tls=request.param == "tls")


def start_cluster(
    start_server: StartServer,
    redis: RedisServer,
    workers: int = WORKERS,
    **env: str,
) -> Server:
    server = start_server(
        "gunicorn",
        env={**redis.env(), **env},
        args=["-w", str(workers), "--graceful-timeout", "30"],
    )
    wait_for(lambda: len(server.children()) == workers, 30)
    # Every worker answers (it booted and imported the app).
    wait_for(lambda: len(worker_streams(server)) == workers, 30)
    return server


def worker_streams(server: Server, rounds: int = 60) -> dict[int, int]:
    """{worker pid: open /gen streams}, asked of whichever workers answer."""
    seen: dict[int, int] = {}
    for _ in range(rounds):
        counters = server.get_json("/counters")
        seen[counters["pid"]] = counters["gen_started"] - counters["gen_finally"]
    return seen


def open_spread(server: Server, count: int, **kwargs: t.Any) -> list[SSEClient]:
    """Open ``count`` streams on /gen/lobby and check they landed on more
    than one worker."""
    clients = open_clients(server.port, "/gen/lobby", count, batch=10, **kwargs)
    try:
        pump(clients, lambda: all(c.events for c in clients), 10)
        spread = worker_streams(server)
        busy = [pid for pid, n in spread.items() if n > 0]
        assert len(busy) >= 2, f"all streams on one worker: {spread}"
    except BaseException:
        for client in clients:
            client.close()
        raise
    return clients


def test_every_client_on_every_worker_gets_every_event_in_order(
    start_server: StartServer, any_redis: RedisServer
):
    redis_server = any_redis
    server = start_cluster(start_server, redis_server)
    clients = open_spread(server, 30)
    try:
        # Separate POSTs, answered by different workers.
        sent = [server.publish("lobby", {"n": i}) for i in range(100)]
        pump(clients, lambda: all(len(ids_of(c)) >= 100 for c in clients), 20)
        for client in clients:
            assert ids_of(client) == sent
            assert [e.data for e in client.events[1:]] == [
                f'{{"n":{i}}}' for i in range(100)
            ]
        assert [i for i, _ in stream_entries(redis_server, "lobby")] == sent
    finally:
        for client in clients:
            client.close()


def test_redis_restart_mid_run_loses_nothing(
    start_server: StartServer, any_redis_aof: RedisServer
):
    redis = any_redis_aof
    server = start_cluster(start_server, redis, EVENTSTREAM_HEARTBEAT="0.5")
    clients = open_spread(server, 30)
    try:
        publisher = Publisher(server, "lobby", pause=0.005)
        publisher.start()
        try:
            publisher.wait_for(50, 20)
            redis.stop()
            publisher.wait_refused(2, 20)
            redis.start()
            mark = len(publisher.accepted)
            publisher.wait_for(mark + 50, 20)
        finally:
            publisher.stop()
        assert publisher.errors == []
        entries = stream_entries(redis, "lobby")
        # Every 202 is in Redis (with the id it was answered with); what else
        # is there was answered 503 (its reply was lost and Redis stayed away
        # for the whole retry).
        assert set(publisher.accepted) <= set(entries)
        assert {d for _, d in entries} - {d for _, d in publisher.accepted} <= set(
            publisher.refused
        )
        expected = [i for i, _ in entries]
        pump(clients, lambda: all(len(ids_of(c)) >= len(expected) for c in clients), 30)
        for client in clients:
            assert not client.eof
            assert ids_of(client) == expected
    finally:
        for client in clients:
            client.close()


def test_worker_killed_clients_resume_elsewhere(
    start_server: StartServer, any_redis: RedisServer
):
    redis_server = any_redis
    server = start_cluster(start_server, redis_server)
    # Each logical client: its connections, one after another.
    sessions: list[list[SSEClient]] = [[c] for c in open_spread(server, 30)]
    try:
        spread = worker_streams(server)
        victim = max(spread, key=lambda pid: spread[pid])
        publisher = Publisher(server, "lobby", pause=0.005)
        publisher.start()
        try:
            publisher.wait_for(40, 20)
            os.kill(victim, signal.SIGKILL)
            killed_at = time.monotonic()
            # The victim's clients see their stream end and reconnect with
            # Last-Event-ID, as EventSource does.
            reconnected = 0
            while True:
                current = [session[-1] for session in sessions]
                settled = time.monotonic() - killed_at > 3
                if settled and len(publisher.accepted) >= 120:
                    if not any(c.eof for c in current):
                        break
                assert time.monotonic() - killed_at < 30, "no recovery"
                live = [c for c in current if not c.eof]
                try:
                    pump(live, lambda live=live: any(c.eof for c in live), 0.2)
                except TimeoutError:
                    pass
                for session in sessions:
                    if session[-1].eof:
                        headers = {}
                        resume = last_id(session)
                        if resume:
                            headers["Last-Event-ID"] = resume
                        session.append(SSEClient(server.port, "/gen/lobby", headers))
                        reconnected += 1
        finally:
            publisher.stop()
        assert reconnected == spread[victim]
        entries = stream_entries(redis_server, "lobby")
        assert set(publisher.accepted) <= set(entries)
        expected = [i for i, _ in entries]

        def received(session: list[SSEClient]) -> list[str]:
            return [i for c in session for i in ids_of(c)]

        current = [s[-1] for s in sessions]
        pump(
            current,
            lambda: all(len(received(s)) >= len(expected) for s in sessions),
            30,
        )
        for session in sessions:
            assert received(session) == expected
    finally:
        for session in sessions:
            for client in session:
                client.close()


def last_id(session: list[SSEClient]) -> str:
    for client in reversed(session):
        if client.last_event_id:
            return client.last_event_id
    return ""


def test_sigterm_to_master_with_clients_connected(
    start_server: StartServer, redis_server: RedisServer
):
    server = start_cluster(start_server, redis_server)
    clients = open_spread(server, 30)
    try:
        workers = server.children()
        assert len(workers) == WORKERS
        start = time.monotonic()
        server.signal(signal.SIGTERM)
        server.wait(10)
        elapsed = time.monotonic() - start
        assert elapsed < 5, elapsed
        for pid in workers:
            assert not os.path.exists(f"/proc/{pid}") or _zombie(pid)
        pump(clients, lambda: all(c.eof or c.ended for c in clients), 5)
    finally:
        for client in clients:
            client.close()


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def test_redis_connections_per_worker_with_200_streams(
    start_server: StartServer, redis_server: RedisServer
):
    server = start_cluster(start_server, redis_server, workers=1)
    [worker] = server.children()
    channels = [f"room{i}" for i in range(50)]
    clients = []
    try:
        for channel in channels:
            clients += open_clients(server.port, f"/gen/{channel}", 4)
        assert server.connections() == 200
        pump(clients, lambda: all(c.events for c in clients), 10)
        sent = {channel: server.publish(channel, channel) for channel in channels}
        pump(clients, lambda: all(len(ids_of(c)) >= 1 for c in clients), 20)
        for client in clients:
            assert ids_of(client) == [sent[client.path.rsplit("/", 1)[1]]]
        admin = redis_server.client()
        mine = redis_clients(admin, worker)
        assert 1 <= len(mine) <= 3, mine
        # Nothing else (the master, another pid) holds connections.
        assert len(redis_clients(admin)) == len(mine)
    finally:
        for client in clients:
            client.close()


def test_preloaded_app_and_publishing_from_native_threads(
    start_server: StartServer, redis_server: RedisServer
):
    # --preload: the app (and its backend) is made before the fork; each
    # worker makes its own connections and reader.
    server = start_server(
        "gunicorn",
        env={"EVENTSTREAM_REDIS_URL": redis_server.url},
        args=["-w", "2", "--preload"],
    )
    wait_for(lambda: len(worker_streams(server)) == 2, 30)
    clients = open_spread(server, 20)
    try:
        ids = []
        # From a greenlet, a (patched) thread and a native thread of gevent's
        # pool, which has a hub and connections of its own.
        for via in ("greenlet", "thread", "threadpool"):
            body = server.post_json(f"/publish-bg/lobby?via={via}&n=3")
            ids += body["ids"]
        assert len(ids) == 9
        pump(clients, lambda: all(len(ids_of(c)) >= 9 for c in clients), 10)
        for client in clients:
            assert ids_of(client) == ids
        workers = server.children()
        names = [c["name"] for c in redis_clients(redis_server.client())]
        assert {n.rsplit(":", 1)[1] for n in names} <= {str(p) for p in workers}
    finally:
        for client in clients:
            client.close()


def test_several_channels_on_a_gevent_worker_resume_from_their_own_ids(
    start_server: StartServer, redis_server: RedisServer
):
    # Streams that wait on a gevent worker take events straight from the
    # fan-out; a subscription to several channels still gets an id that
    # names its position on each of them, and resumes from it exactly.
    server = start_cluster(start_server, redis_server, workers=1)
    clients = open_clients(server.port, "/stream/alpha+beta", 5)
    try:
        for i in range(6):
            server.publish("alpha" if i % 2 == 0 else "beta", f"m{i}")
        pump(clients, lambda: all(len(c.events) >= 6 for c in clients), 20)
        events = clients[0].events
        assert [e.data for e in events] == [f"m{i}" for i in range(6)]
        ids = [e.id for e in events]
        assert len(set(ids)) == 6
        for client in clients:
            assert [(e.data, e.id) for e in client.events] == [
                (e.data, e.id) for e in events
            ]
        resumed = SSEClient(
            server.port, "/stream/alpha+beta", {"Last-Event-ID": ids[2]}
        )
        clients.append(resumed)
        pump([resumed], lambda: len(resumed.events) >= 3, 10)
        assert [(e.data, e.id) for e in resumed.events] == [
            (e.data, e.id) for e in events[3:]
        ]
        server.publish("beta", "m6")
        pump(clients, lambda: all(len(c.events) >= 7 for c in clients[:5]), 10)
        pump([resumed], lambda: len(resumed.events) >= 4, 10)
        assert [e.data for e in resumed.events] == ["m3", "m4", "m5", "m6"]
        assert resumed.events[-1].id == clients[0].events[-1].id
    finally:
        for client in clients:
            client.close()
