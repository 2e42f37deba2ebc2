"""A raw-socket SSE client for the quick benchmarks, driven from one thread
with :mod:`selectors`.

:class:`SSEClient` sends one HTTP/1.1 ``GET``, decodes the chunked body and
feeds :class:`flask_eventstream.testing.EventParser`, or only counts the
events that carry an id (``count_only``: parsing would cost more than
serving). :func:`open_clients` opens hundreds of streams in batches, and
:func:`pump` reads all of them until a condition holds. Every wait is
bounded; only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import selectors
import socket
import struct
import time
import typing as t
from collections.abc import Callable
from collections.abc import Sequence

from flask_eventstream.testing import EventParser
from flask_eventstream.testing import ReceivedEvent

__all__ = ["HOST", "ChunkedDecoder", "SSEClient", "open_clients", "pump"]

HOST = "127.0.0.1"


class ChunkedDecoder:
    """Incremental decoder of an HTTP/1.1 chunked body."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._left = 0  # bytes left in the current chunk
        self._state = "size"  # size | data | crlf | trailer | done
        self.done = False

    def feed(self, data: bytes) -> bytes:
        buf = self._buf
        buf += data
        out = bytearray()
        pos = 0
        while not self.done:
            state = self._state
            if state == "size":
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    break
                line = bytes(buf[pos:end]).split(b";", 1)[0].strip()
                pos = end + 2
                size = int(line, 16)
                if size == 0:
                    self._state = "trailer"
                else:
                    self._left = size
                    self._state = "data"
            elif state == "data":
                take = min(self._left, len(buf) - pos)
                if take == 0:
                    break
                out += buf[pos : pos + take]
                pos += take
                self._left -= take
                if self._left == 0:
                    self._state = "crlf"
            elif state == "crlf":
                if len(buf) - pos < 2:
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    raise ValueError(f"bad chunk end {bytes(buf[pos : pos + 2])!r}")
                pos += 2
                self._state = "size"
            else:  # trailer: lines until an empty one
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    break
                empty = end == pos
                pos = end + 2
                if empty:
                    self.done = True
        del buf[:pos]
        return bytes(out)


_REQUEST = (
    "GET {path} HTTP/{version}\r\nHost: {host}:{port}\r\n"
    "Accept: text/event-stream\r\nCache-Control: no-cache\r\n{extra}\r\n"
)


class SSEClient:
    """One HTTP/1.1 request over a plain socket, read as an event stream.

    ``count_only`` skips the parser and only counts events carrying an
    ``id`` (for the benchmark, where parsing would cost more than serving).
    ``record`` keeps ``(monotonic time, body bytes)`` per read.
    """

    def __init__(
        self,
        port: int,
        path: str,
        headers: t.Mapping[str, str] | None = None,
        *,
        rcvbuf: int | None = None,
        count_only: bool = False,
        record: bool = False,
        connect_timeout: float = 10.0,
        http_version: str = "1.1",
    ) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            # Before connect, so the window is negotiated small.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(connect_timeout)
        try:
            self.sock.connect((HOST, port))
            extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
            request = _REQUEST.format(
                path=path, host=HOST, port=port, extra=extra, version=http_version
            )
            self.sock.sendall(request.encode("latin-1"))
        except BaseException:
            self.sock.close()
            raise
        self.sock.setblocking(False)
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self._head = bytearray()
        self._chunked: ChunkedDecoder | None = None
        self._length: int | None = None
        self.body = bytearray()
        self.body_len = 0
        self.parser = EventParser()
        self.events: list[ReceivedEvent] = []
        self._taken = 0
        self.count_only = count_only
        self.count = 0
        self._tail = b""
        self.record = record
        self.chunks: list[tuple[float, bytes]] = []
        self.eof = False
        self.error: OSError | None = None
        self.ended = False  # the body ended as HTTP says (last chunk / length)
        self.closed = False
        self.first_body_at: float | None = None
        self.opened_at = time.monotonic()

    def fileno(self) -> int:
        return self.sock.fileno()

    # -- reading --

    def on_readable(self, size: int = 262144) -> bool:
        """Read what the socket has; return False at EOF or error."""
        try:
            data = self.sock.recv(size)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError as e:
            self.error = e
            self.eof = True
            return False
        if not data:
            self.eof = True
            return False
        self._feed(data)
        return True

    def _feed(self, data: bytes) -> None:
        if self.status is None:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self._head[:end]).decode("latin-1")
            data = bytes(self._head[end + 4 :])
            self._head = bytearray()
            lines = head.split("\r\n")
            self.status = int(lines[0].split()[1])
            for line in lines[1:]:
                name, _, value = line.partition(":")
                self.headers[name.strip().lower()] = value.strip()
            if self.headers.get("transfer-encoding", "").lower() == "chunked":
                self._chunked = ChunkedDecoder()
            elif "content-length" in self.headers:
                self._length = int(self.headers["content-length"])
                if self._length == 0:
                    self.ended = True
        if not data or self.ended:
            return
        if self._chunked is not None:
            payload = self._chunked.feed(data)
            if self._chunked.done:
                self.ended = True
        else:
            payload = data
            if self._length is not None:
                payload = payload[: self._length - self.body_len]
                if self.body_len + len(payload) >= self._length:
                    self.ended = True
        if payload:
            self._body(payload)

    def _body(self, payload: bytes) -> None:
        now = time.monotonic()
        if self.first_body_at is None:
            self.first_body_at = now
        self.body_len += len(payload)
        if self.record:
            self.chunks.append((now, payload))
        if self.count_only:
            text = self._tail + payload
            self.count += text.count(b"\nid: ")
            self._tail = text[-4:]
            return
        if self.status == 200:
            self.events.extend(self.parser.feed(payload))
        else:
            self.body += payload

    def wait(self, predicate: Callable[[SSEClient], bool], timeout: float) -> None:
        """Read until ``predicate(self)``; ``TimeoutError`` after ``timeout``."""
        pump([self], lambda: predicate(self), timeout)

    def read_head(self, timeout: float = 5.0) -> int:
        self.wait(lambda c: c.status is not None or c.eof, timeout)
        if self.status is None:
            raise ConnectionError(f"no response head (error {self.error!r})")
        return self.status

    def read_events(self, count: int, timeout: float = 5.0) -> list[ReceivedEvent]:
        """The next ``count`` events not returned before."""
        want = self._taken + count
        self.wait(lambda c: len(c.events) >= want or c.eof or c.ended, timeout)
        if len(self.events) < want:
            raise TimeoutError(
                f"stream ended before {count} events: got"
                f" {self.events[self._taken :]!r} (eof={self.eof}, ended={self.ended})"
            )
        events = self.events[self._taken : want]
        self._taken = want
        return events

    def read_to_end(self, timeout: float = 5.0) -> list[ReceivedEvent]:
        """Read until the body ends; return the events not returned before."""
        self.wait(lambda c: c.ended or c.eof, timeout)
        events = self.events[self._taken :]
        self._taken = len(self.events)
        return events

    def read_body(self, timeout: float = 5.0) -> bytes:
        """The whole body of a response that is not an event stream."""
        self.wait(lambda c: c.ended or c.eof, timeout)
        return bytes(self.body)

    @property
    def last_event_id(self) -> str:
        return self.parser.last_event_id

    # -- closing --

    def close(self) -> None:
        """Close (FIN)."""
        if not self.closed:
            self.closed = True
            self.sock.close()

    def abort(self) -> None:
        """Close with SO_LINGER 0, so the kernel sends RST."""
        if not self.closed:
            self.closed = True
            self.sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            self.sock.close()

    def __enter__(self) -> SSEClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<SSEClient {self.path} status={self.status} events={len(self.events)}"
            f" eof={self.eof} ended={self.ended}>"
        )


def pump(
    clients: Sequence[SSEClient], until: Callable[[], bool], timeout: float
) -> None:
    """Read every client as data arrives until ``until()`` is true; raise
    ``TimeoutError`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        for client in clients:
            if not (client.eof or client.closed):
                sel.register(client.sock, selectors.EVENT_READ, client)
        while not until():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"not done after {timeout}s")
            if not sel.get_map():
                if until():
                    return
                raise TimeoutError("every stream ended before the condition was met")
            for key, _ in sel.select(min(left, 0.5)):
                client = key.data
                if not client.on_readable():
                    sel.unregister(client.sock)


def open_clients(
    port: int,
    path: str,
    count: int,
    headers: t.Mapping[str, str] | None = None,
    *,
    batch: int = 100,
    timeout: float = 30.0,
    **kwargs: t.Any,
) -> list[SSEClient]:
    """Open ``count`` streams, ``batch`` at a time (so the listen backlog
    never overflows), and wait until each has its head and first bytes."""
    clients: list[SSEClient] = []
    deadline = time.monotonic() + timeout
    try:
        for start in range(0, count, batch):
            group = [
                SSEClient(port, path, headers, **kwargs)
                for _ in range(min(batch, count - start))
            ]
            clients.extend(group)
            pump(
                group,
                lambda g=group: all(c.first_body_at or c.eof for c in g),  # type: ignore[misc]
                max(deadline - time.monotonic(), 0.1),
            )
            bad = [c for c in group if c.status != 200 or c.eof]
            if bad:
                raise ConnectionError(f"{len(bad)} streams failed to open: {bad[:3]}")
    except BaseException:
        for client in clients:
            client.close()
        raise
    return clients
