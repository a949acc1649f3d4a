"""The "proxy host" page: a route in one admin form, the upstream made behind the scenes.

Through the admin (Django's test client): names first and the advanced section folded;
``host:port`` lines become the host's own upstream (health checks on); the certificate
comes from a stored one, the local CA or ACME, and the page says which will be served;
HSTS presets map to policies; a host no certificate covers is refused with the choices;
the page asks for the admin's permissions.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.utils import timezone

from proxyadmin import models as m
from tests.conftest import page_text
from tests.test_admin_pages import UPSTREAM_ADD_URL, store, upstream_post

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("fast_password_hashing")]

ADD_URL = "/admin/proxyadmin/host/proxy-host/"
PREVIEW_URL = "/admin/proxyadmin/host/proxy-host/certificate/"


def route(**fields: Any) -> dict[str, Any]:
    data = {"names": "www.example.com", "forward_to": "127.0.0.1:7081", "tls": "stored",
            "certificate": "", "acme": "any", "hsts": "off", "redirect_http": "on", "enabled": "on",
            "name": "", "mode": "http", "client_auth": "off", "proxy_protocol": "off",
            "max_body_size": "10485760"}
    data.update(fields)
    return data


def in_days(days: int) -> dt.datetime:
    return timezone.now() + dt.timedelta(days=days, hours=1)


def test_the_page_asks_for_names_first_and_folds_the_advanced_section(admin_client_logged_in: Client) -> None:
    html = admin_client_logged_in.get(ADD_URL).content.decode()
    assert html.index('name="names"') < html.index('name="forward_to"') < html.index('name="tls"')
    advanced = html[html.index("<details"):html.index("</details>")]
    for field in ("mode", "client_auth", "proxy_protocol", "max_body_size"):
        assert f'name="{field}"' in advanced
    assert "<details open" not in html
    assert "Enter the names to see which certificate will be served." in html


def test_a_route_to_host_port_with_a_local_ca_certificate_is_saved_in_one_post(
    admin_client_logged_in: Client,
) -> None:
    response = admin_client_logged_in.post(ADD_URL, route(tls="local_ca"), follow=True)
    assert "Host 'www.example.com' saved" in page_text(response)
    host = m.Host.objects.get()
    assert host.name == "www.example.com" and host.hostnames() == ["www.example.com"]
    assert [(t.host, t.port) for t in host.upstream.targets.all()] == [("127.0.0.1", 7081)]
    assert host.upstream.health_check_enabled
    assert host.certificate is not None and host.certificate.sans == ["www.example.com"]
    assert host.certificate.source == m.Certificate.Source.GENERATED
    assert host.redirect_http and host.hsts_policy is None


def test_a_route_no_certificate_covers_is_refused_with_the_choices(admin_client_logged_in: Client) -> None:
    store("other", ["shop.example.org"], in_days(90))
    response = admin_client_logged_in.post(ADD_URL, route())
    assert response.status_code == 200
    text = page_text(response)
    assert "No valid stored certificate covers www.example.com" in text
    assert "generate one from the local CA, or obtain one automatically (ACME)" in text
    assert not m.Host.objects.exists() and not m.Upstream.objects.exists()


def test_a_covering_stored_certificate_is_shown_and_chosen_automatically(
    admin_client_logged_in: Client,
) -> None:
    store("wild", ["*.example.com"], in_days(90))
    preview = admin_client_logged_in.get(PREVIEW_URL, {"names": "www.example.com", "tls": "stored"}).json()
    assert preview["level"] == "ok" and "'wild' (automatic" in preview["text"]
    response = admin_client_logged_in.post(ADD_URL, route())
    assert response.status_code == 302, page_text(response)
    assert m.Host.objects.get().certificate is None  # automatic


def test_the_preview_says_what_each_choice_serves(admin_client_logged_in: Client) -> None:
    chosen = store("other", ["shop.example.org"], in_days(90))
    ask = {"names": "www.example.com\napi.example.com"}
    missing = admin_client_logged_in.get(PREVIEW_URL, {**ask, "tls": "stored"}).json()
    assert missing["level"] == "bad" and "www.example.com, api.example.com" in missing["text"]
    wrong = admin_client_logged_in.get(PREVIEW_URL, {**ask, "tls": "stored", "certificate": str(chosen.pk)}).json()
    assert wrong["text"] == "'other' does not cover www.example.com, api.example.com."
    local = admin_client_logged_in.get(PREVIEW_URL, {**ask, "tls": "local_ca"}).json()
    assert local["text"].startswith("A new certificate from the local CA")
    acme = admin_client_logged_in.get(PREVIEW_URL, {**ask, "tls": "acme"}).json()
    assert "(pending)" in acme["text"]


def test_an_acme_route_is_accepted_pending(admin_client_logged_in: Client) -> None:
    response = admin_client_logged_in.post(ADD_URL, route(tls="acme", acme="http-01"))
    assert response.status_code == 302, page_text(response)
    assert m.Host.objects.get().acme == "http-01"


def test_hsts_presets_become_policies_shared_by_hosts(admin_client_logged_in: Client) -> None:
    store("wild", ["*.example.com"], in_days(90))
    admin_client_logged_in.post(ADD_URL, route(hsts="year-subdomains"))
    admin_client_logged_in.post(ADD_URL, route(names="api.example.com", hsts="year-subdomains",
                                               forward_to="127.0.0.1:7082"))
    [policy] = m.HSTSPolicy.objects.all()
    assert policy.header_value() == "max-age=31536000; includeSubDomains"
    assert m.Host.objects.filter(hsts_policy=policy).count() == 2
    admin_client_logged_in.post(ADD_URL, route(names="t.example.com", hsts="test", forward_to="[::1]:80"))
    assert m.Host.objects.get(name="t.example.com").hsts_policy.max_age == 300  # type: ignore[union-attr]
    custom = route(names="c.example.com", hsts="custom", hsts_max_age="600", forward_to="localhost:80")
    admin_client_logged_in.post(ADD_URL, custom)
    assert m.Host.objects.get(name="c.example.com").hsts_policy.name == "max-age=600"  # type: ignore[union-attr]


@pytest.mark.parametrize(("forward_to", "message"), [
    ("127.0.0.1", "'127.0.0.1': write host:port, for example 127.0.0.1:8080."),
    ("127.0.0.1:0", "'127.0.0.1:0': Ensure this value is greater than or equal to 1."),
    ("", "Where should the traffic go? Enter host:port, or pick an upstream."),
    ("a.example:80\na.example:80", "'a.example:80' is listed twice."),
])
def test_bad_forward_to_lines_are_refused_with_the_reason(
    admin_client_logged_in: Client, forward_to: str, message: str
) -> None:
    response = admin_client_logged_in.post(ADD_URL, route(tls="local_ca", forward_to=forward_to))
    assert message in page_text(response)
    assert not m.Host.objects.exists()


def test_editing_updates_the_hosts_own_upstream_and_keeps_a_shared_one(admin_client_logged_in: Client) -> None:
    store("wild", ["*.example.com"], in_days(90))
    admin_client_logged_in.post(ADD_URL, route())
    host = m.Host.objects.get()
    edit_url = f"/admin/proxyadmin/host/{host.pk}/proxy-host/"
    page = admin_client_logged_in.get(edit_url).content.decode()
    assert "127.0.0.1:7081" in page and "www.example.com" in page
    response = admin_client_logged_in.post(edit_url, route(forward_to="127.0.0.1:7081\n127.0.0.1:7082",
                                                           name=host.name))
    assert response.status_code == 302, page_text(response)
    host.refresh_from_db()
    assert sorted(t.port for t in host.upstream.targets.all()) == [7081, 7082]
    assert m.Upstream.objects.count() == 1
    # Another host on the same upstream: the edit makes this host its own upstream instead.
    other = m.Host.objects.create(name="other", upstream=host.upstream)
    other.names.create(name="other.example.com")
    admin_client_logged_in.post(edit_url, route(forward_to="127.0.0.1:9000", name=host.name))
    host.refresh_from_db()
    assert [t.port for t in host.upstream.targets.all()] == [9000]
    assert sorted(t.port for t in other.upstream.targets.all()) == [7081, 7082]


def test_an_existing_upstream_can_be_chosen_instead(admin_client_logged_in: Client) -> None:
    upstream = m.Upstream.objects.create(name="app")
    upstream.targets.create(host="127.0.0.1", port=9000)
    response = admin_client_logged_in.post(ADD_URL, route(tls="local_ca", forward_to="",
                                                          upstream=str(upstream.pk)))
    assert response.status_code == 302, page_text(response)
    assert m.Host.objects.get().upstream == upstream
    assert m.Upstream.objects.count() == 1


def test_the_page_needs_the_permissions_to_add_hosts_and_upstreams(db: None) -> None:
    user = User.objects.create_user("viewer", password="x" * 20, is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_host"))
    client = Client()
    client.force_login(user)
    assert client.get(ADD_URL).status_code == 403
    user.user_permissions.add(*Permission.objects.filter(
        codename__in=["add_host", "add_upstream", "change_upstream"]))
    client.force_login(User.objects.get(pk=user.pk))
    assert client.get(ADD_URL).status_code == 200


def test_a_port_typed_into_a_target_host_is_told_to_go_in_port(admin_client_logged_in: Client) -> None:
    response = admin_client_logged_in.post(UPSTREAM_ADD_URL, upstream_post([("127.0.0.1:7081", "")]))
    assert "Put the port in Port: enter 127.0.0.1 here and 7081 under Port." in page_text(response)
