"""Quick measurements of the core on one gevent worker (the core's own figures).

Starts ``gunicorn -k gevent -w 1 'benchmarks.app:create_app()'`` (the
example app plus a bulk-publish route; in-memory broker, heartbeat 60 s so
heartbeats play no part) on a free port of 127.0.0.1 and measures, with the
clients as raw sockets in this process (one thread, :mod:`selectors`):

a. seconds from N abrupt disconnects (RST, SO_LINGER 0) of idle streams to
   ``connections == 0`` on ``/healthz``;
b. events per second the worker fans out to M local subscribers: events are
   published inside the worker (``POST /bulk/<channel>``, yielding to the hub
   after every ``--batch`` events) or by separate ``POST /publish`` requests
   from a second thread; the clock runs from the first request until every
   subscriber has received every event;
c. the worker's RSS (``VmRSS``/``VmHWM`` in ``/proc/<pid>/status``) empty and
   holding M idle streams, and the difference per stream.

Run from the repository root::

    python -m benchmarks.quick_core
    python -m benchmarks.quick_core --subscribers 1000 --events 200 --server pywsgi

Prints one JSON object per measurement, then a table. The machine's load
average is part of the output: the figures mean little on a busy machine.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import selectors
import statistics
import sys
import threading
import time
import typing as t

if not __package__:  # python benchmarks/quick_core.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import procfs  # noqa: E402
from benchmarks.processes import AppServer  # noqa: E402
from benchmarks.processes import raise_nofile  # noqa: E402
from benchmarks.sseclient import HOST  # noqa: E402
from benchmarks.sseclient import open_clients  # noqa: E402
from benchmarks.sseclient import SSEClient  # noqa: E402


def emit(record: dict[str, t.Any]) -> None:
    print(json.dumps(record), flush=True)


def memory(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` of ``pid`` in KiB."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(rest.split()[0])
    return values


def close_all(clients: list[SSEClient]) -> None:
    for client in clients:
        client.close()


# -- (a) disconnects --


def measure_disconnects(server: AppServer, count: int) -> dict[str, t.Any]:
    clients = open_clients(server.port, "/stream/idle", count)
    try:
        server.wait_connections(count, 30)
        start = time.monotonic()
        for client in clients:
            client.abort()
        server.wait_connections(0, 30)
        seconds = time.monotonic() - start
    finally:
        close_all(clients)
    return {"measure": "disconnect", "streams": count, "seconds": round(seconds, 4)}


# -- (b) fan-out --


def pump_counts(clients: list[SSEClient], target: int, timeout: float) -> float:
    """Read until every client counted ``target`` events; return the time
    the last one got there (monotonic)."""
    left = sum(1 for c in clients if c.count < target)
    last = time.monotonic()
    deadline = last + timeout
    with selectors.DefaultSelector() as sel:
        for client in clients:
            sel.register(client.sock, selectors.EVENT_READ, client)
        while left:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                counts = sorted(c.count for c in clients)
                raise TimeoutError(
                    f"{left} subscribers short of {target} events after"
                    f" {timeout}s (min {counts[0]}, max {counts[-1]})"
                )
            for key, _ in sel.select(min(remaining, 0.5)):
                client = key.data
                before = client.count
                if not client.on_readable():
                    sel.unregister(client.sock)
                    raise ConnectionError(f"a subscriber's stream ended: {client!r}")
                if before < target <= client.count:
                    left -= 1
                    last = time.monotonic()
    return last


def post(
    port: int, path: str, body: t.Any, conn: http.client.HTTPConnection | None = None
) -> t.Any:
    own = conn is None
    conn = conn or http.client.HTTPConnection(HOST, port, timeout=60)
    try:
        conn.request(
            "POST", path, json.dumps(body), {"Content-Type": "application/json"}
        )
        response = conn.getresponse()
        data = response.read()
        if response.status != 202:
            raise RuntimeError(f"POST {path}: {response.status} {data!r}")
        return json.loads(data)
    finally:
        if own:
            conn.close()


def measure_fanout(
    server: AppServer,
    clients: list[SSEClient],
    events: int,
    mode: str,
    batch: int,
    channel: str,
) -> dict[str, t.Any]:
    base = clients[0].count
    target = base + events
    assert all(c.count == base for c in clients)
    errors: list[BaseException] = []
    cpu = time.process_time()
    pid = server.worker_pid()
    server_cpu = procfs.cpu_seconds(pid)

    def publish() -> None:
        try:
            if mode == "bulk":
                post(server.port, f"/bulk/{channel}?n={events}&batch={batch}", {})
            else:
                conn = http.client.HTTPConnection(HOST, server.port, timeout=60)
                try:
                    for i in range(events):
                        post(server.port, f"/publish/{channel}", {"data": i}, conn)
                finally:
                    conn.close()
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    thread = threading.Thread(target=publish)
    start = time.monotonic()
    thread.start()
    try:
        end = pump_counts(clients, target, 120)
    finally:
        thread.join(120)
    if errors:
        raise errors[0]
    seconds = end - start
    extra = [c.count - target for c in clients if c.count != target]
    if extra:
        raise AssertionError(f"subscribers got extra events: {extra[:5]}")
    return {
        "measure": "fanout",
        "mode": mode,
        "batch": batch if mode == "bulk" else None,
        "subscribers": len(clients),
        "events": events,
        "seconds": round(seconds, 4),
        "events_per_s": round(events / seconds, 1),
        "deliveries_per_s": round(events * len(clients) / seconds),
        "worker_cpu_s": round(procfs.cpu_seconds(pid) - server_cpu, 3),
        "client_cpu_s": round(time.process_time() - cpu, 3),
    }


# -- main --


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", choices=["gunicorn", "pywsgi"], default="gunicorn")
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--disconnects", type=int, default=500)
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument(
        "--batch",
        type=int,
        nargs="+",
        default=[1, 10],
        help="bulk runs: events published between yields to the hub",
    )
    parser.add_argument("--posts", type=int, default=100, help="events in the POST run")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)

    raise_nofile()
    env = {"EVENTSTREAM_HEARTBEAT": "60", "EVENTSTREAM_QUEUE_SIZE": "100000"}
    server = AppServer(args.server, env)
    records: list[dict[str, t.Any]] = []
    load_before = os.getloadavg()
    emit(
        {
            "measure": "setup",
            "server": server.argv[2:] if args.server == "gunicorn" else server.argv,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "loadavg": load_before,
        }
    )
    server.start()
    try:
        pid = server.worker_pid()
        # Warm up the code paths (imports, first request) before measuring.
        close_all(open_clients(server.port, "/stream/warmup", 10))
        server.publish("warmup", "x")
        server.wait_connections(0, 10)
        empty = memory(pid)

        # (c) memory with idle streams; they are then the fan-out subscribers.
        clients = open_clients(
            server.port, "/stream/bench", args.subscribers, count_only=True
        )
        try:
            server.wait_connections(args.subscribers, 30)
            full = memory(pid)
            record = {
                "measure": "memory",
                "streams": args.subscribers,
                "empty_rss_kib": empty["VmRSS"],
                "empty_hwm_kib": empty["VmHWM"],
                "rss_kib": full["VmRSS"],
                "hwm_kib": full["VmHWM"],
                "per_stream_kib": round(
                    (full["VmRSS"] - empty["VmRSS"]) / args.subscribers, 2
                ),
            }
            emit(record)
            records.append(record)

            # (b) fan-out
            runs = [("bulk", b, args.events) for b in args.batch]
            runs.append(("post", 1, args.posts))
            for mode, batch, events in runs:
                for _ in range(args.repeat):
                    record = measure_fanout(
                        server, clients, events, mode, batch, "bench"
                    )
                    emit(record)
                    records.append(record)
            after = memory(pid)
            record = {
                "measure": "memory-after-fanout",
                "streams": args.subscribers,
                "rss_kib": after["VmRSS"],
                "hwm_kib": after["VmHWM"],
            }
            emit(record)
            records.append(record)
        finally:
            close_all(clients)
        server.wait_connections(0, 30)

        # (a) abrupt disconnects
        for _ in range(args.repeat):
            record = measure_disconnects(server, args.disconnects)
            emit(record)
            records.append(record)
    finally:
        server.close()
    load_after = os.getloadavg()
    emit({"measure": "load", "before": load_before, "after": load_after})
    print_table(records, args)
    return 0


def print_table(records: list[dict[str, t.Any]], args: argparse.Namespace) -> None:
    print()
    print(f"{'measurement':<46} {'result':>24}")
    print("-" * 71)
    for r in records:
        if r["measure"] == "memory":
            rss, hwm = r["empty_rss_kib"] / 1024, r["empty_hwm_kib"] / 1024
            print(f"{'worker RSS empty / peak (HWM)':<46} {rss:>8.1f} / {hwm:.1f} MiB")
            label = f"worker RSS / peak with {r['streams']} idle streams"
            print(
                f"{label:<46}"
                f" {r['rss_kib'] / 1024:>8.1f} / {r['hwm_kib'] / 1024:.1f} MiB"
            )
            print(f"{'per idle stream':<46} {r['per_stream_kib']:>11.1f} KiB")
        elif r["measure"] == "memory-after-fanout":
            print(
                f"{'worker RSS / peak after the fan-out runs':<46}"
                f" {r['rss_kib'] / 1024:>8.1f} / {r['hwm_kib'] / 1024:.1f} MiB"
            )
    groups: dict[tuple[t.Any, ...], list[dict[str, t.Any]]] = {}
    for r in records:
        if r["measure"] == "fanout":
            groups.setdefault((r["mode"], r["batch"], r["events"]), []).append(r)
    for (mode, batch, events), rs in groups.items():
        label = f"fan-out {events} ev x {rs[0]['subscribers']} subs, " + (
            f"bulk batch={batch}" if mode == "bulk" else "separate POSTs"
        )
        eps = statistics.median(r["events_per_s"] for r in rs)
        dps = statistics.median(r["deliveries_per_s"] for r in rs)
        print(f"{label:<46} {eps:>9.0f} ev/s {dps:>9.0f} del/s (median)")
    ds = [r["seconds"] for r in records if r["measure"] == "disconnect"]
    if ds:
        label = f"{args.disconnects} RST disconnects -> connections 0"
        each = ", ".join(f"{d:.3f}" for d in ds)
        print(f"{label:<46} {statistics.median(ds):>11.3f} s (median; {each})")


if __name__ == "__main__":
    sys.exit(main())
