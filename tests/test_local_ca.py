"""The local CA: certificates for hosts in one click, and its own certificate to download."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse

from proxyadmin import crypto, localca
from proxyadmin.forms import CertificateForm
from proxyadmin.models import Certificate, Host, HostName, LocalCA, Upstream
from tests.conftest import page_text

HOSTS_URL = "/admin/proxyadmin/host/"


pytestmark = pytest.mark.usefixtures("fast_password_hashing")


@pytest.fixture
def upstream(db: None) -> Upstream:
    upstream = Upstream.objects.create(name="app")
    upstream.targets.create(host="127.0.0.1", port=9000)
    return upstream


def make_host(upstream: Upstream, name: str, names: list[str]) -> Host:
    host = Host.objects.create(name=name, upstream=upstream)
    for hostname in names:
        HostName.objects.create(host=host, name=hostname)
    return host


def generate(client: Client, *hosts: Host) -> Any:
    return client.post(
        HOSTS_URL,
        {"action": "generate_local_certificate", "_selected_action": [h.pk for h in hosts]},
        follow=True,
    )


def ca_certificate() -> x509.Certificate:
    return LocalCA.objects.get().certificate()


@pytest.mark.django_db
def test_action_issues_a_local_ca_certificate_for_the_host_names_and_assigns_it(
    admin_client_logged_in: Client, upstream: Upstream
) -> None:
    host = make_host(upstream, "web", ["www.example.com", "*.api.example.com"])
    response = generate(admin_client_logged_in, host)
    assert response.status_code == 200
    cert = Certificate.objects.get()
    assert (
        "Host 'web' now uses the new certificate 'web (local CA)' for *.api.example.com, "
        'www.example.com. <a href="/admin/proxyadmin/certificate/local-ca.pem">Download the '
        "local CA</a> to trust it." in page_text(response)
    )
    host.refresh_from_db()
    assert host.certificate == cert
    assert cert.source == Certificate.Source.GENERATED
    assert sorted(cert.sans) == ["*.api.example.com", "www.example.com"]
    assert cert.chain_complete

    [leaf] = cert.chain()
    assert sorted(leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                  .get_values_for_type(x509.DNSName)) == ["*.api.example.com", "www.example.com"]
    # 200 days, as public CAs issue since March 2026; Mozilla's profile wants under 366.
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == dt.timedelta(days=200)
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert ExtendedKeyUsageOID.SERVER_AUTH in leaf.extensions.get_extension_for_class(
        x509.ExtendedKeyUsage
    ).value

    ca_cert = ca_certificate()
    assert leaf.issuer == ca_cert.subject
    leaf.verify_directly_issued_by(ca_cert)  # raises InvalidSignature if not signed by the CA

    key = load_pem_private_key(crypto.decrypt(cert.key_token), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp256r1"
    assert key.public_key() == leaf.public_key()
    assert (cert.key_type, cert.key_size) == ("EC secp256r1", 256)


@pytest.mark.django_db
def test_action_on_several_hosts_gives_each_its_own_certificate_from_one_ca(
    admin_client_logged_in: Client, upstream: Upstream
) -> None:
    web = make_host(upstream, "web", ["www.example.com"])
    shop = make_host(upstream, "shop", ["shop.example.com"])
    assert generate(admin_client_logged_in, web, shop).status_code == 200
    web.refresh_from_db()
    shop.refresh_from_db()
    assert web.certificate is not None and shop.certificate is not None
    assert web.certificate.sans == ["www.example.com"]
    assert shop.certificate.sans == ["shop.example.com"]
    assert LocalCA.objects.count() == 1
    for cert in (web.certificate, shop.certificate):
        cert.chain()[0].verify_directly_issued_by(ca_certificate())


@pytest.mark.django_db
def test_issuing_again_keeps_the_old_certificate_under_its_name(
    admin_client_logged_in: Client, upstream: Upstream
) -> None:
    host = make_host(upstream, "web", ["www.example.com"])
    generate(admin_client_logged_in, host)
    generate(admin_client_logged_in, host)
    assert list(Certificate.objects.values_list("name", flat=True)) == [
        "web (local CA)", "web (local CA) 2"
    ]
    host.refresh_from_db()
    assert host.certificate is not None and host.certificate.name == "web (local CA) 2"


@pytest.mark.django_db
def test_certificate_name_fits_its_column_for_the_longest_host_name(upstream: Upstream) -> None:
    host = make_host(upstream, "h" * 200, ["www.example.com"])
    first = localca.certificate_for_host(host)
    second = localca.certificate_for_host(host)
    limit = Certificate._meta.get_field("name").max_length
    assert len(first.name) <= limit
    assert len(second.name) <= limit
    assert first.name != second.name
    assert first.name.endswith(" (local CA)")


@pytest.mark.django_db
def test_host_without_names_is_skipped_with_a_warning(
    admin_client_logged_in: Client, upstream: Upstream
) -> None:
    host = make_host(upstream, "empty", [])
    response = generate(admin_client_logged_in, host)
    assert response.status_code == 200
    assert "Host 'empty' has no names: skipped." in page_text(response)
    assert not Certificate.objects.exists()


@pytest.mark.django_db
def test_uploaded_certificate_from_the_local_ca_is_complete_without_the_ca(upstream: Upstream) -> None:
    cert, key_pem = localca.issue(["www.example.com"])
    form = CertificateForm(data={
        "name": "manual",
        "chain_pem": cert.public_bytes(serialization.Encoding.PEM).decode(),
        "key_pem": key_pem.decode(),
    })
    assert form.is_valid(), form.errors
    assert form.save().chain_complete


@pytest.mark.django_db
def test_ca_download_is_a_pem_p256_ca_certificate(admin_client_logged_in: Client) -> None:
    url = reverse("admin:proxyadmin_local_ca")
    response = admin_client_logged_in.get(url)
    assert response.status_code == 200
    assert response["Content-Type"] == "application/x-pem-file"
    assert response["Content-Disposition"] == 'attachment; filename="proxyadmin-local-ca.pem"'
    assert response.content.startswith(b"-----BEGIN CERTIFICATE-----")
    ca_cert = x509.load_pem_x509_certificate(response.content)
    assert ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    public_key = ca_cert.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert public_key.curve.name == "secp256r1"
    ca_cert.verify_directly_issued_by(ca_cert)
    assert b"PRIVATE KEY" not in response.content
    # The same CA on every download: it is created once.
    assert admin_client_logged_in.get(url).content == response.content
    assert LocalCA.objects.count() == 1


@pytest.mark.django_db
def test_ca_download_is_refused_to_anonymous_users() -> None:
    url = reverse("admin:proxyadmin_local_ca")
    response = Client().get(url)
    assert response.status_code == 302
    assert response["Location"] == f"/admin/login/?next={url}"
    assert not LocalCA.objects.exists()


@pytest.mark.django_db
def test_ca_download_is_refused_to_users_who_are_not_staff() -> None:
    User.objects.create_user("visitor", password="correct horse battery")
    client = Client()
    assert client.login(username="visitor", password="correct horse battery")
    response = client.get(reverse("admin:proxyadmin_local_ca"))
    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/")
