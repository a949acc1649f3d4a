"""The admin's index by task, "View site" to the dashboard, a favicon, readable upstream labels."""

from __future__ import annotations

import re

import pytest
from django.contrib.staticfiles import finders
from django.test import Client

from proxyadmin import models as m
from tests.conftest import page_text

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("fast_password_hashing")]


def test_the_index_puts_hosts_upstreams_and_certificates_first_and_bookkeeping_last(
    admin_client_logged_in: Client,
) -> None:
    text = page_text(admin_client_logged_in.get("/admin/"))
    order = [text.index(word) for word in (
        "Live traffic", ">Hosts<", ">Upstreams<", ">Certificates<", "Administration", ">Users<",
        ">Groups<", ">Config revisions<", ">Proxy nodes<", ">Traffic per minute<")]
    assert order == sorted(order)
    assert "Authentication and Authorization" not in text


def test_view_site_opens_the_dashboard_and_every_page_names_a_favicon(admin_client_logged_in: Client) -> None:
    html = admin_client_logged_in.get("/admin/proxyadmin/host/").content.decode()
    assert re.search(r'<a href="/dashboard/">View site</a>', html)
    icon = re.search(r'<link rel="icon" href="([^"]+)"', html)
    assert icon and finders.find(icon[1].removeprefix("/static/"))


def test_the_upstream_form_labels_read_well_and_checks_targets_by_default(
    admin_client_logged_in: Client,
) -> None:
    html = admin_client_logged_in.get("/admin/proxyadmin/upstream/add/").content.decode()
    assert "Tls client certificate" not in html
    assert "Client certificate (mTLS to the upstream)" in html
    assert not re.search(r"<label>\s*:\s*</label>", html)  # no stray ":" label
    assert re.search(r'<input type="checkbox" name="health_check_enabled"[^>]* checked', html)
    upstream = m.Upstream.objects.create(name="app", tls=True, tls_verify=False)
    change = page_text(admin_client_logged_in.get(f"/admin/proxyadmin/upstream/{upstream.pk}/change/"))
    assert "Certificate verification is off" in change


def test_the_index_links_to_the_proxy_host_page(admin_client_logged_in: Client) -> None:
    html = admin_client_logged_in.get("/admin/").content.decode()
    assert 'href="/admin/proxyadmin/host/proxy-host/"' in html
