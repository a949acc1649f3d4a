"""The admin in a real browser (Debian's Chromium through Playwright) at 1366 px.

Against a real control plane (daphne): the host list fits the screen with its status,
names, certificate and upstream columns, and hosts are disabled and enabled from it.
Leaves screenshots in tests/artifacts/.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.processes import ROOT, Project, config, daphne, wait_for_http
from tests.proxyharness import free_port
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
    project.env.update(DJANGO_SUPERUSER_USERNAME=USERNAME, DJANGO_SUPERUSER_PASSWORD=PASSWORD,
                       DJANGO_SUPERUSER_EMAIL="ops@example.com")
    project.manage("createsuperuser", "--noinput")
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
