"""Run the benchmark suite: ``python -m benchmarks`` (add
``--quick`` while developing, ``--only NAME`` for one measurement).

Each measurement starts its servers on free ports (the library's example app
under ``gunicorn -k gevent``, and the hand-written baseline of
:mod:`benchmarks.baseline`), pinned to CPU 0, drives them from an asyncio
client pinned to CPU 1, prints one JSON line and a table with the library's
figure, the baseline's and their ratio, and stops the servers by PID.
Results go to ``benchmarks/out/`` as JSON and as a Markdown summary.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import os
import re
import resource
import shlex
import statistics
import sys
import time
import typing as t
from pathlib import Path

if not __package__:  # python benchmarks/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import loadclient as lc  # noqa: E402
from benchmarks import procfs  # noqa: E402
from benchmarks import profiling  # noqa: E402
from benchmarks import report  # noqa: E402
from benchmarks import sendcost  # noqa: E402
from benchmarks import servers  # noqa: E402
from benchmarks.report import ratio  # noqa: E402
from benchmarks.report import Row  # noqa: E402
from benchmarks.report import side_by_side  # noqa: E402

MEASUREMENTS = (
    "connections",
    "fanout",
    "unbatched",
    "throughput",
    "cleanup",
    "redis",
)
KINDS = ("library", "baseline")
OUT = Path(__file__).resolve().parent / "out"


@dataclasses.dataclass
class Config:
    quick: bool
    connection_ns: tuple[int, ...] = (1000, 5000, 10000, 19500)
    fanout_ns: tuple[int, ...] = (1000, 5000, 10000)
    events: int = 50
    event_rate: float = 10.0
    rounds: int = 3
    drain: float = 30.0
    throughput_subscribers: int = 1000
    throughput_publishers: int = 4
    throughput_seconds: float = 10.0
    #: The unbatched regime: one publisher, one event in flight at a time.
    unbatched_subscribers: int = 1000
    unbatched_events: int = 300
    #: Sends per round of the bare send() micro-benchmark.
    send_count: int = 100_000
    cleanup_streams: int = 1000
    cleanup_giveup: float = 60.0
    redis_subscribers: int = 1000
    open_rate: float = 2000.0
    open_pending: int = 200
    profile: bool = False
    native: bool = False
    profile_seconds: float = 10.0

    @classmethod
    def make(cls, quick: bool, profile: bool, rounds: int | None) -> Config:
        if quick:
            cfg = cls(
                quick=True,
                connection_ns=(200, 1000),
                fanout_ns=(200, 1000),
                events=20,
                rounds=1,
                drain=10.0,
                throughput_subscribers=200,
                throughput_seconds=3.0,
                unbatched_subscribers=200,
                unbatched_events=100,
                send_count=20_000,
                cleanup_streams=200,
                cleanup_giveup=10.0,
                redis_subscribers=200,
                profile=profile,
                profile_seconds=3.0,
            )
        else:
            cfg = cls(quick=False, profile=profile)
        if rounds is not None:
            cfg.rounds = rounds
        return cfg

    def open_timeout(self, n: int) -> float:
        return 30.0 + n / 200.0


class Suite:
    def __init__(self, cfg: Config, outdir: Path) -> None:
        self.cfg = cfg
        self.outdir = outdir
        self.results: list[dict[str, t.Any]] = []
        self.tables: list[tuple[str, list[Row], tuple[str, ...] | None]] = []
        self.notes: list[str] = []
        self.profiles: dict[str, t.Any] = {}
        #: What else the machine was doing before each measurement.
        self.background: dict[str, t.Any] = {}

    # -- output ---------------------------------------------------------

    def emit(
        self,
        rec: dict[str, t.Any],
        title: str,
        rows: list[Row],
        headers: tuple[str, ...] | None = None,
    ) -> None:
        self.results.append(rec)
        self.tables.append((title, rows, headers))
        print(lc.dumps(rec), flush=True)
        print(report.table(title, rows, headers), flush=True)
        print(flush=True)

    def say(self, text: str) -> None:
        print(f"# {text}", flush=True)

    # -- helpers --------------------------------------------------------

    def start(self, kind: str, **kwargs: t.Any) -> servers.Server:
        srv = servers.start_server(kind, self.outdir, **kwargs)
        self.say(f"started {srv.label} on port {srv.port}, pid {srv.pid}")
        return srv

    async def warmup(self, srv: servers.Server) -> None:
        """A few streams and publishes, so that lazy imports and first-use
        allocations are in the idle figures."""
        col = lc.Collector()
        streams, _ = await lc.open_streams(
            srv.port, "/stream/warmup", 10, col, timeout=15
        )
        pubs = await lc.open_publishers(srv.port, 1)
        try:
            for _ in range(3):
                await pubs[0].post("/publish/warmup", lc.event_body(0, 0, time.time()))
            await wait_for(lambda: col.events >= 3 * col.primed, 5.0)
        finally:
            lc.close_all(streams)
            await asyncio.sleep(0.2)
            with contextlib.suppress(ConnectionError, asyncio.TimeoutError):
                await pubs[0].post("/publish/warmup", lc.event_body(0, 0, time.time()))
            for p in pubs:
                p.close()
        await asyncio.sleep(0.3)

    def health(self, srv: servers.Server) -> t.Any:
        try:
            return json.loads(srv.get("/healthz"))
        except (OSError, ValueError):
            return None

    # -- connections ----------------------------------------------------

    async def connections(self) -> None:
        for n in self.cfg.connection_ns:
            rec: dict[str, t.Any] = {
                "measurement": "connections",
                "n": n,
                "rounds": self.cfg.rounds,
            }
            for kind in KINDS:
                runs = [
                    await self._connections(kind, n) for _ in range(self.cfg.rounds)
                ]
                rec[kind] = _median_of(runs, worst={"served": min, "failed": max})
            lib, base = rec["library"], rec["baseline"]
            rec["ratio"] = {
                "served": ratio(lib["served"], base["served"]),
                "rss_per_stream_kb": ratio(
                    lib["rss_per_stream_kb"], base["rss_per_stream_kb"]
                ),
            }
            rows: list[Row] = [
                (
                    "streams served (first bytes)",
                    lib["served"],
                    base["served"],
                    rec["ratio"]["served"],
                ),
                ("failed", lib["failed"], base["failed"], None),
                (
                    "RSS per stream (KB)",
                    lib["rss_per_stream_kb"],
                    base["rss_per_stream_kb"],
                    rec["ratio"]["rss_per_stream_kb"],
                ),
                side_by_side("idle server RSS (MB)", lib, base, "idle_rss_mb"),
                side_by_side("RSS with streams (MB)", lib, base, "rss_mb"),
                side_by_side("open rate (streams/s)", lib, base, "open_rate"),
                (
                    "RSS per stream per round (KB)",
                    _join(lib, "rss_per_stream_kb"),
                    _join(base, "rss_per_stream_kb"),
                    None,
                ),
            ]
            title = (
                f"connections: {n:,} idle streams, median of"
                f" {self.cfg.rounds} round(s), a fresh server each"
            )
            self.emit(rec, title, rows)

    async def _connections(self, kind: str, n: int) -> dict[str, t.Any]:
        cfg = self.cfg
        srv = self.start(kind)
        streams: list[lc.StreamProto] = []
        try:
            await self.warmup(srv)
            idle = srv.rss()
            idle_each = {pid: procfs.rss_bytes(pid) for pid in srv.pids()}
            col = lc.Collector()
            streams, secs = await lc.open_streams(
                srv.port,
                "/stream/idle",
                n,
                col,
                rate=cfg.open_rate,
                max_pending=cfg.open_pending,
                timeout=cfg.open_timeout(n),
            )
            await asyncio.sleep(1.0)
            rss = srv.rss()
            each = {pid: procfs.rss_bytes(pid) for pid in srv.pids()}
            served = col.primed
            health = self.health(srv)
            # Which process grew: gunicorn's arbiter should not.
            growth_kb = (
                {
                    str(pid): round(
                        (each[pid] - idle_each.get(pid, 0)) / served / 1024, 2
                    )
                    for pid in each
                }
                if served
                else {}
            )
            return {
                "served": served,
                "failed": col.failed,
                "lost": col.lost,
                "errors": col.statuses,
                "open_seconds": round(secs, 2),
                "open_rate": round(served / secs, 1) if secs else None,
                "idle_rss_mb": round(idle / 2**20, 1),
                "rss_mb": round(rss / 2**20, 1),
                "rss_per_stream_kb": round((rss - idle) / served / 1024, 2)
                if served
                else None,
                "server_connections": health.get("connections") if health else None,
                "rss_per_stream_kb_by_pid": growth_kb,
            }
        finally:
            lc.close_all(streams)
            await asyncio.sleep(0.2)
            srv.stop()

    # -- fan-out latency ------------------------------------------------

    async def fanout(self) -> None:
        for n in self.cfg.fanout_ns:
            rec: dict[str, t.Any] = {
                "measurement": "fanout",
                "n": n,
                "events": self.cfg.events,
                "rate": self.cfg.event_rate,
                "rounds": self.cfg.rounds,
            }
            for kind in KINDS:
                profile = self.cfg.profile and kind == "library"
                profile = profile and n == max(self.cfg.fanout_ns)
                srv = self.start(kind)
                try:
                    rec[kind] = await self._latency(
                        srv, n, "fan", profile_as=f"fanout-{n}" if profile else None
                    )
                finally:
                    srv.stop()
            lib, base = rec["library"], rec["baseline"]
            rec["ratio"] = {
                k: ratio(lib[k], base[k]) for k in ("p50_ms", "p99_ms", "max_ms")
            }
            rows: list[Row] = [
                side_by_side("subscribers served", lib, base, "served"),
                ("p50 (ms)", lib["p50_ms"], base["p50_ms"], rec["ratio"]["p50_ms"]),
                ("p99 (ms)", lib["p99_ms"], base["p99_ms"], rec["ratio"]["p99_ms"]),
                ("max (ms)", lib["max_ms"], base["max_ms"], rec["ratio"]["max_ms"]),
                (
                    "completeness (min over rounds)",
                    lib["completeness"],
                    base["completeness"],
                    None,
                ),
                (
                    "p99 per round (ms)",
                    _join(lib, "p99_ms"),
                    _join(base, "p99_ms"),
                    None,
                ),
                side_by_side("publish POST p50 (ms)", lib, base, "publish_rtt_p50_ms"),
                side_by_side(
                    "server CPU (s) over all rounds", lib, base, "server_cpu_s"
                ),
            ]
            rows.append(
                (
                    "share of server CPU in the kernel (stime)",
                    lib["server_system_share"],
                    base["server_system_share"],
                    None,
                )
            )
            rows.append(
                (
                    "client CPU (s) over all rounds",
                    lib["client_cpu_s"],
                    base["client_cpu_s"],
                    None,
                )
            )
            title = (
                f"fan-out latency: {n:,} subscribers, {self.cfg.events} events at"
                f" {self.cfg.event_rate:g}/s, median of {self.cfg.rounds} round(s)"
            )
            self.emit(rec, title, rows)

    async def _latency(
        self,
        srv: servers.Server,
        n: int,
        channel: str,
        *,
        groups: int = 1,
        classify: t.Callable[
            [list[lc.StreamProto], list[lc.HttpConn]], t.Awaitable[dict[str, t.Any]]
        ]
        | None = None,
        profile_as: str | None = None,
    ) -> dict[str, t.Any]:
        """Subscribers on ``channel``, then rounds of events on schedule."""
        cfg = self.cfg
        await self.warmup(srv)
        col = lc.Collector(parse=True)
        streams: list[lc.StreamProto] = []
        pubs: list[lc.HttpConn] = []
        try:
            streams, secs = await lc.open_streams(
                srv.port,
                f"/stream/{channel}",
                n,
                col,
                rate=cfg.open_rate,
                max_pending=cfg.open_pending,
                timeout=cfg.open_timeout(n),
            )
            pubs = await lc.open_publishers(srv.port, 4)
            extra: dict[str, t.Any] = {}
            if classify is not None:
                extra = await classify(streams, pubs)
            await asyncio.sleep(0.5)
            cpu0, client0, sys0 = srv.cpu(), _client_cpu(), srv.system_cpu()
            rounds = []
            stats = lc.PublishStats()
            for r in range(1, cfg.rounds + 1):
                took = await lc.publish_schedule(
                    pubs,
                    f"/publish/{channel}",
                    cfg.events,
                    cfg.event_rate,
                    r,
                    stats,
                    groups=groups,
                )
                expected = n * cfg.events
                await wait_for(
                    lambda r=r, e=expected: col.count(r) >= e,
                    cfg.drain,  # type: ignore[misc]
                )
                values = col.take(r)
                summary = lc.latency_summary(values)
                summary["completeness"] = round(len(values) / expected, 4)
                summary["schedule_s"] = round(took, 2)
                if groups > 1:
                    summary["cross"] = lc.latency_summary(col.take(r, cross=True))
                    summary["same"] = lc.latency_summary(col.take(r, cross=False))
                rounds.append(summary)
                await asyncio.sleep(0.5)
            cpu, client = srv.cpu() - cpu0, _client_cpu() - client0
            system = srv.system_cpu() - sys0
            if profile_as is not None:
                # An extra round, not counted: py-spy perturbs what it samples.
                task = asyncio.ensure_future(
                    self._profile(srv, profile_as, cfg.events / cfg.event_rate)
                )
                await lc.publish_schedule(
                    pubs,
                    f"/publish/{channel}",
                    cfg.events,
                    cfg.event_rate,
                    cfg.rounds + 1,
                    lc.PublishStats(),
                    groups=groups,
                )
                await task
            rtts = sorted(stats.rtts)
            result: dict[str, t.Any] = {
                "served": col.primed,
                "open_seconds": round(secs, 2),
                "p50_ms": _median(rounds, "p50_ms"),
                "p99_ms": _median(rounds, "p99_ms"),
                "max_ms": _median(rounds, "max_ms"),
                "worst_max_ms": max((x["max_ms"] or 0 for x in rounds), default=None),
                "completeness": min(x["completeness"] for x in rounds)
                if rounds
                else None,
                "lost_streams": col.lost,
                "publishes_ok": stats.ok,
                "publish_errors": stats.errors,
                "publish_rtt_p50_ms": _ms(lc.percentile(rtts, 0.5)),
                "server_cpu_s": round(cpu, 2),
                "client_cpu_s": round(client, 2),
                "server_system_share": round(system / cpu, 3) if cpu else None,
                "rounds": rounds,
            }
            if groups > 1:
                for key in ("cross", "same"):
                    result[f"{key}_p50_ms"] = _median(
                        [x[key] for x in rounds], "p50_ms"
                    )
                    result[f"{key}_p99_ms"] = _median(
                        [x[key] for x in rounds], "p99_ms"
                    )
            result.update(extra)
            return result
        finally:
            lc.close_all(streams)
            for p in pubs:
                p.close()
            await asyncio.sleep(0.2)

    # -- unbatched regime and the bare send() -----------------------------

    async def unbatched(self) -> None:
        """One publisher with one event in flight: each event is written to
        each subscriber on its own, and the next one is published when every
        subscriber has it. Server CPU per delivery, next to the CPU of one
        plain ``send()`` of the same bytes."""
        cfg = self.cfg
        n = cfg.unbatched_subscribers
        rec: dict[str, t.Any] = {
            "measurement": "unbatched",
            "n": n,
            "events": cfg.unbatched_events,
            "rounds": cfg.rounds,
        }
        sample = b""
        # The bare send() runs right after each of the library's rounds, on
        # the same CPU, with the library's streams idle: the two figures of
        # a pair see the same machine, which drifts more between minutes
        # than the margin of the target.
        paced: list[dict[str, t.Any]] = []

        async def bare_send(chunk: bytes) -> None:
            paced.append(await sendcost.measure(chunk, sockets=n, sends=cfg.send_count))

        for kind in KINDS:
            srv = self.start(kind)
            try:
                library = kind == "library"
                rec[kind] = await self._unbatched(
                    srv,
                    n,
                    profile_as="unbatched" if library and cfg.profile else None,
                    after_round=bare_send if library else None,
                )
                if library:
                    sample = rec[kind].pop("sample")
                else:
                    rec[kind].pop("sample")
            finally:
                srv.stop()
        rec["send"] = await self._sendcost(sample, n, paced)
        lib, base, send = rec["library"], rec["baseline"], rec["send"]
        rec["ratio"] = {
            k: ratio(lib[k], base[k]) for k in ("us_per_delivery", "deliveries_per_s")
        }
        pairs = [
            ratio(r["us_per_delivery"], s["us_per_send"])
            for r, s in zip(lib["rounds"], send["rounds"], strict=False)
        ]
        rec["ratio"]["delivery_vs_send_rounds"] = pairs
        rec["ratio"]["delivery_vs_send"] = (
            round(statistics.median(pairs), 3) if None not in pairs else None
        )
        rec["ratio"]["delivery_vs_send_tight"] = ratio(
            lib["us_per_delivery"], send["us_per_send_tight"]
        )
        rows: list[Row] = [
            side_by_side("subscribers served", lib, base, "served"),
            side_by_side("server CPU per delivery (us)", lib, base, "us_per_delivery"),
            (
                "server CPU per delivery, per round (us)",
                _join(lib, "us_per_delivery"),
                _join(base, "us_per_delivery"),
                None,
            ),
            side_by_side("deliveries/s", lib, base, "deliveries_per_s"),
            side_by_side("events/s (one in flight)", lib, base, "events_per_s"),
            (
                "share of server CPU in the kernel (stime)",
                lib["server_system_share"],
                base["server_system_share"],
                None,
            ),
            (
                "server-CPU softirq us per delivery (not in the above)",
                lib["softirq_us_per_delivery"],
                base["softirq_us_per_delivery"],
                None,
            ),
            ("completeness", lib["completeness"], base["completeness"], None),
            (
                f"bare send() of the same {send['bytes']} bytes, one to each of"
                f" {send['sockets']:,} sockets per burst (us CPU)",
                send["us_per_send"],
                send["us_per_send"],
                None,
            ),
            (
                "bare send() per round, after each of the library's (us CPU)",
                ", ".join(f"{r['us_per_send']:g}" for r in send["rounds"]),
                None,
                None,
            ),
            (
                "server CPU per delivery / bare send(), per round",
                ", ".join(f"{x:g}" for x in pairs if x is not None),
                None,
                None,
            ),
            (
                "server CPU per delivery / bare send(), median of the rounds",
                rec["ratio"]["delivery_vs_send"],
                ratio(base["us_per_delivery"], send["us_per_send"]),
                None,
            ),
            (
                "bare send() in a tight loop over the same sockets (us CPU)",
                send["us_per_send_tight"],
                send["us_per_send_tight"],
                None,
            ),
            (
                "server CPU per delivery / tight-loop send()",
                rec["ratio"]["delivery_vs_send_tight"],
                ratio(base["us_per_delivery"], send["us_per_send_tight"]),
                None,
            ),
        ]
        title = (
            f"unbatched: {n:,} subscribers, 1 publisher, one event in flight,"
            f" {cfg.unbatched_events} events per round, median of"
            f" {cfg.rounds} round(s)"
        )
        self.emit(rec, title, rows)

    async def _unbatched(
        self,
        srv: servers.Server,
        n: int,
        path: str = "unb",
        profile_as: str | None = None,
        after_round: t.Callable[[bytes], t.Awaitable[None]] | None = None,
    ) -> dict[str, t.Any]:
        """The unbatched regime on ``srv``; ``after_round`` is awaited after
        each round with the chunk a delivery wrote, its streams open."""
        cfg = self.cfg
        await self.warmup(srv)
        col = lc.Collector()
        streams, _ = await lc.open_streams(
            srv.port,
            f"/stream/{path}",
            n,
            col,
            rate=cfg.open_rate,
            max_pending=cfg.open_pending,
            timeout=cfg.open_timeout(n),
        )
        sampler = _Sampler()
        loop = asyncio.get_running_loop()
        await loop.create_connection(lambda: sampler, "127.0.0.1", srv.port)
        sampler.transport.write(lc.stream_request(f"/stream/{path}"))  # type: ignore[union-attr]
        pubs = await lc.open_publishers(srv.port, 1)
        pub = pubs[0]
        served = col.primed
        try:
            await wait_for(lambda: sampler.chunks >= 1, 10.0)
            # Warm-up events, not counted.
            for _ in range(5):
                target = col.events + served
                await pub.post(f"/publish/{path}", lc.event_body(0, 0, time.time()))
                await col.wait_events(target, cfg.drain)
            await asyncio.sleep(0.3)
            runs = []
            for r in range(1, cfg.rounds + 1):
                start = col.events
                t0, c0, s0 = loop.time(), srv.cpu(), srv.system_cpu()
                q0 = procfs.softirq_seconds(servers.SERVER_CPU)
                complete = True
                for _ in range(cfg.unbatched_events):
                    target = col.events + served
                    status = await pub.post(
                        f"/publish/{path}", lc.event_body(r, 0, time.time())
                    )
                    if status != 202 or not await col.wait_events(target, cfg.drain):
                        got = col.events - target + served
                        self.say(
                            f"unbatched: publish {status}, {got} of {served}"
                            f" deliveries after {cfg.drain:g} s"
                        )
                        complete = False
                        break
                t1, c1, s1 = loop.time(), srv.cpu(), srv.system_cpu()
                q1 = procfs.softirq_seconds(servers.SERVER_CPU)
                got = col.events - start
                expected = served * cfg.unbatched_events
                runs.append(
                    {
                        "served": served,
                        "us_per_delivery": round((c1 - c0) / got * 1e6, 3)
                        if got
                        else None,
                        "deliveries_per_s": round(got / (t1 - t0)),
                        "events_per_s": round(got / served / (t1 - t0), 1),
                        "server_system_share": round((s1 - s0) / (c1 - c0), 3)
                        if c1 > c0
                        else None,
                        "softirq_us_per_delivery": round((q1 - q0) / got * 1e6, 3)
                        if got
                        else None,
                        "completeness": round(got / expected, 4) if complete else 0,
                        "server_cpu_s": round(c1 - c0, 3),
                    }
                )
                if after_round is not None:
                    await after_round(sampler.last_chunk)
                await asyncio.sleep(0.3)
            if profile_as is not None:
                # An extra round, not counted: py-spy perturbs what it samples.
                task = asyncio.ensure_future(self._profile(srv, profile_as))
                while not task.done():
                    target = col.events + served
                    await pub.post(f"/publish/{path}", lc.event_body(0, 0, time.time()))
                    await col.wait_events(target, cfg.drain)
                await task
            result = _median_of(runs, worst={"completeness": min})
            result["sample"] = sampler.last_chunk
            return result
        finally:
            lc.close_all(streams)
            sampler.close()
            for p in pubs:
                p.close()
            await asyncio.sleep(0.2)

    async def _sendcost(
        self, sample: bytes, n: int, paced: list[dict[str, t.Any]]
    ) -> dict[str, t.Any]:
        """The bare send() micro-benchmark on ``n`` sockets: paced like the
        unbatched fan-out (one send to each socket, then wait until the
        client has the burst: the reference, ``paced``, measured between
        the library's rounds, or now if there are none), and in a tight loop
        (where the kernel moves loopback's receiving side to ksoftirqd,
        charged to no process); a median of rounds each."""
        if not sample:
            sample = sendcost.chunk(b"data: " + b"x" * 150 + b"\n\n")
        if not paced:
            paced = [
                await sendcost.measure(sample, sockets=n, sends=self.cfg.send_count)
                for _ in range(self.cfg.rounds)
            ]
        tight = [
            await sendcost.measure(
                sample, sockets=n, sends=3 * self.cfg.send_count, paced=False
            )
            for _ in range(self.cfg.rounds)
        ]
        return {
            "bytes": len(sample),
            "sockets": n,
            "us_per_send": statistics.median(r["us_per_send"] for r in paced),
            "us_per_send_tight": statistics.median(r["us_per_send"] for r in tight),
            "rounds": paced,
            "rounds_tight": tight,
            "payload": sample.decode("latin-1"),
        }

    # -- throughput -----------------------------------------------------

    async def throughput(self) -> None:
        cfg = self.cfg
        rec: dict[str, t.Any] = {
            "measurement": "throughput",
            "n": cfg.throughput_subscribers,
            "publishers": cfg.throughput_publishers,
            "seconds": cfg.throughput_seconds,
        }
        kinds = (*KINDS, "baseline-nodelay")
        for kind in kinds:
            srv = self.start(kind)
            try:
                rec[kind] = await self._throughput(srv)
            finally:
                srv.stop()
        lib, base, nodelay = rec["library"], rec["baseline"], rec["baseline-nodelay"]
        keys = ("deliveries_per_s", "cpu_s_per_100k", "publishes_per_s")
        rec["ratio"] = {k: ratio(lib[k], base[k]) for k in keys}
        rec["ratio_vs_nodelay"] = {k: ratio(lib[k], nodelay[k]) for k in keys}
        labels = (
            ("deliveries/s", "deliveries_per_s", True),
            ("server CPU s per 100k deliveries", "cpu_s_per_100k", True),
            ("publishes/s accepted", "publishes_per_s", True),
            ("server CPU use (cores)", "server_cores", False),
            ("share of it in the kernel (stime)", "server_system_share", False),
            (
                "server-CPU softirq s per 100k (not in the above)",
                "softirq_s_per_100k",
                False,
            ),
            ("client CPU s per 100k deliveries", "client_cpu_s_per_100k", False),
            ("slowest / fastest 2 s slice (deliveries/s)", "slices", False),
            ("completeness after drain", "completeness", False),
            ("streams dropped by server", "lost_streams", False),
            ("event latency under this load, p50 (ms)", "latency_p50_ms", False),
            ("event latency under this load, p99 (ms)", "latency_p99_ms", False),
        )
        for r in (lib, base, nodelay):
            slices = r["deliveries_per_s_slices"]
            r["slices"] = f"{min(slices):,} / {max(slices):,}" if slices else None
        rows: list[Row] = [
            (
                label,
                lib[key],
                base[key],
                ratio(lib[key], base[key]) if show else None,
                nodelay[key],
                ratio(lib[key], nodelay[key]) if show else None,
            )
            for label, key, show in labels
        ]
        for label, key in (
            ("deliveries/s per round", "deliveries_per_s"),
            ("CPU s per 100k per round", "cpu_s_per_100k"),
        ):
            rows.append(
                (
                    label,
                    _join(lib, key),
                    _join(base, key),
                    None,
                    _join(nodelay, key),
                    None,
                )
            )
        headers = (
            "metric",
            "library",
            "baseline",
            "library/baseline",
            "baseline+NODELAY",
            "library/(b+NODELAY)",
        )
        title = (
            f"throughput: {cfg.throughput_subscribers:,} subscribers,"
            f" {cfg.throughput_publishers} closed-loop publishers,"
            f" {cfg.throughput_seconds:g} s, median of {cfg.rounds} round(s)"
        )
        self.emit(rec, title, rows, headers)

    async def _throughput(
        self, srv: servers.Server, path: str = "tput"
    ) -> dict[str, t.Any]:
        """Closed-loop publishers over the same subscribers, in rounds (a
        median of them is reported)."""
        cfg = self.cfg
        await self.warmup(srv)
        col = lc.Collector()
        n = cfg.throughput_subscribers
        streams, _ = await lc.open_streams(
            srv.port,
            f"/stream/{path}",
            n,
            col,
            rate=cfg.open_rate,
            max_pending=cfg.open_pending,
            timeout=cfg.open_timeout(n),
        )
        pubs = await lc.open_publishers(srv.port, cfg.throughput_publishers)
        loop = asyncio.get_running_loop()
        # Two more streams (on either worker) time the events under load.
        probes = []
        for _ in range(2):
            _, probe = await loop.create_connection(
                lambda: _LatencyProbe(f"/stream/{path}"), "127.0.0.1", srv.port
            )
            probes.append(probe)
        try:
            runs = []
            for r in range(cfg.rounds):
                last = r == cfg.rounds - 1
                runs.append(
                    await self._throughput_round(
                        srv, col, pubs, path, probes, profile=last and cfg.profile
                    )
                )
            result = _median_of(runs, worst={"completeness": min, "lost_streams": max})
            result["served"] = col.primed
            result["deliveries_per_s_slices"] = [
                x for r in runs for x in r["deliveries_per_s_slices"]
            ]
            if "profile" in runs[-1]:
                result["profile"] = runs[-1]["profile"]
            return result
        finally:
            lc.close_all(streams)
            for p in pubs:
                p.close()
            for probe in probes:
                probe.close()
            await asyncio.sleep(0.2)

    async def _throughput_round(
        self,
        srv: servers.Server,
        col: lc.Collector,
        pubs: list[lc.HttpConn],
        path: str,
        probes: list[_LatencyProbe],
        profile: bool,
    ) -> dict[str, t.Any]:
        cfg = self.cfg
        stop = asyncio.Event()
        stats = lc.PublishStats()
        events0 = col.events
        task = asyncio.ensure_future(
            lc.publish_closed_loop(pubs, f"/publish/{path}", stop, stats)
        )
        try:
            await asyncio.sleep(1.0)
            loop = asyncio.get_running_loop()

            def sample() -> tuple[float, ...]:
                return (
                    loop.time(),
                    col.events,
                    stats.ok,
                    srv.cpu(),
                    _client_cpu(),
                    procfs.softirq_seconds(servers.SERVER_CPU),
                    srv.system_cpu(),
                )

            # The window in slices, to show how steady the rate was.
            samples = [sample()]
            for probe in probes:
                probe.latencies = []
                probe.recording = True
            slices = max(1, round(cfg.throughput_seconds / 2))
            for _ in range(slices):
                await asyncio.sleep(cfg.throughput_seconds / slices)
                samples.append(sample())
            for probe in probes:
                probe.recording = False
            latency = lc.latency_summary([x for p in probes for x in p.latencies])
            t0, e0, p0, c0, k0, q0, s0 = samples[0]
            t1, e1, p1, c1, k1, q1, s1 = samples[-1]
            rates = [
                (b[1] - a[1]) / (b[0] - a[0])
                for a, b in zip(samples, samples[1:], strict=False)
            ]
            prof = None
            if profile and srv.kind in KINDS:
                what = "throughput" if path == "tput" else f"throughput-{path}"
                prof = await self._profile(srv, what)
            stop.set()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(task, 30.0)
            expected = events0 + stats.ok * col.primed
            await col.wait_events(expected, cfg.drain)
            dt, de = t1 - t0, e1 - e0
            result: dict[str, t.Any] = {
                "deliveries_per_s": round(de / dt, 1),
                "cpu_s_per_100k": round((c1 - c0) / de * 1e5, 3) if de else None,
                "publishes_per_s": round((p1 - p0) / dt, 1),
                "server_cores": round((c1 - c0) / dt, 2),
                "server_system_share": round((s1 - s0) / (c1 - c0), 3)
                if c1 > c0
                else None,
                "client_cpu_s_per_100k": round((k1 - k0) / de * 1e5, 3) if de else None,
                "softirq_s_per_100k": round((q1 - q0) / de * 1e5, 3) if de else None,
                "deliveries_per_s_slices": [round(r) for r in rates],
                "completeness": round((col.events - events0) / (expected - events0), 4)
                if expected > events0
                else None,
                "lost_streams": col.lost,
                "publish_errors": stats.errors,
                "latency_p50_ms": latency["p50_ms"],
                "latency_p99_ms": latency["p99_ms"],
            }
            if prof is not None:
                result["profile"] = prof
            return result
        finally:
            stop.set()
            task.cancel()
            await asyncio.sleep(0.5)

    async def _profile(
        self, srv: servers.Server, what: str, seconds: float | None = None
    ) -> dict[str, t.Any]:
        pid = srv.worker_pids()[0]
        seconds = seconds or self.cfg.profile_seconds
        path = self.outdir / f"profile-{srv.kind}-{what}.speedscope.json"
        self.say(f"py-spy on {srv.kind} pid {pid} for {seconds:g} s")
        error = await profiling.record(pid, seconds, path, native=self.cfg.native)
        if error is not None:
            self.say(f"profile failed: {error}")
            return {"error": error}
        summary = profiling.summarise(path)
        text = profiling.format_summary(
            summary, f"profile of {srv.label} during {what}"
        )
        print(text, flush=True)
        (self.outdir / f"profile-{srv.kind}-{what}.txt").write_text(text + "\n")
        self.profiles[f"{srv.kind}-{what}"] = {"file": str(path), **summary}
        return {
            "file": str(path),
            "samples": summary["samples"],
            "own_top": summary["own"][:10],
        }

    # -- cleanup --------------------------------------------------------

    async def cleanup(self) -> None:
        cfg = self.cfg
        rec: dict[str, t.Any] = {"measurement": "cleanup", "n": cfg.cleanup_streams}
        for kind in KINDS:
            srv = self.start(kind)
            try:
                rec[kind] = await self._cleanup(srv)
            finally:
                srv.stop()
        lib, base = rec["library"], rec["baseline"]
        rec["ratio"] = {"seconds": ratio(lib["seconds"], base["seconds"])}

        def shown(r: dict[str, t.Any]) -> t.Any:
            return f"> {r['giveup_s']:g}" if r["gave_up"] else r["seconds"]

        r = rec["ratio"]["seconds"]
        if base["gave_up"] and not lib["gave_up"]:
            r = f"< {ratio(lib['seconds'], base['giveup_s'])}"
        rows: list[Row] = [
            ("streams open", lib["streams"], base["streams"], None),
            (
                "server sockets idle / with streams",
                f"{lib['sockets_idle']} / {lib['sockets_open']}",
                f"{base['sockets_idle']} / {base['sockets_open']}",
                None,
            ),
            ("seconds until sockets back to idle", shown(lib), shown(base), r),
            (
                "sockets still open at the end",
                lib["sockets_left"],
                base["sockets_left"],
                None,
            ),
        ]
        self.emit(
            rec, f"cleanup: {cfg.cleanup_streams:,} idle streams closed with RST", rows
        )

    async def _cleanup(self, srv: servers.Server) -> dict[str, t.Any]:
        cfg = self.cfg
        await self.warmup(srv)
        await asyncio.sleep(0.5)
        pids = srv.pids()
        idle = procfs.socket_count(pids)
        col = lc.Collector()
        streams, _ = await lc.open_streams(
            srv.port,
            "/stream/idle-cleanup",
            cfg.cleanup_streams,
            col,
            rate=cfg.open_rate,
            max_pending=cfg.open_pending,
            timeout=cfg.open_timeout(cfg.cleanup_streams),
        )
        await asyncio.sleep(0.5)
        opened = procfs.socket_count(pids)
        loop = asyncio.get_running_loop()
        start = loop.time()
        lc.close_all(streams)
        seconds = None
        count = opened
        for _ in range(int(cfg.cleanup_giveup / 0.01) + 10):
            await asyncio.sleep(0.01)
            count = procfs.socket_count(pids)
            elapsed = loop.time() - start
            if count <= idle:
                seconds = round(elapsed, 3)
                break
            if elapsed >= cfg.cleanup_giveup:
                break
        return {
            "streams": col.primed,
            "sockets_idle": idle,
            "sockets_open": opened,
            "seconds": seconds,
            "gave_up": seconds is None,
            "giveup_s": cfg.cleanup_giveup,
            "sockets_left": count - idle,
        }

    # -- Redis ----------------------------------------------------------

    async def redis(self) -> None:
        cfg = self.cfg
        n = cfg.redis_subscribers
        rec: dict[str, t.Any] = {"measurement": "redis", "n": n, "workers": 2}
        redis = servers.start_redis(self.outdir)
        if redis is None:
            self._redis_unavailable(rec, "no redis-server binary on PATH")
            return
        try:
            self.say(f"started redis-server on port {redis.port}")
            try:
                srv = self.start("library", workers=2, redis_url=redis.url)
            except RuntimeError as e:
                text = str(e)
                reason = "the library did not start with EVENTSTREAM_REDIS_URL"
                if "NotImplementedError" in text:
                    reason = (
                        "Redis backend not implemented yet"
                        " (the placeholder raises NotImplementedError)"
                    )
                self._redis_unavailable(rec, reason, text.splitlines()[-3:])
                return
            try:
                rec["library"] = await self._latency(
                    srv, n, "rfan", groups=2, classify=self._classifier(srv, redis)
                )
                self.say("Redis: server CPU per delivery, both regimes")
                rec["cpu"] = await self._redis_cpu(srv, redis)
            finally:
                srv.stop()
        finally:
            redis.stop()
        await self._memory_cpu(rec)
        memory = self._memory_p99(n)
        if memory is None:
            self.say("no in-memory fan-out figure at this N in this run: measuring one")
            srv = self.start("library")
            try:
                memory = (await self._latency(srv, n, "fan"))["p99_ms"]
            finally:
                srv.stop()
        lib = rec["library"]
        rec["available"] = True
        rec["memory_p99_ms"] = memory
        rec["ratio"] = {
            "cross_p99_vs_memory_p99": ratio(lib["cross_p99_ms"], memory),
            "p99_vs_memory_p99": ratio(lib["p99_ms"], memory),
        }
        per_worker = lib["redis_connections_per_worker"]
        headers = ("metric", "library -w 2 + Redis", "library -w 1 memory", "ratio")
        rows: list[Row] = [
            (
                "subscribers served (per worker)",
                f"{lib['served']} ({', '.join(map(str, lib['streams_per_worker']))})",
                None,
                None,
            ),
            (
                "Redis connections per worker",
                ", ".join(map(str, per_worker)),
                None,
                None,
            ),
            ("Redis clients in CLIENT LIST", lib["redis_clients_total"], None, None),
            ("cross-worker p50 (ms)", lib["cross_p50_ms"], None, None),
            (
                "cross-worker p99 (ms)",
                lib["cross_p99_ms"],
                memory,
                rec["ratio"]["cross_p99_vs_memory_p99"],
            ),
            (
                "same-worker p99 (ms)",
                lib["same_p99_ms"],
                memory,
                ratio(lib["same_p99_ms"], memory),
            ),
            ("all p99 (ms)", lib["p99_ms"], memory, rec["ratio"]["p99_vs_memory_p99"]),
            ("completeness", lib["completeness"], None, None),
        ]
        cpu = rec["cpu"]
        for label, key, unit in (
            ("unbatched", "us_per_delivery", "us"),
            ("4 publishers", "cpu_s_per_100k", "s per 100k"),
        ):
            regime = "unbatched" if key == "us_per_delivery" else "throughput"
            mine, mem = cpu[regime].get(key), cpu["memory"][regime].get(key)
            rows.append(
                (
                    f"server CPU per delivery, {label} ({unit})",
                    mine,
                    mem,
                    ratio(mine, mem),
                )
            )
        rows.append(
            (
                "redis-server CPU per delivery, unbatched (us)",
                cpu["unbatched"].get("redis_us_per_delivery"),
                None,
                None,
            )
        )
        for label, key in (
            ("deliveries/s, 4 publishers", "deliveries_per_s"),
            ("event latency p50, 4 publishers (ms)", "latency_p50_ms"),
            ("event latency p99, 4 publishers (ms)", "latency_p99_ms"),
        ):
            mine = cpu["throughput"].get(key)
            mem = cpu["memory"]["throughput"].get(key)
            rows.append((label, mine, mem, ratio(mine, mem)))
        rec["ratio"]["cpu_per_delivery_throughput"] = ratio(
            cpu["throughput"].get("cpu_s_per_100k"),
            cpu["memory"]["throughput"].get("cpu_s_per_100k"),
        )
        rec["ratio"]["cpu_per_delivery_unbatched"] = ratio(
            cpu["unbatched"].get("us_per_delivery"),
            cpu["memory"]["unbatched"].get("us_per_delivery"),
        )
        self.emit(rec, f"Redis: {n:,} streams on 2 workers", rows, headers)

    async def _redis_cpu(
        self, srv: servers.Server, redis: servers.RedisServer
    ) -> dict[str, t.Any]:
        """Server CPU per delivery on the Redis server, in both regimes, with
        redis-server's own CPU beside it."""
        cfg = self.cfg
        r0 = procfs.cpu_seconds(redis.proc.pid)
        unbatched = await self._unbatched(srv, cfg.unbatched_subscribers, "runb")
        used = procfs.cpu_seconds(redis.proc.pid) - r0
        unbatched.pop("sample", None)
        # Warm-up events included: an upper bound.
        deliveries = cfg.rounds * cfg.unbatched_events * unbatched["served"]
        unbatched["redis_us_per_delivery"] = (
            round(used / deliveries * 1e6, 3) if deliveries else None
        )
        throughput = await self._throughput(srv, "rtput")
        return {"unbatched": unbatched, "throughput": throughput}

    async def _memory_cpu(self, rec: dict[str, t.Any]) -> None:
        """The in-memory single worker's figures of this run for the same
        regimes (measured now if the run did not include them)."""
        memory: dict[str, t.Any] = {}
        for regime in ("unbatched", "throughput"):
            found = next(
                (r for r in self.results if r.get("measurement") == regime), None
            )
            if found is not None and "library" in found:
                memory[regime] = found["library"]
                continue
            self.say(f"no in-memory {regime} figure in this run: measuring one")
            srv = self.start("library")
            try:
                if regime == "unbatched":
                    res = await self._unbatched(srv, self.cfg.unbatched_subscribers)
                    res.pop("sample", None)
                else:
                    res = await self._throughput(srv)
            finally:
                srv.stop()
            memory[regime] = res
        rec.setdefault("cpu", {})["memory"] = memory

    def _redis_unavailable(
        self, rec: dict[str, t.Any], reason: str, detail: list[str] | None = None
    ) -> None:
        rec["available"] = False
        rec["reason"] = reason
        if detail:
            rec["detail"] = detail
        self.results.append(rec)
        print(lc.dumps(rec), flush=True)
        print(f"Redis: not available: {reason}\n", flush=True)
        self.notes.append(f"Redis measurement not available: {reason}.")

    def _memory_p99(self, n: int) -> float | None:
        for rec in self.results:
            if rec.get("measurement") == "fanout" and rec.get("n") == n:
                return t.cast(float, rec["library"]["p99_ms"])
        return None

    def _classifier(
        self, srv: servers.Server, redis: servers.RedisServer
    ) -> t.Callable[
        [list[lc.StreamProto], list[lc.HttpConn]], t.Awaitable[dict[str, t.Any]]
    ]:
        async def classify(
            streams: list[lc.StreamProto], pubs: list[lc.HttpConn]
        ) -> dict[str, t.Any]:
            workers = srv.worker_pids()
            # Publisher connections on each worker: open more until both have one.
            for _ in range(16):
                owner = _owners(workers, srv.port)
                for p in pubs:
                    p.group = (
                        workers.index(owner[p.local_port])
                        if p.local_port in owner
                        else 0
                    )
                if len({p.group for p in pubs}) >= len(workers):
                    break
                pubs.extend(await lc.open_publishers(srv.port, 1))
            owner = _owners(workers, srv.port)
            per_worker = [0] * len(workers)
            for s in streams:
                pid = owner.get(s.local_port)
                if pid is not None:
                    index = workers.index(pid)
                    s.group = str(index).encode()
                    per_worker[index] += 1
            table = procfs.tcp_table()
            redis_conns = []
            for pid in workers:
                inodes = procfs.socket_inodes(pid)
                redis_conns.append(
                    sum(1 for i in inodes if table.get(i, (0, 0))[1] == redis.port)
                )
            clients = redis.client_list()
            return {
                "worker_pids": workers,
                "streams_per_worker": per_worker,
                "publishers_per_worker": [
                    sum(1 for p in pubs if p.group == i) for i in range(len(workers))
                ],
                "redis_connections_per_worker": redis_conns,
                "redis_connections_per_worker_max": max(redis_conns, default=0),
                "redis_clients_total": len(clients) - 1,
            }

        return classify

    # -- driver ---------------------------------------------------------

    async def run(self, names: list[str]) -> None:
        for name in names:
            started = time.monotonic()
            busy = await background()
            self.background[name] = {"load_average": _load(), "cpu_busy": busy}
            self.say(
                f"measurement {name} ({'quick' if self.cfg.quick else 'full'});"
                f" before it, CPUs busy with other work: {_busy(busy)};"
                f" load average {_load()}"
            )
            try:
                await getattr(self, name)()
            except Exception as e:  # keep going: report what failed
                self.say(f"measurement {name} FAILED: {type(e).__name__}: {e}")
                self.results.append(
                    {"measurement": name, "error": f"{type(e).__name__}: {e}"}
                )
                self.notes.append(f"{name} failed: {type(e).__name__}: {e}")
            took = time.monotonic() - started
            self.say(f"{name} took {took:.0f} s; load average {_load()}")


def _owners(workers: list[int], port: int) -> dict[int, int]:
    """``{client port: worker pid}`` for connections to ``port``."""
    table = procfs.tcp_table()
    owner = {}
    for pid in workers:
        for inode in procfs.socket_inodes(pid):
            local, remote = table.get(inode, (0, 0))
            if local == port:
                owner[remote] = pid
    return owner


class _LatencyProbe(asyncio.Protocol):
    """A stream that reads the publish time out of each event it gets, while
    :attr:`recording`: end-to-end latency (publisher's send to this
    client's receipt) under load."""

    _SENT = re.compile(rb'"t": ?([0-9.e+-]+)')

    def __init__(self, path: str) -> None:
        self.request = lc.stream_request(path)
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.recording = False
        self.latencies: list[float] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = t.cast(asyncio.Transport, transport)
        lc._rst_on_close(transport)
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        end = buf.rfind(b"\n\n")
        if end < 0:
            self.buf = buf[-65536:]
            return
        self.buf = buf[end + 2 :]
        if self.recording:
            now = time.time()
            self.latencies += [now - float(m) for m in self._SENT.findall(buf, 0, end)]

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class _Sampler(lc.StreamProto):
    """A stream that keeps the raw bytes of its last write: the chunk a
    delivery puts on the wire, for the send() micro-benchmark."""

    def __init__(self) -> None:
        super().__init__(lc.Collector(), b"", lambda: None)
        self.raw = b""
        self.chunks = 0
        self.last_chunk = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = t.cast(asyncio.Transport, transport)
        lc._rst_on_close(transport)

    def data_received(self, data: bytes) -> None:
        raw = self.raw + data
        if not self.open:
            end = raw.find(b"\r\n\r\n")
            if end < 0:
                self.raw = raw[-65536:]
                return
            self.open = True
            raw = raw[end + 4 :]
        # Whole chunks: "<hex size>\r\n<data>\r\n".
        while True:
            line = raw.find(b"\r\n")
            if line < 0:
                break
            try:
                size = int(raw[:line], 16)
            except ValueError:
                break
            end = line + 2 + size + 2
            if len(raw) < end:
                break
            self.last_chunk = raw[:end]
            self.chunks += 1
            raw = raw[end:]
        self.raw = raw


async def background(seconds: float = 1.0) -> dict[str, float]:
    """Share of each CPU busy over ``seconds`` while the suite is idle."""
    before = procfs.cpu_ticks()
    await asyncio.sleep(seconds)
    return procfs.busy_fraction(before, procfs.cpu_ticks())


def _busy(busy: dict[str, float]) -> str:
    return ", ".join(f"{cpu} {share:.0%}" for cpu, share in busy.items())


def _client_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


def _median(rows: list[dict[str, t.Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return round(statistics.median(values), 2) if values else None


def _median_of(
    runs: list[dict[str, t.Any]],
    worst: dict[str, t.Callable[[list[t.Any]], t.Any]] | None = None,
) -> dict[str, t.Any]:
    """One record from several rounds: the median of every number (``worst``
    names keys reduced otherwise, e.g. ``min`` of streams served), the first
    round's value of anything else, and the rounds under ``rounds``."""
    worst = worst or {}
    out: dict[str, t.Any] = {}
    for key, first in runs[0].items():
        values = [r.get(key) for r in runs]
        if key in worst:
            present = [v for v in values if v is not None]
            out[key] = worst[key](present) if present else None
        elif all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
        ):
            m = statistics.median(values)
            out[key] = round(m, 3) if isinstance(m, float) else m
        else:
            out[key] = first
    out["rounds"] = [
        {k: v for k, v in r.items() if k not in ("rounds", "profile")} for r in runs
    ]
    return out


def _join(rec: dict[str, t.Any], key: str) -> str:
    return " / ".join(report.fmt(r[key]) for r in rec.get("rounds", []))


async def wait_for(predicate: t.Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="smaller N, shorter runs")
    parser.add_argument(
        "--only",
        action="append",
        choices=MEASUREMENTS,
        help="run only this measurement (repeatable)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the servers (throughput, largest fan-out)",
    )
    parser.add_argument(
        "--native",
        action="store_true",
        help="with --profile: include C frames (GC, gevent, libc); pauses the server",
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="latency rounds (median reported)"
    )
    parser.add_argument("--out", type=Path, default=OUT, help="output directory")
    args = parser.parse_args(argv)

    cfg = Config.make(args.quick, args.profile or args.native, args.rounds)
    cfg.native = args.native
    outdir: Path = args.out
    outdir.mkdir(parents=True, exist_ok=True)
    names = [m for m in MEASUREMENTS if not args.only or m in args.only]
    nofile = servers.raise_nofile()
    ncpu = os.cpu_count() or 1
    if ncpu > 1:
        os.sched_setaffinity(0, {servers.CLIENT_CPU})
    suite = Suite(cfg, outdir)
    if ncpu < 2:
        suite.notes.append(
            "Fewer than 2 CPUs: server and client were not pinned apart."
        )
    if nofile < max(cfg.connection_ns) + 1000:
        suite.notes.append(f"RLIMIT_NOFILE is only {nofile}.")
    root = str(servers.ROOT)
    env = report.environment(root)
    command = "python -m benchmarks " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    load = {"start": _load()}
    loop = lc.new_event_loop()
    suite.say(
        f"{command.strip()}: {', '.join(names)}; client loop {lc.loop_name(loop)},"
        f" RLIMIT_NOFILE {nofile}, load average {load['start']}"
    )
    started = time.monotonic()
    try:
        loop.run_until_complete(suite.run(names))
    finally:
        loop.close()
    load["end"] = _load()
    elapsed = time.monotonic() - started
    suite.notes.append(
        f"Total run time {elapsed:.0f} s. Load averages include any other work"
        " on the machine; figures from a shared machine are noisy, and latency"
        " differences under 2x between single runs are noise."
    )
    n = {
        "fanout_small": cfg.fanout_ns[0],
        "fanout_large": cfg.fanout_ns[-1],
        "connections_max": max(cfg.connection_ns),
    }
    target_rows = report.targets(suite.results, n)
    if cfg.quick:
        suite.notes.append(
            "Quick mode: smaller N and shorter runs than the targets assume;"
            " the target rows are indicative only."
        )
    print(
        report.table(
            "targets",
            target_rows,
            ("target", "measured", "status", "unit / note"),
        )
    )
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    mode = "quick" if cfg.quick else "full"
    if args.only:
        # A partial run must not replace latest-<mode> of a complete one.
        mode += "-only-" + "-".join(names)
    payload = {
        "environment": env,
        "command": command.strip(),
        "mode": mode,
        "config": dataclasses.asdict(cfg),
        "load_average": load,
        "background": suite.background,
        "elapsed_s": round(elapsed, 1),
        "results": suite.results,
        "targets": [list(r) for r in target_rows],
        "profiles": suite.profiles,
        "notes": suite.notes,
    }
    json_path = outdir / f"results-{mode}-{stamp}.json"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    for name, bg in suite.background.items():
        suite.notes.append(
            f"Before {name}: CPUs busy with other work {_busy(bg['cpu_busy'])},"
            f" load average {bg['load_average']}."
        )
    md = report.markdown(
        env,
        command.strip(),
        suite.results,
        suite.tables,
        target_rows,
        load,
        suite.notes,
    )
    md_path = outdir / f"summary-{mode}-{stamp}.md"
    md_path.write_text(md)
    (outdir / f"latest-{mode}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (outdir / f"latest-{mode}.md").write_text(md)
    print(f"\nwrote {json_path} and {md_path} in {elapsed:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
