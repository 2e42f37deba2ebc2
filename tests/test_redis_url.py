"""EVENTSTREAM_REDIS_URL forms and EVENTSTREAM_REDIS_OPTIONS checks that need
no server: every accepted form parses to what it names, and every malformed
one fails with a message that names the key, the problem and the accepted
forms, without the password."""

from __future__ import annotations

import pytest

from flask_eventstream.backends.redis.url import check_options
from flask_eventstream.backends.redis.url import FORMS
from flask_eventstream.backends.redis.url import parse_url
from flask_eventstream.backends.redis.url import redact
from flask_eventstream.backends.redis.url import Sentinel
from flask_eventstream.backends.redis.url import Server


@pytest.mark.parametrize(
    "url",
    [
        "redis://localhost",
        "redis://127.0.0.1:6379",
        "redis://127.0.0.1:6379/0",
        "redis://:secret@redis.example:6380/3",
        "redis://app:s%40cret@redis.example:6380/3",
        "redis://[::1]:6379/0",
        "REDIS://localhost/1",
        "rediss://default:secret@managed.example:6380/0",
        "redis://localhost:6379/0?socket_keepalive=true",
        "unix:///run/redis/redis.sock",
        "unix:///run/redis/redis.sock?db=2",
        "unix://:secret@/run/redis/redis.sock?db=2",
    ],
)
def test_one_server_forms(url: str):
    assert parse_url(url) == Server(url)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "redis+sentinel://127.0.0.1:26379/0/mymaster",
            Sentinel((("127.0.0.1", 26379),), "mymaster"),
        ),
        (
            "redis+sentinel://s1:26379,s2:26380,[::1]:26381/2/cache",
            Sentinel((("s1", 26379), ("s2", 26380), ("::1", 26381)), "cache", 2),
        ),
        (
            "redis+sentinel://:pw@s1:26379,s2:26379/0/mymaster",
            Sentinel((("s1", 26379), ("s2", 26379)), "mymaster", 0, None, "pw"),
        ),
        (
            "redis+sentinel://app:p%3Aw@s1:26379/1/my%20master",
            Sentinel((("s1", 26379),), "my master", 1, "app", "p:w"),
        ),
        (
            "redis+sentinel://app@s1:26379/0/m",
            Sentinel((("s1", 26379),), "m", 0, "app", None),
        ),
    ],
)
def test_sentinel_forms(url: str, expected: Sentinel):
    assert parse_url(url) == expected


def test_the_password_is_not_in_the_repr():
    target = parse_url("redis+sentinel://:hunter2@s1:26379/0/m")
    assert "hunter2" not in repr(target)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("localhost:6379", "it has no scheme"),
        ("", "it has no scheme"),
        ("http://localhost:6379/0", "the scheme must be one of redis://, rediss://"),
        ("redis+cluster2://h:1", "the scheme must be one of"),
        ("redis://", "it names no host"),
        ("redis://:secret@/0", "it names no host"),
        ("redis://localhost:port/0", "the port must be a number"),
        ("redis://localhost:0/0", "the port must be a number from 1 to 65535"),
        ("redis://localhost:70000/0", "the port must be a number from 1 to 65535"),
        ("redis://localhost:6379/zero", "the database must be a number"),
        ("redis://localhost:6379/0/extra", "the database must be a number"),
        ("redis://localhost:6379/0?db=x", "the database must be a number"),
        ("redis://h1:6379,h2:6379/0", "several hosts; for Sentinel use"),
        ("redis://::1:6379/0", "IPv6 address in brackets"),
        ("redis://[::1/0", "is not a host"),
        ("redis://[::1]x/0", "is not host:port"),
        ("redis://local host:6379", "whitespace"),
        ("redis://localhost:6379/0#frag", "#fragment"),
        ("unix://", "names no socket file"),
        ("unix://host/run/redis.sock", "a unix:// URL has no host"),
        ("unix:///run/redis.sock?db=one", "the database must be a number"),
        ("redis+sentinel://", "it names no Sentinel"),
        ("redis+sentinel://:pw@/0/m", "it names no Sentinel"),
        ("redis+sentinel://s1/0/mymaster", "'s1' has no port"),
        ("redis+sentinel://s1:26379,/0/m", "is not a host (empty)"),
        ("redis+sentinel://s1:x/0/mymaster", "the port must be a number"),
        ("redis+sentinel://s1:26379", "the path must be /db/service_name"),
        ("redis+sentinel://s1:26379/mymaster", "the path must be /db/service_name"),
        ("redis+sentinel://s1:26379/0/", "the path must be /db/service_name"),
        ("redis+sentinel://s1:26379/0/a/b", "the path must be /db/service_name"),
        ("redis+sentinel://s1:26379/x/mymaster", "the database must be a number"),
        ("redis+sentinel://s1:26379/0/m?ssl=1", "takes no ?query"),
    ],
)
def test_malformed_urls_name_the_key_problem_and_forms(url: str, problem: str):
    with pytest.raises(ValueError) as info:
        parse_url(url)
    message = str(info.value)
    assert message.startswith(
        f"EVENTSTREAM_REDIS_URL {redact(url)!r} is not a Redis URL: "
    )
    assert "secret" not in message
    assert problem in message
    for form in FORMS:
        assert form in message


def test_malformed_url_messages_hide_the_password():
    with pytest.raises(ValueError) as info:
        parse_url("redis://app:hunter2@h1:6379,h2:6379/0")
    assert "hunter2" not in str(info.value)
    assert "'redis://app:***@h1:6379,h2:6379/0'" in str(info.value)


@pytest.mark.parametrize("value", [None, 6379, b"redis://localhost"])
def test_a_url_that_is_not_a_string(value: object):
    with pytest.raises(TypeError, match="EVENTSTREAM_REDIS_URL must be a string"):
        parse_url(value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@h:1/0", "redis://:***@h:1/0"),
        ("redis://u:pw@h:1/0", "redis://u:***@h:1/0"),
        ("redis://u@h:1/0", "redis://***@h:1/0"),
        ("redis://h:1/0", "redis://h:1/0"),
        ("redis+sentinel://u:p@w@a:1,b:2/0/m", "redis+sentinel://u:***@a:1,b:2/0/m"),
        ("no scheme:pw@x", "no scheme:pw@x"),
    ],
)
def test_redact(url: str, shown: str):
    assert redact(url) == shown


# -- options --


def test_options_pass_through(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    options = {"ssl_ca_certs": str(ca), "socket_keepalive": True}
    assert check_options(options, Server("rediss://h")) == options
    sentinel = Sentinel((("h", 1),), "m")
    assert check_options({"sentinel_kwargs": {"password": "x"}}, sentinel)


@pytest.mark.parametrize(
    "value", [None, "ssl_ca_certs=/x", ["ssl"], {1: 2}, '{"ssl_ca_certs": "/x"}']
)
def test_options_must_be_a_dict(value: object):
    with pytest.raises(TypeError, match="EVENTSTREAM_REDIS_OPTIONS must be a dict"):
        check_options(value, Server("redis://h"))


@pytest.mark.parametrize(
    "name", ["decode_responses", "retry", "connection_pool", "host", "client_name"]
)
def test_options_the_library_sets_are_refused(name: str):
    with pytest.raises(
        ValueError, match=f"EVENTSTREAM_REDIS_OPTIONS may not set {name}"
    ):
        check_options({name: 1}, Server("redis://h"))


def test_option_files_must_exist(tmp_path):
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(ValueError, match=r"ssl_ca_certs '.*nope.pem' does not exist"):
        check_options({"ssl_ca_certs": missing}, Server("rediss://h"))
    with pytest.raises(ValueError, match=r"sentinel_kwargs.ssl_keyfile '.*' does not"):
        check_options(
            {"sentinel_kwargs": {"ssl_keyfile": missing}},
            Sentinel((("h", 1),), "m"),
        )
    with pytest.raises(TypeError, match="ssl_certfile must be a path"):
        check_options({"ssl_certfile": 3}, Server("rediss://h"))


def test_sentinel_kwargs_only_with_sentinel():
    with pytest.raises(
        ValueError, match=r"sentinel_kwargs applies only to a redis\+sentinel"
    ):
        check_options({"sentinel_kwargs": {}}, Server("redis://h"))
    with pytest.raises(TypeError, match="sentinel_kwargs must be a dict"):
        check_options({"sentinel_kwargs": "x"}, Sentinel((("h", 1),), "m"))
