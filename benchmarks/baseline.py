"""The hand-written baseline: what a Flask user writes for SSE without a
library. Plain Flask on gevent's WSGIServer (monkey-patched), one gevent
``Queue`` per subscriber, and a publish view that formats the event once and
puts it into every subscriber's queue. No ids, no history, no disconnect
watcher: a dead client is noticed only when a heartbeat write fails.

It serves the routes the benchmark uses, with the example app's request and
response shapes: ``GET /stream/<channel>``, ``POST /publish/<channel>``
(JSON ``{"data": ..., "event": ...}`` -> 202) and ``GET /healthz``.

Run: ``python -m benchmarks.baseline PORT`` (BASELINE_HEARTBEAT seconds
between heartbeats, default 15). Access logging is off, as it is by default
under gunicorn, so that both servers do the same work per request.

Like any plain WSGIServer, it leaves Nagle's algorithm on: pywsgi sends a
response's headers and body in two writes, so each non-streaming response
(the publish view's 202) waits for the client's delayed ACK, about 40 ms on
Linux. Gunicorn sets TCP_NODELAY on its listener, which accepted sockets
inherit. BASELINE_NODELAY=1 sets it here too, to separate that effect from
the cost of the fan-out itself.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import typing as t  # noqa: E402

from flask import Flask  # noqa: E402
from flask import jsonify  # noqa: E402
from flask import request  # noqa: E402
from flask import Response  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402
from gevent.queue import Empty  # noqa: E402
from gevent.queue import Queue  # noqa: E402

HEARTBEAT = float(os.environ.get("BASELINE_HEARTBEAT", "15"))

app = Flask(__name__)
subscribers: dict[str, set[Queue]] = {}


@app.get("/stream/<channel>")
def stream(channel: str) -> Response:
    def events() -> t.Iterator[str]:
        queue: Queue = Queue()
        subscribers.setdefault(channel, set()).add(queue)
        try:
            yield "retry: 3000\n\n"
            while True:
                try:
                    yield queue.get(timeout=HEARTBEAT)
                except Empty:
                    yield ":\n\n"
        finally:
            queues = subscribers.get(channel)
            if queues is not None:
                queues.discard(queue)
                if not queues:
                    del subscribers[channel]

    return Response(
        events(),
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@app.post("/publish/<channel>")
def publish(channel: str) -> t.Any:
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or "data" not in body:
        return jsonify(error="Expected a JSON object {'data': ...}."), 400
    message = ""
    if body.get("event"):
        message += f"event: {body['event']}\n"
    message += f"data: {json.dumps(body['data'])}\n\n"
    for queue in list(subscribers.get(channel, ())):
        queue.put(message)
    return jsonify(channel=channel), 202


@app.get("/healthz")
def healthz() -> t.Any:
    return jsonify(
        connections=sum(len(q) for q in subscribers.values()),
        channels={name: len(q) for name, q in subscribers.items()},
    )


def main() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 5001
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if os.environ.get("BASELINE_NODELAY") == "1":
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(2048)
    server = WSGIServer(listener, app, log=None)
    server.serve_forever()


if __name__ == "__main__":
    main()
