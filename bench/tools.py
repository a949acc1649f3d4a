"""The programs the benchmark drives, installed from Debian's packages when missing."""

from __future__ import annotations

import os
import shutil
import subprocess

REQUIRED = {"nginx": "nginx", "wrk": "wrk"}  # command: Debian package
OPTIONAL = {"haproxy": "haproxy", "caddy": "caddy"}


class ToolsMissing(SystemExit):
    pass


def _apt_install(packages: list[str]) -> str:
    """Run apt-get update && install; return '' on success, else the tail of its output."""
    if os.geteuid() != 0:
        return "not root: cannot run apt-get"
    if shutil.which("apt-get") is None:
        return "no apt-get on this machine"
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *packages]):
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
            return f"`{' '.join(argv)}` failed (exit {proc.returncode}):\n{tail}"
    return ""


def ensure_tools(want_haproxy: bool, want_caddy: bool = True) -> list[str]:
    """Install what is missing; exit with a clear message if nginx or wrk cannot be had.

    Returns notes for the report (e.g. why HAProxy or Caddy is left out).
    """
    optional = {cmd: pkg for cmd, pkg in OPTIONAL.items()
                if (cmd != "haproxy" or want_haproxy) and (cmd != "caddy" or want_caddy)}
    wanted = REQUIRED | optional
    missing = [pkg for cmd, pkg in wanted.items() if shutil.which(cmd) is None]
    notes: list[str] = []
    if missing:
        print(f"installing Debian packages: {' '.join(missing)}", flush=True)
        error = _apt_install(missing)
        leftover = [pkg for pkg in missing if pkg in optional.values()]
        if error and leftover:  # try again without the optional ones
            notes.append(f"{', '.join(leftover)} left out: did not install ({error.splitlines()[0]})")
            missing = [pkg for pkg in missing if pkg not in leftover]
            error = _apt_install(missing) if missing else ""
        if error:
            raise ToolsMissing(
                f"bench: cannot install {' '.join(missing)} from Debian's packages: {error}\n"
                f"Install them by hand (apt-get install -y {' '.join(missing)}) and run again."
            )
    still = [cmd for cmd in REQUIRED if shutil.which(cmd) is None]
    if still:
        raise ToolsMissing(f"bench: {' '.join(still)} still not on PATH after installing")
    if want_haproxy and shutil.which("haproxy") is None and not notes:
        notes.append("HAProxy left out: not on PATH after installing")
    return notes
