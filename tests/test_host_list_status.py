"""The host list shows each host's state at a glance, and enables or disables hosts.

Through the admin's host list (Django's test client): serving, disabled, no valid
certificate, ACME pending, certificate expiring, upstream down and not applied on a
node, from the certificates, node rows and upstream health the control plane stores.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from proxyadmin import models as m
from tests.conftest import page_text
from tests.test_admin_pages import store

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("fast_password_hashing")]

HOSTS_URL = "/admin/proxyadmin/host/"


def node(*, healthy: int = 1, total: int = 1, applied: int | None = None, error: str = "") -> m.ProxyNode:
    targets = [{"address": f"127.0.0.1:{9000 + i}", "healthy": i < healthy, "cooling_down": False,
                "active": 0, "weight": 1, "draining": False, "enabled": True, "last_error": None}
               for i in range(total)]
    stats = {"time": 0, "totals": {"upstreams": {"app": {
        "targets": targets, "healthy": healthy, "available": healthy, "total": total}}}}
    return m.ProxyNode.objects.create(
        name="edge-1", connected=True, last_seen=timezone.now(), last_stats=stats,
        applied_revision=m.ConfigRevision.current() if applied is None else applied,
        last_error=error, last_error_revision=m.ConfigRevision.current() if error else None,
    )


def host(name: str = "web", names: tuple[str, ...] = ("www.example.com",), **fields: Any) -> m.Host:
    upstream, _ = m.Upstream.objects.get_or_create(name="app")
    made = m.Host.objects.create(name=name, upstream=upstream, **fields)
    for hostname in names:
        made.names.create(name=hostname)
    return made


def row(client: Client, name: str) -> str:
    text = page_text(client.get(HOSTS_URL))
    [found] = [r for r in text.split("<tr") if f">{name}</a>" in r]
    return found


def in_days(days: int) -> dt.datetime:
    return timezone.now() + dt.timedelta(days=days, hours=1)


def test_a_covered_host_with_healthy_targets_on_an_up_to_date_node_is_serving(
    admin_client_logged_in: Client,
) -> None:
    store("site", ["www.example.com"], in_days(90))
    host()
    node()
    text = row(admin_client_logged_in, "web")
    assert "serving" in text
    assert "site</a> (automatic)" in text and "expires in 90 days" in text
    assert "1 / 1 healthy" in text


def test_a_disabled_host_says_so(admin_client_logged_in: Client) -> None:
    store("site", ["www.example.com"], in_days(90))
    host(enabled=False)
    assert "disabled (answers 503)" in row(admin_client_logged_in, "web")


def test_a_host_without_a_covering_certificate_shows_none(admin_client_logged_in: Client) -> None:
    host()
    node()
    text = row(admin_client_logged_in, "web")
    assert "no valid certificate" in text and "serving" not in text


def test_an_acme_host_waiting_for_its_certificate_shows_pending(admin_client_logged_in: Client) -> None:
    host(acme="http-01")
    assert "certificate pending (ACME)" in row(admin_client_logged_in, "web")


def test_a_certificate_expiring_soon_is_flagged(admin_client_logged_in: Client) -> None:
    store("site", ["www.example.com"], in_days(10))
    host()
    node()
    assert "certificate expires in 10 days" in row(admin_client_logged_in, "web")


def test_an_upstream_with_no_healthy_target_shows_down(admin_client_logged_in: Client) -> None:
    store("site", ["www.example.com"], in_days(90))
    host()
    node(healthy=0, total=2)
    text = row(admin_client_logged_in, "web")
    assert "upstream down (0 of 2 targets healthy)" in text
    assert "0 / 2 healthy" in text


def test_a_node_that_rejected_the_current_revision_shows_not_applied(admin_client_logged_in: Client) -> None:
    store("site", ["www.example.com"], in_days(90))
    host()
    current = m.ConfigRevision.current()
    node(applied=current - 1, error="certificate 'site': key does not match")
    text = row(admin_client_logged_in, "web")
    assert f"not applied on edge-1 (serves revision {current - 1} of {current})" in text
    assert "key does not match" in text


def test_no_node_online_is_said(admin_client_logged_in: Client) -> None:
    store("site", ["www.example.com"], in_days(90))
    host()
    assert "no proxy node is online" in row(admin_client_logged_in, "web")


def act(client: Client, action: str, *hosts: m.Host) -> str:
    response = client.post(HOSTS_URL, {"action": action, "_selected_action": [str(h.pk) for h in hosts]},
                           follow=True)
    return page_text(response)


def test_hosts_are_disabled_and_enabled_from_the_list(admin_client_logged_in: Client) -> None:
    store("site", ["*.example.com"], in_days(90))
    web, api = host(), host("api", ("api.example.com",))
    before = m.ConfigRevision.current()
    assert "Disabled: api, web." in act(admin_client_logged_in, "disable_hosts", web, api)
    assert not m.Host.objects.filter(enabled=True).exists()
    assert m.ConfigRevision.current() > before  # nodes reload
    assert "Enabled: web." in act(admin_client_logged_in, "enable_hosts", web)
    assert list(m.Host.objects.filter(enabled=True).values_list("name", flat=True)) == ["web"]
    history = page_text(admin_client_logged_in.get(f"{HOSTS_URL}{web.pk}/history/"))
    assert "Changed Enabled." in history


def test_a_host_no_certificate_covers_is_not_enabled(admin_client_logged_in: Client) -> None:
    web = host(enabled=False)
    text = act(admin_client_logged_in, "enable_hosts", web)
    assert "Host 'web' stays disabled: No valid stored certificate covers www.example.com" in text
    web.refresh_from_db()
    assert not web.enabled
