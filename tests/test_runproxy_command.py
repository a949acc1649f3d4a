"""`manage.py runproxy` serves a host configured in the database, follows config changes
without a restart, logs each request, and stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.proxyharness import Upstream, read_response, tls_connect

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Project:
    """A control-plane database in a temp dir, driven through manage.py commands."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PROXYADMIN_", "DATABASE_URL"))}
        env["PROXYADMIN_VAR_DIR"] = str(tmp_path / "var")
        self.env = env

    def manage(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        out = subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=self.env,
                             capture_output=True, text=True, timeout=120)
        if check:
            assert out.returncode == 0, out.stdout + out.stderr
        return out

    def import_config(self, config: dict[str, object]) -> None:
        path = self.tmp / f"config-{time.monotonic_ns()}.json"
        path.write_text(json.dumps(config))
        self.manage("importconfig", str(path))


def config(ca: trustme.CA, upstream_port: int, hosts: list[str]) -> dict[str, object]:
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


@pytest.fixture
def project(tmp_path: Path) -> Project:
    p = Project(tmp_path)
    p.manage("migrate", "--verbosity", "0")
    return p


@pytest.fixture
def node_process(project: Project, ca: trustme.CA, upstream: Upstream) -> Iterator[tuple[subprocess.Popen[str], int, int, Path]]:
    project.import_config(config(ca, upstream.port, ["a"]))
    https, http = free_port(), free_port()
    log = project.tmp / "access.log"
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "runproxy", "--https", f"127.0.0.1:{https}",
         "--http", f"127.0.0.1:{http}", "--access-log", str(log), "--stop-deadline", "5"],
        cwd=ROOT, env=project.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", https)) == 0:
                break
        time.sleep(0.1)
    yield proc, https, http, log
    if proc.poll() is None:
        proc.kill()
        proc.communicate(timeout=10)


def get(port: int, ca: trustme.CA, host: str, path: str = "/") -> tuple[int, dict[bytes, list[bytes]], bytes]:
    sock = tls_connect(port, ca, host)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    try:
        return read_response(sock)
    finally:
        sock.close()


def test_runproxy_serves_the_database_config_and_follows_changes(
    project: Project, ca: trustme.CA, upstream: Upstream,
    node_process: tuple[subprocess.Popen[str], int, int, Path],
) -> None:
    proc, https, http, log = node_process
    status, headers, body = get(https, ca, "a.example", "/hello")
    assert status == 200
    assert headers[b"strict-transport-security"] == [b"max-age=31536000"]
    assert json.loads(body)["target"] == "/hello"

    # A host added to the database is served within a couple of seconds, without a restart.
    project.import_config(config(ca, upstream.port, ["a", "b"]))
    deadline = time.monotonic() + 10
    while True:
        try:
            if get(https, ca, "b.example")[0] == 200:
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, "the new host was not served in time"
        time.sleep(0.2)

    # The HTTP listener redirects to the HTTPS port.
    with socket.create_connection(("127.0.0.1", http), timeout=5) as sock:
        sock.sendall(b"GET /x?y=1 HTTP/1.1\r\nHost: a.example\r\n\r\n")
        status, headers, _ = read_response(sock)
    assert status == 308
    assert headers[b"location"] == [f"https://a.example:{https}/x?y=1".encode()]

    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    assert "Traceback" not in out
    lines = log.read_text().splitlines()
    assert any('a "GET /hello HTTP/1.1" 200' in line for line in lines), lines
    assert any(" http a " in line and " 308 " in line for line in lines), lines


def test_runproxy_refuses_a_bad_address_with_a_clear_message(project: Project) -> None:
    out = project.manage("runproxy", "--https", "nonsense", check=False)
    assert out.returncode != 0
    assert "--https must look like 127.0.0.1:8443" in out.stderr
    assert "Traceback" not in out.stderr


def test_runproxy_says_when_the_port_is_taken(project: Project) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = project.manage("runproxy", "--https", f"127.0.0.1:{port}", "--http", "off", check=False)
    assert out.returncode != 0
    assert "Cannot listen" in out.stderr
    assert "Traceback" not in out.stderr


