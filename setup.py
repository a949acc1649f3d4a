"""Build hook: the sans-I/O core of the data plane, compiled with mypyc.

The modules of the per-request path (``proxycore.http1``, ``http1_checks``,
``routing``, ``decide``, ``exchange``, ``client``, ``upstream``, ``stats``, ``accesslog``)
are plain, fully typed Python. mypyc
(part of mypy) compiles them to C extension modules that Python imports in place of
the .py files; nothing else changes, and their per-request Python time roughly
halves (README, "Speed"). Everything else in setup is in pyproject.toml.

The extensions are optional: without a C compiler, with PROXYADMIN_PURE_PYTHON=1 at
install time, or when mypyc is not importable, the same modules run as Python.
``proxycore.compiled.state()`` tells which, and whether a compiled module is older
than its source (an editable install edited since: reinstall, or remove the .so).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
# The hot path: parsing, decisions and head rewriting, the client, exchange and upstream
# protocols, the counters and the access log.
# (as proxycore.COMPILED)
MODULES = (
    "http1", "http1_checks", "routing", "decide", "exchange", "client", "upstream", "stats", "accesslog",
    "ratelimit", "clienthello", "acceptor",
)
COMPILED = tuple(f"proxycore/{name}.py" for name in MODULES)


def compiled_extensions() -> list:  # type: ignore[type-arg]
    if os.environ.get("PROXYADMIN_PURE_PYTHON"):
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        return []
    # "--config-file=": not the project's mypy settings (they load the Django plugin, and the
    # isolated build environment has neither it nor httptools: those imports are Any here).
    try:
        extensions = mypycify(["--config-file=", "--ignore-missing-imports", *COMPILED], opt_level="3")
    except (Exception, SystemExit) as exc:  # mypyc refused the code: install it as Python
        print(f"setup.py: not compiling the data plane ({exc}); it runs as Python", file=sys.stderr)
        return []
    for extension in extensions:
        extension.optional = True  # a failed compile leaves the module in Python
    # What the extensions were built from, so that a stale one can be told at run time.
    sources = {path: hashlib.sha256((ROOT / path).read_bytes()).hexdigest() for path in COMPILED}
    (ROOT / "proxycore" / "_compiled_sources.json").write_text(json.dumps(sources, indent=1) + "\n")
    return extensions


setup(ext_modules=compiled_extensions())
