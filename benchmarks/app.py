"""The example app plus the routes the quick benchmarks need.

Served by :mod:`benchmarks.processes`::

    gunicorn -k gevent 'benchmarks.app:create_app()'
    python -m benchmarks.app            # gevent's WSGIServer, monkey-patched

Extra routes:

``GET /gen/<channel>``
    A generator view that subscribes, yields a ``subscribed`` event, then
    follows the channel. Its start and its ``finally:`` are counted.
``GET /named/<channel>?user=NAME``
    A subscription with a user named by the app, no grant (presence).
``GET /counters``
    ``{"gen_started", "gen_finally", "pid"}``: which worker answered, and
    how many ``/gen`` streams it started and finished.
``POST /bulk/<channel>?n=N&batch=B&size=S``
    Publishes N events of about S bytes inside the worker, yielding to the
    hub every B events; returns the first and last ids and the seconds it
    took.
``GET /memory?snapshot=PATH``
    The worker's memory as :mod:`benchmarks.memory` reads it (after a full
    garbage collection): RSS, the C allocator's and pymalloc's figures, and
    the open streams' greenlets (saved C stack, parked Python frames); with
    ``snapshot``, a :mod:`tracemalloc` snapshot is dumped to ``PATH``.
    Tracing starts when the app is created with ``BENCH_TRACEMALLOC=<frames>``
    in the environment.
"""

from __future__ import annotations

if __name__ == "__main__":  # before anything imports socket or threading
    from gevent import monkey

    monkey.patch_all()

import os  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
import typing as t  # noqa: E402

from flask import Flask  # noqa: E402
from flask import jsonify  # noqa: E402
from flask import request  # noqa: E402

from example_app import create_app as create_example_app  # noqa: E402
from example_app import stream  # noqa: E402
from flask_eventstream import Event  # noqa: E402
from flask_eventstream import eventstream  # noqa: E402

__all__ = ["create_app"]

_lock = threading.Lock()
_counters = {"gen_started": 0, "gen_finally": 0}


def _count(name: str) -> None:
    with _lock:
        _counters[name] += 1


def create_app(config: t.Mapping[str, t.Any] | None = None) -> Flask:
    frames = int(os.environ.get("BENCH_TRACEMALLOC") or 0)
    if frames and not tracemalloc.is_tracing():
        tracemalloc.start(frames)
    app = create_example_app(config)

    @app.get("/gen/<channel>")
    @eventstream
    def gen(channel: str) -> t.Iterator[t.Any]:
        _count("gen_started")
        try:
            sub = stream.subscribe(channel)
            yield Event(data=channel, event="subscribed")
            yield from sub
        finally:
            _count("gen_finally")

    @app.get("/named/<channel>")
    @eventstream
    def named(channel: str) -> t.Any:
        return stream.subscribe(channel, user=request.args["user"])

    @app.get("/counters")
    def counters() -> t.Any:
        with _lock:
            return jsonify(dict(_counters, pid=os.getpid()))

    @app.post("/bulk/<channel>")
    def bulk(channel: str) -> t.Any:
        n = int(request.args.get("n", "100"))
        batch = max(int(request.args.get("batch", "1")), 1)
        size = int(request.args.get("size", "0"))
        pad = "x" * size
        first = last = None
        start = time.perf_counter()
        for i in range(n):
            event = stream.publish(channel, {"i": i, "pad": pad} if size else i)
            last = event.id
            if first is None:
                first = last
            if (i + 1) % batch == 0:
                stream.sleep(0)
        return jsonify(first=first, last=last, seconds=time.perf_counter() - start), 202

    @app.get("/memory")
    def memory() -> t.Any:
        from benchmarks.memprobe import probe

        return jsonify(probe(app, request.args.get("snapshot")))

    return app


def main() -> None:
    import logging

    from flask_eventstream.serving import run

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    host = os.environ.get("EXAMPLE_HOST", "127.0.0.1")
    port = int(os.environ.get("EXAMPLE_PORT", "5000"))
    print(f" * serving benchmarks.app on http://{host}:{port}/", flush=True)
    run(create_app(), host, port)


if __name__ == "__main__":
    main()
