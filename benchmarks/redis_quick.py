"""Quick figures for the Redis backend::

    python -m benchmarks.redis_quick [--events 1000] [--streams 200] [--json PATH]

Starts its own ``redis-server`` and ``gunicorn -k gevent`` servers of
``benchmarks.app`` (the example app plus a generator view) on free ports
of 127.0.0.1, and measures:

``connections``
    Redis connections (``CLIENT LIST``) held by one worker with N streams
    open over 50 channels, all live (each got an event).
``latency``
    Publish on one worker (a POST on a keep-alive connection) -> delivery on
    a stream of another worker (a second gunicorn with the same Redis): p50,
    p99 and max over the events, paced so that nothing queues.
``restart`` / ``sigkill``
    Three workers, 30 streams; POSTs run while Redis is stopped and started
    again (AOF) / while a worker is killed with SIGKILL (its clients
    reconnect with Last-Event-ID). Counts, over all streams, events that
    Redis accepted and a stream missed (lost) or got twice (duplicated).

Every server is stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import sys
import threading
import time
import typing as t
from pathlib import Path

if not __package__:  # python benchmarks/redis_quick.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.processes import AppServer  # noqa: E402
from benchmarks.processes import raise_nofile  # noqa: E402
from benchmarks.processes import redis_clients  # noqa: E402
from benchmarks.processes import RedisProcess  # noqa: E402
from benchmarks.processes import wait_for  # noqa: E402
from benchmarks.sseclient import HOST  # noqa: E402
from benchmarks.sseclient import open_clients  # noqa: E402
from benchmarks.sseclient import pump  # noqa: E402
from benchmarks.sseclient import SSEClient  # noqa: E402
from flask_eventstream.backends.positions import format_position  # noqa: E402
from flask_eventstream.backends.positions import Position  # noqa: E402


class TimedClient(SSEClient):
    """An SSE client that notes when each event arrived."""

    def __init__(self, *args: t.Any, **kwargs: t.Any) -> None:
        super().__init__(*args, **kwargs)
        self.arrived: dict[str, float] = {}

    def _body(self, payload: bytes) -> None:
        before = len(self.events)
        super()._body(payload)
        now = time.monotonic()
        for event in self.events[before:]:
            if event.id:
                self.arrived.setdefault(event.id, now)


def ids_of(client: SSEClient) -> list[str]:
    return [e.id for e in client.events if e.id]


def gunicorn(redis: RedisProcess, workers: int, **env: str) -> AppServer:
    server = AppServer(
        "gunicorn",
        env={"EVENTSTREAM_REDIS_URL": redis.url, **env},
        args=["-w", str(workers)],
    )
    server.start()
    wait_for(lambda: len(server.children()) == workers, 30)
    seen: set[int] = set()

    def all_answer() -> bool:
        seen.add(server.get_json("/counters")["pid"])
        return len(seen) == workers

    wait_for(all_answer, 30, interval=0.0)
    return server


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


# -- measurements --


def measure_connections(redis: RedisProcess, streams: int) -> dict[str, t.Any]:
    server = gunicorn(redis, 1)
    clients: list[SSEClient] = []
    try:
        [worker] = server.children()
        channels = [f"room{i}" for i in range(50)]
        for i in range(streams):
            clients += open_clients(server.port, f"/gen/{channels[i % 50]}", 1)
        pump(clients, lambda: all(c.events for c in clients), 20)
        for channel in channels:
            server.publish(channel, channel)
        pump(clients, lambda: all(ids_of(c) for c in clients), 20)
        admin = redis.client()
        mine = redis_clients(admin, worker)
        return {
            "streams": server.connections(),
            "redis_connections": len(mine),
            "names": sorted(c["name"] for c in mine),
            "all_clients": len(redis_clients(admin)),
        }
    finally:
        for client in clients:
            client.close()
        server.stop()
        server.close()


def measure_latency(redis: RedisProcess, events: int, pause: float) -> dict[str, t.Any]:
    subscriber = gunicorn(redis, 1)
    publisher = gunicorn(redis, 1)
    clients: list[TimedClient] = []
    conn = http.client.HTTPConnection(HOST, publisher.port, timeout=10)
    try:
        clients = [TimedClient(subscriber.port, "/gen/lat") for _ in range(20)]
        pump(clients, lambda: all(c.events for c in clients), 10)
        sent: dict[str, float] = {}
        answered: list[float] = []
        reading = threading.Event()
        done = threading.Event()

        def read() -> None:
            reading.set()
            pump(clients, lambda: done.is_set(), 600)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reading.wait(5)
        for i in range(events):
            start = time.monotonic()
            conn.request(
                "POST",
                "/publish/lat",
                body=json.dumps({"data": i}),
                headers={"Content-Type": "application/json"},
            )
            response = conn.getresponse()
            body = response.read()
            answered.append(time.monotonic() - start)
            assert response.status == 202, (response.status, body)
            sent[json.loads(body)["id"]] = start
            time.sleep(pause)
        deadline = time.monotonic() + 30
        while any(len(c.arrived) < events for c in clients):
            assert time.monotonic() < deadline, [len(c.arrived) for c in clients]
            time.sleep(0.01)
        done.set()
        reader.join(5)
        ms = [
            (client.arrived[event_id] - at) * 1000
            for client in clients
            for event_id, at in sent.items()
        ]
        first = [(clients[0].arrived[i] - at) * 1000 for i, at in sent.items()]
        for client in clients:
            assert ids_of(client) == list(sent), "order or content differs"
        return {
            "events": events,
            "streams": len(clients),
            "p50_ms": round(statistics.median(first), 3),
            "p99_ms": round(percentile(first, 99), 3),
            "max_ms": round(max(first), 3),
            "all_streams_p50_ms": round(statistics.median(ms), 3),
            "all_streams_p99_ms": round(percentile(ms, 99), 3),
            "post_p50_ms": round(statistics.median(answered) * 1000, 3),
        }
    finally:
        conn.close()
        for client in clients:
            client.close()
        for server in (subscriber, publisher):
            server.stop()
            server.close()


class Publisher(threading.Thread):
    def __init__(self, server: AppServer, channel: str) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.channel = channel
        self.stopped = threading.Event()
        self.accepted: list[str] = []
        self.refused = 0
        self.errors = 0

    def run(self) -> None:
        n = 0
        while not self.stopped.is_set():
            n += 1
            try:
                status, raw = self.server.request(
                    "POST", f"/publish/{self.channel}", {"data": n}
                )
            except OSError:
                self.errors += 1
                continue
            if status == 202:
                self.accepted.append(json.loads(raw)["id"])
            else:
                self.refused += 1
            time.sleep(0.005)

    def wait_for(self, count: int, timeout: float = 30) -> None:
        wait_for(lambda: len(self.accepted) >= count, timeout)

    def stop(self) -> None:
        self.stopped.set()
        self.join(30)


def _order(event_id: str) -> tuple[int, int]:
    """Where an event id of a one-channel stream is in its history."""
    epoch, offset = event_id.split(".")
    return int(epoch, 36), int(offset)


def _count(
    sessions: list[list[SSEClient]], redis: RedisProcess, accepted: list[str]
) -> dict[str, t.Any]:
    # Stream entry ids are "<epoch>-<offset>"; events carry them as
    # "<epoch in base 36>.<offset>".
    entries = [
        format_position(Position(*map(int, i.decode().split("-"))))
        for i, _ in redis.client().xrange("eventstream:{lobby}")
    ]
    current = [s[-1] for s in sessions]

    def received(session: list[SSEClient]) -> list[str]:
        return [i for c in session for i in ids_of(c)]

    try:
        pump(
            current,
            lambda: all(len(set(received(s))) >= len(entries) for s in sessions),
            30,
        )
    except TimeoutError:
        pass
    lost = duplicated = out_of_order = 0
    for session in sessions:
        got = received(session)
        lost += len(set(entries) - set(got))
        duplicated += len(got) - len(set(got))
        out_of_order += got != sorted(got, key=_order)
    return {
        "streams": len(sessions),
        "events_accepted_202": len(accepted),
        "events_in_redis": len(entries),
        "accepted_missing_from_redis": len(set(accepted) - set(entries)),
        "lost": lost,
        "duplicated": duplicated,
        "streams_out_of_order": out_of_order,
    }


def measure_restart(redis: RedisProcess) -> dict[str, t.Any]:
    server = gunicorn(redis, 3)
    clients: list[SSEClient] = []
    try:
        clients = open_clients(server.port, "/gen/lobby", 30, batch=10)
        pump(clients, lambda: all(c.events for c in clients), 10)
        publisher = Publisher(server, "lobby")
        publisher.start()
        try:
            publisher.wait_for(100)
            redis.stop()
            wait_for(lambda: publisher.refused >= 2, 30)
            down = publisher.refused
            redis.start()
            publisher.wait_for(len(publisher.accepted) + 100)
        finally:
            publisher.stop()
        result = _count([[c] for c in clients], redis, publisher.accepted)
        result.update(
            refused_503=publisher.refused,
            refused_while_down=down,
            streams_closed=sum(c.eof for c in clients),
        )
        return result
    finally:
        for client in clients:
            client.close()
        server.stop()
        server.close()


def measure_sigkill(redis: RedisProcess) -> dict[str, t.Any]:
    server = gunicorn(redis, 3)
    sessions: list[list[SSEClient]] = []
    try:
        sessions = [[c] for c in open_clients(server.port, "/gen/lobby", 30, batch=10)]
        pump([s[0] for s in sessions], lambda: all(s[0].events for s in sessions), 10)
        spread: dict[int, int] = {}
        for _ in range(60):
            c = server.get_json("/counters")
            spread[c["pid"]] = c["gen_started"] - c["gen_finally"]
        victim = max(spread, key=lambda pid: spread[pid])
        publisher = Publisher(server, "lobby")
        publisher.start()
        reconnects = 0
        try:
            publisher.wait_for(100)
            os.kill(victim, signal.SIGKILL)
            killed = time.monotonic()
            while time.monotonic() - killed < 3 or any(s[-1].eof for s in sessions):
                live = [s[-1] for s in sessions if not s[-1].eof]
                try:
                    pump(live, lambda live=live: any(c.eof for c in live), 0.2)
                except TimeoutError:
                    pass
                for session in sessions:
                    if session[-1].eof:
                        last = next(
                            (c.last_event_id for c in reversed(session) if ids_of(c)),
                            "",
                        )
                        headers = {"Last-Event-ID": last} if last else {}
                        session.append(SSEClient(server.port, "/gen/lobby", headers))
                        reconnects += 1
            publisher.wait_for(len(publisher.accepted) + 100)
        finally:
            publisher.stop()
        result = _count(sessions, redis, publisher.accepted)
        result.update(
            streams_on_killed_worker=spread[victim],
            reconnects=reconnects,
            posts_failed_by_the_kill=publisher.errors,
        )
        return result
    finally:
        for session in sessions:
            for client in session:
                client.close()
        server.stop()
        server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--pause", type=float, default=0.005, help="between POSTs, s")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    raise_nofile()
    results: dict[str, t.Any] = {}
    plain = RedisProcess().start()
    aof = RedisProcess(appendonly=True).start()
    try:
        results["redis_version"] = plain.client().info("server")["redis_version"]
        results["connections"] = measure_connections(plain, args.streams)
        print("connections", json.dumps(results["connections"]), flush=True)
        results["latency"] = measure_latency(plain, args.events, args.pause)
        print("latency", json.dumps(results["latency"]), flush=True)
        results["restart"] = measure_restart(aof)
        print("restart", json.dumps(results["restart"]), flush=True)
        results["sigkill"] = measure_sigkill(plain)
        print("sigkill", json.dumps(results["sigkill"]), flush=True)
    finally:
        plain.close()
        aof.close()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
