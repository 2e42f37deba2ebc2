"""Sphinx configuration for the flask-eventstream documentation.

Build it with warnings as errors, as ``tests/test_docs.py`` does::

    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import importlib.metadata
import os
import sys

# Document the checkout this file belongs to, installed or not.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

project = "flask-eventstream"
author = "flask-eventstream developers"
copyright = author
try:
    release = importlib.metadata.version("flask-eventstream")
except importlib.metadata.PackageNotFoundError:
    release = "dev"
version = ".".join(release.split(".")[:2])

extensions = ["sphinx.ext.autodoc"]

# alabaster ships with Sphinx: the build downloads nothing.
html_theme = "alabaster"
html_title = f"flask-eventstream {release}"
exclude_patterns = ["_build"]

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_preserve_defaults = True
autoclass_content = "class"
