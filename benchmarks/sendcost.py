"""The physical reference for one delivery: the CPU cost of one ``send()`` of
the same bytes on a loopback TCP socket, from plain Python.

A child process pinned to the server's CPU listens on a free port of
127.0.0.1, accepts ``sockets`` connections from the caller (which drains them
on the client's CPU, as the load client drains the servers' streams), then
sends ``payload`` ``sends`` times, round-robin over its sockets, with a plain
blocking ``socket.send``. It reports its own CPU time (``getrusage``: user +
system) over the send loop, divided by the number of sends.

``paced`` sends in the pattern of an unbatched fan-out: one send to each
socket, then a wait (a blocking ``recv`` on one more connection) until the
caller has received the whole burst, and so on. This matters for what the
sender is charged: in a tight loop the kernel soon hands the receiving side
of loopback TCP to ``ksoftirqd`` (charged to no process of ours), while after
each short burst it runs it in the sender's own system calls, as it does for
a server's fan-out.

``python -m benchmarks.sendcost`` prints one measurement as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import socket
import struct
import sys
import time
import typing as t
from pathlib import Path

if not __package__:  # python benchmarks/sendcost.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import servers  # noqa: E402

__all__ = ["chunk", "measure"]

_LINGER_RST = struct.pack("ii", 1, 0)


def chunk(event: bytes) -> bytes:
    """``event`` framed as one HTTP/1.1 chunk, as both servers write it."""
    return b"%X\r\n" % len(event) + event + b"\r\n"


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _sender(
    port_file: Path, sockets: int, sends: int, payload: bytes, paced: bool
) -> None:
    """The child: accept ``sockets`` connections (and the control one when
    ``paced``), send, report."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(sockets + 16)
    port_file.write_text(str(listener.getsockname()[1]))
    conns = []
    listener.settimeout(60)
    for _ in range(sockets + (1 if paced else 0)):
        conn, _ = listener.accept()
        conn.settimeout(None)
        conns.append(conn)
    listener.close()
    control = conns.pop() if paced else None
    rounds = max(1, sends // sockets)
    senders = [c.send for c in conns]
    # Warm up: page in the loop and the sockets' buffers.
    for send in senders:
        send(payload)
    if control is not None:
        recv = control.recv
        recv(1)
        cpu0, wall0 = _cpu(), time.perf_counter()
        for _ in range(rounds):
            for send in senders:
                send(payload)
            recv(1)
    else:
        cpu0, wall0 = _cpu(), time.perf_counter()
        for _ in range(rounds):
            for send in senders:
                send(payload)
    cpu1, wall1 = _cpu(), time.perf_counter()
    count = rounds * len(senders)
    print(
        json.dumps(
            {
                "sockets": len(senders),
                "paced": paced,
                "sends": count,
                "bytes": len(payload),
                "cpu_s": round(cpu1 - cpu0, 4),
                "wall_s": round(wall1 - wall0, 4),
                "us_per_send": round((cpu1 - cpu0) / count * 1e6, 3),
            }
        ),
        flush=True,
    )
    for conn in conns:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        conn.close()


class _Total:
    """Bytes received over all sockets; in paced mode, tells the sender to
    go on each time a whole burst has arrived."""

    def __init__(self, burst: int) -> None:
        self.received = 0
        self.burst = burst
        self.next = burst
        self.control: asyncio.Transport | None = None

    def add(self, n: int) -> None:
        self.received += n
        while self.control is not None and self.received >= self.next:
            self.next += self.burst
            self.control.write(b"g")


class _Drain(asyncio.Protocol):
    def __init__(self, total: _Total) -> None:
        self.total = total

    def data_received(self, data: bytes) -> None:
        self.total.add(len(data))


async def measure(
    payload: bytes,
    sockets: int = 1000,
    sends: int = 300_000,
    *,
    paced: bool = True,
    timeout: float = 300,
) -> dict[str, t.Any]:
    """Run the child on the server's CPU and drain its sockets here."""
    import tempfile

    loop = asyncio.get_running_loop()
    with tempfile.TemporaryDirectory(prefix="sendcost-") as tmp:
        port_file = Path(tmp) / "port"
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.sendcost",
            "--child",
            str(port_file),
            "--sockets",
            str(sockets),
            "--sends",
            str(sends),
            "--payload-hex",
            payload.hex(),
            *(["--paced"] if paced else []),
        ]
        proc = await asyncio.create_subprocess_exec(
            *servers._pin(servers.SERVER_CPU),
            *cmd,
            cwd=servers.ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        transports = []
        try:
            for _ in range(500):
                if port_file.exists() and port_file.read_text():
                    break
                await asyncio.sleep(0.02)
            port = int(port_file.read_text())
            total = _Total(sockets * len(payload))
            for _ in range(sockets + (1 if paced else 0)):
                transport, _ = await loop.create_connection(
                    lambda: _Drain(total), "127.0.0.1", port
                )
                sock = transport.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
                transports.append(transport)
            if paced:
                total.control = transports[-1]
                total.add(0)
            out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            for transport in transports:
                transport.abort()
    lines = out.decode(errors="replace").strip().splitlines()
    try:
        return t.cast(dict[str, t.Any], json.loads(lines[-1]))
    except (IndexError, ValueError):
        text = "\n".join(lines[-10:])
        raise RuntimeError(f"send micro-benchmark failed:\n{text}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--sockets", type=int, default=1000)
    parser.add_argument("--sends", type=int, default=300_000)
    parser.add_argument("--payload-hex", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--bytes", type=int, default=160, help="event size")
    parser.add_argument(
        "--paced", action="store_true", help="one burst per socket set at a time"
    )
    args = parser.parse_args(argv)
    if args.payload_hex is not None:
        payload = bytes.fromhex(args.payload_hex)
    else:
        payload = chunk(b"data: " + b"x" * max(0, args.bytes - 8) + b"\n\n")
    if args.child is not None:
        _sender(args.child, args.sockets, args.sends, payload, args.paced)
        return 0
    servers.raise_nofile()
    result = asyncio.run(measure(payload, args.sockets, args.sends, paced=args.paced))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
