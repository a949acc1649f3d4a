"""proxycore: the data plane. Pure asyncio, no Django: it consumes a Snapshot."""
# The data plane never imports Django: the snapshot types are its only contract
# with the control plane (see shared DESIGN.md, "The two planes").

from __future__ import annotations

import os
import sys

# The modules setup.py compiles with mypyc (it keeps its own list: it cannot import this).
COMPILED = (
    "http1", "http1_checks", "routing", "decide", "exchange", "client", "upstream", "stats", "accesslog",
    "ratelimit", "clienthello", "acceptor",
)

if os.environ.get("PROXYADMIN_PURE_PYTHON"):
    # Run the modules setup.py compiles from their .py sources even where compiled ones
    # exist (CI runs the suite both ways: see proxycore/compiled.py).
    import importlib.util
    from importlib.machinery import ModuleSpec
    from pathlib import Path

    _HERE = Path(__file__).resolve().parent
    _SOURCES = {f"proxycore.{name}": _HERE / f"{name}.py" for name in COMPILED}

    class _SourcesFirst:
        @staticmethod
        def find_spec(name: str, path: object = None, target: object = None) -> ModuleSpec | None:
            source = _SOURCES.get(name)
            return importlib.util.spec_from_file_location(name, source) if source else None

    sys.meta_path.insert(0, _SourcesFirst)
