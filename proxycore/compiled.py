"""Which of the data plane's modules run compiled (mypyc, see setup.py), and are they current.

The product runs the same either way; compiled, its per-request Python time is
about a third lower. An editable install compiles the modules next to their
sources, so a module edited since its last build would run stale: ``state()``
says so, the test suite refuses to run with one (tests/conftest.py), and
``runproxy`` logs the state at start.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path

from proxycore import COMPILED

MODULES = tuple(f"proxycore.{name}" for name in COMPILED)
_SOURCES = Path(__file__).resolve().parent / "_compiled_sources.json"


def compiled_modules() -> list[str]:
    """The modules of MODULES that were imported from a compiled extension."""
    found = []
    for name in MODULES:
        module = importlib.import_module(name)
        if not (module.__file__ or "").endswith(".py"):
            found.append(name)
    return found


def stale_modules() -> list[str]:
    """Compiled modules whose source changed after they were built."""
    compiled = compiled_modules()
    if not compiled:
        return []
    try:
        built = json.loads(_SOURCES.read_text())
    except (OSError, ValueError):
        return compiled  # no record of what they were built from
    stale = []
    for name in compiled:
        path = name.replace(".", "/") + ".py"
        source = Path(__file__).resolve().parent.parent / path
        try:
            digest = hashlib.sha256(source.read_bytes()).hexdigest()
        except OSError:
            continue  # an installed (not editable) package ships no sources to compare
        if built.get(path) != digest:
            stale.append(name)
    return stale


def state() -> str:
    """'compiled', 'python', or 'stale: <modules>' (one line, for logs)."""
    stale = stale_modules()
    if stale:
        return "stale: " + ", ".join(stale) + " (edited since built: reinstall with pip install -e .)"
    return "compiled" if compiled_modules() else "python"
