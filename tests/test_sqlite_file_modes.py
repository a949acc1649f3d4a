"""The SQLite database holds sessions and encrypted keys: it and its -wal/-shm files are
owner-only (0600), whatever the umask, from the first migrate on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.processes import ROOT, Project

DATABASE = "proxyadmin.sqlite3"
# Writes a row, then reports the modes while the connection (and so the -wal/-shm) is open.
WRITE_AND_LIST_MODES = """
import json, os
from django.contrib.auth.models import User
from django.db import connection
User.objects.create(username="writer")
name = str(connection.settings_dict["NAME"])
print(json.dumps({suffix: oct(os.stat(name + suffix).st_mode & 0o777)
                  for suffix in ("", "-wal", "-shm") if os.path.exists(name + suffix)}))
"""


def manage(project: Project, *args: str) -> str:
    out = subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=project.env,
                         capture_output=True, text=True, timeout=120, umask=0o022)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def modes_while_writing(project: Project) -> dict[str, str]:
    return json.loads(manage(project, "shell", "-c", WRITE_AND_LIST_MODES).strip().splitlines()[-1])


def test_fresh_database_and_its_wal_files_are_owner_only(tmp_path: Path) -> None:
    project = Project(tmp_path)
    manage(project, "migrate", "--verbosity", "0")
    assert oct((tmp_path / "var" / DATABASE).stat().st_mode & 0o777) == "0o600"
    assert modes_while_writing(project) == {"": "0o600", "-wal": "0o600", "-shm": "0o600"}


def test_database_files_left_readable_by_an_older_version_are_tightened(tmp_path: Path) -> None:
    project = Project(tmp_path)
    manage(project, "migrate", "--verbosity", "0")
    var = tmp_path / "var"
    for name in (DATABASE, f"{DATABASE}-wal", f"{DATABASE}-shm"):
        (var / name).touch()
        (var / name).chmod(0o644)
    manage(project, "check")
    for name in (DATABASE, f"{DATABASE}-wal", f"{DATABASE}-shm"):
        assert oct((var / name).stat().st_mode & 0o777) == "0o600", name
