"""What the benchmark reads about a server from /proc: its process tree, RSS,
CPU time, socket file descriptors and which process holds which TCP
connection. Linux only; every function is a bounded scan."""

from __future__ import annotations

import os

__all__ = [
    "busy_fraction",
    "cpu_seconds",
    "cpu_ticks",
    "descendants",
    "rss_bytes",
    "socket_count",
    "socket_inodes",
    "softirq_seconds",
    "system_seconds",
    "tcp_table",
    "start_time",
    "tree_cpu",
    "tree_system",
    "tree_rss",
]

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read().decode()
    # The command name is in parentheses and may contain spaces.
    return raw[raw.rindex(")") + 2 :].split()


def descendants(root: int) -> list[int]:
    """``root`` and every live process below it."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(name))[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    found = [root]
    i = 0
    while i < len(found) and i < 10_000:
        found.extend(children.get(found[i], ()))
        i += 1
    return [pid for pid in found if os.path.exists(f"/proc/{pid}")]


def start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks after boot), to tell it from a
    process that reused its number; ``None`` when it is gone."""
    try:
        return int(_stat_fields(pid)[19])
    except (OSError, ValueError, IndexError):
        return None


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def tree_rss(root: int) -> int:
    """Resident set size of the whole tree, in bytes."""
    return sum(rss_bytes(pid) for pid in descendants(root))


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` in seconds."""
    try:
        fields = _stat_fields(pid)
    except OSError:
        return 0.0
    # Fields 14 and 15 of stat; index 0 here is field 3 (state).
    return (int(fields[11]) + int(fields[12])) / _TICK


def tree_cpu(root: int) -> float:
    return sum(cpu_seconds(pid) for pid in descendants(root))


def system_seconds(pid: int) -> float:
    """stime of ``pid`` in seconds: time in the kernel (syscalls)."""
    try:
        return int(_stat_fields(pid)[12]) / _TICK
    except (OSError, ValueError, IndexError):
        return 0.0


def tree_system(root: int) -> float:
    return sum(system_seconds(pid) for pid in descendants(root))


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets ``pid`` has open."""
    inodes: set[int] = set()
    base = f"/proc/{pid}/fd"
    try:
        names = os.listdir(base)
    except OSError:
        return inodes
    for name in names:
        try:
            target = os.readlink(f"{base}/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def socket_count(pids: list[int]) -> int:
    """Socket file descriptors held by ``pids`` (a shared listener counts
    once per process)."""
    return sum(len(socket_inodes(pid)) for pid in pids)


def tcp_table() -> dict[int, tuple[int, int]]:
    """``{inode: (local_port, remote_port)}`` for IPv4 TCP sockets of this
    network namespace."""
    table: dict[int, tuple[int, int]] = {}
    with open("/proc/net/tcp", "rb") as f:
        next(f)
        for line in f:
            parts = line.split()
            if len(parts) < 10:
                continue
            local = int(parts[1].rsplit(b":", 1)[1], 16)
            remote = int(parts[2].rsplit(b":", 1)[1], 16)
            inode = int(parts[9])
            if inode:
                table[inode] = (local, remote)
    return table


def cpu_ticks() -> dict[str, list[int]]:
    """``{"cpu0": [user, nice, system, idle, iowait, irq, softirq, steal], ...}``
    from /proc/stat, in clock ticks."""
    ticks: dict[str, list[int]] = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu"):
                parts = line.split()
                ticks[parts[0]] = [int(x) for x in parts[1:9]]
    return ticks


def busy_fraction(
    before: dict[str, list[int]], after: dict[str, list[int]]
) -> dict[str, float]:
    """Share of each CPU's time that was not idle between two samples."""
    busy = {}
    for cpu, a in after.items():
        b = before.get(cpu)
        if b is None or cpu == "cpu":
            continue
        delta = [y - x for x, y in zip(b, a, strict=True)]
        total = sum(delta)
        idle = delta[3] + delta[4]
        busy[cpu] = round((total - idle) / total, 3) if total else 0.0
    return busy


def softirq_seconds(cpu: int) -> float:
    """Seconds CPU ``cpu`` has spent in softirq: on loopback, much of the
    TCP work a send causes (delivery to the receiving socket) runs there and
    is charged to no process."""
    return cpu_ticks()[f"cpu{cpu}"][6] / _TICK
