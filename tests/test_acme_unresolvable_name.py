"""A name that does not resolve: the CA's DNS error on the host, a growing backoff, the old
certificate still served.

challtestsrv answers no name by default here (``-defaultIPv4 ""``); only example.com
gets an A record (its management API, ``/add-a``), so pebble cannot resolve
www.example.com and says so in its own words. The error is read on the host's admin
page, served by the stack's daphne to a logged-in browser session.
"""

from __future__ import annotations

import html
import http.cookiejar
import re
import urllib.parse
import urllib.request
from pathlib import Path

import trustme

from tests.acmeharness import Stack, acme_stack, needs_pebble
from tests.proxyharness import Upstream, tls_connect
from tests.test_acme_issuance import NAMES
from tests.test_acme_worker import old_certificate_config

pytestmark = needs_pebble

PASSWORD = "correct horse battery staple"


def admin_page(stack: Stack, path: str) -> str:
    """``path`` of the admin, fetched from daphne after logging in as a new superuser."""
    stack.shell("from django.contrib.auth.models import User; "
                f"User.objects.filter(username='ops').exists() or "
                f"User.objects.create_superuser('ops', 'ops@example.com', {PASSWORD!r}); print('ok')")
    base = f"http://127.0.0.1:{stack.admin_port}"
    browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    login = browser.open(f"{base}/admin/login/", timeout=10).read().decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', login)
    assert token is not None
    form = urllib.parse.urlencode({"csrfmiddlewaretoken": token.group(1), "username": "ops",
                                   "password": PASSWORD, "next": path}).encode()
    request = urllib.request.Request(  # noqa: S310 (loopback)
        f"{base}/admin/login/", data=form, headers={"Referer": f"{base}/admin/login/"})
    return html.unescape(browser.open(request, timeout=10).read().decode())


def test_an_unresolvable_name_shows_the_ca_dns_error_backs_off_and_keeps_the_old_certificate(
    tmp_path: Path, upstream: Upstream, ca: trustme.CA
) -> None:
    with acme_stack(tmp_path, default_ipv4="") as stack:
        stack.pebble.add_a("example.com", "127.0.0.1")  # www.example.com resolves to nothing
        stack.project.import_config(old_certificate_config(ca, upstream.port))
        stack.acme_once()
        first = stack.host_state("site")
        assert first["status"] == "failing", first
        error = str(first["error"])
        print(f"\nthe CA's error: {error}")
        assert error.startswith("www.example.com: "), error  # the one name that does not resolve
        assert "could not resolve URL" in error, error  # pebble's own words for a failed lookup ...
        assert "example.com: " not in error.removeprefix("www.example.com: ")  # ... and only for it
        assert first["certificate"] == "old"

        stack.shell("from proxyadmin.acme.models import HostState; "
                    "print(HostState.objects.get(host__name='site').request_now())")
        stack.acme_once()
        second = stack.host_state("site")
        assert second["failures"] == 2 and second["status"] == "failing"
        error = str(second["error"])  # a new order: a new token in the URL, the same words
        assert error.startswith("www.example.com: ") and "could not resolve URL" in error, error
        backoff = [float(s["next_attempt"]) - float(s["last_attempt"])  # type: ignore[arg-type]
                   for s in (first, second)]
        assert 55 < backoff[0] < 65 and 115 < backoff[1] < 125, backoff

        host_id = stack.shell("from proxyadmin.models import Host; print(Host.objects.get(name='site').pk)")
        page = admin_page(stack, f"/admin/proxyadmin/host/{host_id}/change/")
        assert f"CA error: {error}" in page, page[-3000:]
        assert "2 failed attempt(s) in a row" in page

        for name in NAMES:  # the old certificate, trusted by its own CA, is still what is served
            tls_connect(stack.https_port, ca, name).close()
