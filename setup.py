"""Build hook: the sans-I/O core of the data plane, compiled with mypyc.

``proxycore.http1``, ``proxycore.http1_checks`` and ``proxycore.routing`` are plain,
fully typed Python. mypyc (part of mypy) compiles them to C extension modules that
Python imports in place of the .py files; nothing else changes. They are the half of
the per-request Python time that is not event-loop plumbing, and compiled they take
a third of it (README, "Speed"). Everything else in setup is in pyproject.toml.

The extensions are optional: without a C compiler, with PROXYADMIN_PURE_PYTHON=1 at
install time, or when mypyc is not importable, the same modules run as Python.
``proxycore.compiled.state()`` tells which, and whether a compiled module is older
than its source (an editable install edited since: reinstall, or remove the .so).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
COMPILED = ("proxycore/http1.py", "proxycore/http1_checks.py", "proxycore/routing.py")


def compiled_extensions() -> list:  # type: ignore[type-arg]
    if os.environ.get("PROXYADMIN_PURE_PYTHON"):
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        return []
    # "--config-file=": not the project's mypy settings (they load the Django plugin).
    extensions = mypycify(["--config-file=", "--strict", *COMPILED], opt_level="3")
    for extension in extensions:
        extension.optional = True  # a failed compile leaves the module in Python
    # What the extensions were built from, so that a stale one can be told at run time.
    sources = {path: hashlib.sha256((ROOT / path).read_bytes()).hexdigest() for path in COMPILED}
    (ROOT / "proxycore" / "_compiled_sources.json").write_text(json.dumps(sources, indent=1) + "\n")
    return extensions


setup(ext_modules=compiled_extensions())
