"""proxycore/ is the data plane: it must not import Django, Channels or the control plane."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parent.parent / "proxycore"
FORBIDDEN = ("django", "channels", "proxyadmin", "daphne")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_no_module_under_proxycore_imports_django() -> None:
    files = sorted(CORE.rglob("*.py"))
    assert files, "proxycore/ has no modules"
    offenders = {
        str(f.relative_to(CORE)): sorted(imported_modules(f) & set(FORBIDDEN)) for f in files
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_proxycore_imports_without_django_installed_in_the_process() -> None:
    code = (
        "import sys, pkgutil, importlib, proxycore\n"
        "for m in pkgutil.walk_packages(proxycore.__path__, 'proxycore.'):\n"
        "    importlib.import_module(m.name)\n"
        "print(sorted(k for k in sys.modules if k.split('.')[0] in ('django','channels')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=CORE.parent,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
