"""Helpers for tests that run the project's real processes: manage.py commands, runproxy, up, daphne.

Each child runs in the project folder with an environment of its own (no PROXYADMIN_* or
DATABASE_URL from the caller's), so a test never touches a real database or var dir.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import trustme

from tests.proxyharness import free_port

ROOT = Path(__file__).resolve().parent.parent


class Project:
    """A control-plane database in a temp dir, driven through manage.py commands."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PROXYADMIN_", "DATABASE_URL")) or k == "PROXYADMIN_PURE_PYTHON"}
        env["PROXYADMIN_VAR_DIR"] = str(tmp_path / "var")
        # Traffic reaches the rollup within half a second, not the default ten.
        env["PROXYADMIN_ROLLUP_FLUSH_SECONDS"] = "0.5"
        self.env = env

    def manage(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        out = subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=self.env,
                             capture_output=True, text=True, timeout=120)
        if check:
            assert out.returncode == 0, out.stdout + out.stderr
        return out

    def refuses(self, *args: str) -> str:
        """Runs a manage.py command that must fail, without a traceback; its stderr."""
        out = self.manage(*args, check=False)
        assert out.returncode != 0
        assert "Traceback" not in out.stderr
        return out.stderr

    def start(self, *args: str) -> subprocess.Popen[str]:
        """``manage.py args`` as a child process, its stdout and stderr on one text pipe."""
        return subprocess.Popen([sys.executable, "manage.py", *args], cwd=ROOT, env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def create_superuser(self, username: str, password: str) -> None:
        """A staff superuser to log in to the admin with (the database must be migrated)."""
        self.env.update(DJANGO_SUPERUSER_USERNAME=username, DJANGO_SUPERUSER_PASSWORD=password,
                        DJANGO_SUPERUSER_EMAIL="ops@example.com")
        self.manage("createsuperuser", "--noinput")

    def import_config(self, config: dict[str, object]) -> None:
        path = self.tmp / f"config-{time.monotonic_ns()}.json"
        path.write_text(json.dumps(config))
        self.manage("importconfig", str(path))


def config(ca: trustme.CA, upstream_port: int, hosts: list[str]) -> dict[str, object]:
    """An importconfig document: ``<name>.example`` for each of ``hosts``, all to one upstream, with HSTS."""
    certs, host_entries = [], []
    for name in hosts:
        leaf = ca.issue_cert(f"{name}.example")
        chain = b"".join(b.bytes() for b in leaf.cert_chain_pems) + ca.cert_pem.bytes()
        certs.append({"name": name, "chain_pem": chain.decode(),
                      "key_pem": leaf.private_key_pem.bytes().decode()})
        host_entries.append({"name": name, "names": [f"{name}.example"], "certificate": name,
                             "upstream": "app", "hsts_policy": "year"})
    return {
        "format": "proxyadmin-config", "version": 1,
        "certificates": certs,
        "hsts_policies": [{"name": "year", "max_age": 31536000}],
        "upstreams": [{"name": "app", "targets": [{"host": "127.0.0.1", "port": upstream_port}]}],
        "hosts": host_entries,
    }


# ---- children -----------------------------------------------------------------------------


def start_up(
    tmp_path: Path, port: int, extra_env: dict[str, str], extra_args: list[str] | None = None
) -> subprocess.Popen[str]:
    """``manage.py up`` with its admin on ``port`` and the proxy node's listeners on free ports."""
    project = Project(tmp_path)
    project.env.update(extra_env)
    return project.start("up", "--admin", f"127.0.0.1:{port}",
                         "--https", f"127.0.0.1:{free_port()}", "--http", f"127.0.0.1:{free_port()}",
                         *(extra_args or []))


def option_port(proc: subprocess.Popen[Any], option: str) -> int:
    """The port given to the child on its command line as ``option 127.0.0.1:PORT``."""
    assert isinstance(proc.args, list)
    args = [str(arg) for arg in proc.args]
    return int(args[args.index(option) + 1].rsplit(":", 1)[1])


def interrupt(proc: subprocess.Popen[str]) -> str:
    """Ctrl-C (SIGINT) to the child; all it printed once it has exited."""
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=20)
    return out


def kill(proc: subprocess.Popen[Any]) -> None:
    """Kills the child if it still runs, and reaps it."""
    if proc.poll() is None:
        proc.kill()
        proc.communicate(timeout=10)


def terminate(proc: subprocess.Popen[Any]) -> None:
    """Stops the child if it still runs: SIGTERM, and SIGKILL if it has not exited after 10 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@contextlib.contextmanager
def process(argv: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``argv`` as a child in the project folder, its output appended to ``log``; terminated at the end."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            terminate(proc)


def daphne_argv(port: int) -> list[str]:
    """The command line of a daphne serving the control plane on 127.0.0.1:``port``."""
    return [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "proxyadmin.asgi:application"]


def daphne(project: Project, port: int) -> Any:
    """The control plane under daphne on ``port``, as a ``process`` logging to daphne.log."""
    return process(daphne_argv(port), project.env, project.tmp / "daphne.log")


# ---- waiting ------------------------------------------------------------------------------


def wait_for_http(url: str, timeout: float = 40) -> int:
    """Polls ``url`` until it answers without an error status; that status."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 (loopback)
                return int(response.status)
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"{url} did not answer in time")


def wait_for_port(port: int, timeout: float = 40) -> None:
    """Waits until something listens on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on port {port}")


@contextlib.contextmanager
def listening_port() -> Iterator[int]:
    """A port on 127.0.0.1 that something listens on (so it is taken) while in ``with``."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        yield busy.getsockname()[1]
