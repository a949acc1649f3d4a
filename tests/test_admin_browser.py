"""The admin in a real browser (Debian's Chromium through Playwright) at 1366 px.

Against a real control plane (daphne): the host list fits the screen with its status,
names, certificate and upstream columns, and hosts are disabled and enabled from it; a
route added on the proxy host page (names, ``host:port``, a local-CA certificate) answers
200 through a real proxy node (runproxy) with the certificate that covers it, after the
save without a covering certificate was refused. Leaves screenshots in tests/artifacts/.
"""

from __future__ import annotations

import socket
import ssl
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.processes import ROOT, Project, config, daphne, process, wait_for_http, wait_for_port
from tests.proxyharness import Upstream, free_port, read_response
from tests.test_dashboard_browser import CHROMIUM_ARGS, chromium

ARTIFACTS = ROOT / "tests" / "artifacts"
USERNAME = "ops"
PASSWORD = "a long browser pass phrase"
# Neither the page nor the list's own box (Django's .results scrolls by itself) scrolls sideways.
NO_HORIZONTAL_SCROLL_JS = """() => document.documentElement.scrollWidth <= window.innerWidth
  && [...document.querySelectorAll(".results")].every((e) => e.scrollWidth <= e.clientWidth)"""


@dataclass
class Admin:
    base: str
    page: Any
    project: Project


@pytest.fixture
def admin(tmp_path: Path, ca: trustme.CA) -> Iterator[Admin]:
    """A logged-in Chromium page on a fresh control plane with hosts a, b and c."""
    executable = chromium()
    from playwright.sync_api import sync_playwright

    project = Project(tmp_path)
    project.manage("migrate", "--verbosity", "0")
    document = config(ca, free_port(), ["a", "b", "c"])
    # Long names are what push a list off the screen.
    document["hosts"][0]["names"] += [  # type: ignore[index]
        f"service-{i}.a.example" for i in range(6)]
    document["certificates"][0]["chain_pem"] = _covering_chain(ca, document)  # type: ignore[index]
    project.import_config(document)
    project.create_superuser(USERNAME, PASSWORD)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    ARTIFACTS.mkdir(exist_ok=True)
    with daphne(project, port), sync_playwright() as pw:
        wait_for_http(f"{base}/admin/login/")
        browser = pw.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1366, "height": 768})
            page.goto(f"{base}/admin/login/?next=/admin/")
            page.fill("#id_username", USERNAME)
            page.fill("#id_password", PASSWORD)
            page.click("input[type=submit]")
            page.wait_for_url(f"{base}/admin/")
            yield Admin(base, page, project)
        finally:
            browser.close()


def _covering_chain(ca: trustme.CA, document: dict[str, Any]) -> str:
    """Host a's certificate, reissued for all its names (with its key in the same entry)."""
    names = document["hosts"][0]["names"]
    leaf = ca.issue_cert(*names)
    document["certificates"][0]["key_pem"] = leaf.private_key_pem.bytes().decode()
    return (b"".join(b.bytes() for b in leaf.cert_chain_pems) + ca.cert_pem.bytes()).decode()


def test_host_list_fits_1366_px_and_enables_and_disables_hosts(admin: Admin) -> None:
    from playwright.sync_api import expect

    page = admin.page
    page.goto(f"{admin.base}/admin/proxyadmin/host/")
    for column in ("status", "names", "certificate served", "upstream", "enabled"):
        expect(page.locator("#result_list thead")).to_contain_text(column, ignore_case=True)
    row = page.locator("#result_list tbody tr", has_text="service-5.a.example")
    expect(row).to_contain_text("no proxy node is online")
    expect(row.locator("td.field-enabled img")).to_be_visible()
    assert page.evaluate(NO_HORIZONTAL_SCROLL_JS)
    page.screenshot(path=str(ARTIFACTS / "host-list-1366.png"), full_page=True)

    # Disable host b from the list: tick it, pick the action, Go.
    row_b = page.locator("#result_list tbody tr", has_text="b.example")
    row_b.locator("input.action-select").check()
    page.select_option("select[name=action]", "disable_hosts")
    page.click("button[name=index]")
    expect(page.locator(".messagelist")).to_contain_text("Disabled: b.")
    expect(page.locator("#result_list tbody tr", has_text="b.example")).to_contain_text("disabled (answers 503)")
    page.locator("#result_list tbody tr", has_text="b.example").locator("input.action-select").check()
    page.select_option("select[name=action]", "enable_hosts")
    page.click("button[name=index]")
    expect(page.locator(".messagelist")).to_contain_text("Enabled: b.")
    expect(page.locator("#result_list tbody tr", has_text="b.example")).not_to_contain_text("disabled")


def get_through_node(port: int, ca_pem: str, name: str) -> tuple[int, list[str]]:
    """GET / for ``name`` through the node trusting only ``ca_pem``: status and the SANs served."""
    ctx = ssl.create_default_context(cadata=ca_pem)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=name) as sock:
        cert: dict[str, Any] = dict(sock.getpeercert() or {})
        sans = [str(value) for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"]
        sock.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
        return read_response(sock)[0], sans


def test_a_route_added_on_the_proxy_host_page_answers_through_a_node(
    admin: Admin, upstream: Upstream, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    page = admin.page
    page.goto(f"{admin.base}/admin/proxyadmin/host/")
    page.click("#add-proxy-host")
    page.wait_for_load_state()
    served = page.locator("#served-certificate")
    page.fill("#id_names", "route.example")
    expect(served).to_contain_text("No valid stored certificate covers route.example")
    page.fill("#id_forward_to", f"127.0.0.1:{upstream.port}")
    page.click("input[name=_save]")
    # Refused: nothing covers the name, and the page says how to get a certificate.
    expect(page.locator(".field-certificate .errorlist")).to_contain_text(
        "No valid stored certificate covers route.example")
    expect(page.locator("#id_forward_to")).to_have_value(f"127.0.0.1:{upstream.port}")
    page.screenshot(path=str(ARTIFACTS / "proxy-host-refused.png"), full_page=True)

    page.get_by_label("Generate one from the local CA").check()
    expect(served).to_contain_text("A new certificate from the local CA for route.example")
    assert page.evaluate(NO_HORIZONTAL_SCROLL_JS)
    page.click("input[name=_save]")
    expect(page.locator(".messagelist")).to_contain_text("Host 'route.example' saved")
    expect(page.locator("#result_list tbody tr", has_text="route.example")).to_contain_text(
        "route.example (local CA)")

    ca_pem = page.request.get(f"{admin.base}/admin/proxyadmin/certificate/local-ca.pem").text()
    https = free_port()
    node = [sys.executable, "manage.py", "runproxy", "--no-control", "--https", f"127.0.0.1:{https}",
            "--http", "off", "--no-access-log"]
    with process(node, admin.project.env, tmp_path / "runproxy.log"):
        wait_for_port(https)
        status, sans = get_through_node(https, ca_pem, "route.example")
    assert status == 200
    assert sans == ["route.example"]
