"""Shared fixtures. Area-specific fixtures live in tests/support/*.py and are
loaded as plugins so every test module can use them."""

from __future__ import annotations

import gc
import importlib.util
import os
import shutil
import sys
import time
import typing as t

import pytest

from flask_eventstream.broker import Subscription
from flask_eventstream.connection import Connection

pytest_plugins = [
    "tests.support.servers",
    "tests.support.redis",
    "tests.support.sentinel",
    "tests.support.tls",
    "tests.support.browser",
]

IN_CI = bool(os.environ.get("CI"))


def _missing(message: str) -> t.NoReturn:
    """Skip, but fail under CI=true, where nothing may be skipped for want of
    a tool."""
    if IN_CI:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def require_tool(path_or_name: str, what: str) -> str:
    """Return the path of a system program (redis-server, chromium, openssl),
    which scripts/test.sh installs with apt-get.

    Python tools (gunicorn, flask, sphinx) are never looked up here: tests run
    them as ``sys.executable -m TOOL``, so they come from the environment that
    runs the tests; see :func:`require_module`."""
    found = path_or_name if os.path.isabs(path_or_name) else shutil.which(path_or_name)
    if found and os.path.exists(found):
        return found
    _missing(
        f"{what} ({path_or_name}) is not installed; bash scripts/test.sh installs it"
    )


def require_module(name: str) -> None:
    """Fail (or skip outside CI) unless ``sys.executable -m name`` can run."""
    if importlib.util.find_spec(name) is None:
        _missing(
            f"{name} is not installed for {sys.executable};"
            " pip install -e '.[test]' (bash scripts/test.sh does)"
        )


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
