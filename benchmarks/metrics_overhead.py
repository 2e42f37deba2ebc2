"""The cost of Prometheus metrics on the hot path: fan-out throughput with
``EVENTSTREAM_METRICS`` off and on, in the same run.

Starts two ``gunicorn -k gevent -w 1 'benchmarks.app:create_app()'``
servers on free ports of 127.0.0.1 (in-memory broker, heartbeat 60 s): one
without metrics, one with ``EVENTSTREAM_METRICS=1`` and
``PROMETHEUS_MULTIPROC_DIR`` set (the multi-process mode, where every count
is a write to a memory-mapped file: the dearer of prometheus_client's two
modes). Each holds M subscribers (raw sockets in this process); runs of N
events published inside the worker (``POST /bulk``) alternate between the
two servers, and for each the figures are

- deliveries per second, from the first request until every subscriber has
  every event, and
- the worker's CPU time per 1,000 deliveries (``/proc/<pid>/stat``), which
  the client's own speed does not hide.

The overhead is 1 - (median with metrics / median without) for throughput,
and (median with / median without) - 1 for CPU per delivery; the paired
figures are the medians of the same ratios taken run by run (each run with
metrics against the run without it next to it; which of the two goes first
alternates), which cancels most of the drift of a shared machine. On a busy
machine wall-clock throughput swings by tens of percent from run to run; the
CPU time per delivery is the steadier measure of what the metrics cost.
Last, the cost of each counting call is timed in this process, which bounds
the CPU the counting can add per delivery (at most one write per delivery,
one publish per event) independently of the machine's load.

``--control`` runs the same with metrics off on both servers: the
differences it shows are the noise floor of the machine.

Run from the repository root::

    python -m benchmarks.metrics_overhead
    python -m benchmarks.metrics_overhead --subscribers 500 --events 400 --repeat 7
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import timeit
import typing as t

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.processes import AppServer  # noqa: E402
from benchmarks.processes import raise_nofile  # noqa: E402
from benchmarks.quick_core import close_all  # noqa: E402
from benchmarks.quick_core import emit  # noqa: E402
from benchmarks.quick_core import measure_fanout  # noqa: E402
from benchmarks.sseclient import open_clients  # noqa: E402
from benchmarks.sseclient import SSEClient  # noqa: E402


def deliveries(server: AppServer) -> float:
    """``eventstream_deliveries_total`` from the server's /metrics."""
    status, body = server.request("GET", "/metrics")
    assert status == 200, body[:200]
    for line in body.decode().splitlines():
        if line.startswith("eventstream_deliveries_total "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no eventstream_deliveries_total")


def call_costs(directory: str) -> dict[str, float]:
    """Nanoseconds per call of what the hot path does with metrics on, in
    the multi-process mode (this process's first prometheus_client import):
    counting a write's deliveries (an integer addition, added up at the
    watchdog's ticks) and counting a publish (a counter increment)."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    from flask_eventstream import Event
    from flask_eventstream.metrics import get_metrics

    metrics = get_metrics()
    # The statements of the write loop, with metrics on and off.
    write = "if count and metrics is not None:\n    if batched:\n" + (
        "        metrics.pending += count"
    )

    def per_call(stmt: str, **names: t.Any) -> float:
        timer = timeit.Timer(stmt, globals=names)
        n = 1_000_000
        return 1e9 * min(timer.repeat(repeat=7, number=n)) / n

    costs = {
        "write_ns": per_call(write, count=3, metrics=metrics, batched=True)
        - per_call(write, count=3, metrics=None, batched=True),
        "publish_ns": per_call(
            "metrics.published('bench', event)",
            metrics=metrics,
            event=Event(data="x", id="1-0"),
        ),
    }
    metrics.flush()
    return {k: round(v, 1) for k, v in costs.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=500)
    parser.add_argument("--events", type=int, default=300)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--control",
        action="store_true",
        help="metrics off on both servers: the noise floor of the comparison",
    )
    args = parser.parse_args(argv)

    raise_nofile()
    base = {"EVENTSTREAM_HEARTBEAT": "60", "EVENTSTREAM_QUEUE_SIZE": "100000"}
    metrics_dir = tempfile.TemporaryDirectory(prefix="eventstream-metrics-")
    servers = {
        "off": AppServer("gunicorn", base),
        "on": AppServer(
            "gunicorn",
            base
            if args.control
            else {
                **base,
                "EVENTSTREAM_METRICS": "1",
                "PROMETHEUS_MULTIPROC_DIR": metrics_dir.name,
            },
        ),
    }
    emit(
        {
            "measure": "setup",
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "loadavg": os.getloadavg(),
            "subscribers": args.subscribers,
            "events": args.events,
            "batch": args.batch,
            "control": args.control,
        }
    )
    clients: dict[str, list[SSEClient]] = {}
    runs: dict[str, list[dict[str, t.Any]]] = {"off": [], "on": []}
    try:
        for name, server in servers.items():
            server.start()
            close_all(open_clients(server.port, "/stream/warmup", 10))
            server.publish("warmup", "x")
            server.wait_connections(0, 10)
            clients[name] = open_clients(
                server.port, "/stream/bench", args.subscribers, count_only=True
            )
            server.wait_connections(args.subscribers, 30)
        if not args.control:
            status, body = servers["on"].request("GET", "/metrics")
            assert status == 200 and b"eventstream_connections " in body, body[:200]
        for n in range(args.repeat):
            # Which goes first alternates: a shared machine's load drifts.
            order = ["off", "on"] if n % 2 == 0 else ["on", "off"]
            for name in order:
                server = servers[name]
                record = measure_fanout(
                    server, clients[name], args.events, "bulk", args.batch, "bench"
                )
                record["metrics"] = name
                record["worker_cpu_ms_per_1000"] = round(
                    1e6 * record["worker_cpu_s"] / (args.events * args.subscribers),
                    3,
                )
                emit(record)
                runs[name].append(record)
        # The count is exact (pending deliveries land at the next tick).
        total = args.subscribers * args.events * args.repeat
        deadline = time.monotonic() + 5
        while not args.control and (counted := deliveries(servers["on"])) != total:
            assert time.monotonic() < deadline, (counted, total)
            time.sleep(0.1)
    finally:
        for group in clients.values():
            close_all(group)
        for server in servers.values():
            server.close()

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    off_dps, on_dps = (
        median("off", "deliveries_per_s"),
        median("on", "deliveries_per_s"),
    )
    off_cpu = median("off", "worker_cpu_ms_per_1000")
    on_cpu = median("on", "worker_cpu_ms_per_1000")
    # Paired: each run with metrics against the run without next to it,
    # which cancels the drift of a shared machine's load.
    pairs = list(zip(runs["off"], runs["on"], strict=True))
    paired_dps = statistics.median(
        1 - on["deliveries_per_s"] / off["deliveries_per_s"] for off, on in pairs
    )
    paired_cpu = statistics.median(
        on["worker_cpu_ms_per_1000"] / off["worker_cpu_ms_per_1000"] - 1
        for off, on in pairs
    )
    costs = call_costs(metrics_dir.name)
    # At most one write per delivery and one publish per event: an upper
    # bound of the CPU the counting adds, against the measured CPU per
    # delivery without metrics.
    bound = costs["write_ns"] + costs["publish_ns"] / args.subscribers
    result = {
        "measure": "metrics-overhead",
        "call_costs_ns": costs,
        "cpu_bound_pct": round(100 * bound / (1e3 * off_cpu), 2),
        "paired_throughput_overhead_pct": round(100 * paired_dps, 2),
        "paired_cpu_overhead_pct": round(100 * paired_cpu, 2),
        "deliveries_per_s_off": off_dps,
        "deliveries_per_s_on": on_dps,
        "throughput_overhead_pct": round(100 * (1 - on_dps / off_dps), 2),
        "worker_cpu_ms_per_1000_off": off_cpu,
        "worker_cpu_ms_per_1000_on": on_cpu,
        "cpu_overhead_pct": round(100 * (on_cpu / off_cpu - 1), 2),
        "loadavg": os.getloadavg(),
    }
    metrics_dir.cleanup()
    emit(result)
    print()
    print(f"{'':<34} {'metrics off':>12} {'metrics on':>12} {'overhead':>10}")
    print(
        f"{'deliveries/s (median)':<34} {off_dps:>12.0f} {on_dps:>12.0f}"
        f" {result['throughput_overhead_pct']:>9.2f}%"
    )
    print(
        f"{'worker CPU ms / 1000 deliveries':<34} {off_cpu:>12.3f} {on_cpu:>12.3f}"
        f" {result['cpu_overhead_pct']:>9.2f}%"
    )
    print(
        f"{'paired (median of per-pair ratios)':<34} {'':>12} {'':>12}"
        f" {result['paired_throughput_overhead_pct']:>9.2f}%"
        f" throughput, {result['paired_cpu_overhead_pct']:.2f}% CPU"
    )
    print(
        f"{'bound from the cost per call':<34} {'':>12} {'':>12}"
        f" {result['cpu_bound_pct']:>9.2f}% CPU ({costs['write_ns']} ns a write,"
        f" {costs['publish_ns']} ns a publish)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
