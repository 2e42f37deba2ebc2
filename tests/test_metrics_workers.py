"""Prometheus metrics summed over 3 gunicorn workers on one Redis, with the
documented gunicorn config (example_app/gunicorn.conf.py) and
``PROMETHEUS_MULTIPROC_DIR``: one scrape of ``/metrics`` gives exact sums,
and a dead worker's open streams leave the gauge."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.redis import RedisServer
from tests.support.servers import open_clients
from tests.support.servers import pump
from tests.support.servers import ROOT
from tests.support.servers import Server
from tests.support.servers import SSEClient
from tests.support.servers import wait_for
from tests.support.workers import worker_connections
from tests.support.workers import WorkerConnection

pytestmark = [pytest.mark.redis, pytest.mark.server]

APP = "tests.apps.streams:create_app"
CONFIG = os.path.join(ROOT, "example_app", "gunicorn.conf.py")
#: Long enough for the steps before the last; then every stream left ends.
LIFETIME = 30.0


def scrape(server: Server) -> dict[str, float]:
    """The eventstream_* samples of one scrape, by their text names."""
    status, body = server.request("GET", "/metrics")
    assert status == 200, body
    samples = {}
    for line in body.decode().splitlines():
        if line.startswith("eventstream_"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def expected(**values: float) -> dict[str, float]:
    """Every sample a scrape has, zero unless given (labels as keywords
    ``disconnects_<reason>`` and ``resumes_<result>``)."""
    samples = {
        "eventstream_connections": 0.0,
        "eventstream_connections_opened_total": 0.0,
        "eventstream_events_published_total": 0.0,
        "eventstream_deliveries_total": 0.0,
        "eventstream_publish_errors_total": 0.0,
    }
    for reason in (
        "closed",
        "client",
        "overflow",
        "timeout",
        "lifetime",
        "shutdown",
        "revoked",
        "error",
    ):
        samples[f'eventstream_disconnects_total{{reason="{reason}"}}'] = 0.0
    for result in ("replayed", "reset"):
        samples[f'eventstream_resumes_total{{result="{result}"}}'] = 0.0
    for key, value in values.items():
        if key.startswith("disconnects_"):
            key = f'eventstream_disconnects_total{{reason="{key[12:]}"}}'
        elif key.startswith("resumes_"):
            key = f'eventstream_resumes_total{{result="{key[8:]}"}}'
        else:
            key = f"eventstream_{key}"
        assert key in samples, key
        samples[key] = float(value)
    return samples


def until_scraped(
    server: Server, want: dict[str, float], timeout: float = 10.0
) -> None:
    """Scrape until the samples are exactly ``want`` (a count lands when a
    worker gets to it: a write is counted once it completed)."""
    last: dict[str, float] = {}

    def done() -> bool:
        nonlocal last
        last = scrape(server)
        return last == want

    try:
        wait_for(done, timeout, 0.1)
    except TimeoutError:
        diff = {
            k: (last.get(k), want.get(k))
            for k in sorted(set(last) | set(want))
            if last.get(k) != want.get(k)
        }
        raise AssertionError(f"scraped != expected: {diff}") from None


def streams_per_worker(workers: list[WorkerConnection]) -> dict[int, int]:
    return {w.pid: int(w.get_json("/healthz")["connections"]) for w in workers}


def test_one_scrape_sums_three_workers(
    start_server: Callable[..., Server],
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "counter_1.db").write_bytes(b"left over from an earlier run")
    server = start_server(
        "gunicorn",
        app=APP,
        env={
            "EVENTSTREAM_REDIS_URL": redis_server.url,
            "EVENTSTREAM_METRICS": "1",
            "EVENTSTREAM_MAX_LIFETIME": str(LIFETIME),
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        },
        args=["-c", CONFIG, "-w", "3", "--keep-alive", "120"],
    )
    started = time.monotonic()
    # gunicorn.conf.py's on_starting emptied the directory.
    assert not (metrics_dir / "counter_1.db").exists()
    workers = worker_connections(server, 3)
    clients: list[SSEClient] = []
    try:
        until_scraped(server, expected())

        # 30 streams, spread over the workers by the kernel.
        clients = open_clients(server.port, "/stream/lobby", 30)
        spread = streams_per_worker(workers)
        assert sum(spread.values()) == 30
        until_scraped(server, expected(connections=30, connections_opened_total=30))

        # 50 events, published through the three workers in turn; every
        # stream gets all of them.
        ids = [
            workers[n % 3].publish("lobby", {"n": n}, event="chat") for n in range(50)
        ]
        for client in clients:
            assert [e.id for e in client.read_events(50, timeout=20.0)] == ids
        now = expected(
            connections=30,
            connections_opened_total=30,
            events_published_total=50,
            deliveries_total=30 * 50,
        )
        until_scraped(server, now)

        # Resumes: three from the 40th event (10 replayed each), one from
        # an id older than this Redis (a reset event, then what it retains).
        for _ in range(3):
            client = SSEClient(server.port, "/stream/lobby", {"Last-Event-ID": ids[39]})
            clients.append(client)
            assert [e.id for e in client.read_events(10)] == ids[40:]
        client = SSEClient(server.port, "/stream/lobby", {"Last-Event-ID": "1-0"})
        clients.append(client)
        events = client.read_events(51)
        assert events[0].event == "eventstream-reset"
        assert [e.id for e in events[1:]] == ids
        now = expected(
            connections=34,
            connections_opened_total=34,
            events_published_total=50,
            deliveries_total=30 * 50 + 3 * 10 + 1 + 50,
            resumes_replayed=3,
            resumes_reset=1,
        )
        until_scraped(server, now)

        # Reason "client": four clients leave (RST).
        for client in clients[:4]:
            client.abort()
        open_now = [c for c in clients if not c.closed]
        now["eventstream_connections"] = 30
        now['eventstream_disconnects_total{reason="client"}'] = 4
        until_scraped(server, now)

        # Reason "shutdown": a worker is told to stop (SIGTERM) and ends its
        # streams at once; gunicorn starts another.
        spread = streams_per_worker(workers)
        stopping = max(spread, key=lambda pid: spread[pid])
        ended = spread[stopping]
        assert ended > 0
        os.kill(stopping, signal.SIGTERM)
        pump(open_now, lambda: sum(c.eof or c.ended for c in open_now) == ended, 10)
        now["eventstream_connections"] = 30 - ended
        now['eventstream_disconnects_total{reason="shutdown"}'] = ended
        until_scraped(server, now)

        # A worker killed outright (SIGKILL) counts no disconnect, but its
        # open streams leave the gauge (child_exit -> mark_process_dead);
        # its counters stay in the sums.
        alive = [w for w in workers if w.pid != stopping]
        spread = streams_per_worker(alive)
        killed = max(spread, key=lambda pid: spread[pid])
        lost = spread[killed]
        os.kill(killed, signal.SIGKILL)
        now["eventstream_connections"] = 30 - ended - lost
        until_scraped(server, now)

        # Reason "lifetime": the streams left end at EVENTSTREAM_MAX_LIFETIME.
        left = 30 - ended - lost
        assert time.monotonic() - started < LIFETIME * 0.9, "too slow to test"
        survivors = [w for w in alive if w.pid != killed]
        assert streams_per_worker(survivors) == {survivors[0].pid: left}
        now["eventstream_connections"] = 0
        now['eventstream_disconnects_total{reason="lifetime"}'] = left
        until_scraped(server, now, timeout=LIFETIME * 1.1 + 10)
        final = scrape(server)
        assert final == now
        assert final["eventstream_connections_opened_total"] == 34
        disconnects = sum(
            v for k, v in final.items() if k.startswith("eventstream_disconnects")
        )
        assert disconnects == 34 - lost
    finally:
        for client in clients:
            client.close()
        for worker in workers:
            worker.close()
    text = server.request("GET", "/metrics")[1].decode()
    print("\n".join(ln for ln in text.splitlines() if ln.startswith("eventstream_")))
    assert "lobby" not in text
    for line in text.splitlines():
        if line.startswith("eventstream_") and "{" in line:
            assert line.partition("{")[2].partition("=")[0] in ("reason", "result")
