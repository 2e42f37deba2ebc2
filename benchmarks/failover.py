"""Sentinel failover, in a loop, with and without EVENTSTREAM_REDIS_MIN_REPLICAS::

    python -m benchmarks.failover [--kills 5] [--streams 24] [--json PATH]

For MIN_REPLICAS = 1 and then 0, starts its own Redis master, a replica and
three Sentinels (``redis-server CONF --sentinel``, see
:mod:`benchmarks.sentinel`) and ``gunicorn -k gevent -w 3`` of
:mod:`benchmarks.app` on a ``redis+sentinel://`` URL, all on free ports of
127.0.0.1. Streams stay open on /gen/lobby (a
stream that ends reconnects with its Last-Event-ID, as EventSource does)
while one publisher POSTs numbered events without pause. Then, ``--kills``
times (with ``--lag S``, after cutting the replica off for S seconds, so
that it is behind): SIGKILL the master, wait for the Sentinels to promote the replica,
start the killed node again as a replica of the new master, and wait for
POSTs to succeed again. It prints, per setting:

``seconds_to_publish``
    From the SIGKILL to the answer of the first POST sent after it that got a
    202, per kill, and their median.
``lost`` / ``duplicated``
    Over all streams: events answered 202 that a stream never got, and events
    a stream got more than once; ``missing_from_redis``: events answered 202
    that the final master does not hold; ``unacknowledged_delivered``:
    events that streams got although their POST was answered 503 (whose
    outcome the publisher could not know).
``publish_ms``
    ``publish()`` latency at each setting (in this process, through the same
    Sentinel URL, no failover, settings alternating in 5 rounds): p50 and
    p99 over ``--publishes`` calls each.

Every process is stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import threading
import time
import typing as t
from pathlib import Path

if not __package__:  # python benchmarks/failover.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.processes import AppServer  # noqa: E402
from benchmarks.processes import raise_nofile  # noqa: E402
from benchmarks.processes import wait_for  # noqa: E402
from benchmarks.sentinel import FAILOVER_TIMEOUT_MS  # noqa: E402
from benchmarks.sentinel import SentinelSetup  # noqa: E402
from benchmarks.sseclient import open_clients  # noqa: E402
from benchmarks.sseclient import pump  # noqa: E402
from benchmarks.sseclient import SSEClient  # noqa: E402

PATH = "/gen/lobby"
WORKERS = 3


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


class Publisher(threading.Thread):
    """POSTs numbered events one after another; keeps every answer as
    (sent at, answered at, status, id, data)."""

    def __init__(self, server: AppServer) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.stopped = threading.Event()
        self.answers: list[tuple[float, float, int, str, str]] = []
        self.errors: list[str] = []

    def run(self) -> None:
        n = 0
        while not self.stopped.is_set():
            data = f"e{n}"
            n += 1
            sent = time.monotonic()
            try:
                status, raw = self.server.request(
                    "POST", "/publish/lobby", {"data": data}, timeout=30
                )
            except OSError as e:
                self.errors.append(f"{data}: {e!r}")
                continue
            event_id = json.loads(raw)["id"] if status == 202 else ""
            self.answers.append((sent, time.monotonic(), status, event_id, data))

    def accepted(self) -> list[tuple[str, str]]:
        return [(i, d) for _, _, status, i, d in self.answers if status == 202]

    def stop(self) -> None:
        self.stopped.set()
        self.join(60)


class Streams:
    """Streams that reconnect with their last id when they end."""

    def __init__(self, server: AppServer, count: int) -> None:
        self.server = server
        self.sessions = [[c] for c in open_clients(server.port, PATH, count, batch=8)]
        self.reconnects = 0

    def wait(self, until: t.Callable[[], bool], timeout: float) -> None:
        """Read every stream (reconnecting those that end) until ``until()``."""
        deadline = time.monotonic() + timeout
        while not until():
            if time.monotonic() > deadline:
                raise TimeoutError(f"not done after {timeout}s")
            current = [s[-1] for s in self.sessions]
            try:
                pump(current, lambda c=current: any(x.eof for x in c), 0.1)
            except TimeoutError:
                pass
            for session in self.sessions:
                if session[-1].eof:
                    last = next(
                        (c.last_event_id for c in reversed(session) if c.last_event_id),
                        "",
                    )
                    headers = {"Last-Event-ID": last} if last else {}
                    session.append(SSEClient(self.server.port, PATH, headers))
                    self.reconnects += 1

    def received(self, session: list[SSEClient]) -> list[str]:
        return [e.data for c in session for e in c.events if e.event == "message"]

    def resets(self) -> int:
        return sum(
            e.event == "eventstream-reset"
            for s in self.sessions
            for c in s
            for e in c.events
        )

    def close(self) -> None:
        for session in self.sessions:
            for client in session:
                client.close()


def start_gunicorn(setup: SentinelSetup, min_replicas: int) -> AppServer:
    server = AppServer(
        "gunicorn",
        env={
            **setup.env(),
            "EVENTSTREAM_REDIS_MIN_REPLICAS": str(min_replicas),
            "EVENTSTREAM_HEARTBEAT": "1",
            # Keep every event, to compare the final master with the 202s.
            "EVENTSTREAM_HISTORY": "1000000",
        },
        args=["-w", str(WORKERS), "--graceful-timeout", "30"],
    )
    server.start()
    wait_for(lambda: len(server.children()) == WORKERS, 30)
    return server


def measure_publish(
    settings: list[int], count: int, rounds: int = 5
) -> dict[str, t.Any]:
    """``publish()`` latency at each MIN_REPLICAS setting, on one topology,
    in alternating rounds (so that the machine's load hits all alike)."""
    from example_app import create_app
    from flask_eventstream.testing import broker

    setup = SentinelSetup.start(replicas=1)
    apps = {
        # (A secret key of its own: the grants of these apps are never used.)
        n: create_app(
            {
                **setup.config(),
                "EVENTSTREAM_REDIS_MIN_REPLICAS": n,
                "SECRET_KEY": "failover-benchmark",
            }
        )
        for n in settings
    }
    times: dict[int, list[float]] = {n: [] for n in settings}
    try:
        for app in apps.values():
            with app.app_context():
                for i in range(50):  # connections made, scripts loaded
                    app.extensions["eventstream"].publish("latency", i)
        for _ in range(rounds):
            for n, app in apps.items():
                stream = app.extensions["eventstream"]
                with app.app_context():
                    for i in range(count // rounds):
                        start = time.perf_counter()
                        stream.publish("latency", i)
                        times[n].append((time.perf_counter() - start) * 1000)
    finally:
        for app in apps.values():
            broker(app).close()
        setup.close()
    return {
        f"min_replicas_{n}": {
            "publishes": len(values),
            "p50_ms": round(statistics.median(values), 3),
            "p99_ms": round(percentile(values, 99), 3),
        }
        for n, values in times.items()
    }


def save_logs(setup: SentinelSetup, directory: Path | None, tag: str) -> None:
    if directory is None:
        return
    directory.mkdir(parents=True, exist_ok=True)
    for server in [*setup.nodes, *setup.sentinels]:
        path = directory / f"{tag}-{type(server).__name__}-{server.port}.log"
        path.write_text(server.log(1_000_000))


def failover_loop(
    min_replicas: int,
    kills: int,
    streams: int,
    logs: Path | None = None,
    lag: float = 0.0,
) -> dict[str, t.Any]:
    setup = SentinelSetup.start(replicas=1)
    server: AppServer | None = None
    clients: Streams | None = None
    try:
        server = start_gunicorn(setup, min_replicas)
        clients = Streams(server, streams)
        publisher = Publisher(server)
        publisher.start()
        recovery: list[float] = []
        try:
            killed_at = 0.0
            for _ in range(kills):
                mark = len(publisher.accepted())
                # Steady publishing, and Sentinels free to fail over again.
                ready = killed_at + 2 * FAILOVER_TIMEOUT_MS / 1000 + 1
                clients.wait(
                    lambda m=mark, r=ready: (
                        len(publisher.accepted()) >= m + 50 and time.monotonic() > r
                    ),
                    60,
                )
                master = setup.master
                replica = next(n for n in setup.nodes if n.running and n is not master)
                if lag:
                    # The replica falls behind just before the master dies,
                    # as on a slow network: it is stopped and its link cut,
                    # so that what the master takes meanwhile reaches no one.
                    os.kill(replica.pid, signal.SIGSTOP)
                    master.client().client_kill_filter(_type="replica")
                    time.sleep(lag)
                old = setup.kill_master()
                killed_at = time.monotonic()
                if lag:
                    os.kill(replica.pid, signal.SIGCONT)
                new = setup.wait_failover(old)
                promoted = time.monotonic() - killed_at
                setup.rejoin(old)
                rejoined = time.monotonic() - killed_at

                def back(at: float = killed_at) -> float | None:
                    for sent, answered, status, _, _ in publisher.answers:
                        if sent > at and status == 202:
                            return answered - at
                    return None

                clients.wait(lambda b=back: b() is not None, 60)
                seconds = back()
                assert seconds is not None
                recovery.append(round(seconds, 3))
                print(
                    f"  SIGKILL :{old.port}; :{new.port} promoted after"
                    f" {promoted:.2f}s, :{old.port} a replica again after"
                    f" {rejoined:.2f}s, first 202 after {seconds:.2f}s",
                    flush=True,
                )
            mark = len(publisher.accepted())
            clients.wait(lambda: len(publisher.accepted()) >= mark + 50, 60)
        finally:
            publisher.stop()
        accepted = publisher.accepted()
        refused = [d for _, _, status, _, d in publisher.answers if status != 202]
        master = setup.master
        entries = [
            f[b"d"].decode() for _, f in master.client().xrange("eventstream:{lobby}")
        ]
        wanted = {d for _, d in accepted}
        # Everything the final master holds reaches every stream (bounded).
        try:
            clients.wait(
                lambda: all(
                    set(entries) <= set(clients.received(s)) for s in clients.sessions
                ),
                30,
            )
        except TimeoutError:
            pass
        lost = duplicated = unacknowledged = 0
        for session in clients.sessions:
            got = clients.received(session)
            lost += len(wanted - set(got))
            duplicated += len(got) - len(set(got))
            unacknowledged += len(set(got) & set(refused))
        return {
            "min_replicas": min_replicas,
            "replica_lag_s": lag,
            "kills": kills,
            "streams": streams,
            "seconds_to_publish": recovery,
            "seconds_to_publish_median": statistics.median(recovery),
            "posts_202": len(accepted),
            "posts_503": len(refused),
            "post_errors": len(publisher.errors),
            "missing_from_redis": len(wanted - set(entries)),
            "lost": lost,
            "duplicated": duplicated,
            "unacknowledged_delivered": unacknowledged,
            "resets": clients.resets(),
            "reconnects": clients.reconnects,
        }
    finally:
        if clients is not None:
            clients.close()
        if server is not None:
            server.close()
        save_logs(setup, logs, f"min{min_replicas}")
        setup.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--streams", type=int, default=24)
    parser.add_argument("--publishes", type=int, default=2000)
    parser.add_argument(
        "--min-replicas", type=int, nargs="+", default=[1, 0], metavar="N"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--logs", type=Path, help="save the Redis logs here")
    parser.add_argument(
        "--lag",
        type=float,
        default=0.0,
        help="stop the replica this many seconds before each kill (a lagging replica)",
    )
    args = parser.parse_args(argv)
    raise_nofile()
    results: dict[str, t.Any] = {}
    results["publish_ms"] = measure_publish(args.min_replicas, args.publishes)
    print("publish()", json.dumps(results["publish_ms"]), flush=True)
    for n in args.min_replicas:
        print(f"MIN_REPLICAS={n}", flush=True)
        result = failover_loop(n, args.kills, args.streams, args.logs, args.lag)
        print(json.dumps(result), flush=True)
        results[f"failover_min_replicas_{n}"] = result
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
