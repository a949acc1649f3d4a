"""`manage.py runproxy` serves a host configured in the database, follows config changes
without a restart, logs each request, and stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.processes import Project, config, kill, listening_port, wait_for_port
from tests.proxyharness import Upstream, free_port, https_get, read_response


@pytest.fixture
def node_process(project: Project, ca: trustme.CA, upstream: Upstream) -> Iterator[tuple[subprocess.Popen[str], int, int, Path]]:
    project.import_config(config(ca, upstream.port, ["a"]))
    https, http = free_port(), free_port()
    log = project.tmp / "access.log"
    proc = project.start("runproxy", "--https", f"127.0.0.1:{https}", "--http", f"127.0.0.1:{http}",
                         "--access-log", str(log), "--stop-deadline", "5")
    wait_for_port(https, 30)
    yield proc, https, http, log
    kill(proc)


def test_runproxy_serves_the_database_config_and_follows_changes(
    project: Project, ca: trustme.CA, upstream: Upstream,
    node_process: tuple[subprocess.Popen[str], int, int, Path],
) -> None:
    proc, https, http, log = node_process
    status, headers, body = https_get(https, ca, "a.example", "/hello")
    assert status == 200
    assert headers[b"strict-transport-security"] == [b"max-age=31536000"]
    assert json.loads(body)["target"] == "/hello"

    # A host added to the database is served within a couple of seconds, without a restart.
    project.import_config(config(ca, upstream.port, ["a", "b"]))
    deadline = time.monotonic() + 10
    while True:
        try:
            if https_get(https, ca, "b.example")[0] == 200:
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
    assert "--https must look like 127.0.0.1:8443" in project.refuses("runproxy", "--https", "nonsense")


def test_runproxy_says_when_the_port_is_taken(project: Project) -> None:
    with listening_port() as port:
        stderr = project.refuses("runproxy", "--https", f"127.0.0.1:{port}", "--http", "off")
    assert "Cannot listen" in stderr


