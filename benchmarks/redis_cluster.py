"""One Redis server against a Redis Cluster of three masters::

    python -m benchmarks.redis_cluster [--seconds 5] [--publishers 2]
        [--readers 10] [--events 500] [--json PATH]

Starts its own ``redis-server`` (one server) and three ``redis-server
--cluster-enabled yes`` joined by ``redis-cli --cluster create`` (no
replicas, so that both setups run the same number of Redis processes per
shard), on free ports of 127.0.0.1, and measures on each:

``publish``
    ``publish()`` throughput: ``--publishers`` processes publish 100-byte
    events on 30 channels for ``--seconds`` seconds, with nobody reading,
    then with ``--readers`` reader connections per master (as many workers'
    readers) subscribed to every channel, then four times as many. Reports
    events/s, and per event the Redis CPU time (``INFO cpu``, all masters)
    and the commands' own times (``INFO commandstats``), from which the
    per-reader cost of an event follows.
``latency``
    Publish on one gunicorn worker (a POST) -> delivery on 20 streams of
    another worker: p50, p99 and max (the scenario of
    ``benchmarks.redis_quick``).

Every server is stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import time
import typing as t
from pathlib import Path

if not __package__:  # python benchmarks/redis_cluster.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.processes import RedisClusterProcess  # noqa: E402
from benchmarks.processes import RedisProcess  # noqa: E402
from benchmarks.redis_quick import measure_latency  # noqa: E402

CHANNELS = [f"bench{i}" for i in range(30)]


def stream_key(channel: str) -> str:
    """The key (and shard channel) of a channel's stream."""
    return f"eventstream:{{{channel}}}"


def slot_of(key: str) -> int:
    import redis.crc

    return int(redis.crc.key_slot(key.encode()))


class _Target:
    """What measure_latency needs of a Redis: its URL."""

    def __init__(self, url: str) -> None:
        self.url = url


def _publish_for(url: str, seconds: float, seed: int, out: t.Any) -> None:
    from flask_eventstream import EventStream

    stream = EventStream(redis_url=url)
    data = "x" * 100
    n = 0
    start = time.monotonic()
    deadline = start + seconds
    while time.monotonic() < deadline:
        for _ in range(50):
            stream.publish(CHANNELS[(seed + n) % len(CHANNELS)], data)
            n += 1
    out.put((n, time.monotonic() - start))


def _masters(setup: RedisProcess | RedisClusterProcess) -> list[RedisProcess]:
    if isinstance(setup, RedisClusterProcess):
        return list(setup.nodes)
    return [setup]


def _cpu(nodes: list[RedisProcess]) -> float:
    total = 0.0
    for node in nodes:
        info = node.client().info("cpu")
        total += float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    return total


def _command(nodes: list[RedisProcess], name: str) -> tuple[int, float]:
    """Calls and microseconds of one command on ``nodes`` (INFO
    commandstats; commands run by scripts count too)."""
    calls, usec = 0, 0.0
    for node in nodes:
        stats = node.client().info("commandstats").get(f"cmdstat_{name}")
        if stats:
            calls += int(stats["calls"])
            usec += float(stats["usec"])
    return calls, usec


def _readers(setup: RedisProcess | RedisClusterProcess, count: int) -> list[t.Any]:
    """``count`` connections per master subscribed to every channel it
    serves, each drained by a thread (as workers' readers)."""
    import threading

    import redis

    conns = []
    for node in _masters(setup):
        for _ in range(count):
            conn = redis.Connection(host="127.0.0.1", port=node.port, protocol=2)
            conn.connect()
            for channel in CHANNELS:
                if isinstance(setup, RedisClusterProcess):
                    if setup.master_of(slot_of(stream_key(channel))) is not node:
                        continue
                conn.send_command("SSUBSCRIBE", stream_key(channel))
            conns.append(conn)

    def drain(conn: t.Any) -> None:
        try:
            while True:
                conn.read_response()
        except Exception:
            return

    for conn in conns:
        threading.Thread(target=drain, args=(conn,), daemon=True).start()
    return conns


def measure_publish(
    setup: RedisProcess | RedisClusterProcess,
    url: str,
    seconds: float,
    publishers: int,
    readers: int,
) -> dict[str, t.Any]:
    masters = _masters(setup)
    conns = _readers(setup, readers) if readers else []
    try:
        for node in masters:
            node.client().config_resetstat()
        cpu0 = _cpu(masters)
        ctx = multiprocessing.get_context("fork")
        out = ctx.Queue()
        procs = [
            ctx.Process(target=_publish_for, args=(url, seconds, i * 7, out))
            for i in range(publishers)
        ]
        for proc in procs:
            proc.start()
        results = [out.get(timeout=seconds + 60) for _ in procs]
        for proc in procs:
            proc.join(30)
        cpu = _cpu(masters) - cpu0
        events = sum(n for n, _ in results)
        elapsed = max(s for _, s in results)
        row: dict[str, t.Any] = {
            "readers_per_master": readers,
            "events": events,
            "events_per_s": round(events / elapsed),
            "redis_cpu_us_per_event": round(cpu / events * 1e6, 2),
            "redis_cpu_share": round(cpu / elapsed / len(masters), 3),
        }
        for name in ("evalsha", "xadd", "spublish"):
            calls, usec = _command(masters, name)
            row[f"{name}_us_per_call"] = round(usec / calls, 2) if calls else None
        return row
    finally:
        for conn in conns:
            conn.disconnect()


def run(args: argparse.Namespace) -> dict[str, t.Any]:
    if not shutil.which("redis-server") or not shutil.which("redis-cli"):
        raise SystemExit(
            "redis-server and redis-cli are needed (apt-get install redis)"
        )
    results: dict[str, t.Any] = {"cpus": os.cpu_count()}
    single = RedisProcess().start()
    cluster = RedisClusterProcess(3).start()
    try:
        for name, setup, url in (
            ("one_server", single, single.url),
            ("cluster_3_masters", cluster, cluster.url),
        ):
            row: dict[str, t.Any] = {}
            row["publish"] = [
                measure_publish(setup, url, args.seconds, args.publishers, readers)
                for readers in (0, args.readers, args.readers * 4)
            ]
            target = t.cast(RedisProcess, _Target(url))
            row["latency"] = measure_latency(target, args.events, 0.002)
            results[name] = row
            print(name, json.dumps(row, indent=1), flush=True)
    finally:
        single.close()
        cluster.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--publishers", type=int, default=2)
    parser.add_argument("--readers", type=int, default=10)
    parser.add_argument("--events", type=int, default=500)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    results = run(args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
