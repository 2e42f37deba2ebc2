"""The documentation builds with warnings as errors, documents every public
name, and its configuration page lists exactly the keys the extension reads,
with their real defaults."""

from __future__ import annotations

import ast
import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest

import flask_eventstream
from flask_eventstream import serving
from flask_eventstream import signals
from flask_eventstream import testing
from flask_eventstream.extension import Settings
from tests.conftest import IN_CI

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _config_entries() -> dict[str, str]:
    """``{key: default}`` from the ``.. data::`` entries of docs/config.rst,
    the default being the first literal after ``Default:`` in the entry."""
    text = (DOCS / "config.rst").read_text(encoding="utf-8")
    entries: dict[str, str] = {}
    parts = re.split(r"^\.\. data:: *(\S+) *$", text, flags=re.MULTILINE)
    for key, body in zip(parts[1::2], parts[2::2], strict=True):
        assert key not in entries, f"{key} is documented twice"
        default = re.search(r"Default: ``([^`]+)``", body)
        assert default is not None, f"{key} has no 'Default: ``...``' line"
        entries[key] = default.group(1)
    return entries


def test_config_page_documents_exactly_the_settings_keys() -> None:
    documented = set(_config_entries())
    keys = set(Settings.KEYS.values())
    assert documented == keys, (
        f"missing from docs/config.rst: {sorted(keys - documented)};"
        f" not a setting: {sorted(documented - keys)}"
    )


def test_config_page_defaults_match_the_code() -> None:
    entries = _config_entries()
    defaults = Settings()
    for name, key in Settings.KEYS.items():
        actual = getattr(defaults, name)
        written = entries[key]
        if actual is None:
            assert written == "None", f"{key}: docs say {written}, code None"
        elif isinstance(actual, bool):
            assert written == str(actual), f"{key}: docs say {written}, code {actual}"
        elif isinstance(actual, (int, float)):
            assert float(written) == actual, f"{key}: docs say {written}, code {actual}"
        else:
            assert ast.literal_eval(written) == actual, (
                f"{key}: docs say {written}, code {actual!r}"
            )


@pytest.fixture(scope="module")
def html(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    if importlib.util.find_spec("sphinx") is None:
        message = "sphinx is not installed: pip install -e '.[test]'"
        if IN_CI:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    out = tmp_path_factory.mktemp("html")
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html"]
    result = subprocess.run(
        [*command, str(DOCS), str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert result.returncode == 0, (
        f"sphinx failed ({result.returncode}):\n{result.stderr}\n{result.stdout}"
    )
    return out


def test_docs_build_without_warnings(html: pathlib.Path) -> None:
    pages = {p.stem for p in html.glob("*.html")}
    toc = {
        "quickstart",
        "guide",
        "config",
        "deploy",
        "migrating",
        "signals",
        "api",
        "changes",
    }
    assert {"index", *toc} <= pages
    index = (html / "index.html").read_text(encoding="utf-8")
    for page in toc:
        assert f'href="{page}.html"' in index, f"{page} is not in the toctree"


def test_every_public_name_is_documented(html: pathlib.Path) -> None:
    built = (html / "api.html").read_text(encoding="utf-8")
    built += (html / "signals.html").read_text(encoding="utf-8")
    anchors = set(re.findall(r'id="(flask_eventstream[\w.]*)"', built))
    public = [
        *(f"flask_eventstream.{name}" for name in flask_eventstream.__all__),
        *(f"flask_eventstream.testing.{name}" for name in testing.__all__),
        *(f"flask_eventstream.serving.{name}" for name in serving.__all__),
        *(f"flask_eventstream.signals.{name}" for name in signals.__all__),
    ]
    missing = [name for name in public if name not in anchors]
    assert not missing, f"not in docs/api.rst or docs/signals.rst: {missing}"


def test_every_config_key_is_an_anchor(html: pathlib.Path) -> None:
    built = (html / "config.html").read_text(encoding="utf-8")
    for key in Settings.KEYS.values():
        assert f'id="{key}"' in built, key
