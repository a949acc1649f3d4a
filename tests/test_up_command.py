"""`manage.py up` migrates, creates the admin once, serves the admin, and stops on Ctrl-C."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_http(url: str, deadline: float) -> int:
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 (loopback)
                return int(response.status)
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"{url} did not answer in time")


def wait_for_port(proc: subprocess.Popen[str], deadline: float) -> None:
    """The proxy node child listens on the --https port given on the command line."""
    https = proc.args[proc.args.index("--https") + 1]  # type: ignore[union-attr]
    port = int(https.rsplit(":", 1)[1])
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError("the proxy node did not start")


def start_up(
    tmp_path: Path, port: int, extra_env: dict[str, str], extra_args: list[str] | None = None
) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROXYADMIN_", "DATABASE_URL"))}
    env.update(PROXYADMIN_VAR_DIR=str(tmp_path / "var"), **extra_env)
    return subprocess.Popen(
        [sys.executable, "manage.py", "up", "--admin", f"127.0.0.1:{port}",
         "--https", f"127.0.0.1:{free_port()}", "--http", f"127.0.0.1:{free_port()}",
         *(extra_args or [])],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=20)
    return out


def test_up_serves_the_admin_and_prints_the_password_once(tmp_path: Path) -> None:
    port = free_port()
    proc = start_up(tmp_path, port, {})
    try:
        status = wait_for_http(f"http://127.0.0.1:{port}/admin/login/", time.monotonic() + 40)
        assert status == 200
        wait_for_port(proc, time.monotonic() + 40)
    finally:
        first = stop(proc)
    assert proc.returncode == 0
    assert "Created the admin account 'admin' with password: " in first
    password = first.split("with password: ")[1].split()[0]
    assert len(password) >= 12
    with socket.socket() as probe:  # the daphne child is gone too
        assert probe.connect_ex(("127.0.0.1", port)) != 0

    proc = start_up(tmp_path, port, {})
    try:
        wait_for_http(f"http://127.0.0.1:{port}/admin/login/", time.monotonic() + 40)
    finally:
        second = stop(proc)
    assert "Created the admin account" not in second
    assert password not in second


def test_up_takes_the_admin_password_from_the_environment(tmp_path: Path) -> None:
    port = free_port()
    proc = start_up(tmp_path, port, {"PROXYADMIN_ADMIN_USER": "ops",
                                     "PROXYADMIN_ADMIN_PASSWORD": "a long pass phrase"})
    try:
        wait_for_http(f"http://127.0.0.1:{port}/admin/login/", time.monotonic() + 40)
    finally:
        out = stop(proc)
    assert "Created the admin account 'ops' (PROXYADMIN_ADMIN_PASSWORD)" in out
    assert "a long pass phrase" not in out
