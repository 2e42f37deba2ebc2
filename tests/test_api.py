"""The public API and the package's dependency rules."""

from __future__ import annotations
import __future__

import ast
import importlib
import pathlib
import subprocess
import sys
import types

import pytest

import flask_eventstream

PACKAGE = pathlib.Path(flask_eventstream.__file__).parent
SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_sources_found() -> None:
    names = {p.relative_to(PACKAGE).as_posix() for p in SOURCES}
    assert {"__init__.py", "sse.py", "broker.py", "_gevent.py", "views.py"} <= names
    assert (PACKAGE / "py.typed").exists()


def _public_names(module: types.ModuleType) -> set[str]:
    return {
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType)
        and not isinstance(value, __future__._Feature)
    }


def test_all_is_complete_and_sorted() -> None:
    names = flask_eventstream.__all__
    assert names == sorted(names)
    assert len(set(names)) == len(names)
    assert set(names) == _public_names(flask_eventstream)
    for name in names:
        assert getattr(flask_eventstream, name) is not None


def test_documented_names_are_public() -> None:
    from flask_eventstream import Event  # noqa: F401
    from flask_eventstream import EventStream  # noqa: F401
    from flask_eventstream import eventstream  # noqa: F401
    from flask_eventstream import EventStreamError
    from flask_eventstream import PublishError

    assert issubclass(PublishError, EventStreamError)
    assert issubclass(EventStreamError, Exception)


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from flask_eventstream import *", namespace)
    namespace.pop("__builtins__")
    assert sorted(namespace) == flask_eventstream.__all__


@pytest.mark.parametrize(
    "module",
    [
        "flask_eventstream.sse",
        "flask_eventstream.testing",
        "flask_eventstream.signals",
        "flask_eventstream.exceptions",
        "flask_eventstream.broker",
        "flask_eventstream.extension",
        "flask_eventstream.views",
        "flask_eventstream.serving",
        "flask_eventstream.backends.memory",
    ],
)
def test_submodule_all_names_exist(module: str) -> None:
    mod = importlib.import_module(module)
    assert len(set(mod.__all__)) == len(mod.__all__)
    for name in mod.__all__:
        assert hasattr(mod, name), f"{module}.{name}"


def test_testing_module_exposes_the_documented_helpers() -> None:
    from flask_eventstream import testing

    assert set(testing.__all__) == {
        "EventParser",
        "ReceivedEvent",
        "broker",
        "connection",
        "direct_writes",
        "parse",
        "read_events",
        "served_by",
        "settings",
    }


def test_signals_module_exposes_the_documented_signals() -> None:
    from flask_eventstream import signals

    assert set(signals.__all__) == {
        "client_connected",
        "client_disconnected",
        "event_published",
    }


# -- modules that must work without the others' dependencies --

_BLOCKED_IMPORT = """
import sys, types
for name in {blocked!r}:
    sys.modules[name] = None
{stub}
import {module} as m
for name in {blocked!r}:
    assert sys.modules.get(name) is None, name
{check}
print("ok")
"""

# The package's __init__ re-exports EventStream (which needs Flask), so the
# module is imported with the package's __init__ replaced by an empty stub:
# what is checked is the module's own imports.
_STUB = """
pkg = types.ModuleType("flask_eventstream")
pkg.__path__ = [{path!r}]
sys.modules["flask_eventstream"] = pkg
"""


def _run_blocked(module: str, blocked: list[str], check: str) -> None:
    code = _BLOCKED_IMPORT.format(
        blocked=blocked,
        module=module,
        stub=_STUB.format(path=str(PACKAGE)),
        check=check,
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(PACKAGE.parent),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


FRAMEWORKS = ["flask", "werkzeug", "click", "gevent", "greenlet", "redis", "blinker"]


def test_sse_imports_only_the_standard_library() -> None:
    _run_blocked(
        "flask_eventstream.sse",
        FRAMEWORKS,
        "assert [e.data for e in m.parse(m.encode(m.Event('a\\u2028b\\nc')))]"
        " == ['a\\u2028b\\nc']",
    )


def test_timing_imports_only_the_standard_library() -> None:
    _run_blocked(
        "flask_eventstream.timing",
        FRAMEWORKS,
        "assert m.Timing(0.0, 15, 30).heartbeat_due(15.0)",
    )


def test_broker_and_memory_backend_need_only_blinker() -> None:
    _run_blocked(
        "flask_eventstream.backends.memory",
        ["flask", "werkzeug", "click", "gevent", "greenlet", "redis"],
        "from flask_eventstream.broker import Broker\n"
        "b = Broker(lambda broker: m.MemoryBackend(broker))\n"
        "e = b.publish('c', __import__('flask_eventstream.sse').sse.Event('x'))\n"
        "assert e.id",
    )


def test_the_blocking_really_blocks() -> None:
    # The harness itself: a module that imports flask fails under it.
    code = _BLOCKED_IMPORT.format(
        blocked=["flask"],
        module="flask_eventstream.views",
        stub=_STUB.format(path=str(PACKAGE)),
        check="",
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "flask" in result.stderr


# -- grep-style: which module may import what --


def _imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def _importers(*packages: str) -> set[str]:
    return {
        path.relative_to(PACKAGE).as_posix()
        for path in SOURCES
        if _imports(path) & set(packages)
    }


def test_only_the_redis_backend_imports_redis() -> None:
    importers = _importers("redis")
    assert importers and all(p.startswith("backends/redis/") for p in importers)


def test_only_the_metrics_module_imports_prometheus_client() -> None:
    assert _importers("prometheus_client") == {"metrics.py"}


def test_only_gevent_modules_import_gevent() -> None:
    assert _importers("gevent", "greenlet") <= {"_gevent.py", "serving.py"}
    assert "_gevent.py" in _importers("gevent")


def test_only_the_flask_layer_imports_flask() -> None:
    # The flask-sse compatibility layer is a Flask blueprint.
    allowed = {
        "extension.py",
        "request.py",
        "views.py",
        "cli.py",
        "testing.py",
        "compat/flask_sse.py",
    }
    assert _importers("flask", "werkzeug", "click") <= allowed
    assert {"extension.py", "views.py"} <= _importers("flask")


def test_sse_imports_only_stdlib_modules() -> None:
    imported = _imports(PACKAGE / "sse.py") - {"__future__"}
    assert imported <= set(sys.stdlib_module_names)


def test_import_scan_sees_lazy_imports(tmp_path: pathlib.Path) -> None:
    # Imports inside functions count as much as those at the top.
    source = tmp_path / "lazy.py"
    source.write_text(
        "from . import sibling\n"
        "def f():\n"
        "    import redis.asyncio\n"
        "    from gevent import sleep\n"
    )
    assert _imports(source) == {"redis", "gevent"}


# -- imports point one way --


def _module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: pathlib.Path) -> dict[str, set[str]]:
    """``{module: package modules it imports}`` for every module under the
    package directory ``root``, counting imports inside functions and under
    ``if TYPE_CHECKING:`` alike. Importing a package's submodule counts as
    importing the submodule, not the package's ``__init__``."""
    modules = {_module_name(path, root): path for path in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    prefix = ".".join(base)
                    module = f"{prefix}.{node.module}" if node.module else prefix
                else:
                    module = node.module or ""
                # "from . import signals" imports the submodule signals.
                targets = [
                    f"{module}.{alias.name}"
                    if f"{module}.{alias.name}" in modules
                    else module
                    for alias in node.names
                ]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    found.add(target)
        graph[name] = found
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as a list of modules (first == last), or None."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        for child in sorted(graph.get(node, ())):
            cycle = visit(child, [*path, node])
            if cycle is not None:
                return cycle
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start, [])
        if cycle is not None:
            return cycle
    return None


def _package_imports_ignoring_init(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    # Every module imports its package's __init__ on the way (Python runs
    # it first); only what the modules name counts. The package __init__
    # re-exports the public names, so it may import anything.
    return {
        name: {m for m in deps if m != "flask_eventstream"}
        for name, deps in graph.items()
    }


def test_the_package_has_no_import_cycle() -> None:
    graph = _package_imports_ignoring_init(import_graph(PACKAGE))
    assert "flask_eventstream.connection" in graph["flask_eventstream.views"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_check_finds_a_lazy_cycle(tmp_path: pathlib.Path) -> None:
    # A module that imports one that imports it back inside a function is a
    # cycle as much as two imports at the top.
    root = tmp_path / "pkg"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "a.py").write_text("from .sub import b\n")
    (root / "sub" / "__init__.py").write_text("")
    (root / "sub" / "b.py").write_text("def f():\n    from ..a import x\n")
    (root / "c.py").write_text("from . import a\n")
    graph = import_graph(root)
    assert graph == {
        "pkg": set(),
        "pkg.a": {"pkg.sub.b"},
        "pkg.c": {"pkg.a"},
        "pkg.sub": set(),
        "pkg.sub.b": {"pkg.a"},
    }
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.a"]
    (root / "sub" / "b.py").write_text("def f():\n    return 1\n")
    assert find_cycle(import_graph(root)) is None
