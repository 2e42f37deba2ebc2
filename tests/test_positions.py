"""Per-channel positions: the ids that carry them and the replay plan that
resumes from them (pure functions, no Redis)."""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flask_eventstream.backends.positions import channel_tag
from flask_eventstream.backends.positions import Entry
from flask_eventstream.backends.positions import format_position
from flask_eventstream.backends.positions import format_positions
from flask_eventstream.backends.positions import parse_positions
from flask_eventstream.backends.positions import plan_replay
from flask_eventstream.backends.positions import Position
from flask_eventstream.backends.positions import Snapshot
from flask_eventstream.backends.positions import Stale
from flask_eventstream.backends.positions import START

EPOCH = 1764489600123
channel_names = st.from_regex(r"[A-Za-z0-9_\-.:]{1,128}", fullmatch=True)
positions = st.builds(
    Position, st.integers(1, 2**53), st.integers(0, 2**63 - 1)
) | st.just(START)


def test_one_channel_id() -> None:
    assert format_position(Position(EPOCH, 42)) == "milfjszf.42"
    assert format_positions(["a"], {"a": Position(EPOCH, 42)}) == "milfjszf.42"
    assert parse_positions("milfjszf.42", ["a"]) == {"a": Position(EPOCH, 42)}
    assert format_positions(["a"], {}) == "0.0"
    assert parse_positions("0.0", ["a"]) == {"a": START}


def test_several_channels_id() -> None:
    pos = {"a": Position(EPOCH, 3), "b": Position(EPOCH + 1, 7)}
    value = format_positions(["a", "b"], pos)
    assert value == f"{channel_tag('a')}milfjszf.3~{channel_tag('b')}milfjszg.7"
    assert parse_positions(value, ["a", "b"]) == pos
    # Order does not matter; a channel the id does not cover is None.
    assert parse_positions(value, ["c", "b", "a"]) == {"c": None, **pos}
    # A stream on one of the channels resumes from its part.
    assert parse_positions(value, ["b"]) == {"b": pos["b"]}
    # A one-channel id says nothing about which channel it was.
    assert parse_positions("milfjszf.3", ["a", "b"]) == {"a": None, "b": None}


def test_ten_channels_on_three_shards_fit_well_under_a_kilobyte() -> None:
    # Long channel names, epochs of today and offsets of a billion events:
    # names do not go into the id.
    channels = [f"tenant-{i:03d}:" + "x" * 100 for i in range(10)]
    epoch = int(time.time() * 1000)
    pos = {c: Position(epoch + i, 10**9 + i) for i, c in enumerate(channels)}
    value = format_positions(channels, pos)
    assert len(value.encode()) == 10 * (4 + 8 + 1 + 10) + 9 == 239
    assert parse_positions(value, channels) == pos


def test_stale_and_malformed_ids() -> None:
    assert parse_positions("1700000000000-3", ["a"]) == Stale("1700000000000-3")
    assert parse_positions(" 1700000000000-3\t", ["a", "b"]) == Stale("1700000000000-3")
    for bad in [
        "",
        None,
        "x",
        "milfjszf",
        ".3",
        "milfjszf.-1",
        "MIL5.3",
        "milfjszf.3\n",
        "ab.3~",
        "~",
        "abcdmil5.3~abc",
        "a" * 3000,
        "milfjszf.3 x",
    ]:
        assert parse_positions(bad, ["a"]) is None, bad
    too_many = "~".join(f"{channel_tag(str(i))}1.1" for i in range(65))
    assert parse_positions(too_many, ["a"]) is None


def test_colliding_tags_are_not_trusted() -> None:
    tag = channel_tag("a")
    assert parse_positions(f"{tag}1.1~{tag}1.2", ["a", "b"]) == {
        "a": None,
        "b": None,
    }


@given(st.lists(channel_names, min_size=1, max_size=12, unique=True), st.data())
def test_round_trip(channels: list[str], data: st.DataObject) -> None:
    tags = {channel_tag(c) for c in channels}
    pos = {c: data.draw(positions) for c in channels}
    parsed = parse_positions(format_positions(channels, pos), channels)
    if len(tags) == len(channels):
        assert parsed == pos
    else:  # colliding tags: those channels are not trusted, never wrong
        assert isinstance(parsed, dict)
        assert all(parsed[c] in (None, pos[c]) for c in channels)


# -- replay planning --


def entries(epoch_time: int, offsets: range) -> list[Entry]:
    return [Entry(o, epoch_time + o, f"e{o}") for o in offsets]


def snap(epoch: int, first: int, top: int, after: int = 0) -> Snapshot:
    return Snapshot(
        Position(epoch, top),
        first,
        entries(1000, range(max(first, after + 1), top + 1)),
    )


def replayed(plan) -> list[tuple[str, int]]:  # type: ignore[no-untyped-def]
    return [(c, e.offset) for c, e in plan.replay]


def test_exact_resume_of_one_channel() -> None:
    plan = plan_replay(
        {"a": Position(7, 3)},
        {"a": snap(7, 1, 6, 3)},
        {"a": Position(7, 5)},
        resume=True,
    )
    # Up to the join; 6 comes live.
    assert (plan.reset, replayed(plan)) == (None, [("a", 4), ("a", 5)])
    assert plan.positions == {"a": Position(7, 5)}


def test_resume_of_several_channels_merges_by_time() -> None:
    a = Snapshot(Position(7, 3), 1, [Entry(2, 100, "a2"), Entry(3, 300, "a3")])
    b = Snapshot(Position(9, 2), 1, [Entry(1, 200, "b1"), Entry(2, 400, "b2")])
    plan = plan_replay(
        {"a": Position(7, 1), "b": START},
        {"a": a, "b": b},
        {"a": Position(7, 3), "b": Position(9, 2)},
        resume=True,
    )
    assert plan.reset is None
    assert replayed(plan) == [("a", 2), ("b", 1), ("a", 3), ("b", 2)]


def test_a_channel_keeps_its_order_when_clocks_go_back() -> None:
    a = Snapshot(Position(7, 2), 1, [Entry(1, 500, "a1"), Entry(2, 100, "a2")])
    plan = plan_replay({"a": START}, {"a": a}, {"a": Position(7, 2)}, resume=True)
    assert replayed(plan) == [("a", 1), ("a", 2)]


def test_trimmed_history_is_reported_expired() -> None:
    plan = plan_replay(
        {"a": Position(7, 2)},
        {"a": snap(7, 5, 8)},
        {"a": Position(7, 8)},
        resume=True,
    )
    assert plan.reset == "expired"
    assert replayed(plan) == [("a", o) for o in range(5, 9)]


def test_nothing_missed_is_exact_even_when_trimmed() -> None:
    plan = plan_replay(
        {"a": Position(7, 8)},
        {"a": snap(7, 5, 8, 8)},
        {"a": Position(7, 8)},
        resume=True,
    )
    assert (plan.reset, plan.replay) == (None, [])


@pytest.mark.parametrize(
    "since",
    [
        Position(6, 2),  # another epoch: the history was lost and recreated
        Position(7, 9),  # newer than anything published
        None,  # the id does not cover this channel
        Stale("1700000000000-3"),
    ],
)
def test_unknown_positions(since: Position | Stale | None) -> None:
    given_since = since if isinstance(since, Stale) else {"a": since}
    plan = plan_replay(
        given_since, {"a": snap(7, 1, 3)}, {"a": Position(7, 3)}, resume=True
    )
    assert plan.reset == "unknown"
    expected = [("a", o) for o in (1, 2, 3)] if since == Position(6, 2) else []
    assert replayed(plan) == expected
    assert plan.positions == {"a": Position(7, 3)}


def test_lost_history_without_new_events() -> None:
    empty = Snapshot(None, None, [])
    plan = plan_replay({"a": Position(7, 3)}, {"a": empty}, {"a": START}, resume=True)
    assert (plan.reset, plan.replay) == ("unknown", [])
    # From the start of a channel with no history: exact.
    plan = plan_replay({"a": START}, {"a": empty}, {"a": START}, resume=True)
    assert (plan.reset, plan.replay) == (None, [])


def test_new_stream_is_never_reset() -> None:
    plan = plan_replay(
        {"a": Position(7, 2), "b": None},
        {"a": snap(7, 2, 4), "b": snap(1, 1, 1)},
        {"a": Position(7, 4), "b": Position(1, 1)},
        resume=False,
    )
    assert plan.reset is None
    assert replayed(plan) == [("a", 3), ("a", 4)]


def test_without_history_missed_events_are_reported_not_replayed() -> None:
    plan = plan_replay(
        {"a": Position(7, 2)},
        {"a": snap(7, 4, 4)},
        {"a": Position(7, 4)},
        resume=True,
        history=False,
    )
    assert (plan.reset, plan.replay) == ("expired", [])
    plan = plan_replay(
        {"a": Position(7, 4)},
        {"a": snap(7, 4, 4, 4)},
        {"a": Position(7, 4)},
        resume=True,
        history=False,
    )
    assert (plan.reset, plan.replay) == (None, [])
