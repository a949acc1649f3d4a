"""The dashboard in a real browser: headless Chromium (Debian's) driven by Playwright,
against a real control plane (daphne) and a real proxy node (runproxy) reporting over
the agent link. Traffic sent through the proxy shows in the totals, the host table and
the charts within seconds; the page says when no node is connected, and reconnects when
the control plane comes back. Leaves a screenshot in tests/artifacts/dashboard.png."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import trustme

from tests.processes import ROOT, Project, config, daphne, process, terminate, wait_for_http, wait_for_port
from tests.proxyharness import TrafficThread, Upstream, free_port, read_response, tls_connect

ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
USERNAME = "ops"
PASSWORD = "a long browser pass phrase"

# Pixels of the 2xx colour (green) on the requests chart's canvas: none before any traffic.
GREEN_PIXELS_JS = """() => {
  const canvas = window.dashboard.charts.requests.root.querySelector("canvas");
  const d = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let n = 0;
  for (let i = 0; i < d.length; i += 4) {
    if (d[i + 3] > 0 && d[i + 1] > d[i] + 40 && d[i + 1] > d[i + 2] + 40) n += 1;
  }
  return n;
}"""
PEAK_JS = "(key) => Math.max(0, ...window.dashboard.charts[key].data[1].filter((v) => v !== null))"


def chromium() -> str:
    for candidate in (os.environ.get("CHROMIUM"), *CHROMIUM_CANDIDATES, shutil.which("chromium")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.skip("Chromium not found (Debian: apt-get install chromium); .ci/run installs it")


class Traffic(TrafficThread):
    """Requests through the proxy from a background thread until stopped."""

    def __init__(self, port: int, ca: trustme.CA) -> None:
        self.port, self.ca = port, ca
        self.ok = 0
        self.failed_handshakes = 0
        super().__init__()

    def send_round(self) -> None:
        for _ in range(5):
            sock = tls_connect(self.port, self.ca, "a.example")
            try:
                sock.sendall(b"GET /dashboard-test HTTP/1.1\r\nHost: a.example\r\n\r\n")
                if read_response(sock)[0] == 200:
                    self.ok += 1
            finally:
                sock.close()
        # An unknown name: no default certificate, so the handshake fails (host "-").
        with contextlib.suppress(OSError):
            tls_connect(self.port, self.ca, "nobody.example").close()
        self.failed_handshakes += 1


def number(text: str) -> float:
    match = re.match(r"[\d,.]+", text.strip())
    return float(match.group(0).replace(",", "")) if match else 0.0


def test_dashboard_shows_live_traffic_in_a_browser(tmp_path: Path, ca: trustme.CA, upstream: Upstream) -> None:
    executable = chromium()
    from playwright.sync_api import expect, sync_playwright

    project = Project(tmp_path)
    project.manage("migrate", "--verbosity", "0")
    project.import_config(config(ca, upstream.port, ["a"]))
    project.create_superuser(USERNAME, PASSWORD)
    admin_port, https_port = free_port(), free_port()
    base = f"http://127.0.0.1:{admin_port}"
    node_argv = [sys.executable, "manage.py", "runproxy", "--control", base, "--name", "edge-1",
                 "--https", f"127.0.0.1:{https_port}", "--http", "off", "--no-access-log"]
    ARTIFACTS.mkdir(exist_ok=True)

    with daphne(project, admin_port) as control, sync_playwright() as pw:
        wait_for_http(f"{base}/admin/login/")
        browser = pw.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))

            # Log in through the admin's own form, then follow the header link.
            page.goto(f"{base}/admin/login/?next=/admin/")
            page.fill("#id_username", USERNAME)
            page.fill("#id_password", PASSWORD)
            page.click("input[type=submit]")
            page.click("#dashboard-link")
            page.wait_for_url(f"{base}/dashboard/")
            expect(page.locator("#connection-status")).to_have_text("Live", timeout=15_000)

            # No node yet.
            expect(page.locator("#no-node")).to_be_visible()
            expect(page.locator("#no-node")).to_contain_text("No proxy node is connected")
            expect(page.locator("#total-nodes")).to_have_text("0")
            assert page.evaluate(GREEN_PIXELS_JS) == 0
            page.screenshot(path=str(ARTIFACTS / "dashboard-no-node.png"))

            with process(node_argv, project.env, tmp_path / "runproxy.log") as node:
                wait_for_port(https_port)
                expect(page.locator("#total-nodes")).to_have_text("1", timeout=15_000)
                expect(page.locator("#no-node")).to_be_hidden()
                node_row = page.locator('#nodes-table tr[data-key="edge-1"]')
                expect(node_row).to_contain_text("online")
                expect(node_row).to_contain_text("(current)")

                with Traffic(https_port, ca) as traffic:
                    expect(page.locator('#hosts-table tr[data-key="a"]')).to_be_visible(timeout=15_000)
                    page.wait_for_function(
                        "() => Number(document.getElementById('total-requests').textContent.replace(/,/g, '')) > 0",
                        timeout=15_000)
                    page.wait_for_function(f"() => ({PEAK_JS})('requests') > 0", timeout=15_000)
                    page.wait_for_function(f"() => ({GREEN_PIXELS_JS})() > 50", timeout=15_000)
                    page.wait_for_function("() => window.dashboard.ticks >= 3", timeout=15_000)
                    expect(page.locator('#hosts-table tr[data-key="-"]')).to_be_visible(timeout=15_000)
                    expect(page.locator("#tls-versions")).to_contain_text("TLSv1.3", timeout=15_000)
                    page.wait_for_timeout(2500)  # a few more seconds on the charts for the screenshot
                    page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
                assert traffic.ok > 0

                host_row = page.locator('#hosts-table tr[data-key="a"]')
                requests_2xx = number(host_row.locator("td").nth(3).inner_text())
                assert 0 < requests_2xx <= traffic.ok
                assert number(page.locator("#total-requests").inner_text()) >= requests_2xx
                assert number(page.locator('#hosts-table tr[data-key="-"] td').nth(11).inner_text()) > 0
                assert page.evaluate(PEAK_JS, "bandwidth") > 0
                assert page.evaluate(PEAK_JS, "dayRequests") > 0
                assert "ms" in host_row.locator("td").nth(7).inner_text()  # p50 latency

                # The control plane goes away: the page says so, then reconnects by itself.
                terminate(control)
                expect(page.locator("#connection-status")).to_contain_text("Disconnected", timeout=15_000)
                page.screenshot(path=str(ARTIFACTS / "dashboard-disconnected.png"))
                with daphne(project, admin_port):
                    expect(page.locator("#connection-status")).to_have_text("Live", timeout=45_000)
                    expect(page.locator("#total-nodes")).to_have_text("1", timeout=30_000)
                assert node.poll() is None
            assert not errors, errors
        finally:
            browser.close()
