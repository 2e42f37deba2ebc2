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
_LINGER_RST = struct.pack("ii", 1, 0)
_REQUEST = (
    "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
    "Accept: text/event-stream\r\nCache-Control: no-cache\r\n{extra}\r\n"
)


class ChunkedDecoder:
    """Incremental decoder of an HTTP/1.1 chunked body."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._left = 0  # bytes left in the current chunk
        self._state = "size"  # size | data | crlf | trailer
        self.done = False

    def feed(self, data: bytes) -> bytes:
        buf = self._buf
        buf += data
        out = bytearray()
        pos = 0
        while not self.done:
            if self._state == "size":
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    break
                size = int(bytes(buf[pos:end]).split(b";", 1)[0].strip(), 16)
                pos = end + 2
                self._left = size
                self._state = "data" if size else "trailer"
            elif self._state == "data":
                take = min(self._left, len(buf) - pos)
                if take == 0:
                    break
                out += buf[pos : pos + take]
                pos += take
                self._left -= take
                if self._left == 0:
                    self._state = "crlf"
            elif self._state == "crlf":
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
                self.done = end == pos
                pos = end + 2
        del buf[:pos]
        return bytes(out)


class SSEClient:
    """One ``GET`` over a non-blocking socket, read as an event stream."""

    def __init__(
        self,
        port: int,
        path: str,
        headers: t.Mapping[str, str] | None = None,
        *,
        count_only: bool = False,
        connect_timeout: float = 10.0,
    ) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.settimeout(connect_timeout)
        try:
            self.sock.connect((HOST, port))
            extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
            request = _REQUEST.format(path=path, host=HOST, port=port, extra=extra)
            self.sock.sendall(request.encode("latin-1"))
        except BaseException:
            self.sock.close()
            raise
        self.sock.setblocking(False)
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self._head = bytearray()
        self._chunked: ChunkedDecoder | None = None
        self.parser = EventParser()
        self.events: list[ReceivedEvent] = []
        self.count_only = count_only
        #: Events with an id so far (``count_only``).
        self.count = 0
        self._tail = b""
        self.first_body_at: float | None = None
        self.eof = False
        self.ended = False  # the chunked body ended
        self.closed = False

    def on_readable(self, size: int = 262144) -> bool:
        """Read what the socket has; return False at EOF or error."""
        try:
            data = self.sock.recv(size)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
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
            lines = bytes(self._head[:end]).decode("latin-1").split("\r\n")
            data = bytes(self._head[end + 4 :])
            self._head = bytearray()
            self.status = int(lines[0].split()[1])
            for line in lines[1:]:
                name, _, value = line.partition(":")
                self.headers[name.strip().lower()] = value.strip()
            if self.headers.get("transfer-encoding", "").lower() == "chunked":
                self._chunked = ChunkedDecoder()
        if not data or self.ended:
            return
        payload = data
        if self._chunked is not None:
            payload = self._chunked.feed(data)
            self.ended = self._chunked.done
        if payload:
            self._body(payload)

    def _body(self, payload: bytes) -> None:
        if self.first_body_at is None:
            self.first_body_at = time.monotonic()
        if self.count_only:
            text = self._tail + payload
            self.count += text.count(b"\nid: ")
            self._tail = text[-4:]
        elif self.status == 200:
            self.events.extend(self.parser.feed(payload))

    @property
    def last_event_id(self) -> str:
        return self.parser.last_event_id

    def close(self) -> None:
        """Close (FIN)."""
        if not self.closed:
            self.closed = True
            self.sock.close()

    def abort(self) -> None:
        """Close with ``SO_LINGER`` 0, so the kernel sends RST."""
        if not self.closed:
            self.closed = True
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            self.sock.close()

    def __repr__(self) -> str:
        return (
            f"<SSEClient {self.path} status={self.status} events={len(self.events)}"
            f" count={self.count} eof={self.eof} ended={self.ended}>"
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
                raise TimeoutError("every stream ended before the condition was met")
            for key, _ in sel.select(min(left, 0.5)):
                if not key.data.on_readable():
                    sel.unregister(key.fileobj)


def open_clients(
    port: int,
    path: str,
    count: int,
    headers: t.Mapping[str, str] | None = None,
    *,
    batch: int = 100,
    timeout: float = 30.0,
    count_only: bool = False,
) -> list[SSEClient]:
    """Open ``count`` streams, ``batch`` at a time (so the listen backlog
    never overflows), and wait until each has its head and first bytes."""
    clients: list[SSEClient] = []
    deadline = time.monotonic() + timeout
    try:
        for start in range(0, count, batch):
            group = [
                SSEClient(port, path, headers, count_only=count_only)
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
