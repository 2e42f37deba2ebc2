"""Grants, revocation and presence across three gunicorn gevent workers that
share one Redis (the example app): revoke ends a user's streams on every
worker within a second and every worker refuses the old grant; presence
sums the workers, announces joins and leaves once, and forgets a SIGKILLed
worker within EVENTSTREAM_PRESENCE_TIMEOUT."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import typing as t

import pytest

from tests.support.redis import RedisServer
from tests.support.servers import pump
from tests.support.servers import Server
from tests.support.servers import SSEClient
from tests.support.servers import wait_for

pytestmark = [pytest.mark.redis, pytest.mark.server]

StartServer = t.Callable[..., Server]
WORKERS = 3
ADMIN = "admin-token"
PRESENCE_TIMEOUT = 2.0


def start_workers(start_server: StartServer, redis: RedisServer, **env: str) -> Server:
    server = start_server(
        "gunicorn",
        app="example_app",
        env={
            "EVENTSTREAM_REDIS_URL": redis.url,
            "EXAMPLE_SECRET_KEY": "shared-by-every-worker",
            "EXAMPLE_PRIVATE_TOKEN": ADMIN,
            "EVENTSTREAM_PRESENCE_EVENTS": "true",
            "EVENTSTREAM_PRESENCE_TIMEOUT": str(PRESENCE_TIMEOUT),
            "EVENTSTREAM_HEARTBEAT": "0.5",
            **env,
        },
        args=["-w", str(WORKERS), "--graceful-timeout", "10"],
    )
    wait_for(lambda: len(server.children()) == WORKERS, 30)
    return server


def grant(server: Server, channel: str, user: str) -> str:
    token: str = server.get_json(f"/grant/{channel}?user={user}")["grant"]
    return token


def presence(server: Server, channel: str = "lobby") -> dict[str, int]:
    users: dict[str, int] = server.get_json(f"/presence/{channel}")["users"]
    return users


def open_granted(server: Server, user: str, count: int) -> list[SSEClient]:
    """``count`` streams of ``user`` on lobby, each with a grant of its own
    (fetched from whichever worker answers)."""
    clients = [
        SSEClient(server.port, f"/stream/lobby?grant={grant(server, 'lobby', user)}")
        for _ in range(count)
    ]
    pump(clients, lambda: all(c.first_body_at or c.eof for c in clients), 20)
    assert all(c.status == 200 for c in clients), clients[:3]
    return clients


def open_spread(
    server: Server,
    redis: RedisServer,
    user: str,
    workers: int,
    channel: str = "lobby",
    batch: int = 10,
) -> list[SSEClient]:
    """Streams of ``user`` on ``channel``, a batch at a time, until they are
    on ``workers`` workers: the kernel hands each connection to whichever
    worker accepts first, and a busy machine may give one worker them all."""
    clients: list[SSEClient] = []
    field = f"{channel} {user}"

    def counted() -> bool:
        return presence(server, channel).get(user) == len(clients)

    try:
        while True:
            token = grant(server, channel, user)
            group = [
                SSEClient(server.port, f"/stream/{channel}?grant={token}")
                for _ in range(batch)
            ]
            clients += group
            pump(group, lambda g=group: all(c.first_body_at or c.eof for c in g), 20)
            assert all(c.status == 200 for c in group), group[:3]
            wait_for(counted, 10)
            holding = [c for c in worker_counts(redis).values() if c.get(field)]
            if len(holding) >= workers:
                return clients
            assert len(clients) < 150, (
                f"{len(clients)} streams of {user} are on {len(holding)} worker(s)"
            )
    except BaseException:
        for client in clients:
            client.close()
        raise


def worker_counts(redis: RedisServer) -> dict[int, dict[str, int]]:
    """{worker pid: {"<channel> <user>": streams}} as the workers told Redis."""
    admin = redis.client()
    out: dict[int, dict[str, int]] = {}
    for key in admin.scan_iter("eventstream:~w:*"):
        pid = int(key.decode().split(":")[-2])
        fields = admin.hgetall(key)
        out[pid] = {k.decode().replace("\n", " "): int(v) for k, v in fields.items()}
    admin.close()
    return out


def test_revoke_across_three_workers(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    server = start_workers(start_server, redis_server)
    watcher = SSEClient(
        server.port, f"/stream/lobby?grant={grant(server, 'lobby', 'watcher')}"
    )
    alice: list[SSEClient] = []
    bob: list[SSEClient] = []
    try:
        watcher.read_head()
        wait_for(lambda: presence(server) == {"watcher": 1}, 10)
        # Alice's streams on every worker.
        alice = open_spread(server, redis_server, "alice", WORKERS)
        n = len(alice)
        spread = [c.get("lobby alice", 0) for c in worker_counts(redis_server).values()]
        print(f"\nalice's streams per worker: {spread}")
        assert presence(server) == {"alice": n, "watcher": 1}
        bob = open_granted(server, "bob", 30)
        wait_for(lambda: presence(server) == {"alice": n, "bob": 30, "watcher": 1}, 10)
        old = grant(server, "lobby", "alice")

        # Refused without the admin token.
        status, _ = server.request("POST", "/revoke/alice")
        assert status == 403
        start = time.monotonic()
        status, _ = server.request(
            "POST", "/revoke/alice", headers={"Authorization": f"Bearer {ADMIN}"}
        )
        assert status == 204
        pump(alice, lambda: all(c.ended or c.eof for c in alice), 5)
        elapsed = time.monotonic() - start
        print(
            f"\nrevoke to close, {len(alice)} streams on {WORKERS} workers: "
            f"{elapsed * 1000:.0f} ms"
        )
        assert elapsed < 1.0, elapsed
        assert all(c.ended for c in alice), alice[:3]

        # Bob's streams go on; alice's got nothing more.
        sent = server.publish("lobby", "after the revoke")
        pump(bob, lambda: all(any(e.id == sent for e in c.events) for c in bob), 10)
        assert all(e.data != "after the revoke" for c in alice for e in c.events)

        # Every worker refuses the old grants, and one issued before the
        # revocation that was never used.
        for token in [old] * (WORKERS * 3) + [alice[0].path.split("=", 1)[1]]:
            with SSEClient(server.port, f"/stream/lobby?grant={token}") as again:
                assert again.read_head() == 403
                assert again.read_body().startswith(b"403 Forbidden")
        wait_for(lambda: presence(server) == {"bob": 30, "watcher": 1}, 10)
        # The watcher's presence events (the message may come before or
        # after the leave: they are published by different workers).
        events = [e for e in watcher.read_events(5, timeout=10) if e.event != "message"]
        assert [(e.event, json.loads(e.data)) for e in events] == [
            ("eventstream-join", {"user": "watcher"}),
            ("eventstream-join", {"user": "alice"}),
            ("eventstream-join", {"user": "bob"}),
            ("eventstream-leave", {"user": "alice"}),
        ]
    finally:
        for client in [watcher, *alice, *bob]:
            client.close()


def test_disconnect_a_channel_across_workers(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    server = start_workers(start_server, redis_server)
    lobby = open_spread(server, redis_server, "carol", 2)
    other = [
        SSEClient(server.port, f"/stream/other?grant={grant(server, 'other', 'carol')}")
        for _ in range(6)
    ]
    try:
        pump(other, lambda: all(c.first_body_at for c in other), 10)
        wait_for(lambda: presence(server, "other") == {"carol": 6}, 10)
        # From a script with no app, sharing the Redis.
        code = (
            "from flask_eventstream import EventStream;"
            f"EventStream(redis_url={redis_server.url!r}).disconnect(channel='lobby')"
        )
        start = time.monotonic()
        subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
        pump(lobby, lambda: all(c.ended or c.eof for c in lobby), 5)
        assert time.monotonic() - start < 5
        # The other channel's streams stay.
        sent = server.publish("other", "still here")
        pump(other, lambda: all(any(e.id == sent for e in c.events) for c in other), 10)
        wait_for(lambda: presence(server) == {}, 10)
        assert presence(server, "other") == {"carol": 6}
    finally:
        for client in [*lobby, *other]:
            client.close()


def test_sigkilled_worker_leaves_presence_within_the_timeout(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    server = start_workers(start_server, redis_server)
    clients = open_spread(server, redis_server, "dave", 2)
    total = len(clients)
    try:
        counts = worker_counts(redis_server)
        victim, theirs = max(counts.items(), key=lambda kv: kv[1].get("lobby dave", 0))
        lost = theirs["lobby dave"]
        assert 0 < lost < total, counts
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        wait_for(
            lambda: presence(server) == {"dave": total - lost}, PRESENCE_TIMEOUT + 3
        )
        elapsed = time.monotonic() - killed
        print(f"\nSIGKILLed worker out of presence after {elapsed:.2f} s")
        assert elapsed <= PRESENCE_TIMEOUT + 0.5, elapsed
        assert victim not in worker_counts(redis_server)
    finally:
        for client in clients:
            client.close()
