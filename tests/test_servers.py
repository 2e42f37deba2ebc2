"""Streams over real sockets on real servers: fan-out, resume, heartbeat,
limits, publishing from other greenlets and threads, the Werkzeug dev server
and a sync gunicorn worker. Servers run in subprocesses
(tests/support/servers.py); the example app is extended by tests/apps/streams.py."""

from __future__ import annotations

import json
import time
import typing as t

import pytest

from tests.support.servers import GEVENT_KINDS
from tests.support.servers import open_clients
from tests.support.servers import pump
from tests.support.servers import Server
from tests.support.servers import SSEClient
from tests.support.servers import wait_for

pytestmark = pytest.mark.server

StartServer = t.Callable[..., Server]


def wire(data: t.Any) -> str:
    """The text a client receives as ``data`` for a published value."""
    if isinstance(data, str):
        return data
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def triples(events: t.Iterable[t.Any]) -> list[tuple[str, str, str]]:
    return [(e.event, e.data, e.id) for e in events]


def publish_many(
    server: Server, channel: str, count: int, tag: str = "m"
) -> list[tuple[str, str, str]]:
    """Publish ``count`` events through separate POSTs; return what a client
    must receive for them."""
    sent = []
    for i in range(count):
        event = "chat" if i % 2 else None
        data: t.Any = (
            {"n": i, "tag": tag, "text": "α\nβ"} if i % 3 == 0 else f"{tag}{i}"
        )
        event_id = server.publish(channel, data, event)
        sent.append((event or "message", wire(data), event_id))
    return sent


def id_key(event_id: str) -> tuple[int, int]:
    ms, seq = event_id.split("-")
    return int(ms), int(seq)


# -- fan-out --


@pytest.mark.parametrize("kind", GEVENT_KINDS)
def test_fanout_to_many_clients_in_publish_order(start_server: StartServer, kind: str):
    server = start_server(kind)
    clients = open_clients(server.port, "/stream/lobby", 50)
    try:
        assert server.connections() == 50
        assert server.get_json("/healthz")["channels"] == {"lobby": 50}
        sent = publish_many(server, "lobby", 30)
        ids = [key for _, _, key in sent]
        assert sorted(ids, key=id_key) == ids and len(set(ids)) == 30
        # A last event marks the end: nothing may arrive between (no
        # duplicates, nothing extra).
        sent.append(("done", "end", server.publish("lobby", "end", "done")))
        pump(clients, lambda: all(len(c.events) >= len(sent) for c in clients), 15)
        for client in clients:
            assert triples(client.events) == sent
            assert client.parser.retry == 3000
    finally:
        for client in clients:
            client.close()
    server.wait_connections(0, 5)


# -- resume --


@pytest.mark.parametrize("kind", GEVENT_KINDS)
def test_resume_sends_exactly_the_missed_events_then_live(
    start_server: StartServer, kind: str
):
    server = start_server(kind, env={"EVENTSTREAM_HISTORY": "5"})
    with SSEClient(server.port, "/stream/news") as client:
        client.read_head()
        first = publish_many(server, "news", 3, "a")
        assert triples(client.read_events(3)) == first
        last_id = client.last_event_id
        assert last_id == first[-1][2]
    server.wait_connections(0, 5)
    missed = publish_many(server, "news", 3, "b")
    for headers, path in [
        ({"Last-Event-ID": last_id}, "/stream/news"),
        ({}, f"/stream/news?lastEventId={last_id}"),
        # The header wins over the query parameter.
        ({"Last-Event-ID": last_id}, f"/stream/news?lastEventId={missed[0][2]}"),
    ]:
        with SSEClient(server.port, path, headers) as client:
            assert client.read_head() == 200
            assert triples(client.read_events(len(missed))) == missed
            live = ("message", "live", server.publish("news", "live"))
            assert triples(client.read_events(1)) == [live]
            missed.append(live)
        server.wait_connections(0, 5)


@pytest.mark.parametrize("kind", GEVENT_KINDS)
def test_resume_from_trimmed_history_sends_reset_then_retained(
    start_server: StartServer, kind: str
):
    server = start_server(kind, env={"EVENTSTREAM_HISTORY": "5"})
    old = server.publish("news", "old")
    later = publish_many(server, "news", 8, "c")
    newest = later[-1][2]
    with SSEClient(server.port, "/stream/news", {"Last-Event-ID": old}) as client:
        assert client.read_head() == 200
        events = client.read_events(6)
        reset = events[0]
        assert (reset.event, reset.id) == ("eventstream-reset", newest)
        assert json.loads(reset.data) == {"reason": "expired", "last_event_id": old}
        assert triples(events[1:]) == later[-5:]
        live = ("message", "live", server.publish("news", "live"))
        assert triples(client.read_events(1)) == [live]


@pytest.mark.parametrize("kind", GEVENT_KINDS)
def test_unknown_and_garbage_last_event_ids(start_server: StartServer, kind: str):
    server = start_server(kind, env={"EVENTSTREAM_HISTORY": "5"})
    known = server.publish("news", "before")
    future = f"{id_key(known)[0] + 10**6}-0"
    with SSEClient(server.port, "/stream/news", {"Last-Event-ID": future}) as client:
        assert client.read_head() == 200
        [reset] = client.read_events(1)
        assert (reset.event, reset.id) == ("eventstream-reset", known)
        assert json.loads(reset.data) == {"reason": "unknown", "last_event_id": future}
    server.wait_connections(0, 5)
    garbage = [
        "garbage",
        "12-ab",
        "-1",
        "1-2-3",
        "9" * 1000,
        "%00",
        "1" * 16 + "-1",
        " ",
    ]
    for value in garbage:
        with SSEClient(server.port, "/stream/news", {"Last-Event-ID": value}) as client:
            assert client.read_head() == 200, value
            live = ("message", value, server.publish("news", value))
            # Treated as absent: no replay, no reset, just live events.
            assert triples(client.read_events(1)) == [live], value
    with SSEClient(server.port, "/stream/news?lastEventId=%FF%FE") as client:
        assert client.read_head() == 200
        live = ("message", "q", server.publish("news", "q"))
        assert triples(client.read_events(1)) == [live]


# -- the first bytes, and heartbeats --


@pytest.mark.parametrize("kind", GEVENT_KINDS)
def test_stream_opens_with_retry_at_once(start_server: StartServer, kind: str):
    server = start_server(
        kind, env={"EVENTSTREAM_HEARTBEAT": "60", "EVENTSTREAM_RETRY": "1234"}
    )
    with SSEClient(server.port, "/stream/quiet", record=True) as client:
        start = client.opened_at
        client.wait(lambda c: c.body_len >= len(b"retry: 1234\n\n"), 2.0)
        assert client.status == 200
        assert client.first_body_at is not None
        assert client.first_body_at - start < 1.0
        assert b"".join(chunk for _, chunk in client.chunks) == b"retry: 1234\n\n"
        headers = client.headers
        assert headers["content-type"] == "text/event-stream; charset=utf-8"
        assert headers["cache-control"] == "no-cache"
        assert headers["x-accel-buffering"] == "no"
        assert headers["transfer-encoding"] == "chunked"
        assert "content-length" not in headers


@pytest.mark.parametrize("kind", GEVENT_KINDS)
def test_idle_stream_gets_heartbeats_at_the_period(
    start_server: StartServer, kind: str
):
    server = start_server(kind, env={"EVENTSTREAM_HEARTBEAT": "0.3"})
    with SSEClient(server.port, "/stream/quiet", record=True) as client:
        client.wait(lambda c: len(c.chunks) >= 6, 5.0)
        first_at, first = client.chunks[0]
        assert first == b"retry: 3000\n\n"
        beats = client.chunks[1:6]
        assert [chunk for _, chunk in beats] == [b":\n\n"] * 5
        times = [first_at] + [at for at, _ in beats]
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        assert all(0.2 <= gap <= 0.8 for gap in gaps), gaps
        assert 0.25 <= sum(gaps) / len(gaps) <= 0.5, gaps
        assert client.events == []


# -- limits --


@pytest.mark.parametrize("kind", GEVENT_KINDS)
def test_max_connections_gives_503_with_retry_after(
    start_server: StartServer, kind: str
):
    server = start_server(
        kind, env={"EVENTSTREAM_MAX_CONNECTIONS": "3", "EVENTSTREAM_RETRY": "2500"}
    )
    clients = open_clients(server.port, "/stream/lobby", 3)
    try:
        with SSEClient(server.port, "/stream/lobby") as refused:
            assert refused.read_head() == 503
            assert refused.headers["retry-after"] == "3"
            assert b"Too many" in refused.read_body()
        assert server.connections() == 3
        clients.pop().close()
        server.wait_connections(2, 5)
        clients.extend(open_clients(server.port, "/stream/lobby", 1))
        sent = ("message", "ok", server.publish("lobby", "ok"))
        pump(clients, lambda: all(len(c.events) == 1 for c in clients), 5)
        assert all(triples(c.events) == [sent] for c in clients)
    finally:
        for client in clients:
            client.close()


@pytest.mark.parametrize("kind", GEVENT_KINDS)
def test_client_that_falls_behind_is_cut_off_and_resumes(
    start_server: StartServer, kind: str
):
    """A client that stops reading while events come fast is disconnected
    (QUEUE_SIZE), a reading client gets everything, and the slow one resumes
    from history without loss."""
    server = start_server(
        kind,
        env={
            "EVENTSTREAM_QUEUE_SIZE": "4",
            "EVENTSTREAM_HISTORY": "1000",
            "EVENTSTREAM_SEND_TIMEOUT": "60",
        },
    )
    reader = SSEClient(server.port, "/stream/fast")
    stalled = SSEClient(server.port, "/stream/fast", rcvbuf=4096)
    try:
        pump([reader, stalled], lambda: bool(reader.status and stalled.status), 5)
        # Big events fill the kernel buffers of the stalled client, then its
        # queue; the reading client keeps up with every POST.
        data = "x" * 100_000
        sent = []
        for _ in range(80):
            sent.append(("message", data, server.publish("fast", data)))
            reader.read_events(1, 5)
        assert triples(reader.events) == sent
        # The stalled client reads again: what was in the pipe, then the end.
        received = stalled.read_to_end(10)
        assert stalled.ended or stalled.eof
        assert "fell more than 4 events behind on fast" in server.stderr()
        assert 0 < len(received) < len(sent)
        assert triples(received) == sent[: len(received)]
        with SSEClient(
            server.port, "/stream/fast", {"Last-Event-ID": received[-1].id}
        ) as again:
            rest = again.read_events(len(sent) - len(received), 10)
            assert triples(rest) == sent[len(received) :]
    finally:
        reader.close()
        stalled.close()
    server.wait_connections(0, 5)


@pytest.mark.parametrize("kind", GEVENT_KINDS)
def test_frozen_client_is_dropped_after_send_timeout(
    start_server: StartServer, kind: str
):
    server = start_server(
        kind,
        env={
            "EVENTSTREAM_SEND_TIMEOUT": "1.5",
            "EVENTSTREAM_QUEUE_SIZE": "1000",
            "EVENTSTREAM_HEARTBEAT": "60",
        },
    )
    frozen = SSEClient(server.port, "/stream/big", rcvbuf=4096)
    try:
        frozen.read_head()
        server.wait_connections(1, 5)
        data = "y" * 500_000
        first_at = time.monotonic()
        for _ in range(24):  # 12 MB: more than any kernel buffer holds
            server.publish("big", data)
        last_at = time.monotonic()
        elapsed = server.wait_connections(0, 10)
        dropped_at = last_at + elapsed
        # Dropped once a write had blocked for the send timeout: not before,
        # and within a second or so of it.
        assert dropped_at - first_at >= 1.5
        assert elapsed <= 1.5 + 1.2, elapsed
    finally:
        frozen.close()


# -- publishing from elsewhere --


@pytest.mark.parametrize(
    ("kind", "via"),
    [
        ("pywsgi", "greenlet"),
        ("pywsgi", "thread"),
        ("pywsgi", "threadpool"),
        ("gunicorn", "greenlet"),
        ("gunicorn", "thread"),
        ("gunicorn", "threadpool"),
        ("werkzeug", "thread"),
    ],
)
def test_publish_from_another_greenlet_or_thread(
    start_server: StartServer, kind: str, via: str
):
    server = start_server(kind, env={"EVENTSTREAM_HEARTBEAT": "60"})
    clients = open_clients(server.port, "/stream/bg", 5)
    clients += open_clients(server.port, "/gen/bg", 5)
    try:
        result = server.post_json(f"/publish-bg/bg?via={via}&n=4")
        assert result["same_thread"] is False
        assert result["gevent"] is (kind != "werkzeug")
        sent = [
            ("bg", wire({"i": i, "via": via}), id_)
            for i, id_ in enumerate(result["ids"])
        ]
        assert len(sent) == 4
        pump(
            clients,
            lambda: (
                all(len(c.events) >= 4 for c in clients[:5])
                and all(len(c.events) >= 5 for c in clients[5:])
            ),
            5,
        )
        for client in clients[:5]:
            assert triples(client.events) == sent
        for client in clients[5:]:
            assert triples(client.events) == [("subscribed", "bg", "")] + sent
    finally:
        for client in clients:
            client.close()


# -- the Werkzeug development server and a sync gunicorn worker --


def test_werkzeug_dev_server_streams_and_notices_disconnects(
    start_server: StartServer,
):
    server = start_server("werkzeug", env={"EVENTSTREAM_HEARTBEAT": "0.4"})
    clients = open_clients(server.port, "/stream/lobby", 3)
    gen = SSEClient(server.port, "/gen/lobby")
    clients.append(gen)
    try:
        gen.read_events(1)
        sent = publish_many(server, "lobby", 5)
        pump(clients, lambda: all(len(c.events) >= 5 for c in clients[:3]), 5)
        for client in clients[:3]:
            assert triples(client.events) == sent
        assert triples(gen.read_events(5)) == sent
        assert server.connections() == 4
        for client in clients:
            client.close()
        # No socket watcher here: the next heartbeat writes find the sockets
        # closed (one or two periods).
        assert server.wait_connections(0, 3) <= 2.0
        counters = server.get_json("/counters")
        assert counters["gen_started"] == counters["gen_finally"] == 1
    finally:
        for client in clients:
            client.close()


def test_sync_gunicorn_worker_logs_a_clear_warning(start_server: StartServer):
    server = start_server("gunicorn-sync", env={"EVENTSTREAM_HEARTBEAT": "0.3"})
    with SSEClient(server.port, "/stream/lobby") as client:
        assert client.read_head() == 200
        wait_for(lambda: "synchronous gunicorn worker" in server.stderr(), 5)
    text = server.stderr()
    assert "each open event stream blocks a whole worker" in text
    assert "-k gevent" in text
