"""The timing rules of a stream, fed the time: no gevent, no clock, no sleep."""

from __future__ import annotations

import pytest

from flask_eventstream.timing import JITTER
from flask_eventstream.timing import Timing


def test_a_heartbeat_is_due_a_period_after_the_last_write() -> None:
    timing = Timing(100.0, heartbeat=15, send_timeout=30)
    assert [timing.heartbeat_due(t) for t in (100.0, 114.9, 115.0, 200.0)] == [
        False,
        False,
        True,
        True,
    ]
    timing.last_write = 110.0
    assert (timing.heartbeat_due(124.9), timing.heartbeat_due(125.0)) == (False, True)


def test_without_a_lifetime_a_stream_never_expires() -> None:
    timing = Timing(0.0, heartbeat=15, send_timeout=30)
    assert timing.deadline is None
    assert not timing.expired(1e12)
    assert timing.timeout(0.0) == 15.0
    assert timing.timeout(0.0, heartbeats=False) == float("inf")


@pytest.mark.parametrize("factor", [JITTER[0], 1.0, JITTER[1]])
def test_the_lifetime_is_jittered_within_ten_percent(factor: float) -> None:
    drawn: list[tuple[float, float]] = []

    def uniform(low: float, high: float) -> float:
        drawn.append((low, high))
        return factor

    timing = Timing(50.0, 1000, 30, max_lifetime=100, uniform=uniform)
    assert drawn == [(0.9, 1.1)]
    assert timing.deadline == 50.0 + 100 * factor
    deadline = timing.deadline
    assert not timing.expired(deadline - 0.001)
    assert timing.expired(deadline)
    assert timing.due(deadline) and not timing.due(deadline - 0.001)


def test_the_timeout_is_the_next_heartbeat_or_the_end() -> None:
    timing = Timing(0.0, 15, 30, max_lifetime=20, uniform=lambda a, b: 1.0)
    assert timing.timeout(0.0) == 15.0  # the heartbeat first
    assert timing.timeout(10.0, heartbeats=False) == 10.0
    timing.last_write = 14.0
    assert timing.timeout(14.0) == 6.0  # then the end
    assert timing.timeout(25.0) == 0.0  # never negative


def test_an_earlier_deadline_wins_and_a_later_one_is_ignored() -> None:
    timing = Timing(0.0, 15, 30, max_lifetime=100, uniform=lambda a, b: 1.0)
    timing.end_by(40.0)
    assert timing.deadline == 40.0
    timing.end_by(60.0)
    assert timing.deadline == 40.0
    open_ended = Timing(0.0, 15, 30)
    open_ended.end_by(5.0)
    assert open_ended.deadline == 5.0 and open_ended.expired(5.0)


def test_a_write_times_out_only_while_it_blocks() -> None:
    timing = Timing(0.0, 15, send_timeout=30)
    assert not timing.send_timed_out(1000.0)  # not writing
    timing.writing_since = 100.0
    assert [timing.send_timed_out(t) for t in (100.0, 130.0, 130.001)] == [
        False,
        False,
        True,
    ]
    # A blocked write is not idle: no heartbeat is asked for meanwhile, but
    # the watchdog sees the stream as due once a period passed.
    timing.writing_since = None
    timing.last_write = 100.0
    assert timing.due(115.0) and not timing.send_timed_out(1e9)
