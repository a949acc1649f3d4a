"""The dashboard's chart library (uPlot): npm installs it from ``package.json`` into
``node_modules/``, and Django serves it from there (``settings.STATICFILES_DIRS``).

No copy of it is kept in the repository. ``manage.py up`` calls
``ensure_installed`` so that a fresh checkout gets its charts without a separate
step; without npm the product still runs and the dashboard says what is missing.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Protocol

SCRIPT = "uPlot.iife.min.js"
NPM_ARGS = ("ci", "--no-audit", "--no-fund")
NPM_TIMEOUT = 300.0


class Output(Protocol):
    """Where messages go: a management command's ``self.stdout``, or any text stream."""

    def write(self, text: str, /) -> object: ...


def installed(dist: Path) -> bool:
    return (dist / SCRIPT).is_file()


def how_to_install(root: Path) -> str:
    return (f"install Node.js and npm (Debian: apt-get install nodejs npm), run "
            f"`npm {' '.join(NPM_ARGS)}` in {root}, and restart. Until then the dashboard has no charts.")


def ensure_installed(root: Path, dist: Path, out: Output, npm: str | None = None) -> bool:
    """Install the chart library with npm when it is missing; True when it is there.

    Never raises: a product without charts is better than no product.
    """
    if installed(dist):
        return True
    npm = npm or shutil.which("npm")
    if npm is None:
        out.write(f"The dashboard's chart library is not installed and npm was not found: "
                  f"{how_to_install(root)}\n")
        return False
    out.write(f"Installing the dashboard's chart library (npm {' '.join(NPM_ARGS)})...\n")
    try:
        result = subprocess.run([npm, *NPM_ARGS], cwd=root, capture_output=True, text=True,
                                timeout=NPM_TIMEOUT, check=False)
        failure = "" if result.returncode == 0 else (result.stderr.strip() or result.stdout.strip())
    except (OSError, subprocess.TimeoutExpired) as exc:
        failure = str(exc)
    if failure or not installed(dist):
        detail = failure.splitlines()[-1] if failure else f"{dist / SCRIPT} is still missing"
        out.write(f"Could not install the dashboard's chart library ({detail}): {how_to_install(root)}\n")
        return False
    return True
