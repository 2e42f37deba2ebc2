"""The load client: asyncio protocols on raw sockets (uvloop when installed),
much cheaper per delivery than the servers it measures.

A stream is counted, not parsed: every ``\\n\\n`` after the response headers
ends one block (the first block is the server's ``retry:`` priming, which
marks the stream as served). Chunked framing puts ``\\r\\n`` around each chunk
and never produces ``\\n\\n`` itself. In latency mode the client also pulls
``"r":<round>,"w":<group>,"t":<send time>`` out of each completed block with
one regular expression, and records ``receive time - send time``.

Every socket is closed with an RST (``SO_LINGER`` 0), so ten thousand
streams leave no TIME_WAIT behind and the cleanup measurement sees an
abrupt disconnect. Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import struct
import time
import typing as t

__all__ = [
    "Collector",
    "HttpConn",
    "StreamProto",
    "close_all",
    "new_event_loop",
    "open_publishers",
    "open_streams",
    "percentile",
    "publish_closed_loop",
    "publish_schedule",
]

_LINGER_RST = struct.pack("ii", 1, 0)
#: Fields the publishers put first in every event's data (the example app and
#: the baseline both send ``data`` as JSON, with or without spaces).
_SAMPLE = re.compile(rb'"r": ?(\d+), ?"w": ?(\d+), ?"t": ?([0-9.]+)')
_CONTENT_LENGTH = re.compile(rb"(?i)\r\ncontent-length: *(\d+)")
#: Bytes of headers (or of an unfinished block) a stream may buffer.
_MAX_BUFFER = 1 << 16
#: Payload padding: a short chat message's worth of text.
PAD = "x" * 100


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return t.cast(asyncio.AbstractEventLoop, uvloop.new_event_loop())


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    return type(loop).__module__.split(".")[0]


def _rst_on_close(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        except OSError:
            pass


class Collector:
    """Counters shared by a set of streams."""

    def __init__(self, parse: bool = False) -> None:
        self.parse = parse
        self.primed = 0
        self.failed = 0
        self.lost = 0
        self.events = 0
        self.statuses: dict[str, int] = {}
        #: ``{(round, cross_group): [latency seconds, ...]}`` in latency mode.
        self.latencies: dict[tuple[bytes, bool], list[float]] = {}
        #: Resolved when :attr:`events` reaches :attr:`target`.
        self.target: int | None = None
        self.reached: asyncio.Future[None] | None = None

    async def wait_events(self, target: int, timeout: float) -> bool:
        """Wait until :attr:`events` is at least ``target``; ``False`` on
        timeout. Resolved from the stream that counts the last block, so a
        closed-loop publisher loses no polling interval."""
        if self.events >= target:
            return True
        self.target = target
        self.reached = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(self.reached, timeout)
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            self.target = self.reached = None

    def _check(self) -> None:
        if self.target is not None and self.events >= self.target:
            reached = self.reached
            if reached is not None and not reached.done():
                reached.set_result(None)

    def take(self, round_id: int, cross: bool | None = None) -> list[float]:
        key = str(round_id).encode()
        if cross is None:
            return self.latencies.get((key, False), []) + self.latencies.get(
                (key, True), []
            )
        return self.latencies.get((key, cross), [])

    def count(self, round_id: int) -> int:
        key = str(round_id).encode()
        return len(self.latencies.get((key, False), ())) + len(
            self.latencies.get((key, True), ())
        )


class StreamProto(asyncio.Protocol):
    """One SSE stream: ``GET path``, then count blocks."""

    def __init__(
        self, collector: Collector, request: bytes, on_ready: t.Callable[[], None]
    ) -> None:
        self.c = collector
        self.request = request
        self.on_ready = on_ready
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.buf = b""
        self.open = False
        self.primed = False
        self.done = False
        self.closing = False
        self.local_port = 0
        #: Which server worker holds this stream (set by the Redis measurement).
        self.group = b"0"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = t.cast(asyncio.Transport, transport)
        _rst_on_close(transport)
        sockname = transport.get_extra_info("sockname")
        if sockname:
            self.local_port = sockname[1]
        self.transport.write(self.request)

    def _ready(self, ok: bool) -> None:
        if not self.done:
            self.done = True
            if ok:
                self.c.primed += 1
            else:
                self.c.failed += 1
            self.on_ready()

    def _headers(self, data: bytes) -> bytes:
        head = self.head + data
        end = head.find(b"\r\n\r\n")
        if end < 0:
            if len(head) > _MAX_BUFFER:
                self._fail("oversized headers")
            else:
                self.head = head
            return b""
        self.head = b""
        status = head[9:12].decode(errors="replace")
        if status != "200":
            self._fail(status)
            return b""
        self.open = True
        return head[end + 4 :]

    def _fail(self, why: str) -> None:
        self.c.statuses[why] = self.c.statuses.get(why, 0) + 1
        self._ready(False)
        self.close()

    def data_received(self, data: bytes) -> None:
        if not self.open:
            data = self._headers(data)
            if not data:
                return
        buf = self.buf + data if self.buf else data
        end = buf.rfind(b"\n\n") + 2
        if end < 2:
            self.buf = buf if len(buf) < _MAX_BUFFER else b""
            return
        self.buf = buf[end:]
        n = buf.count(b"\n\n", 0, end)
        if not self.primed:
            self.primed = True
            n -= 1
            self._ready(True)
        c = self.c
        c.events += n
        if c.target is not None:
            c._check()
        if c.parse and n:
            now = time.time()
            group = self.group
            latencies = c.latencies
            for r, w, sent in _SAMPLE.findall(buf, 0, end):
                key = (r, w != group)
                samples = latencies.get(key)
                if samples is None:
                    samples = latencies[key] = []
                samples.append(now - float(sent))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closing:
            if self.primed:
                self.c.lost += 1
            else:
                self.c.statuses["closed before priming"] = (
                    self.c.statuses.get("closed before priming", 0) + 1
                )
                self._ready(False)
        self.transport = None

    def close(self) -> None:
        """Close with an RST."""
        self.closing = True
        if self.transport is not None:
            self.transport.abort()


def stream_request(path: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Accept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n"
    ).encode()


async def open_streams(
    port: int,
    path: str,
    n: int,
    collector: Collector,
    *,
    rate: float = 2000.0,
    max_pending: int = 200,
    timeout: float = 60.0,
) -> tuple[list[StreamProto], float]:
    """Open ``n`` streams, at most ``rate`` per second and at most
    ``max_pending`` not yet primed; wait until each is primed or failed, or
    ``timeout`` seconds. Return the streams and the seconds it took."""
    loop = asyncio.get_running_loop()
    request = stream_request(path)
    pending = asyncio.Semaphore(max_pending)
    streams: list[StreamProto] = []
    start = loop.time()
    deadline = start + timeout
    goal = collector.primed + collector.failed + n
    for i in range(n):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        try:
            await asyncio.wait_for(pending.acquire(), remaining)
        except asyncio.TimeoutError:
            break
        proto = StreamProto(collector, request, pending.release)
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda p=proto: p, "127.0.0.1", port),  # type: ignore[misc]
                max(0.1, min(10.0, deadline - loop.time())),
            )
        except (OSError, asyncio.TimeoutError) as e:
            collector.statuses[type(e).__name__] = (
                collector.statuses.get(type(e).__name__, 0) + 1
            )
            proto._ready(False)
            continue
        streams.append(proto)
    while collector.primed + collector.failed < goal and loop.time() < deadline:
        await asyncio.sleep(0.02)
    return streams, loop.time() - start


def close_all(streams: list[StreamProto]) -> None:
    for s in streams:
        s.close()


class HttpConn(asyncio.Protocol):
    """A keep-alive HTTP/1.1 connection for POSTs, one request at a time."""

    def __init__(self, group: int = 0, port: int = 0) -> None:
        self.port = port
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.future: asyncio.Future[int] | None = None
        self.group = group
        self.local_port = 0
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = t.cast(asyncio.Transport, transport)
        _rst_on_close(transport)
        self.local_port = transport.get_extra_info("sockname")[1]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        match = _CONTENT_LENGTH.search(self.buf, 0, end + 2)
        length = int(match.group(1)) if match else 0
        if len(self.buf) < end + 4 + length:
            return
        status = int(self.buf[9:12])
        self.buf = self.buf[end + 4 + length :]
        future, self.future = self.future, None
        if future is not None and not future.done():
            future.set_result(status)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        future, self.future = self.future, None
        if future is not None and not future.done():
            future.set_exception(ConnectionError("publisher connection lost"))

    async def post(self, path: str, body: bytes, timeout: float = 30.0) -> int:
        if self.transport is None and self.port:
            # Closed by the server while idle: a client would reconnect.
            self.buf = b""
            await asyncio.wait_for(
                asyncio.get_running_loop().create_connection(
                    lambda: self, "127.0.0.1", self.port
                ),
                10.0,
            )
        if self.transport is None:
            raise ConnectionError("publisher connection closed")
        self.busy = True
        try:
            self.future = asyncio.get_running_loop().create_future()
            self.transport.write(
                (
                    f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    "Content-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n"
                ).encode()
                + body
            )
            return await asyncio.wait_for(self.future, timeout)
        finally:
            self.busy = False

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def open_publishers(port: int, count: int) -> list[HttpConn]:
    loop = asyncio.get_running_loop()
    conns = []
    for _ in range(count):
        conn = HttpConn(port=port)
        await asyncio.wait_for(
            loop.create_connection(lambda c=conn: c, "127.0.0.1", port),  # type: ignore[misc]
            10.0,
        )
        conns.append(conn)
    return conns


def event_body(round_id: int, group: int, sent: float) -> bytes:
    data = f'{{"r":{round_id},"w":{group},"t":{sent!r},"m":"{PAD}"}}'
    return b'{"data":' + data.encode() + b"}"


class PublishStats:
    def __init__(self) -> None:
        self.sent = 0
        self.ok = 0
        self.errors: dict[str, int] = {}
        self.rtts: list[float] = []

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


async def publish_schedule(
    conns: list[HttpConn],
    path: str,
    count: int,
    rate: float,
    round_id: int,
    stats: PublishStats,
    *,
    groups: int = 1,
) -> float:
    """Publish ``count`` events at ``rate`` per second, each carrying its send
    time, alternating over ``groups`` (a publisher connection's group is the
    server worker it is on). Return the seconds the schedule took."""
    loop = asyncio.get_running_loop()
    tasks = []
    start = loop.time() + 0.02

    async def one(conn: HttpConn, body: bytes, sent: float) -> None:
        try:
            status = await conn.post(path, body)
        except (ConnectionError, asyncio.TimeoutError) as e:
            stats.error(type(e).__name__)
            return
        stats.rtts.append(time.time() - sent)
        if status == 202:
            stats.ok += 1
        else:
            stats.error(str(status))

    for i in range(count):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        group = i % groups
        pool = [c for c in conns if c.group == group] or conns
        conn = None
        for _ in range(3000):  # at most 30 s for a connection to come free
            conn = next((c for c in pool if not c.busy), None)
            if conn is not None:
                break
            await asyncio.sleep(0.01)
        if conn is None:
            stats.error("no free publisher connection")
            continue
        conn.busy = True
        sent = time.time()
        stats.sent += 1
        body = event_body(round_id, conn.group, sent)
        tasks.append(asyncio.ensure_future(one(conn, body, sent)))
    if tasks:
        await asyncio.wait(tasks, timeout=30.0)
    return loop.time() - start


async def publish_closed_loop(
    conns: list[HttpConn], path: str, stop: asyncio.Event, stats: PublishStats
) -> None:
    """Each connection publishes its next event as soon as the previous one
    was accepted, until ``stop`` is set."""

    async def run(conn: HttpConn) -> None:
        for _ in range(10_000_000):
            if stop.is_set():
                return
            sent = time.time()
            stats.sent += 1
            try:
                status = await conn.post(path, event_body(0, conn.group, sent))
            except (ConnectionError, asyncio.TimeoutError) as e:
                stats.error(type(e).__name__)
                return
            if status == 202:
                stats.ok += 1
            else:
                stats.error(str(status))

    await asyncio.gather(*(run(c) for c in conns))


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, int(q * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]


def latency_summary(values: list[float]) -> dict[str, float | int | None]:
    values = sorted(values)

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 2)

    return {
        "samples": len(values),
        "p50_ms": ms(percentile(values, 0.50)),
        "p99_ms": ms(percentile(values, 0.99)),
        "max_ms": ms(values[-1] if values else None),
    }


def dumps(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"), sort_keys=False)
