"""The Redis backend on a Redis Cluster of three masters and three replicas
(tests/support/rcluster.py): channels spread over the masters, exact resume
for one channel and for several on different masters, a short
Last-Event-ID, at most three connections per master per worker, and no
event lost or sent twice through a failover or a slot that moves. Also a
TLS-only cluster of three masters over ``rediss+cluster://`` (live delivery
and exact resume on different masters; a wrong CA fails fast), and a
cluster with no reachable node."""

from __future__ import annotations

import json
import time
import typing as t

import pytest
from flask import Flask
from flask import request

from flask_eventstream import EventStream
from flask_eventstream import eventstream
from flask_eventstream import PublishError
from flask_eventstream.backends.positions import parse_positions
from flask_eventstream.backends.positions import Position
from flask_eventstream.testing import read_events
from tests.support.rcluster import ClusterNode
from tests.support.rcluster import RedisCluster
from tests.support.rcluster import slot_of
from tests.support.redis import close_app
from tests.support.redis import ids_of
from tests.support.redis import Publisher
from tests.support.redis import redis_clients
from tests.support.redis import sse_id
from tests.support.redis import stream_key
from tests.support.servers import free_port
from tests.support.servers import open_clients
from tests.support.servers import pump
from tests.support.servers import Server
from tests.support.servers import wait_for

pytestmark = pytest.mark.redis

StartServer = t.Callable[..., Server]


def pos(event_id: str) -> Position:
    epoch, offset = event_id.split(".")
    return Position(int(epoch, 36), int(offset))


def channels_by_master(
    cluster: RedisCluster, per_master: int, prefix: str = "ch"
) -> dict[ClusterNode, list[str]]:
    """``per_master`` channel names served by each master."""
    found: dict[ClusterNode, list[str]] = {m: [] for m in cluster.masters()}
    slots = cluster.slots()
    i = 0
    while any(len(v) < per_master for v in found.values()):
        name = f"{prefix}{i}"
        i += 1
        slot = slot_of(stream_key(name))
        for node, ranges in slots.items():
            if any(a <= slot <= b for a, b in ranges) and len(found[node]) < per_master:
                found[node].append(name)
    return found


def app_on(cluster: RedisCluster, **config: t.Any) -> Flask:
    """An app on the cluster with ``/multi?ch=a&ch=b`` and ``/pub/<ch>``."""
    app = Flask(__name__)
    app.config.update({**cluster.config(), **config})
    stream = EventStream(app)

    @app.get("/multi")
    @eventstream
    def multi() -> t.Any:
        return stream.subscribe(*request.args.getlist("ch"))

    @app.get("/user/<channel>/<user>")
    @eventstream
    def as_user(channel: str, user: str) -> t.Any:
        return stream.subscribe(channel, user=user)

    @app.post("/pub/<channel>")
    def pub(channel: str) -> t.Any:
        return {"id": stream.publish(channel, request.get_json()).id}, 202

    return app


def pub(client: t.Any, channel: str, data: t.Any) -> str:
    response = client.post(f"/pub/{channel}", json=data)
    assert response.status_code == 202, response.get_data(as_text=True)
    return str(response.get_json()["id"])


def wait_registered(app: Flask, channel: str, count: int = 1) -> None:
    stream = app.extensions["eventstream"]
    with app.app_context():
        wait_for(lambda: stream.stats()["channels"].get(channel, 0) >= count, 10)


def entries(cluster: RedisCluster, channel: str) -> list[tuple[str, str]]:
    """(SSE id, data) of a channel's stream, from whichever master serves it."""
    raw = cluster.client().xrange(stream_key(channel))
    return [(sse_id(i), f[b"d"].decode()) for i, f in raw]


# -- channels over shards --


def test_channels_spread_over_masters_one_key_each(cluster: RedisCluster):
    app = app_on(cluster)
    try:
        client = app.test_client()
        by_master = channels_by_master(cluster, 2, "spread")
        channels = [c for names in by_master.values() for c in names]
        ids = {c: [pub(client, c, f"{c}-{i}") for i in range(3)] for c in channels}
        for channel, channel_ids in ids.items():
            assert [pos(i).offset for i in channel_ids] == [1, 2, 3]
            assert entries(cluster, channel) == [
                (i, f"{channel}-{n}") for n, i in enumerate(channel_ids)
            ]
        # Each channel is one key, on the master of its slot.
        for master, names in by_master.items():
            keys = sorted(k.decode() for k in master.client().keys("eventstream:*"))
            assert keys == sorted(stream_key(c) for c in names)
    finally:
        close_app(app)


def by_channel(datas: list[str]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for data in datas:
        found.setdefault(data.split("/")[0], []).append(data)
    return found


def check_resume_on_different_masters(cluster: RedisCluster, prefix: str) -> None:
    """Live delivery and exact resume of one channel and of three channels
    on three different masters, through two workers."""
    by_master = channels_by_master(cluster, 1, prefix)
    a, b, c = (names[0] for names in by_master.values())
    first, second = app_on(cluster), app_on(cluster)  # two workers
    try:
        client = first.test_client()
        query = f"/multi?ch={a}&ch={b}&ch={c}"
        stream = client.get(query, buffered=False)
        for channel in (a, b, c):
            wait_registered(first, channel)
        sent = {
            f"{ch}/{i}": pub(client, ch, f"{ch}/{i}")
            for i in range(3)
            for ch in (a, b, c)
        }
        events = read_events(stream, 9)
        # In order per channel (masters deliver independently of each other).
        assert by_channel([e.data for e in events]) == {
            ch: [f"{ch}/{i}" for i in range(3)] for ch in (a, b, c)
        }
        # Every id holds the position of the three channels: the newest
        # event of each seen so far.
        seen = dict.fromkeys((a, b, c), Position(0, 0))
        for event in events:
            seen[event.data.split("/")[0]] = pos(sent[event.data])
            assert parse_positions(event.id, [a, b, c]) == seen
        # Resumed on the other worker from the middle: exactly the rest.
        middle = events[4]
        other = second.test_client()
        resumed = other.get(query, headers={"Last-Event-ID": middle.id}, buffered=False)
        one = other.get(
            f"/multi?ch={b}", headers={"Last-Event-ID": sent[f"{b}/0"]}, buffered=False
        )
        live = pub(client, a, f"{a}/live")
        rest = read_events(resumed, 5)
        assert rest[-1].data == f"{a}/live"
        expected = by_channel([e.data for e in events[5:]])
        expected.setdefault(a, []).append(f"{a}/live")
        assert by_channel([e.data for e in rest]) == expected
        assert parse_positions(rest[-1].id, [a, b, c]) == {
            a: pos(live),
            b: pos(sent[f"{b}/2"]),
            c: pos(sent[f"{c}/2"]),
        }
        assert [(e.data, e.id) for e in read_events(one, 2)] == [
            (f"{b}/1", sent[f"{b}/1"]),
            (f"{b}/2", sent[f"{b}/2"]),
        ]
        stream.close()
    finally:
        close_app(first)
        close_app(second)


def test_resume_one_channel_and_several_on_different_masters(cluster: RedisCluster):
    check_resume_on_different_masters(cluster, "res")


def test_last_event_id_of_ten_channels_on_three_masters(cluster: RedisCluster):
    by_master = channels_by_master(cluster, 4, "tenant-0042:notifications-")
    channels = [c for names in by_master.values() for c in names][:10]
    assert len({cluster.master_of(stream_key(c)) for c in channels}) == 3
    app = app_on(cluster)
    try:
        client = app.test_client()
        query = "/multi?" + "&".join(f"ch={c}" for c in channels)
        stream = client.get(query, buffered=False)
        for channel in channels:
            wait_registered(app, channel)
        for i in range(3):
            for channel in channels:
                pub(client, channel, i)
        events = read_events(stream, 30)
        last = events[-1].id
        size = len(last.encode())
        # Four-character tags instead of the names, the epoch in base 36.
        assert size < 300, (size, last)
        print(f"Last-Event-ID for 10 channels on 3 masters: {size} bytes: {last}")
        positions = parse_positions(last, channels)
        assert isinstance(positions, dict)
        assert [p.offset for p in positions.values() if p] == [3] * 10
        # It resumes exactly.
        resumed = client.get(query, headers={"Last-Event-ID": last}, buffered=False)
        live = pub(client, channels[7], "live")
        [event] = read_events(resumed, 1)
        assert event.data == "live"
        assert parse_positions(event.id, channels) == {
            **positions,
            channels[7]: pos(live),
        }
        stream.close()
    finally:
        close_app(app)


def test_old_id_gets_a_reset_on_the_cluster(cluster: RedisCluster):
    app = app_on(cluster)
    try:
        client = app.test_client()
        ids = [pub(client, "old", i) for i in range(2)]
        stale = "1764489600123-0"
        response = client.get(
            "/multi?ch=old", headers={"Last-Event-ID": stale}, buffered=False
        )
        wait_registered(app, "old")
        live = pub(client, "old", "live")
        reset, event = read_events(response, 2)
        assert (reset.event, reset.id) == ("eventstream-reset", ids[-1])
        assert json.loads(reset.data) == {"reason": "unknown", "last_event_id": stale}
        assert (event.data, event.id) == ("live", live)
    finally:
        close_app(app)


def test_presence_and_disconnect_on_the_cluster(cluster: RedisCluster):
    # Their keys share one hash tag, so their scripts run in one slot.
    first, second = app_on(cluster), app_on(cluster)
    try:
        stream = first.test_client().get("/user/room/alice", buffered=False)
        other = second.test_client().get("/user/room/bob", buffered=False)
        wait_registered(first, "room")
        wait_registered(second, "room")
        ext = first.extensions["eventstream"]
        with first.app_context():
            wait_for(lambda: ext.presence("room") == {"alice": 1, "bob": 1}, 10)
            ext.disconnect(channel="room")
        # Both streams end, on both workers (the other within a second: its
        # reader hears the control message announced).
        started = time.monotonic()
        for response in (stream, other):
            for _ in response.response:
                assert time.monotonic() - started < 1
            response.close()
        assert time.monotonic() - started < 1
    finally:
        close_app(first)
        close_app(second)


# -- workers --


def start_worker(
    start_server: StartServer, cluster: RedisCluster, workers: int = 1, **env: str
) -> Server:
    server = start_server(
        "gunicorn",
        env={
            "EVENTSTREAM_REDIS_URL": cluster.url,
            "EVENTSTREAM_HEARTBEAT": "0.5",
            **env,
        },
        args=["-w", str(workers)],
    )
    wait_for(lambda: len(server.children()) == workers, 30)
    return server


@pytest.mark.server
def test_connections_per_master_with_200_streams_over_30_channels(
    start_server: StartServer, cluster: RedisCluster
):
    server = start_worker(start_server, cluster)
    [worker] = server.children()
    channels = [f"room{i}" for i in range(30)]
    assert {cluster.master_of(stream_key(c)) for c in channels} == set(
        cluster.masters()
    )
    clients = []
    try:
        for i in range(200):
            clients += open_clients(server.port, f"/gen/{channels[i % 30]}", 1)
        assert server.connections() == 200
        pump(clients, lambda: all(c.events for c in clients), 10)
        sent = {channel: server.publish(channel, channel) for channel in channels}
        pump(clients, lambda: all(len(ids_of(c)) >= 1 for c in clients), 20)
        for client in clients:
            assert ids_of(client) == [sent[client.path.rsplit("/", 1)[1]]]
        for node in cluster.running():
            mine = redis_clients(node.client(), worker)
            roles = sorted(c["name"].split(":")[1] for c in mine)
            if node.role() == "master":
                # One reader (every master has channels), at most two for
                # publishing and bookkeeping.
                assert roles.count("reader") == 1 and len(mine) <= 3, roles
            else:
                assert mine == [], (node, mine)
    finally:
        for client in clients:
            client.close()


def check_exact(clients: list[t.Any], expected: list[str]) -> None:
    pump(clients, lambda: all(len(ids_of(c)) >= len(expected) for c in clients), 30)
    for client in clients:
        assert not client.eof, "a stream was closed"
        assert ids_of(client) == expected


@pytest.mark.server
def test_a_slot_that_moves_while_publishing(
    start_server: StartServer, cluster: RedisCluster
):
    server = start_worker(start_server, cluster, workers=2)
    channel = "moving"
    key = stream_key(channel)
    slot = slot_of(key)
    src = cluster.master_of(key)
    dst = next(m for m in cluster.masters() if m is not src)
    clients = open_clients(server.port, f"/gen/{channel}", 10, record=True)
    try:
        pump(clients, lambda: all(c.events for c in clients), 10)
        publisher = Publisher(server, channel, pause=0.005)
        publisher.start()
        try:
            publisher.wait_for(20, 20)
            cluster.move_slot(slot, dst)
            assert cluster.master_of(key) is dst
            mark = len(publisher.accepted)
            publisher.wait_for(mark + 20, 20)
        finally:
            publisher.stop()
        assert publisher.errors == [] and publisher.refused == []
        stored = entries(cluster, channel)
        assert stored == publisher.accepted
        check_exact(clients, [i for i, _ in stored])
    finally:
        for client in clients:
            client.close()
        cluster.heal()


@pytest.mark.server
def test_failover_streams_resume_exactly(
    start_server: StartServer, cluster: RedisCluster
):
    server = start_worker(start_server, cluster, workers=2)
    channel = "failing"
    key = stream_key(channel)
    victim = cluster.master_of(key)
    replica = cluster.replica_of(victim)
    others = [
        c for names in channels_by_master(cluster, 1, "calm").values() for c in names
    ]
    multi = "/multi?" + "&".join(f"ch={c}" for c in [channel, *others])
    clients = open_clients(server.port, f"/gen/{channel}", 10, record=True)
    try:
        pump(clients, lambda: all(c.events for c in clients), 10)
        before = Publisher(server, channel)
        before.start()
        try:
            before.wait_for(20, 20)
        finally:
            before.stop()
        # Replication is asynchronous: kill once the replica has it all.
        wait_for(lambda: cluster.in_sync(victim, replica), 10)
        resume_from = before.accepted[9][0]
        cluster.kill(victim)
        after = Publisher(server, channel)
        after.start()
        try:
            after.wait_refused(1, 20)
            after.wait_for(20, 30)
        finally:
            after.stop()
        assert before.errors == after.errors == []
        assert replica.role() == "master"
        stored = entries(cluster, channel)
        assert stored == before.accepted + after.accepted
        check_exact(clients, [i for i, _ in stored])
        # A client resuming from before the failover, on either worker.
        resumed = open_clients(
            server.port, f"/gen/{channel}", 4, {"Last-Event-ID": resume_from}
        )
        try:
            check_exact(resumed, [i for i, _ in stored[10:]])
        finally:
            for client in resumed:
                client.close()
        # A stream on channels of every master goes on too.
        several = open_clients(server.port, multi, 1)
        try:
            pump(several, lambda: several[0].first_body_at, 10)
            server.publish(others[0], "x")
            new = server.publish(channel, "y")
            pump(several, lambda: len(several[0].events) >= 2, 10)
            got = several[0].events
            assert [e.data for e in got] == ["x", "y"]
            assert parse_positions(got[-1].id, [channel, *others])[channel] == pos(new)
        finally:
            several[0].close()
    finally:
        for client in clients:
            client.close()
        cluster.heal()


@pytest.mark.server
def test_failover_while_publishing_with_min_replicas(
    start_server: StartServer, cluster: RedisCluster
):
    # With EVENTSTREAM_REDIS_MIN_REPLICAS=1 an event is acknowledged (and
    # sent to streams) only once a replica has it, so killing the master at
    # any moment loses none. The promoted master has no replica until the
    # killed node is back as one: publishing fails until then.
    server = start_worker(
        start_server, cluster, workers=2, EVENTSTREAM_REDIS_MIN_REPLICAS="1"
    )
    channel = "replicated"
    key = stream_key(channel)
    victim = cluster.master_of(key)
    replica = cluster.replica_of(victim)
    # A process that only publishes (it reads nothing, so no reader of its
    # own notices the failover).
    solo = app_on(cluster, EVENTSTREAM_REDIS_MIN_REPLICAS=1)
    solo_client = solo.test_client()
    clients = open_clients(server.port, f"/gen/{channel}", 10, record=True)
    try:
        solo_ids = [pub(solo_client, channel, "solo-before")]
        pump(clients, lambda: all(c.events for c in clients), 10)
        publisher = Publisher(server, channel, pause=0.005)
        publisher.start()
        try:
            publisher.wait_for(30, 20)
            cluster.kill(victim)
            publisher.wait_refused(1, 20)
            wait_for(lambda: replica.role() == "master", 20)
            # The publishing process finds the new master, which has no
            # replica yet.
            with solo.app_context(), pytest.raises(PublishError, match="replicas"):
                solo.extensions["eventstream"].publish(channel, "solo-refused")
            mark = len(publisher.accepted)
            cluster.heal()
            # It finds the new master by itself.
            solo_ids.append(pub(solo_client, channel, "solo-after"))
            publisher.wait_for(mark + 20, 30)
        finally:
            publisher.stop()
        assert publisher.errors == []
        stored = entries(cluster, channel)
        # Every acknowledged event survived; refused ones may be there too
        # (published, then not acknowledged in time), and streams get them
        # all alike, once, in order.
        assert set(publisher.accepted) <= set(stored)
        assert set(solo_ids) <= {i for i, _ in stored}
        check_exact(clients, [i for i, _ in stored])
    finally:
        for client in clients:
            client.close()
        close_app(solo)
        cluster.heal()


# -- TLS --


def test_tls_cluster_live_and_resume_on_different_masters(tls_cluster: RedisCluster):
    assert tls_cluster.seed_url.startswith("rediss+cluster://")
    for node in tls_cluster.nodes:
        # No plain port: everything below went over TLS.
        argv = node.argv()
        assert argv[argv.index("--port") + 1] == "0"
        assert argv[argv.index("--tls-cluster") + 1] == "yes"
    assert len(tls_cluster.masters()) == 3
    check_resume_on_different_masters(tls_cluster, "tls")


def test_tls_cluster_with_a_wrong_ca_fails_fast_with_a_clear_error(
    tls_cluster: RedisCluster, other_ca: str
):
    app = app_on(tls_cluster, EVENTSTREAM_REDIS_OPTIONS={"ssl_ca_certs": other_ca})
    try:
        stream = app.extensions["eventstream"]
        with app.app_context():
            start = time.monotonic()
            with pytest.raises(PublishError) as info:
                stream.publish("tls-wrong", "x")
            elapsed = time.monotonic() - start
        assert elapsed < 0.5, elapsed
        message = str(info.value)
        assert "TLS handshake with Redis at rediss+cluster://127.0.0.1:" in message
        assert "certificate verify failed" in message
        assert "ssl_ca_certs in EVENTSTREAM_REDIS_OPTIONS" in message
        # Nothing was written through the right CA's eyes either.
        assert entries(tls_cluster, "tls-wrong") == []
    finally:
        close_app(app)


def test_publish_to_a_cluster_with_no_reachable_node_raises_publish_error():
    # The cluster client connects as it is made: that failure too is retried
    # (for about a second) and then reported as a PublishError.
    app = Flask(__name__)
    app.config["EVENTSTREAM_REDIS_URL"] = f"redis+cluster://127.0.0.1:{free_port()}"
    stream = EventStream(app)
    try:
        with app.app_context():
            start = time.monotonic()
            with pytest.raises(PublishError) as info:
                stream.publish("nowhere", "x")
            elapsed = time.monotonic() - start
        assert elapsed < 3, elapsed
        assert "Redis at redis+cluster://127.0.0.1:" in str(info.value)
        assert "is unreachable" in str(info.value)
    finally:
        close_app(app)


# -- URLs --


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://",
        "redis+cluster://127.0.0.1",
        "redis+cluster://127.0.0.1:7000,,127.0.0.1:7001",
        "rediss+cluster://u:p@127.0.0.1:x",
    ],
)
def test_malformed_cluster_urls_fail_at_init(url: str):
    app = Flask(__name__)
    app.config["EVENTSTREAM_REDIS_URL"] = url
    with pytest.raises(ValueError, match="EVENTSTREAM_REDIS_URL") as info:
        EventStream(app)
    assert ":p@" not in str(info.value)


def test_cluster_url_forms():
    from flask_eventstream.backends.redis.url import Cluster
    from flask_eventstream.backends.redis.url import parse_url

    target = parse_url("rediss+cluster://alice:s%40cret@10.0.0.1:7000,[::1]:7001")
    assert target == Cluster(
        (("10.0.0.1", 7000), ("::1", 7001)), True, "alice", "s@cret"
    )
    assert parse_url("redis+cluster://:pw@h:1") == Cluster(
        (("h", 1),), False, None, "pw"
    )
