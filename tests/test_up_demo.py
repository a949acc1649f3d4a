"""`manage.py up --demo`: a newcomer's first run serves a working example host."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.processes import interrupt, option_port, start_up, wait_for_http
from tests.proxyharness import free_port


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is installed by .ci/run")
def test_up_demo_serves_localhost_through_the_proxy_with_hsts(tmp_path: Path) -> None:
    admin = free_port()
    proc = start_up(tmp_path, admin, {}, extra_args=["--demo", "--demo-upstream", f"127.0.0.1:{free_port()}"])
    https = option_port(proc, "--https")
    ca_file = tmp_path / "var" / "local-ca.pem"
    try:
        wait_for_http(f"http://127.0.0.1:{admin}/admin/login/")
        deadline = time.monotonic() + 30
        while True:
            out = subprocess.run(
                ["curl", "-sS", "-i", "--cacert", str(ca_file),
                 "--resolve", f"localhost:{https}:127.0.0.1", f"https://localhost:{https}/hi"],
                capture_output=True, text=True, timeout=30,
            )
            if out.returncode == 0 and out.stdout.startswith("HTTP/1.1 200"):
                break
            assert time.monotonic() < deadline, out.stdout + out.stderr
            time.sleep(0.5)
    finally:
        printed = interrupt(proc)
    assert "Hello from the proxyadmin demo upstream." in out.stdout
    assert "GET /hi" in out.stdout
    assert "x-forwarded-proto: https" in out.stdout.lower()
    assert "strict-transport-security: max-age=300" in out.stdout.lower()
    assert "added host 'localhost'" in printed
    assert f"curl --cacert {ca_file}" in printed
