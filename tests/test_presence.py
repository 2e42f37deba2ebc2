"""Presence: the per-process table, and (below) presence across streams,
workers and backends."""

from __future__ import annotations

import threading

from flask_eventstream.presence import PresenceTable


def test_counts_and_transitions() -> None:
    table = PresenceTable()
    assert table.add(["lobby", "private-alice"], "alice") == ["lobby", "private-alice"]
    assert table.add(["lobby"], "alice") == []
    assert table.add(["lobby"], "bob") == ["lobby"]
    assert table.users("lobby") == {"alice": 2, "bob": 1}
    assert table.users("private-alice") == {"alice": 1}
    assert table.users("nowhere") == {}
    assert table.remove(["lobby"], "alice") == []
    assert table.remove(["lobby", "private-alice"], "alice") == [
        "lobby",
        "private-alice",
    ]
    assert table.users("lobby") == {"bob": 1}
    assert table.users("private-alice") == {}
    assert len(table) == 1
    assert list(table) == [("lobby", "bob", 1)]


def test_removing_what_is_not_there_changes_nothing() -> None:
    table = PresenceTable()
    table.add(["lobby"], "alice")
    table.take_changes()
    assert table.remove(["lobby"], "bob") == []
    assert table.remove(["other"], "alice") == []
    assert table.users("lobby") == {"alice": 1}
    assert table.take_changes() == {}


def test_changes_are_net_and_taken_once() -> None:
    table = PresenceTable()
    table.add(["lobby"], "alice")
    table.add(["lobby"], "alice")
    table.add(["lobby"], "bob")
    table.remove(["lobby"], "bob")
    assert table.pending
    assert table.take_changes() == {("lobby", "alice"): 2}
    assert not table.pending
    assert table.take_changes() == {}
    table.remove(["lobby"], "alice")
    changes = table.take_changes()
    assert changes == {("lobby", "alice"): -1}
    # Could not be applied: back, merged with what happened since.
    table.add(["lobby"], "carol")
    table.remove(["lobby"], "alice")
    table.give_back(changes)
    assert table.take_changes() == {("lobby", "alice"): -2, ("lobby", "carol"): 1}
    assert table.snapshot() == {("lobby", "carol"): 1}


def test_threads() -> None:
    table = PresenceTable()
    users = [f"u{i}" for i in range(8)]

    def churn(user: str) -> None:
        for _ in range(2000):
            table.add(["lobby", "b"], user)
        for _ in range(1999):
            table.remove(["lobby", "b"], user)

    threads = [threading.Thread(target=churn, args=(u,)) for u in users]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert table.users("lobby") == dict.fromkeys(users, 1)
    assert table.take_changes() == {
        (channel, user): 1 for channel in ("lobby", "b") for user in users
    }
