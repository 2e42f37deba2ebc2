"""Reaching each worker of a multi-worker gunicorn server on purpose.

gunicorn's workers share one listening socket, and the kernel decides which
one accepts a connection. A kept-alive HTTP connection stays with the worker
that accepted it: :func:`worker_connections` opens connections until it has
one to each worker (asking ``GET /counters`` of ``tests.apps.streams`` for
the pid), so a test can publish through a worker of its choice. The server
needs ``--keep-alive`` longer than the test.
"""

from __future__ import annotations

import http.client
import json
import time
import typing as t

from benchmarks.processes import JsonRoutes
from tests.support.servers import HOST
from tests.support.servers import Server

__all__ = ["WorkerConnection", "worker_connections"]


class WorkerConnection(JsonRoutes):
    """A kept-alive HTTP connection to one worker (publishes go through it)."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection(HOST, port, timeout=10.0)
        self.pid = int(self.get_json("/counters")["pid"])

    def request(self, method: str, path: str, body: t.Any = None) -> tuple[int, bytes]:
        headers = {"Connection": "keep-alive"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        self.conn.request(method, path, body=data, headers=headers)
        response = self.conn.getresponse()
        raw = response.read()
        if response.getheader("Connection", "").lower() == "close":
            raise ConnectionError(f"worker {self.pid} closed the connection")
        return response.status, raw

    def close(self) -> None:
        self.conn.close()


def worker_connections(
    server: Server, workers: int, timeout: float = 30.0
) -> list[WorkerConnection]:
    """One kept-alive connection to each of ``workers`` workers (in pid
    order); raises ``AssertionError`` if some worker accepted none within
    ``timeout`` seconds (a worker still booting accepts none: polled)."""
    found: dict[int, WorkerConnection] = {}
    spare: list[WorkerConnection] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if len(spare) >= 20:
                for conn in spare:
                    conn.close()
                spare.clear()
                time.sleep(0.05)
            # Holding the extra connections open makes the next accept land
            # on a worker that is not busy with one of ours.
            conn = WorkerConnection(server.port)
            if conn.pid in found:
                spare.append(conn)
            else:
                found[conn.pid] = conn
            if len(found) == workers:
                break
    finally:
        for conn in spare:
            conn.close()
    if len(found) != workers:
        for conn in found.values():
            conn.close()
        raise AssertionError(f"reached workers {sorted(found)}, not {workers}")
    return [found[pid] for pid in sorted(found)]
