"""Redis as production runs it, against real redis-server processes: a bad
URL or bad options fail at init_app; TLS with the run's own CA (and a wrong
CA failing fast); the ACL user of docs/deploy.rst; two apps with different
key prefixes on one Redis; EVENTSTREAM_REDIS_MIN_REPLICAS with a replica
that stops answering; and Redis losing its data under live and resuming
clients."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import time
import typing as t

import pytest
from flask import Flask

from flask_eventstream import PublishError
from flask_eventstream.backends.redis.url import FORMS
from flask_eventstream.testing import EventParser
from flask_eventstream.testing import read_events
from tests.support.redis import close_app
from tests.support.redis import HOST
from tests.support.redis import RedisServer
from tests.support.redis import stream_entries
from tests.support.sentinel import NODE_OPTIONS
from tests.support.tls import TLSFiles

pytestmark = pytest.mark.redis

ROOT = pathlib.Path(__file__).resolve().parent.parent
StartRedis = t.Callable[..., RedisServer]


def make_app(config: t.Mapping[str, t.Any]) -> Flask:
    from example_app import create_app

    return create_app(dict(config))


@pytest.fixture
def apps() -> t.Iterator[t.Callable[[t.Mapping[str, t.Any]], Flask]]:
    made: list[Flask] = []

    def make(config: t.Mapping[str, t.Any]) -> Flask:
        app = make_app(config)
        made.append(app)
        return app

    yield make
    for app in made:
        close_app(app)


def post(client: t.Any, channel: str, data: t.Any) -> str:
    response = client.post(f"/publish/{channel}", json={"data": data})
    assert response.status_code == 202, response.get_data(as_text=True)
    return str(response.get_json()["id"])


class Reader:
    """Reads a streaming test-client response chunk by chunk."""

    def __init__(self, response: t.Any) -> None:
        self.response = response
        self.chunks = iter(response.response)
        self.parser = EventParser()
        self.events: list[t.Any] = []

    def until(self, count: int) -> list[tuple[str, str, str]]:
        while len(self.events) < count:
            self.events.extend(self.parser.feed(next(self.chunks)))
        return [(e.event, e.data, e.id) for e in self.events]

    def close(self) -> None:
        self.response.close()


# -- configuration --


@pytest.mark.parametrize(
    ("config", "error", "message"),
    [
        (
            {"EVENTSTREAM_REDIS_URL": "redis://h1:6379,h2:6379/0"},
            ValueError,
            "EVENTSTREAM_REDIS_URL 'redis://h1:6379,h2:6379/0' is not a Redis URL",
        ),
        (
            {"EVENTSTREAM_REDIS_URL": "redis+sentinel://:pw@s1:26379/mymaster"},
            ValueError,
            "the path must be /db/service_name",
        ),
        (
            {"EVENTSTREAM_REDIS_URL": "redis://h", "EVENTSTREAM_REDIS_OPTIONS": "x"},
            TypeError,
            "EVENTSTREAM_REDIS_OPTIONS must be a dict",
        ),
        (
            {
                "EVENTSTREAM_REDIS_URL": "redis://h",
                "EVENTSTREAM_REDIS_OPTIONS": {"no_such_option": 1},
            },
            ValueError,
            "EVENTSTREAM_REDIS_OPTIONS redis-py does not take these options"
            " (TypeError: ",
        ),
        (
            # TLS options on a plain URL: redis-py's plain connection refuses.
            {
                "EVENTSTREAM_REDIS_URL": "redis://h",
                "EVENTSTREAM_REDIS_OPTIONS": {"ssl_cert_reqs": "required"},
            },
            ValueError,
            "ssl_cert_reqs",
        ),
        (
            {
                "EVENTSTREAM_REDIS_URL": "rediss://h",
                "EVENTSTREAM_REDIS_OPTIONS": {"ssl_cert_reqs": "sometimes"},
            },
            ValueError,
            "Invalid SSL Certificate Requirements Flag: sometimes",
        ),
        (
            {
                "EVENTSTREAM_REDIS_URL": "redis+sentinel://s:26379/0/m",
                "EVENTSTREAM_REDIS_OPTIONS": {"sentinel_kwargs": {"nope": 1}},
            },
            ValueError,
            "EVENTSTREAM_REDIS_OPTIONS sentinel_kwargs: redis-py does not take",
        ),
        (
            {
                "EVENTSTREAM_REDIS_URL": "redis://h",
                "EVENTSTREAM_REDIS_OPTIONS": {"decode_responses": True},
            },
            ValueError,
            "EVENTSTREAM_REDIS_OPTIONS may not set decode_responses",
        ),
        (
            {"EVENTSTREAM_REDIS_URL": "redis://h", "EVENTSTREAM_REDIS_PREFIX": 3},
            TypeError,
            "EVENTSTREAM_REDIS_PREFIX must be a string",
        ),
        (
            {"EVENTSTREAM_REDIS_URL": "redis://h", "EVENTSTREAM_REDIS_PREFIX": ""},
            ValueError,
            "EVENTSTREAM_REDIS_PREFIX must be 1 to 128 characters",
        ),
        (
            {
                "EVENTSTREAM_REDIS_URL": "redis://h",
                "EVENTSTREAM_REDIS_MIN_REPLICAS": -1,
            },
            ValueError,
            "EVENTSTREAM_REDIS_MIN_REPLICAS must be >= 0",
        ),
    ],
)
def test_bad_redis_configuration_fails_at_init_app(
    config: dict[str, t.Any], error: type[Exception], message: str
):
    with pytest.raises(error) as info:
        make_app(config)
    assert message in str(info.value)
    assert "pw" not in str(info.value)
    if "is not a Redis URL" in str(info.value) or "does not take" in str(info.value):
        for form in FORMS:
            assert form in str(info.value)


def test_example_app_reads_redis_options_as_json(monkeypatch, tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    monkeypatch.setenv("EVENTSTREAM_REDIS_URL", "rediss://127.0.0.1:1/0")
    monkeypatch.setenv(
        "EVENTSTREAM_REDIS_OPTIONS", json.dumps({"ssl_ca_certs": str(ca)})
    )
    monkeypatch.setenv("EVENTSTREAM_REDIS_PREFIX", "shop:")
    monkeypatch.setenv("EVENTSTREAM_REDIS_MIN_REPLICAS", "1")
    app = make_app({})
    try:
        assert app.config["EVENTSTREAM_REDIS_OPTIONS"] == {"ssl_ca_certs": str(ca)}
        assert app.config["EVENTSTREAM_REDIS_PREFIX"] == "shop:"
        assert app.config["EVENTSTREAM_REDIS_MIN_REPLICAS"] == 1
    finally:
        close_app(app)
    monkeypatch.setenv("EVENTSTREAM_REDIS_OPTIONS", "{ssl_ca_certs: x}")
    with pytest.raises(ValueError, match="EVENTSTREAM_REDIS_OPTIONS=.* is not JSON"):
        make_app({})


# -- a Unix socket --


def test_publish_and_resume_over_a_unix_socket(start_redis: StartRedis, apps, tmp_path):
    path = tmp_path / "redis.sock"
    start_redis(extra=["--unixsocket", str(path), "--unixsocketperm", "700"])
    app = apps({"EVENTSTREAM_REDIS_URL": f"unix://{path}?db=0"})
    client = app.test_client()
    response = client.get("/stream/unix", buffered=False)
    ids = [post(client, "unix", i) for i in range(3)]
    assert [e.id for e in read_events(response, 3)] == ids
    resumed = client.get("/stream/unix", headers={"Last-Event-ID": ids[1]})
    assert [e.data for e in read_events(resumed, 1)] == ["2"]


# -- Sentinel --


def test_sentinel_url_with_a_password(start_sentinel, apps):
    setup = start_sentinel(password="s3nt-pw")
    assert setup.url.startswith("redis+sentinel://:s3nt-pw@127.0.0.1:")
    app = apps(setup.config())
    client = app.test_client()
    response = client.get("/stream/s", buffered=False)
    ids = [post(client, "s", i) for i in range(3)]
    assert [e.id for e in read_events(response, 3)] == ids
    assert [i for i, _ in stream_entries(setup.master, "s")] == ids
    wrong = apps({"EVENTSTREAM_REDIS_URL": setup.url.replace("s3nt-pw", "nope-pw")})
    start = time.monotonic()
    with wrong.app_context(), pytest.raises(PublishError) as info:
        wrong.extensions["eventstream"].publish("s", "x")
    assert time.monotonic() - start < 2
    assert "nope-pw" not in str(info.value)
    assert "the master 'mymaster' of the Sentinels at 127.0.0.1:" in str(info.value)


def test_sentinel_over_tls(start_sentinel, apps):
    """Nodes and Sentinels that speak TLS only: the CA is given for both,
    the Sentinels' in ``sentinel_kwargs``."""
    setup = start_sentinel(tls=True)
    assert "--port" in setup.master.argv()
    config = setup.config()
    assert config["EVENTSTREAM_REDIS_OPTIONS"]["sentinel_kwargs"]["ssl"] is True
    app = apps(config)
    client = app.test_client()
    response = client.get("/stream/st", buffered=False)
    ids = [post(client, "st", i) for i in range(3)]
    assert [e.id for e in read_events(response, 3)] == ids
    assert [i for i, _ in stream_entries(setup.master, "st")] == ids
    # Without TLS to the Sentinels: a clear error, in bounded time.
    options = config["EVENTSTREAM_REDIS_OPTIONS"]
    nodes_only = {k: v for k, v in options.items() if k != "sentinel_kwargs"}
    plain = apps({**config, "EVENTSTREAM_REDIS_OPTIONS": nodes_only})
    start = time.monotonic()
    with plain.app_context(), pytest.raises(PublishError) as info:
        plain.extensions["eventstream"].publish("st", "x")
    assert time.monotonic() - start < 5
    assert "the master 'mymaster' of the Sentinels at 127.0.0.1:" in str(info.value)


# -- TLS --


def test_publish_and_resume_over_tls(start_redis: StartRedis, apps):
    server = start_redis(tls=True)
    assert server.url.startswith("rediss://")
    app = apps(server.config())
    client = app.test_client()
    response = client.get("/stream/tls", buffered=False)
    ids = [post(client, "tls", i) for i in range(3)]
    assert [e.id for e in read_events(response, 3)] == ids
    resumed = client.get("/stream/tls", headers={"Last-Event-ID": ids[0]})
    assert [e.data for e in read_events(resumed, 2)] == ["1", "2"]
    # The server has no plain port.
    assert (
        "--port" in server.argv()
        and server.argv()[server.argv().index("--port") + 1] == "0"
    )


def test_wrong_ca_fails_fast_with_a_clear_error(
    start_redis: StartRedis, other_ca: str, apps
):
    server = start_redis(tls=True)
    app = apps(
        {**server.config(), "EVENTSTREAM_REDIS_OPTIONS": {"ssl_ca_certs": other_ca}}
    )
    stream = app.extensions["eventstream"]
    with app.app_context():
        start = time.monotonic()
        with pytest.raises(PublishError) as info:
            stream.publish("tls", "x")
        elapsed = time.monotonic() - start
    assert elapsed < 0.5, elapsed
    message = str(info.value)
    assert "TLS handshake with Redis at rediss://127.0.0.1:" in message
    assert "certificate verify failed" in message
    assert "ssl_ca_certs in EVENTSTREAM_REDIS_OPTIONS" in message
    response = app.test_client().post("/publish/tls", json={"data": "x"})
    assert response.status_code == 503
    assert stream_entries(server, "tls") == []


def test_plain_url_to_a_tls_server_fails_in_bounded_time(
    start_redis: StartRedis, tls_files: TLSFiles, apps
):
    server = start_redis(tls=True)
    app = apps({"EVENTSTREAM_REDIS_URL": f"redis://{HOST}:{server.port}/0"})
    stream = app.extensions["eventstream"]
    with app.app_context():
        start = time.monotonic()
        with pytest.raises(PublishError):
            stream.publish("tls", "x")
    assert time.monotonic() - start < 5


# -- ACL --


def acl_rules() -> list[str]:
    """The ACL SETUSER line of docs/deploy.rst, as arguments after the
    user name."""
    text = (ROOT / "docs" / "deploy.rst").read_text(encoding="utf-8")
    [line] = [
        line.strip()
        for line in text.splitlines()
        if line.strip().startswith("ACL SETUSER eventstream ")
    ]
    return line.split()[3:]


def add_user(server: RedisServer, rules: list[str], password: str) -> str:
    rules = [f">{password}" if r == ">CHANGE-ME" else r for r in rules]
    assert f">{password}" in rules
    server.client().execute_command("ACL", "SETUSER", "eventstream", "reset", *rules)
    return f"redis://eventstream:{password}@{HOST}:{server.port}/0"


def test_the_documented_acl_user_is_enough(
    redis_server: RedisServer,
    apps,
    caplog: pytest.LogCaptureFixture,
):
    rules = acl_rules()
    url = add_user(redis_server, rules, "s3cret-pw")
    app = apps({"EVENTSTREAM_REDIS_URL": url})
    client = app.test_client()
    first = client.get("/stream/acl1", buffered=False)
    second = client.get("/stream/acl2", buffered=False)
    ids = [post(client, "acl1", 1), post(client, "acl2", 2), post(client, "acl1", 3)]
    assert [e.id for e in read_events(first, 2)] == [ids[0], ids[2]]
    assert [e.id for e in read_events(second, 1)] == [ids[1]]
    resumed = client.get("/stream/acl1", headers={"Last-Event-ID": ids[0]})
    assert [e.id for e in read_events(resumed, 1)] == [ids[2]]
    assert "Lost Redis" not in caplog.text
    assert "s3cret-pw" not in caplog.text
    # The user can do nothing else.
    import redis

    limited = redis.Redis.from_url(url)
    try:
        with pytest.raises(redis.exceptions.NoPermissionError):
            limited.get("eventstream:acl1x")
        with pytest.raises(redis.exceptions.NoPermissionError):
            limited.xrange("other:acl1")
    finally:
        limited.close()


def test_the_documented_acl_user_with_min_replicas(start_redis: StartRedis, apps):
    master, replica = start_pair(start_redis)
    url = add_user(master, acl_rules(), "pw2")
    app = apps({"EVENTSTREAM_REDIS_URL": url, "EVENTSTREAM_REDIS_MIN_REPLICAS": 1})
    client = app.test_client()
    response = client.get("/stream/acl", buffered=False)
    ids = [post(client, "acl", i) for i in range(3)]
    assert [e.id for e in read_events(response, 3)] == ids
    assert replica.client().xlen("eventstream:{acl}") == 3


# -- key prefix --


def test_two_apps_with_different_prefixes_share_a_redis(
    redis_server: RedisServer, apps
):
    one = apps({**redis_server.config(), "EVENTSTREAM_REDIS_PREFIX": "one:"})
    two = apps({**redis_server.config(), "EVENTSTREAM_REDIS_PREFIX": "two:"})
    c1, c2 = one.test_client(), two.test_client()
    r1 = c1.get("/stream/lobby", buffered=False)
    r2 = c2.get("/stream/lobby", buffered=False)
    sent1 = [post(c1, "lobby", f"one{i}") for i in range(3)]
    sent2 = [post(c2, "lobby", f"two{i}") for i in range(2)]
    sent1.append(post(c1, "lobby", "one3"))
    got1 = read_events(r1, 4)
    got2 = read_events(r2, 2)
    assert [(e.id, e.data) for e in got1] == list(
        zip(sent1, ["one0", "one1", "one2", "one3"], strict=True)
    )
    assert [(e.id, e.data) for e in got2] == list(
        zip(sent2, ["two0", "two1"], strict=True)
    )
    # Nothing more arrives on either (the streams end at the deadline).
    assert (
        read_events(c1.get("/stream/lobby", headers={"Last-Event-ID": sent1[-1]}), 0)
        == []
    )
    keys = sorted(k.decode() for k in redis_server.client().keys("*"))
    assert keys == ["one:{lobby}", "two:{lobby}"]
    # Resuming one app from an id of the other does not mix them.
    resumed = c2.get("/stream/lobby", headers={"Last-Event-ID": sent2[0]})
    assert [e.data for e in read_events(resumed, 1)] == ["two1"]


# -- EVENTSTREAM_REDIS_MIN_REPLICAS --


def start_pair(start_redis: StartRedis) -> tuple[RedisServer, RedisServer]:
    """A master and a replica in sync with it."""
    master = start_redis(extra=NODE_OPTIONS)
    replica = start_redis(extra=[*NODE_OPTIONS, "--replicaof", HOST, str(master.port)])
    wait_replicas(master, 1)
    return master, replica


def wait_replicas(master: RedisServer, count: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        info = master.client().info("replication")
        online = [
            v
            for k, v in info.items()
            if k.startswith("slave") and v["state"] == "online"
        ]
        if len(online) >= count:
            return
        assert time.monotonic() < deadline, info
        time.sleep(0.02)


def test_min_replicas_waits_for_a_replica_and_retries_without_duplicates(
    start_redis: StartRedis, apps, monkeypatch
):
    from flask_eventstream.backends.redis import client as backend

    monkeypatch.setattr(backend, "PUBLISH_UNSURE_TIME", 2.5)
    master, replica = start_pair(start_redis)
    app = apps({**master.config(), "EVENTSTREAM_REDIS_MIN_REPLICAS": 1})
    stream = app.extensions["eventstream"]
    client = app.test_client()
    reader = Reader(client.get("/stream/w", buffered=False))
    try:
        first = post(client, "w", "first")
        assert reader.until(1) == [("message", "first", first)]
        # The replica stops acknowledging: publish() waits, retries with the
        # event's token, and gives up after a bounded time.
        os.kill(replica.pid, signal.SIGSTOP)
        try:
            with app.app_context():
                start = time.monotonic()
                with pytest.raises(PublishError) as info:
                    stream.publish("w", "unconfirmed")
                elapsed = time.monotonic() - start
            assert 2.5 <= elapsed < 5, elapsed
            assert "only 0 of 1 replicas acknowledging within 1000 ms" in str(
                info.value
            )
            # Redis has it once, however many times publish() tried; the
            # reader does not hand it out while no replica holds it.
            assert [d for _, d in stream_entries(master, "w")] == [
                "first",
                "unconfirmed",
            ]
            assert reader.events == reader.events[:1]
        finally:
            os.kill(replica.pid, signal.SIGCONT)
        # Once the replica holds it, it is delivered (once), then new events.
        last = post(client, "w", "last")
        unconfirmed = stream_entries(master, "w")[1][0]
        assert reader.until(3) == [
            ("message", "first", first),
            ("message", "unconfirmed", unconfirmed),
            ("message", "last", last),
        ]
        assert [d for _, d in stream_entries(replica, "w")] == [
            "first",
            "unconfirmed",
            "last",
        ]
    finally:
        reader.close()


def test_min_replicas_without_a_replica_writes_nothing(redis_server: RedisServer, apps):
    app = apps({**redis_server.config(), "EVENTSTREAM_REDIS_MIN_REPLICAS": 1})
    stream = app.extensions["eventstream"]
    with app.app_context():
        start = time.monotonic()
        with pytest.raises(PublishError, match="NOREPLICAS 0 of 1 replicas online"):
            stream.publish("n", "x")
    assert 0.5 < time.monotonic() - start < 2
    assert stream_entries(redis_server, "n") == []


def test_a_retry_after_a_lost_reply_is_found_by_its_token(
    start_redis: StartRedis, apps
):
    # The script ran, then the connection broke before the reply: the retry
    # (with the retry flag) returns the first id instead of adding the event.
    from flask_eventstream.backends.redis.scripts import PUBLISH

    master, _ = start_pair(start_redis)
    script = master.client().register_script(PUBLISH)
    keys = ["eventstream:{tok}"]
    first = script(keys=keys, args=["10", "tok-1", "0", "1", "1", "d", "x"])
    again = script(keys=keys, args=["10", "tok-1", "1", "1", "1", "d", "x"])
    assert again == first
    assert [d for _, d in stream_entries(master, "tok")] == ["x"]


# -- lost data --


@pytest.mark.parametrize("loss", ["flushall", "restart"])
def test_lost_data_resets_resuming_clients_then_live_events(
    redis_server: RedisServer, apps, loss: str
):
    app = apps(redis_server.config())
    client = app.test_client()
    live = Reader(client.get("/stream/v", buffered=False))
    try:
        old = [post(client, "v", f"old{i}") for i in range(3)]
        assert [e[2] for e in live.until(3)] == old
        if loss == "flushall":
            redis_server.client().flushall()
        else:
            redis_server.restart()  # --save '': everything is gone
        new = post(client, "v", "new0")
        resumer = Reader(
            client.get("/stream/v", headers={"Last-Event-ID": old[1]}, buffered=False)
        )
        try:
            reset = resumer.until(1)[0]
            assert reset[0] == "eventstream-reset"
            assert json.loads(reset[1]) == {
                "reason": "unknown",
                "last_event_id": old[1],
            }
            more = [post(client, "v", f"new{i}") for i in (1, 2)]
            # The resumed client: the reset, then what this Redis has, never
            # an old event again.
            got = resumer.until(4)[1:]
            assert got == [
                ("message", "new0", new),
                ("message", "new1", more[0]),
                ("message", "new2", more[1]),
            ]
        finally:
            resumer.close()
        # The live client simply goes on.
        assert live.until(6)[3:] == [
            ("message", "new0", new),
            ("message", "new1", more[0]),
            ("message", "new2", more[1]),
        ]
    finally:
        live.close()
