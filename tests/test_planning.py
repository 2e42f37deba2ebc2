"""Resume planning as plain functions, without a Redis server: the rules the
in-memory and the Redis backend share, and the Redis reader's plan."""

from __future__ import annotations

import typing as t

import pytest

from flask_eventstream.backends.planning import is_unknown
from flask_eventstream.backends.planning import next_id
from flask_eventstream.backends.planning import read_starts
from flask_eventstream.backends.planning import replay
from flask_eventstream.backends.planning import reset_reason
from flask_eventstream.broker import Frame
from flask_eventstream.broker import Key
from flask_eventstream.testing import parse

pytest.importorskip("redis")

from flask_eventstream.backends.redis.reader import Pending  # noqa: E402
from flask_eventstream.backends.redis.reader import plan  # noqa: E402


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


def test_next_id_and_read_starts() -> None:
    assert next_id((5, 7)) == "5-8"
    assert next_id((5, 2**64 - 1)) == "6-0"
    assert read_starts(
        [(("a", "b"), (5, 0)), (("b", "c"), (3, 0)), (("c",), None)]
    ) == {"a": (5, 0), "b": (3, 0), "c": (3, 0)}
    assert read_starts([(("d",), None)]) == {"d": (1 << 62, 0)}


def entry(channel: str, key: Key, prev: Key | None) -> t.Any:
    fields = {b"d": b"x", b"p": f"{prev[0]}-{prev[1]}".encode() if prev else b""}
    return (key, channel, f"{key[0]}-{key[1]}", fields)


class _Sub:
    def __init__(self, *channels: str) -> None:
        self.channels = channels


def pending(since: Key | None, resume: bool, *channels: str) -> Pending:
    return Pending(t.cast(t.Any, _Sub(*channels)), since, resume)


def planned(
    since: Key | None,
    resume: bool,
    *channels: str,
    counter: Key | None,
    epoch: Key | None,
    history: int,
) -> tuple[str | None, list[t.Any]]:
    return plan(pending(since, resume, *channels), counter, epoch, ENTRIES, history)


ENTRIES = {
    "a": [entry("a", (3, 0), (1, 0)), entry("a", (6, 0), (3, 0))],
    "b": [entry("b", (4, 0), (2, 0))],
}


def test_plan_replays_what_followed_the_position() -> None:
    reason, streams = plan(pending((3, 0), True, "a", "b"), (6, 0), (1, 0), ENTRIES, 10)
    assert reason is None
    assert [[e[0] for e in s] for s in streams] == [[(6, 0)], [(4, 0)]]


def test_plan_reports_a_trimmed_predecessor_as_expired() -> None:
    # The oldest entry of "a" after 2-0 is 3-0, whose predecessor 1-0 is
    # older: nothing lost there. On "b", 4-0 follows 2-0: nothing lost.
    assert plan(pending((2, 0), True, "a", "b"), (6, 0), (1, 0), ENTRIES, 10)[0] is None
    # After 0-5, "a" starts at 3-0, whose predecessor 1-0 was trimmed.
    reason, streams = plan(pending((0, 5), True, "a"), (6, 0), None, ENTRIES, 10)
    assert reason == "expired" and len(streams) == 1


def test_plan_without_history_replays_nothing_and_reports_missed_events() -> None:
    reason, streams = plan(pending((3, 0), True, "a"), (6, 0), (1, 0), ENTRIES, 0)
    assert (reason, streams) == ("expired", [])
    assert plan(pending((6, 0), True, "a"), (6, 0), (1, 0), ENTRIES, 0) == (
        None,
        [],
    )


def test_plan_for_a_new_subscriber_never_resets() -> None:
    reason, streams = plan(pending((0, 5), False, "a"), (6, 0), (9, 0), ENTRIES, 0)
    assert reason is None and [e[0] for e in streams[0]] == [(3, 0), (6, 0)]
    assert planned(None, False, "a", counter=(6, 0), epoch=None, history=10) == (
        None,
        [],
    )
    # An id newer than the counter, or older than the epoch, is unknown.
    assert plan(pending((7, 0), True, "a"), (6, 0), (1, 0), ENTRIES, 10)[0] == "unknown"
    assert plan(pending((0, 1), True, "a"), (6, 0), (1, 0), ENTRIES, 10)[0] == "unknown"


def _key(f: Frame) -> Key:
    assert f.key is not None
    return f.key


def _same(f: Frame) -> Frame:
    return f
