"""The dashboard opened after the traffic, in the README's order: send traffic through a real
node (runproxy) linked to a real control plane (daphne), then open the dashboard in headless
Chromium. The 15-minute view shows that traffic from the first second; the time-range presets
switch the charts; host rows link to the host's admin page; the page fits a 390 px phone with
no horizontal scroll and the recent end of the charts in view. Screenshots at 1366 px and
390 px go to tests/artifacts/."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import trustme

from tests.processes import Project, config, daphne, process, wait_for_http, wait_for_port
from tests.proxyharness import LoopThread, Upstream, free_port, read_response, tls_connect
from tests.test_dashboard_browser import ARTIFACTS, CHROMIUM_ARGS, PEAK_JS, chromium, number

USERNAME, PASSWORD = "ops", "a long remembering pass phrase"
OK_REQUESTS = 30
NO_SCROLL_JS = "() => document.scrollingElement.scrollWidth <= window.innerWidth"


@dataclass
class Site:
    base: str
    https_port: int
    ca: trustme.CA
    browser: Any
    storage: Any  # the logged-in session (StorageState), for new pages


def send(port: int, ca: trustme.CA, head: bytes) -> int:
    sock = tls_connect(port, ca, "a.example")
    try:
        sock.sendall(head)
        return read_response(sock)[0]
    finally:
        sock.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    executable = chromium()
    from playwright.sync_api import expect, sync_playwright

    tmp = tmp_path_factory.mktemp("remembers")
    ca = trustme.CA()
    loop = LoopThread()
    upstream = Upstream(loop).start()
    project = Project(tmp)
    project.manage("migrate", "--verbosity", "0")
    project.import_config(config(ca, upstream.port, ["a"]))
    project.create_superuser(USERNAME, PASSWORD)
    admin_port, https_port = free_port(), free_port()
    base = f"http://127.0.0.1:{admin_port}"
    node_argv = [sys.executable, "manage.py", "runproxy", "--control", base, "--name", "edge-1",
                 "--https", f"127.0.0.1:{https_port}", "--http", "off",
                 "--access-log", str(tmp / "access.log")]
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        with daphne(project, admin_port), process(node_argv, project.env, tmp / "runproxy.log"), \
                sync_playwright() as pw:
            wait_for_http(f"{base}/admin/login/")
            wait_for_port(https_port)
            browser = pw.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
            try:
                login = browser.new_page()
                login.goto(f"{base}/admin/login/?next=/admin/")
                login.fill("#id_username", USERNAME)
                login.fill("#id_password", PASSWORD)
                login.click("input[type=submit]")
                expect(login.locator("#dashboard-link")).to_be_visible()
                storage = login.context.storage_state()
                login.close()
                # The traffic, before any dashboard is open.
                for _ in range(OK_REQUESTS):
                    assert send(https_port, ca, b"GET /before HTTP/1.1\r\nHost: a.example\r\n\r\n") == 200
                # The node reports once a second: after this its reports have covered all of it,
                # and any tick a page gets from now on carries none of these requests.
                time.sleep(2.5)
                yield Site(base, https_port, ca, browser, storage)
            finally:
                browser.close()
    finally:
        upstream.stop()
        loop.close()


@contextlib.contextmanager
def dashboard(site: Site, width: int, height: int = 900, path: str = "/dashboard/") -> Iterator[Any]:
    from playwright.sync_api import expect

    context = site.browser.new_context(viewport={"width": width, "height": height},
                                       storage_state=site.storage)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.goto(site.base + path)
        expect(page.locator("#connection-status")).to_have_text("Live", timeout=15_000)
        yield page
        assert not errors, errors
    finally:
        context.close()


def test_dashboard_opened_after_traffic_shows_it_in_the_15_minute_view(site: Site) -> None:
    from playwright.sync_api import expect

    with dashboard(site, 1366) as page:
        # From the state message: no tick had to arrive for these.
        requests = page.locator("#total-requests")
        expect(requests).not_to_have_text("0", timeout=5_000)
        assert number(requests.inner_text()) >= OK_REQUESTS
        row = page.locator('#hosts-table tr[data-key="a"]')
        expect(row).to_be_visible()
        assert number(row.locator("td").nth(3).inner_text()) >= OK_REQUESTS  # 2xx
        assert page.evaluate(PEAK_JS, "requests") > 0
        expect(page.locator("#hosts-empty")).to_be_hidden()
        expect(page.locator("#tls-versions")).to_contain_text("TLSv1.3")


def test_time_range_presets_switch_the_charts(site: Site) -> None:
    from playwright.sync_api import expect

    with dashboard(site, 1366) as page:
        seconds, minutes = page.locator("#charts-seconds"), page.locator("#charts-minutes")
        expect(seconds).to_be_visible()
        expect(minutes).to_be_hidden()
        expect(page.locator('.dash-range-button[data-range="15m"]')).to_have_attribute("aria-pressed", "true")

        page.click('.dash-range-button[data-range="1h"]')
        expect(minutes).to_be_visible()
        expect(seconds).to_be_hidden()
        expect(minutes.locator("figcaption").first).to_contain_text("last hour")
        expect(page.locator('.dash-range-button[data-range="1h"]')).to_have_attribute("aria-pressed", "true")
        points = page.evaluate("() => window.dashboard.charts.dayRequests.data[0].length")
        assert points == 60
        assert page.evaluate(PEAK_JS, "dayRequests") >= OK_REQUESTS  # the rollup, from the database
        assert page.url.endswith("#range=1h")

        page.click('.dash-range-button[data-range="24h"]')
        expect(minutes.locator("figcaption").first).to_contain_text("last 24 hours")
        assert page.evaluate("() => window.dashboard.charts.dayRequests.data[0].length") == 1440

        page.click('.dash-range-button[data-range="15m"]')
        expect(seconds).to_be_visible()
        expect(minutes).to_be_hidden()
        assert page.url.endswith("/dashboard/")

    with dashboard(site, 1366, path="/dashboard/#range=24h") as page:  # the range survives a reload
        expect(page.locator("#charts-minutes")).to_be_visible()


def test_host_rows_link_to_the_hosts_admin_page(site: Site) -> None:
    from playwright.sync_api import expect

    with dashboard(site, 1366) as page:
        link = page.locator('#hosts-table tr[data-key="a"] td.host a')
        expect(link).to_have_text("a")
        href = link.get_attribute("href")
        assert href is not None and href.startswith("/admin/proxyadmin/host/") and href.endswith("/change/")
        link.click()
        page.wait_for_url(f"{site.base}{href}")
        expect(page.locator("#content h1, #content h2").first).to_be_visible()


@pytest.mark.parametrize(("width", "height"), [(1366, 900), (390, 844)])
def test_dashboard_fits_the_screen_without_horizontal_scroll(site: Site, width: int, height: int) -> None:
    with dashboard(site, width, height) as page:
        page.wait_for_function("() => window.dashboard.renders >= 2")
        assert page.evaluate(NO_SCROLL_JS), page.evaluate("() => document.scrollingElement.scrollWidth")
        for key in ("requests", "bandwidth", "active"):
            # The whole chart, its recent (right) end included, lies within the screen.
            right = page.evaluate(f"() => window.dashboard.charts.{key}.root.getBoundingClientRect().right")
            assert right <= width, (key, right)
        page.screenshot(path=str(ARTIFACTS / f"dashboard-{width}px.png"), full_page=True)
        page.click('.dash-range-button[data-range="24h"]')
        page.wait_for_timeout(300)
        assert page.evaluate(NO_SCROLL_JS)
        for key in ("dayRequests", "dayBandwidth"):
            box = page.evaluate(f"() => window.dashboard.charts.{key}.root.getBoundingClientRect().toJSON()")
            assert box["left"] >= 0 and box["right"] <= width, (key, box)
        page.screenshot(path=str(ARTIFACTS / f"dashboard-{width}px-24h.png"), full_page=True)


HOSTILE_TARGET = '/<img/src=x/onerror=alert(1)>"<b>bold</b>&amp;'


def test_recent_requests_of_a_host_are_shown_as_text_and_filtered_by_status(site: Site) -> None:
    from playwright.sync_api import expect

    with dashboard(site, 390, 844) as page:
        dialogs: list[str] = []

        def on_dialog(dialog: Any) -> None:
            dialogs.append(dialog.message)
            dialog.dismiss()

        page.on("dialog", on_dialog)
        page.locator('#hosts-table tr[data-key="a"] .dash-recent-button').click()
        panel = page.locator("#recent")
        expect(panel).to_be_visible()
        expect(page.locator("#recent-host")).to_have_text("a")
        # The lines sent before the view opened come first (the node keeps them)...
        expect(panel.locator("li").filter(has_text="GET /before HTTP/1.1").first).to_be_visible(timeout=10_000)
        # ...then new ones, a hostile target and a request the proxy refuses itself (405) among them.
        head = f"GET {HOSTILE_TARGET} HTTP/1.1\r\nHost: a.example\r\n\r\n".encode()
        assert send(site.https_port, site.ca, head) == 200
        assert send(site.https_port, site.ca, b"TRACE /traced HTTP/1.1\r\nHost: a.example\r\n\r\n") == 405
        hostile = panel.locator("li").filter(has_text=HOSTILE_TARGET)
        expect(hostile).to_have_count(1, timeout=10_000)
        assert HOSTILE_TARGET in hostile.text_content()
        assert panel.locator("img, b").count() == 0  # text, never markup
        assert not dialogs
        assert page.evaluate(NO_SCROLL_JS)  # long lines wrap on a phone

        traced = panel.locator("li").filter(has_text="TRACE /traced")
        page.click('.dash-status-button[data-status="4xx"]')
        expect(traced).to_have_count(1)
        expect(hostile).to_have_count(0)
        assert "405" in traced.text_content()
        page.click('.dash-status-button[data-status="2xx"]')
        expect(hostile).to_have_count(1)
        expect(traced).to_have_count(0)
        page.click('.dash-status-button[data-status="5xx"]')
        expect(page.locator("#recent-empty")).to_be_visible()
        page.screenshot(path=str(ARTIFACTS / "dashboard-recent-390px.png"), full_page=True)
        page.click("#recent-close")
        expect(panel).to_be_hidden()
