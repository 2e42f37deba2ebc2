"""What presence costs Redis::

    python -m benchmarks.presence [--streams 10000] [--workers 3] [--idle 60]

Starts its own ``redis-server`` and ``gunicorn -k gevent -w WORKERS`` of
:mod:`benchmarks.app` (the example app plus ``/named/<channel>?user=``) on free ports of
127.0.0.1, opens STREAMS streams, each with a user of its own, over 100
channels, waits until presence counts every one of them, then reads Redis'
``INFO commandstats`` before and after IDLE seconds in which nothing is
published. It prints the commands per second by command, in total and per
open stream, and the same for the opening phase (commands per stream
opened), and the same for as many streams without a user, so that the
difference is what presence costs.

``--revoke N`` measures instead how long ``POST /revoke/<user>`` takes to end
N streams of that user spread over the workers: from the request sent to the
last stream's end seen by the client, over ``--rounds`` rounds.

Every server is stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import time
import typing as t
from pathlib import Path

if not __package__:  # python benchmarks/presence.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.processes import AppServer  # noqa: E402
from benchmarks.processes import raise_nofile  # noqa: E402
from benchmarks.processes import RedisProcess  # noqa: E402
from benchmarks.processes import wait_for  # noqa: E402
from benchmarks.sseclient import open_clients  # noqa: E402
from benchmarks.sseclient import pump  # noqa: E402
from benchmarks.sseclient import SSEClient  # noqa: E402

CHANNELS = 100


def commandstats(admin: t.Any) -> dict[str, int]:
    stats = admin.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    out = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    # INFO itself is not the library's.
    out.pop("info", None)
    return {k: v for k, v in sorted(out.items()) if v}


def measure(args: argparse.Namespace, users: bool) -> dict[str, t.Any]:
    """One run: fresh Redis and gunicorn; streams with a user each (presence
    counts them) or without (the same streams, no presence)."""
    redis = RedisProcess().start()
    server = AppServer(
        "gunicorn",
        env={
            "EVENTSTREAM_REDIS_URL": redis.url,
            "EVENTSTREAM_HEARTBEAT": "300",
            "EVENTSTREAM_PRESENCE_TIMEOUT": str(args.timeout),
            "EVENTSTREAM_PRESENCE_EVENTS": "true" if args.events else "false",
        },
        args=["-w", str(args.workers), "--worker-connections", "20000"],
    )
    clients: list[SSEClient] = []
    admin = redis.client()
    try:
        server.start()
        wait_for(lambda: len(server.children()) == args.workers, 30)
        before_open = commandstats(admin)
        started = time.monotonic()
        batch = 500
        for first in range(0, args.streams, batch):
            for i in range(first, min(first + batch, args.streams)):
                path = (
                    f"/named/c{i % CHANNELS}?user=u{i}"
                    if users
                    else f"/gen/c{i % CHANNELS}"
                )
                clients += open_clients(server.port, path, 1, timeout=60)
        opened = time.monotonic() - started
        # Let the workers hand the last changes to Redis.
        time.sleep(2)
        after_open = commandstats(admin)

        def counted() -> int:
            total = 0
            for c in range(CHANNELS):
                total += sum(server.get_json(f"/presence/c{c}")["users"].values())
            return total

        assert server.connections() > 0
        if users:
            wait_for(lambda: counted() == args.streams, 120, interval=0.5)
        time.sleep(1)
        before_idle = commandstats(admin)
        idle_start = time.monotonic()
        time.sleep(args.idle)
        after_idle = commandstats(admin)
        idle = time.monotonic() - idle_start
        opening = delta(before_open, after_open)
        idling = delta(before_idle, after_idle)
        total_idle = sum(idling.values())
        scripts_idle = idling.get("evalsha", 0) + idling.get("eval", 0)
        return {
            "users": users,
            "streams": len(clients),
            "opening_seconds": round(opened, 1),
            "opening_commands": opening,
            "opening_commands_per_stream": round(
                sum(opening.values()) / len(clients), 3
            ),
            "idle_seconds": round(idle, 1),
            "idle_commands": idling,
            "idle_commands_per_second": round(total_idle / idle, 3),
            "idle_script_calls_per_second": round(scripts_idle / idle, 3),
            "idle_commands_per_second_per_stream": total_idle / idle / len(clients),
        }
    finally:
        for client in clients:
            client.close()
        admin.close()
        server.stop()
        server.close()
        redis.close()


def measure_revoke(args: argparse.Namespace) -> dict[str, t.Any]:
    redis = RedisProcess().start()
    admin_token = "bench-admin"
    server = AppServer(
        "gunicorn",
        env={
            "EVENTSTREAM_REDIS_URL": redis.url,
            "EVENTSTREAM_HEARTBEAT": "300",
            "EXAMPLE_PRIVATE_TOKEN": admin_token,
        },
        args=["-w", str(args.workers), "--worker-connections", "20000"],
    )
    times: list[float] = []
    spreads: list[list[int]] = []
    try:
        server.start()
        wait_for(lambda: len(server.children()) == args.workers, 30)
        for round_no in range(args.rounds):
            user = f"victim{round_no}"
            clients = open_clients(
                server.port, f"/named/lobby?user={user}", args.revoke, batch=200
            )
            try:
                wait_for(
                    lambda u=user: (
                        server.get_json("/presence/lobby")["users"].get(u)
                        == args.revoke
                    ),
                    60,
                    interval=0.2,
                )
                spreads.append(
                    sorted(
                        int(v)
                        for key in redis.client().scan_iter("eventstream:~w:*")
                        for f, v in redis.client().hgetall(key).items()
                        if f.decode().endswith("\n" + user)
                    )
                )
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
                try:
                    start = time.monotonic()
                    conn.request(
                        "POST",
                        f"/revoke/{user}",
                        headers={"Authorization": f"Bearer {admin_token}"},
                    )
                    status = conn.getresponse().status
                finally:
                    conn.close()
                assert status == 204, status
                pump(clients, lambda c=clients: all(x.ended or x.eof for x in c), 30)
                times.append(time.monotonic() - start)
            finally:
                for client in clients:
                    client.close()
        ordered = sorted(times)
        return {
            "streams": args.revoke,
            "workers": args.workers,
            "streams_per_worker": spreads,
            "revoke_to_close_ms": [round(x * 1000, 1) for x in times],
            "median_ms": round(ordered[len(ordered) // 2] * 1000, 1),
            "max_ms": round(ordered[-1] * 1000, 1),
        }
    finally:
        server.stop()
        server.close()
        redis.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--idle", type=float, default=60.0)
    parser.add_argument("--timeout", type=float, default=30.0, help="PRESENCE_TIMEOUT")
    parser.add_argument(
        "--events", action="store_true", help="EVENTSTREAM_PRESENCE_EVENTS on"
    )
    parser.add_argument(
        "--revoke", type=int, default=0, help="measure revoke to close with N streams"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    raise_nofile()
    if args.revoke:
        result = measure_revoke(args)
        print(json.dumps(result, indent=2), flush=True)
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        return 0
    results: dict[str, t.Any] = {
        "streams": args.streams,
        "workers": args.workers,
        "presence_timeout": args.timeout,
        "presence_events": args.events,
    }
    for users in (True, False):
        record = measure(args, users)
        results["with_users" if users else "without_users"] = record
        print(json.dumps(record), flush=True)
    with_u, without = results["with_users"], results["without_users"]
    results["presence_idle_commands_per_second"] = round(
        with_u["idle_commands_per_second"] - without["idle_commands_per_second"], 3
    )
    results["presence_opening_commands_per_stream"] = round(
        with_u["opening_commands_per_stream"] - without["opening_commands_per_stream"],
        3,
    )
    print(json.dumps(results, indent=2), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
