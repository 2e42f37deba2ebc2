"""The test suite runs on a fresh machine: Python tools come from the
interpreter that runs the tests, never from ``PATH``."""

from __future__ import annotations

import json
import re
import typing as t
from pathlib import Path

import pytest

from tests.support.servers import Server

ROOT = Path(__file__).resolve().parent.parent
PYTHON_TOOLS = ("gunicorn", "flask", "pytest", "sphinx-build", "sphinx", "mypy", "ruff")
BARE_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


@pytest.mark.server
def test_gunicorn_runs_without_the_venv_on_path(
    start_server: t.Callable[..., Server], monkeypatch: pytest.MonkeyPatch
):
    # What a fresh machine has: the venv's bin/ is not on PATH, and no
    # gunicorn is installed anywhere else.
    monkeypatch.setenv("PATH", BARE_PATH)
    server = start_server("gunicorn")
    status, body = server.request("GET", "/healthz")
    assert status == 200
    assert json.loads(body)["connections"] == 0


def _python_sources() -> list[Path]:
    return sorted(
        p
        for folder in ("tests", "benchmarks", "example_app")
        for p in (ROOT / folder).rglob("*.py")
    )


def test_no_python_tool_is_looked_up_on_path():
    tools = "|".join(re.escape(tool) for tool in PYTHON_TOOLS)
    lookup = re.compile(
        rf"""(shutil\.which|require_tool)\(\s*["']({tools})["']"""
        rf"""|(Popen|run|call|check_output|create_subprocess_exec)\(\s*\[?\s*["']({tools})["']"""
    )
    offenders = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in _python_sources()
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if lookup.search(line) and path.name != "test_tooling.py"
    ]
    assert offenders == [], "run Python tools as [sys.executable, '-m', TOOL]"
