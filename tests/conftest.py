"""Shared fixtures. Area-specific fixtures live in tests/support/*.py and are
loaded as plugins so every test module can use them."""

from __future__ import annotations

import gc
import os
import shutil
import time

import pytest

from flask_eventstream.broker import Subscription
from flask_eventstream.connection import Connection

pytest_plugins = [
    "tests.support.servers",
    "tests.support.redis",
    "tests.support.browser",
]

IN_CI = bool(os.environ.get("CI"))


def require_tool(path_or_name: str, what: str) -> str:
    """Return the tool's path; skip without it, but fail under CI=true, where
    nothing may be skipped for want of a tool."""
    found = path_or_name if os.path.isabs(path_or_name) else shutil.which(path_or_name)
    if found and os.path.exists(found):
        return found
    message = (
        f"{what} ({path_or_name}) is not installed; bash scripts/test.sh installs it"
    )
    if IN_CI:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _leaks() -> list[object]:
    gc.collect()
    leaks: list[object] = []
    for obj in gc.get_objects():
        if isinstance(obj, Connection) and not obj.released:
            leaks.append(obj)
        elif (
            isinstance(obj, Subscription) and not obj.closed and obj.broker is not None
        ):
            if obj.broker.channels():
                leaks.append(obj)
    return leaks


@pytest.fixture(autouse=True)
def _no_leaked_streams(request: pytest.FixtureRequest):
    """Fail a test that leaves an open stream or a registered subscription in
    this process (streams in server subprocesses are checked by their tests)."""
    yield
    if request.node.get_closest_marker("allow_leaks"):
        return
    deadline = time.monotonic() + 2.0
    leaks = _leaks()
    while leaks and time.monotonic() < deadline:
        time.sleep(0.02)
        leaks = _leaks()
    assert not leaks, f"test leaked open streams or subscriptions: {leaks!r}"
