"""Signed grants on their own: signing, verifying, and every way a token is
refused; and redacting grants from log lines."""

from __future__ import annotations

import base64
import logging
import secrets
import zlib

import pytest
from itsdangerous import URLSafeTimedSerializer

from flask_eventstream.grants import check_user
from flask_eventstream.grants import Grant
from flask_eventstream.grants import GrantInvalid
from flask_eventstream.grants import load_grant
from flask_eventstream.grants import MAX_GRANT_LENGTH
from flask_eventstream.grants import redact
from flask_eventstream.grants import RedactGrants
from flask_eventstream.grants import SALT
from flask_eventstream.grants import sign_grant

KEYS = ["s3cret-key-of-this-app"]
NOW = 1_800_000_000.0
B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def refusal(token: object, keys: list[str] = KEYS, now: float = NOW + 1) -> str:
    with pytest.raises(GrantInvalid) as info:
        load_grant(keys, token, now=now)
    return info.value.reason


def test_round_trip() -> None:
    token = sign_grant(KEYS, ["private-alice", "lobby"], "alice", 60, now=NOW)
    grant = load_grant(KEYS, token, now=NOW + 59.9)
    assert grant == Grant(
        channels=frozenset({"private-alice", "lobby"}),
        user="alice",
        issued=NOW,
        expires=NOW + 60,
    )
    assert grant.covers(["lobby"])
    assert grant.covers(["lobby", "private-alice"])
    assert not grant.covers(["lobby", "private-bob"])


def test_token_is_url_safe_and_short() -> None:
    token = sign_grant(KEYS, ["lobby"], "alice", 3600, now=NOW)
    assert set(token) <= set(B64 + ".")
    assert len(token) < 150


def test_grant_without_user() -> None:
    token = sign_grant(KEYS, ["lobby"], None, 10, now=NOW)
    assert load_grant(KEYS, token, now=NOW).user is None


def test_expired_at_its_expiry_not_before() -> None:
    token = sign_grant(KEYS, ["lobby"], "alice", 2.5, now=NOW)
    assert load_grant(KEYS, token, now=NOW + 2.499).user == "alice"
    assert refusal(token, now=NOW + 2.5) == "expired"
    assert refusal(token, now=NOW + 86400) == "expired"


@pytest.mark.parametrize("token", [None, ""])
def test_missing(token: object) -> None:
    assert refusal(token) == "missing"


def test_every_flipped_signature_byte_is_refused() -> None:
    token = sign_grant(KEYS, ["lobby"], "alice", 60, now=NOW)
    payload, _, signature = token.rpartition(".")
    for i in range(len(signature)):
        # Half the alphabet away: the top bit of the six changes, which is
        # never a padding bit.
        other = B64[(B64.index(signature[i]) + 32) % 64]
        flipped = signature[:i] + other + signature[i + 1 :]
        assert refusal(payload + "." + flipped) == "invalid", i


def test_tampered_payload_is_refused() -> None:
    token = sign_grant(KEYS, ["lobby"], "alice", 60, now=NOW)
    body, timestamp, signature = token.rsplit(".", 2)
    forged = sign_grant(KEYS, ["private-bob"], "mallory", 60, now=NOW)
    # Another grant's payload with this one's signature.
    assert refusal(forged.rsplit(".", 2)[0] + "." + timestamp + "." + signature) == (
        "invalid"
    )
    # The payload decoded, changed, and re-encoded (compressed or not).
    compressed = body.startswith(".")
    data = body.lstrip(".")
    raw = base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))
    if compressed:
        raw = zlib.decompress(raw)
    changed = raw.replace(b"lobby", b"admin")
    assert changed != raw
    for packed in (changed, zlib.compress(changed)):
        prefix = "." if packed is not changed else ""
        reencoded = prefix + base64.urlsafe_b64encode(packed).rstrip(b"=").decode()
        assert refusal(f"{reencoded}.{timestamp}.{signature}") == "invalid"


def test_another_apps_key_is_refused() -> None:
    token = sign_grant(["the-other-app"], ["lobby"], "alice", 60, now=NOW)
    assert refusal(token) == "invalid"


def test_another_salt_is_refused() -> None:
    # Signed with the same key for something else (a session, another tool).
    token = URLSafeTimedSerializer(KEYS[0], salt="cookie-session").dumps(
        {"c": ["lobby"], "u": "alice", "i": int(NOW * 1000), "e": 60000}
    )
    assert refusal(token) == "invalid"


def test_right_key_wrong_shape_is_refused() -> None:
    serializer = URLSafeTimedSerializer(KEYS[0], salt=SALT)
    for payload in (
        ["lobby"],
        {"c": "lobby", "u": "alice", "i": 1, "e": 1},
        {"c": ["lobby"], "u": 7, "i": 1, "e": 1},
        {"c": ["lobby"], "u": "alice", "i": "1", "e": 1},
        {"c": ["lobby"], "u": "alice", "i": 1.5, "e": 1},
        {"c": ["lobby"], "u": "alice"},
    ):
        assert refusal(serializer.dumps(payload)) == "invalid", payload


def test_fallback_keys_verify_and_the_last_key_signs() -> None:
    old = sign_grant(["old-key"], ["lobby"], "alice", 60, now=NOW)
    keys = ["old-key", "new-key"]
    assert load_grant(keys, old, now=NOW).user == "alice"
    new = sign_grant(keys, ["lobby"], "alice", 60, now=NOW)
    assert load_grant(["new-key"], new, now=NOW).user == "alice"
    assert refusal(new, keys=["old-key"]) == "invalid"


@pytest.mark.parametrize(
    "token",
    [
        "x" * (10 * 1024),
        "a" * (MAX_GRANT_LENGTH + 1),
        "lobby",
        "...",
        "not a token at all",
        "\x00\xff",
        "é" * 100,
        b"bytes-token",
        42,
    ],
)
def test_junk_is_invalid_not_an_error(token: object) -> None:
    assert refusal(token) == "invalid"


def test_a_long_valid_looking_grant_is_refused_unread() -> None:
    # Random names: they do not compress.
    channels = [secrets.token_urlsafe(90) for _ in range(40)]
    token = sign_grant(KEYS, channels, "alice", 60, now=NOW)
    assert len(token) > MAX_GRANT_LENGTH
    assert refusal(token) == "invalid"


def test_sign_checks_its_arguments() -> None:
    with pytest.raises(TypeError, match="at least one channel"):
        sign_grant(KEYS, [], "alice", 60)
    with pytest.raises(ValueError, match="Invalid channel name"):
        sign_grant(KEYS, ["no spaces"], "alice", 60)
    for bad in (0, -1, float("nan"), float("inf"), True, "60"):
        with pytest.raises(ValueError, match="expires_in must be a positive"):
            sign_grant(KEYS, ["lobby"], "alice", bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="user must be a str or an int"):
        sign_grant(KEYS, ["lobby"], ["alice"], 60)  # type: ignore[arg-type]


def test_users() -> None:
    assert check_user("alice") == "alice"
    assert check_user(42) == "42"
    assert check_user("Zoë 🦊") == "Zoë 🦊"
    for bad in ("", "a\nb", "a\x00", "x" * 257):
        with pytest.raises(ValueError, match="Invalid user"):
            check_user(bad)
    for wrong in (None, True, 1.5, b"alice"):
        with pytest.raises(TypeError):
            check_user(wrong)


def test_redact() -> None:
    token = sign_grant(KEYS, ["lobby"], "alice", 60)
    line = f'127.0.0.1 - - "GET /stream/lobby?grant={token}&lastEventId=1-0 HTTP/1.1"'
    assert redact(line) == (
        '127.0.0.1 - - "GET /stream/lobby?grant=[redacted]&lastEventId=1-0 HTTP/1.1"'
    )
    assert redact(f"/s?a=1&grant={token}") == "/s?a=1&grant=[redacted]"
    assert redact(f"/s?grant={token} HTTP/1.1") == "/s?grant=[redacted] HTTP/1.1"
    assert redact("/s?regrant=1") == "/s?regrant=1"
    assert redact("nothing here") == "nothing here"


def test_redact_a_query_string() -> None:
    assert redact("grant=abc.def-_&x=1") == "grant=[redacted]&x=1"
    assert redact("x=1;grant=abc") == "x=1;grant=[redacted]"


def test_log_filter_redacts_messages_and_arguments() -> None:
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    class Atoms(dict[str, object]):
        def __getitem__(self, key: str) -> object:
            return super().get(key, "-")

    logger = logging.getLogger("tests.grants.redact")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = Collect()
    logger.addHandler(handler)
    logger.addFilter(RedactGrants())
    try:
        logger.info('"GET /s?grant=SECRET1 HTTP/1.1" %s', 200)
        logger.info('"%s" %s', "GET /s?grant=SECRET2 HTTP/1.1", 200)
        logger.info(
            "%(r)s %(q)s %(missing)s",
            Atoms(r="GET /s?grant=SECRET3", q="grant=SECRET4"),
        )
    finally:
        logger.removeHandler(handler)
    assert records == [
        '"GET /s?grant=[redacted] HTTP/1.1" 200',
        '"GET /s?grant=[redacted] HTTP/1.1" 200',
        "GET /s?grant=[redacted] grant=[redacted] -",
    ]
