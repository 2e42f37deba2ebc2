"""What may use what outside the package: the benchmarks stand alone
(nothing in benchmarks/ imports the test suite or serves one of its apps),
and the tests reach the library through its public modules only."""

from __future__ import annotations

import ast
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
TESTS = ROOT / "tests"
#: A module of the test suite named in a string (an app for a server to load).
_NAMED = re.compile(r"(?<![\w./-])tests(?:\.[A-Za-z_]\w*)+")


def uses_of_tests(path: pathlib.Path) -> list[str]:
    """Where ``path`` imports ``tests`` (at the top or in a function) or names
    one of its modules in a string, as ``line: what``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.extend(
                (node.lineno, f"names {name}") for name in _NAMED.findall(node.value)
            )
            continue
        for name in names:
            if name == "tests" or name.startswith("tests."):
                found.append((node.lineno, f"imports {name}"))
    return [f"{line}: {what}" for line, what in sorted(found)]


def test_no_benchmark_file_imports_the_tests() -> None:
    sources = sorted(BENCHMARKS.rglob("*.py"))
    assert BENCHMARKS / "quick_core.py" in sources
    assert BENCHMARKS / "redis_quick.py" in sources
    found = {
        path.relative_to(ROOT).as_posix(): uses
        for path in sources
        if (uses := uses_of_tests(path))
    }
    assert found == {}


def test_the_scan_sees_every_way_of_using_the_tests(tmp_path: pathlib.Path) -> None:
    source = tmp_path / "bench.py"
    source.write_text(
        '"""Serves tests.apps.streams."""\n'
        "import tests.support.servers\n"
        "from tests import conftest\n"
        "def f():\n"
        "    from tests.support.redis import RedisServer\n"
        "APP = 'tests.apps.streams:create_app'\n"
        "OK = ['benchmarks.app', 'see tests/test_x.py', 'unittests.x']\n"
    )
    assert uses_of_tests(source) == [
        "1: names tests.apps.streams",
        "2: imports tests.support.servers",
        "3: imports tests",
        "5: imports tests.support.redis",
        "6: names tests.apps.streams",
    ]


def test_the_benchmark_modules_import_without_the_tests() -> None:
    modules = sorted(
        f"benchmarks.{path.stem}"
        for path in BENCHMARKS.glob("*.py")
        # __main__ runs the suite; baseline monkey-patches this process.
        if path.stem not in ("__init__", "__main__", "baseline")
    )
    assert "benchmarks.quick_core" in modules
    script = (
        "import importlib, sys\n"
        "sys.modules['tests'] = None\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout) == (0, "ok\n"), result.stderr


def private_imports(path: pathlib.Path) -> list[str]:
    """Where ``path`` imports a private module of the library
    (``flask_eventstream._state``, ``from flask_eventstream import _gevent``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            names += [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "flask_eventstream" and any(
                p.startswith("_") for p in parts[1:]
            ):
                found.append((node.lineno, name))
    return [f"{line}: {name}" for line, name in sorted(found)]


def test_no_test_imports_a_private_module_of_the_library() -> None:
    # flask_eventstream.testing has what tests need of an app's state.
    found = {
        path.relative_to(ROOT).as_posix(): uses
        for path in sorted(TESTS.rglob("*.py"))
        if (uses := private_imports(path))
    }
    assert found == {}


def test_the_private_import_scan_sees_them(tmp_path: pathlib.Path) -> None:
    source = tmp_path / "test_x.py"
    source.write_text(
        "from flask_eventstream._state import state_for\n"
        "from flask_eventstream import _gevent, testing\n"
        "def f():\n"
        "    import flask_eventstream._gevent as g\n"
        "from flask_eventstream.testing import broker\n"
    )
    assert private_imports(source) == [
        "1: flask_eventstream._state",
        "1: flask_eventstream._state.state_for",
        "2: flask_eventstream._gevent",
        "4: flask_eventstream._gevent",
    ]
