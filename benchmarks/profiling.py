"""py-spy on a server process, and a summary of its speedscope output as the
functions with the most own ("self") and inclusive time.

``python -m benchmarks.profiling FILE.speedscope.json`` prints the summary of
an existing profile.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import typing as t
from pathlib import Path

__all__ = ["record", "summarise"]


async def record(
    pid: int, seconds: float, output: Path, rate: int = 100, native: bool = False
) -> str | None:
    """Sample ``pid`` for ``seconds`` with py-spy; return an error or ``None``.

    ``native`` adds C frames (the garbage collector, gevent's Cython, libc),
    which needs py-spy to pause the process for each sample."""
    # Beside the interpreter first: pip puts py-spy in the venv's bin/, which
    # need not be on PATH.
    beside = Path(sys.executable).parent / "py-spy"
    binary = str(beside) if beside.exists() else shutil.which("py-spy")
    if binary is None:
        return "py-spy is not installed (pip install py-spy)"
    proc = await asyncio.create_subprocess_exec(
        binary,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(int(seconds)),
        "--rate",
        str(rate),
        "--function",
        *(["--native"] if native else ["--nonblocking"]),
        "--format",
        "speedscope",
        "--output",
        str(output),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), seconds + 30)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        return "py-spy did not finish in time"
    if proc.returncode != 0 or not output.exists():
        return (
            f"py-spy failed ({proc.returncode}): {out.decode(errors='replace')[-500:]}"
        )
    return None


def _short(frame: dict[str, t.Any]) -> str:
    name = str(frame.get("name", "?"))
    file = str(frame.get("file") or "")
    for marker in ("site-packages/", "/lib/python3", "/work/main/"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    line = frame.get("line")
    return f"{name} ({file}:{line})" if line else f"{name} ({file})"


def summarise(path: Path, top: int = 25) -> dict[str, t.Any]:
    """Own and inclusive sample counts per function, over all threads."""
    data = json.loads(path.read_text())
    frames = data["shared"]["frames"]
    own: dict[int, float] = {}
    incl: dict[int, float] = {}
    total = 0.0
    seconds = 0.0
    for profile in data.get("profiles", []):
        samples = profile.get("samples", [])
        weights = profile.get("weights") or [1] * len(samples)
        for stack, weight in zip(samples, weights, strict=False):
            if not stack:
                continue
            # py-spy weighs each sample by its interval in seconds: count
            # samples instead, which is the same ranking.
            total += 1
            seconds += weight
            own[stack[-1]] = own.get(stack[-1], 0) + 1
            for index in set(stack):
                incl[index] = incl.get(index, 0) + 1

    def is_python(index: int) -> bool:
        return str(frames[index].get("file") or "").endswith(".py")

    # Native frames (greenlet's C++ bootstrap, the interpreter) sit under
    # every sample: they carry no information about where inclusive time goes.
    incl = {i: n for i, n in incl.items() if is_python(i)}

    def rank(counts: dict[int, float]) -> list[dict[str, t.Any]]:
        best = sorted(counts.items(), key=lambda kv: kv[1], reverse=True)[:top]
        return [
            {
                "function": _short(frames[i]),
                "samples": int(n),
                "percent": round(100 * n / total, 1) if total else 0.0,
            }
            for i, n in best
        ]

    return {
        "samples": int(total),
        "sampled_seconds": round(seconds, 2),
        "own": rank(own),
        "inclusive": rank(incl),
    }


def format_summary(summary: dict[str, t.Any], title: str, top: int = 20) -> str:
    lines = [f"{title}: {summary['samples']} active samples"]
    for key, label in (("own", "own time"), ("inclusive", "inclusive time")):
        lines.append(f"  top functions by {label}:")
        for row in summary[key][:top]:
            lines.append(f"    {row['percent']:5.1f}%  {row['function']}")
    return "\n".join(lines)


def main() -> None:
    for arg in sys.argv[1:]:
        print(format_summary(summarise(Path(arg)), arg))


if __name__ == "__main__":
    main()
