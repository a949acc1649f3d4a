"""A refused certificate upload keeps its files, pasted key and passphrase (Chromium).

Against a real control plane (daphne): Save on the certificate form is checked first
(``certificate.js`` posts the form to the admin's check URL), so a refusal is shown on
the same page, with the chosen files still selected and the typed key and passphrase
still there; corrected, the same Save stores the certificate. Also: no page error and
no CSP violation on the way.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from tests.conftest import make_cert, pem_chain_with_root
from tests.processes import ROOT, Project, daphne, wait_for_http
from tests.proxyharness import free_port
from tests.test_dashboard_browser import CHROMIUM_ARGS, chromium

ARTIFACTS = ROOT / "tests" / "artifacts"
USERNAME = "ops"
PASSWORD = "a long browser pass phrase"
ADD_PATH = "/admin/proxyadmin/certificate/add/"
FILE_COUNT_JS = "(selector) => document.querySelector(selector).files.length"


@dataclass
class Browser:
    base: str
    page: Any
    project: Project
    problems: list[str] = field(default_factory=list)  # page errors and CSP reports


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    executable = chromium()
    from playwright.sync_api import sync_playwright

    project = Project(tmp_path)
    project.manage("migrate", "--verbosity", "0")
    project.create_superuser(USERNAME, PASSWORD)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with daphne(project, port), sync_playwright() as pw:
        wait_for_http(f"{base}/admin/login/")
        chrome = pw.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            page = chrome.new_page(viewport={"width": 1366, "height": 768})
            found = Browser(base, page, project)
            page.on("pageerror", lambda exc: found.problems.append(str(exc)))
            page.on("console", lambda msg: found.problems.append(msg.text)
                    if "Content Security Policy" in msg.text else None)
            page.goto(f"{base}/admin/login/?next=/admin/")
            page.fill("#id_username", USERNAME)
            page.fill("#id_password", PASSWORD)
            page.click("input[type=submit]")
            page.wait_for_url(f"{base}/admin/")
            yield found
        finally:
            chrome.close()


def test_a_refused_upload_keeps_its_files_key_and_passphrase_then_saves(
    browser: Browser, ca: trustme.CA, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    leaf = ca.issue_cert("site.example")
    chain_file = tmp_path / "fullchain.pem"
    chain_file.write_bytes(pem_chain_with_root(ca, leaf))
    wrong_key_file = tmp_path / "wrong.key"
    wrong_key_file.write_bytes(make_cert(["site.example"])[1])
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None)
    locked = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.BestAvailableEncryption(b"open sesame")).decode()
    page = browser.page
    page.goto(browser.base + ADD_PATH)
    page.fill("#id_name", "site")
    page.set_input_files("#id_chain_file", str(chain_file))
    page.set_input_files("#id_key_file", str(wrong_key_file))

    # A key file of another certificate: refused on the page, both files still chosen.
    page.click("input[name=_save]")
    expect(page.locator(".field-key_pem .errorlist")).to_have_text(
        "The private key does not match the certificate: they are not a pair.")
    expect(page.locator("p.errornote")).to_be_visible()
    assert page.url == browser.base + ADD_PATH
    assert page.evaluate(FILE_COUNT_JS, "#id_chain_file") == 1
    assert page.evaluate(FILE_COUNT_JS, "#id_key_file") == 1
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "certificate-refused-upload.png"), full_page=True)

    # The right key, pasted encrypted, with a wrong passphrase: the key and the passphrase stay.
    page.set_input_files("#id_key_file", [])
    page.fill("#id_key_pem", locked)
    page.fill("#id_passphrase", "open barley")
    page.click("input[name=_save]")
    expect(page.locator(".field-passphrase .errorlist")).to_have_text(
        "The passphrase does not open the private key.")
    expect(page.locator(".field-key_pem .errorlist")).to_have_count(0)  # the earlier error is gone
    expect(page.locator("#id_key_pem")).to_have_value(locked)
    expect(page.locator("#id_passphrase")).to_have_value("open barley")
    assert page.evaluate(FILE_COUNT_JS, "#id_chain_file") == 1

    # Corrected: the same Save stores it.
    page.fill("#id_passphrase", "open sesame")
    page.click("input[name=_save]")
    expect(page.locator(".messagelist")).to_contain_text("was added successfully")
    expect(page.locator("#result_list")).to_contain_text("site.example")
    assert browser.problems == []
