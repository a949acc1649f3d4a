"""No silent wrong certificate: a host is saved only with a certificate that covers it.

Through the admin's host page (Django's test client) and ``importconfig``: a host whose
names no valid stored certificate covers is refused with the ways to get one; a stored
certificate covering every name is chosen automatically; the default certificate and an
expired one do not count; the local CA can issue one as the host is saved; an ACME host
is accepted while its order is pending. The snapshot gives an uncovered host no
certificate rather than someone else's.
"""

from __future__ import annotations

import datetime as dt
import re

import pytest
from django.test import Client
from django.utils import timezone

from proxyadmin import configio, pki
from proxyadmin import models as m
from proxyadmin.snapshot import build_snapshot
from tests.conftest import make_cert, page_text
from tests.test_host_names import HOST_ADD_URL, host_post, stored_certificate

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("fast_password_hashing")]

REFUSAL = "No valid stored certificate covers www.example.com"


@pytest.fixture
def upstream() -> m.Upstream:
    upstream = m.Upstream.objects.create(name="app")
    upstream.targets.create(host="127.0.0.1", port=9000)
    return upstream


def certificate_row(response: object) -> str:
    """The host form's certificate row, where the refusal is shown."""
    html = response.content.decode()  # type: ignore[attr-defined]
    match = re.search(r'<div class="form-row[^"]*field-certificate[^"]*">(.*?)</div>\s*</div>', html, re.S)
    assert match, "no certificate row on the page"
    return match.group(1)


def test_a_host_no_certificate_covers_is_refused_with_the_choices(
    admin_client_logged_in: Client, upstream: m.Upstream
) -> None:
    stored_certificate("other", ["shop.example.org"])
    response = admin_client_logged_in.post(HOST_ADD_URL, host_post(upstream, ["www.example.com"]))
    assert response.status_code == 200
    row = certificate_row(response)
    assert REFUSAL in row
    for choice in ("upload a certificate", "Generate a certificate from the local CA", "ACME"):
        assert choice in row
    assert not m.Host.objects.exists()


def test_the_default_certificate_is_not_a_choice_for_a_named_host(
    admin_client_logged_in: Client, upstream: m.Upstream
) -> None:
    settings = m.ProxySettings.load()
    settings.default_certificate = stored_certificate("fallback", ["fallback.example"])
    settings.save()
    response = admin_client_logged_in.post(HOST_ADD_URL, host_post(upstream, ["www.example.com"]))
    assert REFUSAL in page_text(response)
    assert not m.Host.objects.exists()


def test_an_expired_covering_certificate_does_not_count(
    admin_client_logged_in: Client, upstream: m.Upstream
) -> None:
    not_after = timezone.now() - dt.timedelta(days=1)
    chain, key = make_cert(["www.example.com"], not_before=not_after - dt.timedelta(days=90),
                           not_after=not_after)
    expired = m.Certificate(name="expired")
    expired.set_inspected(pki.inspect_upload(chain_pem=chain, key_pem=key,
                                             now=not_after - dt.timedelta(days=1)))
    expired.save()
    response = admin_client_logged_in.post(HOST_ADD_URL, host_post(upstream, ["www.example.com"]))
    assert REFUSAL in page_text(response)


def test_a_stored_certificate_covering_every_name_is_chosen_automatically(
    admin_client_logged_in: Client, upstream: m.Upstream
) -> None:
    cert = stored_certificate("wild", ["*.example.com"])
    response = admin_client_logged_in.post(HOST_ADD_URL, host_post(upstream, ["www.example.com"]))
    assert response.status_code == 302, page_text(response)
    host = m.Host.objects.get(name="web")
    assert host.certificate is None  # automatic: a renewed certificate is picked up by itself
    [route] = build_snapshot().hosts
    assert route.certificate is not None and route.certificate.name == cert.name


def test_generating_from_the_local_ca_on_save_gives_the_host_its_certificate(
    admin_client_logged_in: Client, upstream: m.Upstream
) -> None:
    response = admin_client_logged_in.post(
        HOST_ADD_URL, host_post(upstream, ["www.example.com"], local_certificate="on"), follow=True
    )
    assert response.status_code == 200
    assert "now uses the new certificate" in page_text(response)
    host = m.Host.objects.get(name="web")
    assert host.certificate is not None
    assert host.certificate.source == m.Certificate.Source.GENERATED
    assert host.certificate.sans == ["www.example.com"]


def test_the_local_ca_and_a_chosen_certificate_at_once_are_refused(
    admin_client_logged_in: Client, upstream: m.Upstream
) -> None:
    cert = stored_certificate("site", ["www.example.com"])
    response = admin_client_logged_in.post(HOST_ADD_URL, host_post(
        upstream, ["www.example.com"], local_certificate="on", certificate=str(cert.pk)))
    assert "Choose one: a stored certificate, the local CA, or ACME." in page_text(response)
    assert not m.Host.objects.exists()


def test_an_acme_host_is_accepted_while_its_order_is_pending(
    admin_client_logged_in: Client, upstream: m.Upstream
) -> None:
    response = admin_client_logged_in.post(
        HOST_ADD_URL, host_post(upstream, ["www.example.com"], acme="http-01"))
    assert response.status_code == 302, page_text(response)
    listing = page_text(admin_client_logged_in.get("/admin/proxyadmin/host/"))
    assert "pending" in listing


def document(hosts: list[dict[str, object]]) -> dict[str, object]:
    return {
        "format": "proxyadmin-config", "version": 1,
        "upstreams": [{"name": "app", "targets": [{"host": "127.0.0.1", "port": 9000}]}],
        "hosts": hosts,
    }


def test_import_refuses_each_uncovered_host_with_its_reason(upstream: m.Upstream) -> None:
    stored_certificate("shop", ["shop.example.com"])
    outcomes = configio.import_config(document([
        {"name": "shop", "names": ["shop.example.com"], "upstream": "app"},
        {"name": "web", "names": ["www.example.com"], "upstream": "app"},
        {"name": "auto", "names": ["auto.example.com"], "upstream": "app", "acme": "tls-alpn-01"},
    ]))
    refused = {o.what: o.line() for o in outcomes if o.refused}
    assert list(refused) == ["host 'web'"]
    assert REFUSAL in refused["host 'web'"]
    assert "name it in 'certificate', or set 'acme'" in refused["host 'web'"]
    assert not m.Host.objects.exists()  # all or nothing


def test_the_snapshot_gives_an_uncovered_host_no_certificate_not_the_default(
    upstream: m.Upstream,
) -> None:
    # A host saved before this rule (or whose certificate was deleted) is left without one.
    settings = m.ProxySettings.load()
    settings.default_certificate = stored_certificate("fallback", ["fallback.example"])
    settings.save()
    host = m.Host.objects.create(name="web", upstream=upstream)
    host.names.create(name="www.example.com")
    snapshot = build_snapshot()
    [route] = snapshot.hosts
    assert route.certificate is None
    assert snapshot.default_certificate is not None
