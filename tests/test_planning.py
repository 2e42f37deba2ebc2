"""Resume planning of the in-memory backend as plain functions (the Redis
backend's, per channel, is in tests/test_positions.py)."""

from __future__ import annotations

import pytest

from flask_eventstream.backends.planning import is_unknown
from flask_eventstream.backends.planning import replay
from flask_eventstream.backends.planning import reset_reason
from flask_eventstream.broker import Frame
from flask_eventstream.broker import Key
from flask_eventstream.testing import parse


@pytest.mark.parametrize(
    ("last", "oldest", "newest", "unknown"),
    [
        ((5, 0), (1, 0), (9, 0), False),
        ((1, 0), (1, 0), (9, 0), False),
        ((9, 0), (1, 0), (9, 0), False),
        ((0, 9), (1, 0), (9, 0), True),  # older than the broker remembers
        ((9, 1), (1, 0), (9, 0), True),  # newer than anything assigned
        ((5, 0), None, (9, 0), False),  # no known beginning
        ((5, 0), None, None, True),  # nothing assigned at all
    ],
)
def test_a_position_is_unknown_outside_what_the_broker_remembers(
    last: Key, oldest: Key | None, newest: Key | None, unknown: bool
) -> None:
    assert is_unknown(last, oldest, newest) is unknown


def test_the_reset_reason_is_unknown_first_then_expired() -> None:
    assert reset_reason((5, 0), (1, 0), (9, 0)) is None
    assert reset_reason((5, 0), (1, 0), (9, 0), [None, (4, 0), (5, 0)]) is None
    assert reset_reason((5, 0), (1, 0), (9, 0), [None, (5, 1)]) == "expired"
    assert reset_reason((0, 0), (1, 0), (9, 0), [(5, 1)]) == "unknown"


def frame(key: Key) -> Frame:
    return Frame(f"id: {key[0]}-{key[1]}\ndata: x\n\n".encode(), key)


def test_replay_merges_channels_in_id_order_after_the_reset() -> None:
    a = [frame((2, 0)), frame((4, 0))]
    b = [frame((3, 0)), frame((3, 1))]
    frames = replay((1, 0), "expired", (4, 0), [a, b], _key, _same)
    assert [f.key for f in frames] == [(4, 0), (2, 0), (3, 0), (3, 1), (4, 0)]
    [reset] = parse(frames[0].data)
    assert (reset.event, reset.id) == ("eventstream-reset", "4-0")
    assert reset.data == '{"reason":"expired","last_event_id":"1-0"}'
    assert replay((1, 0), None, (4, 0), [a], _key, _same) == a
    # An item that cannot be sent is skipped.
    assert replay((1, 0), None, None, [a, b], _key, lambda f: None) == []


def _key(f: Frame) -> Key:
    assert f.key is not None
    return f.key


def _same(f: Frame) -> Frame:
    return f
