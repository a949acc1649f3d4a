"""`manage.py up` migrates, creates the admin once, serves the admin, and stops on Ctrl-C."""

from __future__ import annotations

import socket
from pathlib import Path

from tests.processes import interrupt, option_port, start_up, wait_for_http, wait_for_port
from tests.proxyharness import free_port


def test_up_serves_the_admin_and_prints_the_password_once(tmp_path: Path) -> None:
    port = free_port()
    proc = start_up(tmp_path, port, {})
    try:
        status = wait_for_http(f"http://127.0.0.1:{port}/admin/login/")
        assert status == 200
        wait_for_port(option_port(proc, "--https"))
    finally:
        first = interrupt(proc)
    assert proc.returncode == 0
    assert "Created the admin account 'admin' with password: " in first
    password = first.split("with password: ")[1].split()[0]
    assert len(password) >= 12
    with socket.socket() as probe:  # the daphne child is gone too
        assert probe.connect_ex(("127.0.0.1", port)) != 0

    proc = start_up(tmp_path, port, {})
    try:
        wait_for_http(f"http://127.0.0.1:{port}/admin/login/")
    finally:
        second = interrupt(proc)
    assert "Created the admin account" not in second
    assert password not in second


def test_up_takes_the_admin_password_from_the_environment(tmp_path: Path) -> None:
    port = free_port()
    proc = start_up(tmp_path, port, {"PROXYADMIN_ADMIN_USER": "ops",
                                     "PROXYADMIN_ADMIN_PASSWORD": "a long pass phrase"})
    try:
        wait_for_http(f"http://127.0.0.1:{port}/admin/login/")
    finally:
        out = interrupt(proc)
    assert "Created the admin account 'ops' (PROXYADMIN_ADMIN_PASSWORD)" in out
    assert "a long pass phrase" not in out
