"""What ``GET /memory`` of :mod:`benchmarks.app` reports, read inside the
worker: see :mod:`benchmarks.memory`.

Nothing here changes the worker's state but a full garbage collection (run
first, so that the figures count live objects only).
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import gc
import os
import re
import sys
import tempfile
import tracemalloc
import typing as t

__all__ = ["probe"]

_CO_GENERATOR = 0x20


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _mallinfo() -> dict[str, int] | None:
    """glibc's ``mallinfo2()``: bytes the C allocator holds (``arena``: its
    heap; ``hblkhd``: mmapped blocks), of which in use (``uordblks``) and
    free (``fordblks``). ``None`` without glibc 2.33+."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        func = libc.mallinfo2
    except (OSError, AttributeError, TypeError):
        return None
    func.restype = _MallInfo2
    info = func()
    return {
        "arena": info.arena,
        "hblkhd": info.hblkhd,
        "in_use": info.uordblks,
        "free": info.fordblks,
    }


_PYMALLOC_KEYS = {
    "# arenas allocated current": "arenas",
    "# bytes in allocated blocks": "allocated",
    "# bytes in available blocks": "available",
    "pools": "unused_pools",
    "# bytes lost to pool headers": "pool_headers",
    "# bytes lost to quantization": "quantization",
    "# bytes lost to arena alignment": "arena_alignment",
    "Total": "total",
}


def _pymalloc() -> dict[str, int]:
    """pymalloc's own accounts (``sys._debugmallocstats``, which writes to
    the C ``stderr``): bytes in arenas, in live blocks, in free blocks."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        f.seek(0)
        text = f.read().decode("ascii", "replace")
    out: dict[str, int] = {}
    for line in text.splitlines():
        m = re.match(r"(.+?)\s*=\s*([\d,]+)\s*$", line)
        if m is None:
            # "N unused pools * 16384 bytes = X"
            m = re.match(r"\d+ unused (pools) \* \d+ bytes\s*=\s*([\d,]+)", line)
            if m is None:
                continue
        key = _PYMALLOC_KEYS.get(m.group(1).strip())
        if key is not None and key not in out:  # not the arena map's Total
            out[key] = int(m.group(2).replace(",", ""))
    return out


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _frames(task: t.Any) -> list[dict[str, t.Any]]:
    """The Python frames of a parked greenlet, innermost first."""
    frames = []
    frame = getattr(task, "gr_frame", None)
    while frame is not None:
        code = frame.f_code
        frames.append(
            {
                "where": f"{code.co_filename}:{frame.f_lineno}",
                "function": code.co_qualname,
                "generator": bool(code.co_flags & _CO_GENERATOR),
            }
        )
        frame = frame.f_back
    return frames


def probe(app: t.Any, snapshot: str | None = None) -> dict[str, t.Any]:
    from flask_eventstream._state import state_for

    gc.collect()
    types = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
    state = state_for(app)
    tasks = [conn.task for conn in list(state.live) if conn.task is not None]
    saved = sorted(getattr(task, "_stack_saved", 0) for task in tasks)
    import flask_eventstream

    out: dict[str, t.Any] = {
        "pid": os.getpid(),
        "package": os.path.dirname(flask_eventstream.__file__),
        "rss_kib": _rss_kib(),
        "malloc": _mallinfo(),
        "pymalloc": _pymalloc(),
        "allocated_blocks": sys.getallocatedblocks(),
        "gc_objects": dict(types),
        "streams": len(tasks),
        "stack_saved": {
            "total": sum(saved),
            "min": saved[0] if saved else 0,
            "median": saved[len(saved) // 2] if saved else 0,
            "max": saved[-1] if saved else 0,
        },
        "frames": _frames(tasks[len(tasks) // 2]) if tasks else [],
        "tracing": tracemalloc.is_tracing(),
    }
    del tasks
    if snapshot and tracemalloc.is_tracing():
        tracemalloc.take_snapshot().dump(snapshot)
        out["traced"] = tracemalloc.get_traced_memory()[0]
    return out
