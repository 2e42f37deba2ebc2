"""Where the worker's memory per idle stream goes.

Starts ``gunicorn -k gevent -w 1 'benchmarks.app:create_app()'`` (heartbeat
300 s), opens N idle streams on one channel and reads ``GET /memory``
(:mod:`benchmarks.memprobe`) before and after, twice:

1. untraced: RSS, the C allocator's (glibc ``mallinfo2``) and pymalloc's
   bytes, and the garbage collector's objects by type, per stream; the
   saved C stack of the streams' greenlets and the Python frames of one
   parked stream, innermost first (``gen`` marks a generator: each one
   resumed from C runs its own C-level eval loop, whose stack the greenlet
   saves when it parks);
2. with ``tracemalloc`` on in the worker (``BENCH_TRACEMALLOC``): the traced
   bytes per stream by package and by file and line (the innermost Python
   frame of the allocation, or ``--frames`` of them).

Run from the repository root::

    python -m benchmarks.memory                    # 2,000 streams
    python -m benchmarks.memory --streams 10000 --frames 3 --lines 40
    python -m benchmarks.memory --no-trace         # step 1 only

Prints one JSON line per step, then tables.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
import tracemalloc
import typing as t

if not __package__:  # python benchmarks/memory.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.processes import AppServer  # noqa: E402
from benchmarks.processes import raise_nofile  # noqa: E402
from benchmarks.processes import ROOT  # noqa: E402
from benchmarks.sseclient import open_clients  # noqa: E402
from benchmarks.sseclient import SSEClient  # noqa: E402

ENV = {"EVENTSTREAM_HEARTBEAT": "300"}


def _server(streams: int, frames: int) -> AppServer:
    env = dict(ENV)
    if frames:
        env["BENCH_TRACEMALLOC"] = str(frames)
    return AppServer(
        "gunicorn", env, args=["--worker-connections", str(max(streams + 100, 1000))]
    )


def _close(clients: list[SSEClient]) -> None:
    for client in clients:
        client.close()


def measure(
    streams: int, frames: int, snapdir: str | None
) -> tuple[dict[str, t.Any], dict[str, t.Any]]:
    """``/memory`` of a warmed-up worker with no stream and with ``streams``
    idle ones."""
    server = _server(streams, frames).start()
    try:
        _close(open_clients(server.port, "/stream/warmup", 20))
        server.publish("warmup", "x")
        server.wait_connections(0, 10)
        snap0 = os.path.join(snapdir, "empty.snap") if snapdir else ""
        empty = server.get_json(f"/memory?snapshot={snap0}")
        clients = open_clients(
            server.port, "/stream/idle", streams, count_only=True, timeout=600
        )
        try:
            server.wait_connections(streams, 60)
            time.sleep(1.0)  # let the last streams park
            snap1 = os.path.join(snapdir, "full.snap") if snapdir else ""
            full = server.get_json(f"/memory?snapshot={snap1}")
        finally:
            _close(clients)
    finally:
        server.close()
    return empty, full


def package(filename: str) -> str:
    """A package-level name for an allocation's file."""
    if filename.startswith("<"):
        return filename
    parts = filename.split(os.sep)
    if "site-packages" in parts:
        rest = parts[parts.index("site-packages") + 1 :]
        return rest[0].removesuffix(".py") if rest else filename
    root = str(ROOT) + os.sep
    if filename.startswith(root):
        return filename[len(root) :].split(os.sep)[0].removesuffix(".py")
    return "stdlib:" + os.path.basename(filename).removesuffix(".py")


def short(filename: str) -> str:
    parts = filename.split(os.sep)
    if "site-packages" in parts:
        return os.sep.join(parts[parts.index("site-packages") + 1 :])
    root = str(ROOT) + os.sep
    if filename.startswith(root):
        return filename[len(root) :]
    return filename


def report_untraced(
    empty: dict[str, t.Any], full: dict[str, t.Any], n: int, types: int
) -> dict[str, t.Any]:
    def per(a: float, b: float) -> float:
        return round((b - a) / n, 1)

    record: dict[str, t.Any] = {
        "measure": "memory",
        "streams": n,
        "served": full["streams"],
        "package": full["package"],
        "rss_per_stream_b": per(empty["rss_kib"] * 1024, full["rss_kib"] * 1024),
        "blocks_per_stream": per(empty["allocated_blocks"], full["allocated_blocks"]),
        "stack_saved": {
            k: v if k != "total" else round(v / n, 1)
            for k, v in full["stack_saved"].items()
        },
    }
    if empty["malloc"] and full["malloc"]:
        record["malloc_per_stream_b"] = {
            k: per(empty["malloc"][k], full["malloc"][k]) for k in full["malloc"]
        }
    record["pymalloc_per_stream_b"] = {
        k: per(empty["pymalloc"].get(k, 0), v) for k, v in full["pymalloc"].items()
    }
    print(json.dumps(record), flush=True)
    print()
    print(f"untraced, {n} idle streams (served {full['streams']}): per stream")
    print(f"  RSS                        {record['rss_per_stream_b'] / 1024:8.2f} KiB")
    if "malloc_per_stream_b" in record:
        m = record["malloc_per_stream_b"]
        print(
            f"  glibc malloc heap {m['arena']:8.0f} B (in use {m['in_use']:.0f},"
            f" free {m['free']:.0f}), mmapped {m['hblkhd']:.0f}"
        )
    p = collections.defaultdict(float, record["pymalloc_per_stream_b"])
    print(
        f"  pymalloc total    {p['total']:8.0f} B (blocks {p['allocated']:.0f},"
        f" free blocks {p['available']:.0f}, unused pools {p['unused_pools']:.0f})"
    )
    print(f"  allocated blocks  {record['blocks_per_stream']:8.1f}")
    s = full["stack_saved"]
    print(
        f"  greenlet saved C stack: mean {s['total'] / max(full['streams'], 1):.0f} B"
        f" (min {s['min']}, median {s['median']}, max {s['max']})"
    )
    delta = collections.Counter(full["gc_objects"])
    delta.subtract(empty["gc_objects"])
    print(f"  gc-tracked objects per stream, top {types}:")
    for name, count in delta.most_common(types):
        if count / n < 0.05:
            break
        print(f"    {count / n:6.2f}  {name}")
    print("  parked stream greenlet's Python frames, innermost first:")
    for f in full["frames"]:
        mark = "gen" if f["generator"] else "   "
        print(f"    {mark} {f['function']:<40} {short(f['where'])}")
    gens = sum(1 for f in full["frames"] if f["generator"])
    print(f"    {len(full['frames'])} frames, {gens} of them generators")
    return record


def report_traced(
    snapdir: str, n: int, frames: int, lines: int, only: str | None = None
) -> dict[str, t.Any]:
    empty = tracemalloc.Snapshot.load(os.path.join(snapdir, "empty.snap"))
    full = tracemalloc.Snapshot.load(os.path.join(snapdir, "full.snap"))
    key = "traceback" if frames > 1 else "lineno"
    diff = full.compare_to(empty, key)
    by_pkg: collections.Counter[str] = collections.Counter()
    count_pkg: collections.Counter[str] = collections.Counter()
    for stat in diff:
        # Frames run from the oldest to the innermost.
        pkg = package(stat.traceback[-1].filename)
        by_pkg[pkg] += stat.size_diff
        count_pkg[pkg] += stat.count_diff
    total = sum(by_pkg.values())
    record = {
        "measure": "tracemalloc",
        "streams": n,
        "traced_per_stream_b": round(total / n, 1),
        "packages": {k: round(v / n, 1) for k, v in by_pkg.most_common()},
    }
    print(json.dumps(record), flush=True)
    print()
    print(f"tracemalloc, {n} idle streams: {total / n:.0f} B traced per stream")
    print("  by package (of the innermost frame):")
    for pkg, size in by_pkg.most_common():
        if abs(size) / n < 8:
            continue
        print(f"    {size / n:8.1f} B {count_pkg[pkg] / n:6.2f} blocks  {pkg}")
    print(f"  top {lines} lines" + (f" of {only}:" if only else ":"))
    shown = 0
    for stat in diff:
        if abs(stat.size_diff) / n < 8 or shown == lines:
            break
        if only and package(stat.traceback[-1].filename) != only:
            continue
        shown += 1
        where = " -> ".join(f"{short(f.filename)}:{f.lineno}" for f in stat.traceback)
        print(f"    {stat.size_diff / n:8.1f} B {stat.count_diff / n:6.2f}  {where}")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument(
        "--frames", type=int, default=1, help="tracemalloc frames per allocation"
    )
    parser.add_argument("--lines", type=int, default=30)
    parser.add_argument("--package", help="list the lines of this package only")
    parser.add_argument("--types", type=int, default=25)
    parser.add_argument("--no-trace", action="store_true", help="skip step 2")
    parser.add_argument("--trace-only", action="store_true", help="skip step 1")
    args = parser.parse_args(argv)
    limit = raise_nofile()
    if limit < args.streams + 200:
        parser.error(f"RLIMIT_NOFILE is {limit}: too low for {args.streams} streams")
    print(
        json.dumps({"measure": "setup", "loadavg": os.getloadavg(), "nofile": limit}),
        flush=True,
    )
    if not args.trace_only:
        empty, full = measure(args.streams, 0, None)
        report_untraced(empty, full, args.streams, args.types)
    if not args.no_trace:
        with tempfile.TemporaryDirectory(prefix="bench-memory-") as snapdir:
            measure(args.streams, args.frames, snapdir)
            report_traced(snapdir, args.streams, args.frames, args.lines, args.package)
    return 0


if __name__ == "__main__":
    sys.exit(main())
