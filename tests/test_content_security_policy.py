"""Every control-plane response carries a strict Content-Security-Policy (nothing inline),
and the admin and the dashboard work under it: in Chromium they load with no violation."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import trustme
from django.test import Client

from proxyadmin.csp import POLICY
from tests.conftest import make_cert
from tests.processes import Project, config, daphne, wait_for_http
from tests.proxyharness import free_port
from tests.test_dashboard_browser import CHROMIUM_ARGS, chromium

pytestmark = pytest.mark.usefixtures("fast_password_hashing")

USERNAME = "ops"
PASSWORD = "a long browser pass phrase"
EXPECTED_DIRECTIVES = [
    "default-src 'self'", "script-src 'self'", "style-src 'self'", "img-src 'self' data:",
    "connect-src 'self'", "frame-ancestors 'none'", "base-uri 'none'", "form-action 'self'",
    "object-src 'none'",
]
# Reports every violation to the test through an exposed function; Playwright injects it
# before the page's own scripts, outside the page's policy.
REPORT_VIOLATIONS_JS = """
document.addEventListener("securitypolicyviolation", (e) => window.cspViolation(
  `${e.violatedDirective} blocked ${e.blockedURI || "inline"} in ${e.sourceFile}:${e.lineNumber}`));
"""


def test_policy_is_the_strict_one() -> None:
    assert POLICY.split("; ") == EXPECTED_DIRECTIVES


@pytest.mark.parametrize("path", [
    "/admin/", "/admin/proxyadmin/host/add/", "/admin/proxyadmin/configrevision/", "/dashboard/",
    "/admin/no-such-page/",
])
def test_admin_and_dashboard_responses_carry_the_policy(admin_client_logged_in: Client, path: str) -> None:
    response = admin_client_logged_in.get(path, follow=False)
    assert response["Content-Security-Policy"] == POLICY


def test_login_page_and_its_redirects_carry_the_policy(db: None) -> None:
    client = Client()
    assert client.get("/admin/login/")["Content-Security-Policy"] == POLICY
    assert client.get("/dashboard/")["Content-Security-Policy"] == POLICY  # a redirect to the login


def styled_config(ca: trustme.CA) -> dict[str, object]:
    """A config whose admin lists show every status colour: a certificate expiring soon, an
    upstream that does not verify its targets."""
    document = config(ca, free_port(), ["a"])
    soon_cert, soon_key = make_cert(["soon.example"],
                                    not_after=dt.datetime.now(dt.UTC) + dt.timedelta(days=10))
    document["certificates"].append(  # type: ignore[attr-defined]
        {"name": "soon", "chain_pem": soon_cert.decode(), "key_pem": soon_key.decode()})
    document["upstreams"].append(  # type: ignore[attr-defined]
        {"name": "unverified", "tls": True, "tls_verify": False,
         "targets": [{"host": "127.0.0.1", "port": free_port()}]})
    return document


def test_admin_and_dashboard_load_in_chromium_without_a_violation(tmp_path: Path, ca: trustme.CA) -> None:
    executable = chromium()
    from playwright.sync_api import expect, sync_playwright

    project = Project(tmp_path)
    project.manage("migrate", "--verbosity", "0")
    project.import_config(styled_config(ca))
    project.create_superuser(USERNAME, PASSWORD)
    port = free_port()
    base = f"http://127.0.0.1:{port}"

    with daphne(project, port), sync_playwright() as pw:
        wait_for_http(f"{base}/admin/login/")
        browser = pw.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            violations: list[str] = []
            errors: list[str] = []
            page.expose_function("cspViolation", lambda text: violations.append(text))
            page.add_init_script(REPORT_VIOLATIONS_JS)
            page.on("console", lambda msg: errors.append(f"{msg.text} {msg.location.get('url')}")
                    if msg.type == "error" and not msg.location.get("url", "").endswith("/favicon.ico")
                    else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))

            def visit(path: str) -> None:
                response = page.goto(f"{base}{path}")
                assert response is not None and response.ok, path
                assert response.headers["content-security-policy"] == POLICY, path
                page.wait_for_load_state("networkidle")

            visit("/admin/login/?next=/admin/")
            page.fill("#id_username", USERNAME)
            page.fill("#id_password", PASSWORD)
            page.click("input[type=submit]")
            page.wait_for_url(f"{base}/admin/")
            visit("/admin/")
            visit("/admin/proxyadmin/host/add/")
            page.click(".add-row a")  # the names inline adds a row with its script
            visit("/admin/proxyadmin/certificate/")
            expect(page.locator(".status-warn")).to_contain_text("in 9 days")
            visit("/admin/proxyadmin/upstream/")
            expect(page.locator(".status-bad")).to_contain_text("not verified")
            visit("/admin/proxyadmin/configrevision/")
            visit("/dashboard/")
            expect(page.locator("#connection-status")).to_have_text("Live", timeout=15_000)
            expect(page.locator("#no-node")).to_be_visible()
            assert violations == [] and errors == [], violations + errors

            # The watch works: an inline style is refused, and reported.
            page.evaluate("document.body.insertAdjacentHTML('beforeend', '<p style=\"color: red\">x</p>')")
            for _ in range(50):
                if violations:
                    break
                page.wait_for_timeout(100)
            assert [v.split()[0] for v in violations] == ["style-src-attr"], violations
        finally:
            browser.close()
