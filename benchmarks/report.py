"""Readable tables, the performance targets, and the Markdown summary."""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
import typing as t
from pathlib import Path

__all__ = ["environment", "markdown", "ratio", "table", "targets"]

Row = tuple[t.Any, ...]


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b`` rounded, or ``None`` when either is missing or ``b`` is 0."""
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def side_by_side(
    label: str, lib: t.Mapping[str, t.Any], base: t.Mapping[str, t.Any], key: str
) -> Row:
    """A table row: ``key`` of the library, of the baseline, and their ratio."""
    return (label, lib[key], base[key], ratio(lib[key], base[key]))


def fmt(value: t.Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(title: str, rows: list[Row], headers: tuple[str, ...] | None = None) -> str:
    headers = headers or ("metric", "library", "baseline", "library/baseline")
    cells = [list(headers)] + [[fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [title]
    for i, row in enumerate(cells):
        lines.append(
            "  "
            + "  ".join(
                c.ljust(w) if j == 0 else c.rjust(w)
                for j, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if i == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def md_table(rows: list[Row], headers: tuple[str, ...] | None = None) -> str:
    headers = headers or ("metric", "library", "baseline", "library/baseline")
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        out.append("| " + " | ".join(fmt(c) for c in row) + " |")
    return "\n".join(out)


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def _redis_version() -> str | None:
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for part in out.split():
        if part.startswith("v="):
            return part[2:]
    return out.strip() or None


def _git_commit(root: str) -> str | None:
    # Read-only: rev-parse does not touch the index.
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def _fingerprint(root: str) -> str:
    """A hash of the package and example app sources as they are on disk:
    the tree may differ from the commit while work is in progress."""
    digest = hashlib.sha256()
    base = Path(root)
    for path in sorted(
        [*base.glob("flask_eventstream/**/*.py"), *base.glob("example_app/*.py")]
    ):
        digest.update(str(path.relative_to(base)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def environment(root: str) -> dict[str, t.Any]:
    uname = platform.uname()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "commit": _git_commit(root),
        "sources": _fingerprint(root),
        "machine": {
            "nproc": os.cpu_count(),
            "cpu_model": _cpu_model(),
            "kernel": uname.release,
            "memory_gb": _mem_total_gb(),
        },
        "versions": {
            "python": platform.python_version(),
            "flask-eventstream": _version("flask-eventstream"),
            "flask": _version("flask"),
            "werkzeug": _version("werkzeug"),
            "gevent": _version("gevent"),
            "greenlet": _version("greenlet"),
            "gunicorn": _version("gunicorn"),
            "blinker": _version("blinker"),
            "redis-py": _version("redis"),
            "redis-server": _redis_version(),
            "uvloop": _version("uvloop"),
        },
    }


# -- targets ---------------------------------------------------------------


def _find(results: list[dict[str, t.Any]], name: str, **match: t.Any) -> t.Any:
    for rec in results:
        if rec.get("measurement") == name and all(
            rec.get(k) == v for k, v in match.items()
        ):
            return rec
    return None


def _get(rec: t.Any, *path: str) -> t.Any:
    for key in path:
        if not isinstance(rec, dict):
            return None
        rec = rec.get(key)
    return rec


def _check(value: t.Any, ok: t.Callable[[t.Any], bool]) -> str:
    if value is None:
        return "not measured"
    return "met" if ok(value) else "NOT MET"


def targets(results: list[dict[str, t.Any]], n: dict[str, int]) -> list[Row]:
    """``(target, measured, status, note)`` rows: the performance targets,
    then the figures that must not regress."""
    rows: list[Row] = []
    ub = _find(results, "unbatched")
    r = _get(ub, "ratio", "delivery_vs_send")
    note = "x"
    if ub is not None:
        note = (
            "x, median of the rounds' ratios (each round followed by a bare"
            f" send()): {fmt(_get(ub, 'library', 'us_per_delivery'))} us per"
            f" delivery, {fmt(_get(ub, 'send', 'us_per_send'))} us per bare"
            " send() (medians)"
        )
    rows.append(
        (
            "server CPU per unbatched delivery <= 1.5x one bare send()",
            r,
            _check(r, lambda v: v <= 1.5),
            note,
        )
    )
    tp = _find(results, "throughput")
    r = _get(tp, "ratio", "deliveries_per_s")
    rows.append(
        (
            "deliveries/s with 4 publishers >= 3x baseline",
            r,
            _check(r, lambda v: v >= 3),
            "x",
        )
    )
    r = _get(tp, "ratio", "cpu_s_per_100k")
    rows.append(
        (
            "server CPU per 100k deliveries <= 0.3x baseline",
            r,
            _check(r, lambda v: v <= 0.3),
            "x",
        )
    )
    for size, limit in ((1000, 20.0), (5000, 150.0), (10000, 500.0)):
        fo = _find(results, "fanout", n=size)
        v = _get(fo, "library", "p99_ms")
        rows.append(
            (
                f"fan-out p99 <= {limit:g} ms at {size:,}",
                v,
                _check(v, lambda x, lim=limit: x <= lim),
                "ms",
            )
        )
        c = _get(fo, "library", "completeness")
        rows.append(
            (
                f"fan-out completeness 1.0 at {size:,}",
                c,
                _check(c, lambda x: x == 1.0),
                "",
            )
        )
    for size in (10000, n["connections_max"]):
        co = _find(results, "connections", n=size)
        kb = _get(co, "library", "rss_per_stream_kb")
        rows.append(
            (
                f"RSS per idle stream <= 12 KB at {size:,}",
                kb,
                _check(kb, lambda v: v <= 12),
                "KB",
            )
        )
    co = _find(results, "connections", n=n["connections_max"])
    served = _get(co, "library", "served")
    rows.append(
        (
            f"{n['connections_max']:,} streams served by one worker",
            served,
            _check(served, lambda v: v >= n["connections_max"]),
            "streams (lowest of the rounds)",
        )
    )
    rd = _find(results, "redis")
    available = rd is not None and rd.get("available")
    reason = _get(rd, "reason") or "not run"
    if available:
        v = _get(rd, "ratio", "cpu_per_delivery_throughput")
        rows.append(
            (
                "Redis -w 2: server CPU per delivery <= 1.2x one in-memory worker"
                " (4 publishers)",
                v,
                _check(v, lambda x: x <= 1.2),
                "x",
            )
        )
        v = _get(rd, "ratio", "cpu_per_delivery_unbatched")
        rows.append(
            (
                "the same, unbatched (shown, not a target)",
                v,
                "-" if v is not None else "not measured",
                "x",
            )
        )
    else:
        rows.append(
            (
                "Redis -w 2: server CPU per delivery <= 1.2x one in-memory worker",
                None,
                "not available",
                reason,
            )
        )
    # Must not regress.
    cl = _find(results, "cleanup")
    s = _get(cl, "library", "seconds")
    if cl is not None and _get(cl, "library", "gave_up"):
        rows.append(
            (
                "cleanup of 1,000 RST'd idle streams <= 0.25 s",
                "> " + fmt(_get(cl, "library", "giveup_s")),
                "NOT MET",
                "s",
            )
        )
    else:
        rows.append(
            (
                "cleanup of 1,000 RST'd idle streams <= 0.25 s",
                s,
                _check(s, lambda v: v <= 0.25),
                "s",
            )
        )
    if available:
        v = _get(rd, "library", "redis_connections_per_worker_max")
        rows.append(
            ("Redis connections per worker <= 3", v, _check(v, lambda x: x <= 3), "")
        )
        v = _get(rd, "ratio", "cross_p99_vs_memory_p99")
        rows.append(
            (
                "cross-worker p99 <= 2x in-memory p99",
                v,
                _check(v, lambda x: x <= 2),
                "x",
            )
        )
    else:
        rows.append(
            ("Redis connections per worker <= 3", None, "not available", reason)
        )
        rows.append(
            ("cross-worker p99 <= 2x in-memory p99", None, "not available", reason)
        )
    return rows


def markdown(
    env: dict[str, t.Any],
    command: str,
    results: list[dict[str, t.Any]],
    tables: list[tuple[str, list[Row], tuple[str, ...] | None]],
    target_rows: list[Row],
    load: dict[str, t.Any],
    notes: list[str],
) -> str:
    m = env["machine"]
    v = env["versions"]
    lines = [
        f"## Benchmark run {env['date']}",
        "",
        f"- Command: `{command}`",
        f"- Commit: {env['commit'] or 'unknown'} (sources on disk: sha256"
        f" {env['sources']} of flask_eventstream/ and example_app/)",
        f"- Machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['memory_gb']} GB,"
        f" Linux {m['kernel']}",
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
        f"- Load average (1/5/15 min) at start: {load.get('start')},"
        f" at end: {load.get('end')}",
        "- Server pinned to CPU 0, load client (and redis-server) to CPU 1"
        " with taskset.",
        "",
        "### Targets",
        "",
        md_table(target_rows, ("target", "measured", "status", "unit / note")),
        "",
    ]
    for title, rows, headers in tables:
        lines += [f"### {title}", "", md_table(rows, headers), ""]
    if notes:
        lines += ["### Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)
