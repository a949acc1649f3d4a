"""The dashboard page: staff only, its skeleton and static files, links from the admin,
the chart library's install step, and the page's aggregation of node ticks (under node)."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import pytest
from django.contrib.auth.models import User
from django.contrib.staticfiles import finders
from django.test import Client

from proxyadmin import chartlib

ROOT = Path(__file__).resolve().parent.parent
NPM_HINT = "run `npm ci --no-audit --no-fund` in the project folder (the README's test command does)"


pytestmark = pytest.mark.usefixtures("fast_password_hashing")


def static_body(client: Client, path: str) -> bytes:
    response = client.get(f"/static/{path}")
    assert response.status_code == 200, f"/static/{path} is not served"
    return b"".join(response.streaming_content) if response.streaming else response.content  # type: ignore[attr-defined]


def test_anonymous_visitors_are_sent_to_the_admin_login(client: Client) -> None:
    response = client.get("/dashboard/")
    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/?next=/dashboard/")


@pytest.mark.django_db
def test_users_who_are_not_staff_are_refused(client: Client) -> None:
    User.objects.create_user("visitor", password="a long pass phrase")
    client.login(username="visitor", password="a long pass phrase")
    response = client.get("/dashboard/")
    assert response.status_code in (302, 403)
    if response.status_code == 302:
        assert response["Location"].startswith("/admin/login/")


def test_staff_get_the_page_skeleton(admin_client_logged_in: Client) -> None:
    response = admin_client_logged_in.get("/dashboard/")
    assert response.status_code == 200
    assert response["Cache-Control"].startswith("max-age=0")
    page = response.content.decode()
    for element in ('id="dashboard"', 'data-socket-path="/ws/dashboard/"', 'id="connection-status"',
                    'id="total-active"', 'id="total-rps"', 'id="total-bytes-in"', 'id="total-bytes-out"',
                    'id="total-errors"', 'id="total-nodes"', 'id="chart-requests"', 'id="chart-bandwidth"',
                    'id="chart-active"', 'id="chart-day-requests"', 'id="hosts-table"', 'id="nodes-table"',
                    'id="certificates"', 'id="tls-versions"', 'id="tls-ciphers"', 'id="warnings"',
                    "No proxy node is connected"):
        assert element in page, element
    assert '<script src="/static/proxyadmin/dashboard.js" defer>' in page
    assert '<script src="/static/vendor/uplot/uPlot.iife.min.js" defer>' in page, NPM_HINT
    assert 'href="/static/vendor/uplot/uPlot.min.css"' in page
    # CSP-friendly: every script is a file, no inline code or handlers.
    assert "<script>" not in page
    assert " onclick=" not in page and " onload=" not in page


def test_the_page_says_how_to_install_a_missing_chart_library(
    admin_client_logged_in: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("proxyadmin.views.chart_library_installed", lambda: False)
    page = admin_client_logged_in.get("/dashboard/").content.decode()
    assert 'id="chart-library-missing"' in page
    assert "npm ci --no-audit --no-fund" in page
    assert "uPlot.iife.min.js" not in page
    assert '<script src="/static/proxyadmin/dashboard.js" defer>' in page  # the figures still work


def test_the_dashboard_and_chart_library_files_are_served(admin_client_logged_in: Client) -> None:
    assert b"ProxyDashboardModel" in static_body(admin_client_logged_in, "proxyadmin/dashboard-model.js")
    assert b"/ws/dashboard/" in static_body(admin_client_logged_in, "proxyadmin/dashboard.js")
    assert b".dash-totals" in static_body(admin_client_logged_in, "proxyadmin/dashboard.css")
    assert finders.find("vendor/uplot/uPlot.iife.min.js"), NPM_HINT
    assert b"uPlot" in static_body(admin_client_logged_in, "vendor/uplot/uPlot.iife.min.js")
    assert b".uplot" in static_body(admin_client_logged_in, "vendor/uplot/uPlot.min.css")


def test_the_admin_links_to_the_dashboard(admin_client_logged_in: Client) -> None:
    index = admin_client_logged_in.get("/admin/").content.decode()
    assert 'id="dashboard-module"' in index
    assert index.count('href="/dashboard/"') >= 2  # the header and the index's own module
    # Every admin page has it in the header.
    page = admin_client_logged_in.get("/admin/proxyadmin/certificate/").content.decode()
    assert '<a href="/dashboard/" id="dashboard-link">Dashboard</a>' in page


def test_up_installs_the_chart_library_with_npm(tmp_path: Path) -> None:
    dist = tmp_path / "node_modules" / "uplot" / "dist"
    npm = tmp_path / "npm"
    npm.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/args\nmkdir -p {dist} && touch {dist}/uPlot.iife.min.js\n")
    npm.chmod(0o755)
    out = io.StringIO()
    assert chartlib.ensure_installed(tmp_path, dist, out, npm=str(npm))
    assert (tmp_path / "args").read_text().split() == ["ci", "--no-audit", "--no-fund"]
    assert "Installing the dashboard's chart library" in out.getvalue()
    # Installed already: npm is not run again.
    (tmp_path / "args").unlink()
    assert chartlib.ensure_installed(tmp_path, dist, io.StringIO(), npm=str(npm))
    assert not (tmp_path / "args").exists()


def test_up_carries_on_without_npm_and_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    out = io.StringIO()
    assert not chartlib.ensure_installed(tmp_path, tmp_path / "dist", out)
    assert "npm was not found" in out.getvalue()
    assert "apt-get install nodejs npm" in out.getvalue()
    assert f"npm ci --no-audit --no-fund` in {tmp_path}" in out.getvalue()

    failing = tmp_path / "npm"
    failing.write_text("#!/bin/sh\necho 'npm ERR! network unreachable' >&2\nexit 1\n")
    failing.chmod(0o755)
    out = io.StringIO()
    assert not chartlib.ensure_installed(tmp_path, tmp_path / "dist", out, npm=str(failing))
    assert "Could not install the dashboard's chart library (npm ERR! network unreachable)" in out.getvalue()


def test_ticks_of_several_nodes_add_up_per_second_in_the_page_model() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (Debian: apt-get install nodejs npm); .ci/run installs it")
    result = subprocess.run([node, "--test", str(ROOT / "tests" / "js" / "dashboard_model.test.js")], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "# fail 0" in result.stdout
