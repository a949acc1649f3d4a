"""The admin pages: keys stay write-only, expiry shows in the list, hosts and upstreams are checked."""

from __future__ import annotations

import datetime as dt
import re
from io import StringIO
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from django.core.management import call_command
from django.test import Client
from django.utils import timezone

from proxyadmin import crypto, localca, pki
from proxyadmin.models import Certificate, ClientCA, Host, Upstream
from tests.conftest import make_cert, page_text, pem_chain_with_root
from tests.test_host_names import host_post

CERT_ADD_URL = "/admin/proxyadmin/certificate/add/"
UPSTREAM_ADD_URL = "/admin/proxyadmin/upstream/add/"
PRIVATE_KEY_PEM = re.compile(r"BEGIN[A-Z ]*PRIVATE KEY")


pytestmark = pytest.mark.usefixtures("fast_password_hashing")


def key_body_lines(key_pem: bytes) -> list[str]:
    """The base64 lines of a PEM key: none of them may ever appear on a page."""
    return [line for line in key_pem.decode().splitlines() if line and not line.startswith("-----")]


def assert_shows_no_key(text: str, key_pem: bytes) -> None:
    assert "PRIVATE KEY" not in text
    for line in key_body_lines(key_pem):
        assert line not in text


def upload(client: Client, chain: bytes, key: bytes = b"", **fields: Any) -> Any:
    data = {"name": "site", "chain_pem": chain.decode(), "key_pem": key.decode(), "passphrase": "",
            "_save": "Save"}
    data.update(fields)
    return client.post(CERT_ADD_URL, data)


def store(name: str, sans: list[str], not_after: dt.datetime, now: dt.datetime | None = None) -> Certificate:
    """A certificate stored without the admin; ``now`` lets an expired one be stored."""
    not_before = not_after - dt.timedelta(days=365)
    cert_pem, key_pem = make_cert(sans, not_before=not_before, not_after=not_after)
    inspected = pki.inspect_upload(
        chain_pem=cert_pem, key_pem=key_pem, now=now or timezone.now()
    )
    cert = Certificate(name=name)
    cert.set_inspected(inspected)
    cert.save()
    return cert


def changelist_row(text: str, name: str) -> str:
    [row] = [row for row in text.split("<tr") if f">{name}</a>" in row]
    return row


# --- the private key is write-only ----------------------------------------------------------


@pytest.mark.django_db
def test_uploaded_key_is_never_shown_on_the_change_list_or_history_pages(
    admin_client_logged_in: Client, ca: trustme.CA
) -> None:
    leaf = ca.issue_cert("site.example")
    key_pem = leaf.private_key_pem.bytes()
    response = upload(admin_client_logged_in, pem_chain_with_root(ca, leaf), key_pem)
    assert response.status_code == 302, page_text(response)
    cert = Certificate.objects.get(name="site")
    for url, shown in (
        (f"/admin/proxyadmin/certificate/{cert.pk}/change/", "site.example"),
        ("/admin/proxyadmin/certificate/", "site.example"),
        (f"/admin/proxyadmin/certificate/{cert.pk}/history/", "Added."),
    ):
        page = admin_client_logged_in.get(url)
        assert page.status_code == 200
        assert shown in page_text(page)
        assert_shows_no_key(page_text(page), key_pem)


@pytest.mark.django_db
def test_history_of_a_key_change_names_the_field_not_the_key(admin_client_logged_in: Client) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    chain, key_pem = make_cert(["site.example"], key=key)
    assert upload(admin_client_logged_in, chain, key_pem).status_code == 302
    cert = Certificate.objects.get(name="site")
    response = admin_client_logged_in.post(
        f"/admin/proxyadmin/certificate/{cert.pk}/change/",
        {"name": "site", "chain_pem": chain.decode(), "key_pem": key_pem.decode(),
         "passphrase": "", "_save": "Save"},
    )
    assert response.status_code == 302, page_text(response)
    history = page_text(admin_client_logged_in.get(f"/admin/proxyadmin/certificate/{cert.pk}/history/"))
    assert "Private key (PEM)" in history
    assert_shows_no_key(history, key_pem)


@pytest.mark.django_db
def test_form_with_an_error_is_shown_again_without_the_pasted_key(
    admin_client_logged_in: Client,
) -> None:
    chain, _ = make_cert(["site.example"])
    _, other_key = make_cert(["site.example"])
    response = upload(admin_client_logged_in, chain, other_key)
    assert response.status_code == 200
    text = page_text(response)
    assert "The private key does not match the certificate: they are not a pair." in text
    assert_shows_no_key(text, other_key)


@pytest.mark.django_db
def test_form_with_an_error_is_shown_again_without_a_key_pasted_into_the_chain(
    admin_client_logged_in: Client,
) -> None:
    chain, key_pem = make_cert(["site.example"])
    response = upload(admin_client_logged_in, chain + key_pem, name="")
    assert response.status_code == 200
    text = page_text(response)
    assert "This field is required." in text
    assert_shows_no_key(text, key_pem)
    # The certificate itself is kept, so the operator need not paste it again.
    assert key_body_lines(chain)[0] in text


@pytest.mark.django_db
def test_passphrase_is_not_shown_again_after_an_error(admin_client_logged_in: Client) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    chain, _ = make_cert(["site.example"], key=key)
    locked = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"tr0ub4dor&3"),
    )
    response = upload(admin_client_logged_in, chain, locked, passphrase="tr0ub4dor&3", name="")
    assert response.status_code == 200
    assert "tr0ub4dor&3" not in page_text(response)
    assert_shows_no_key(page_text(response), locked)


@pytest.mark.django_db
def test_stored_key_is_only_an_encrypted_token_that_decrypts_to_the_key(
    admin_client_logged_in: Client,
) -> None:
    chain, key_pem = make_cert(["site.example"])
    assert upload(admin_client_logged_in, chain, key_pem).status_code == 302
    token = Certificate.objects.values_list("key_token", flat=True).get(name="site")
    assert "PRIVATE KEY" not in token
    assert all(line not in token for line in key_body_lines(key_pem))
    assert crypto.decrypt(token) == key_pem


@pytest.mark.django_db
def test_dumpdata_exports_no_private_key(admin_client_logged_in: Client) -> None:
    chain, key_pem = make_cert(["site.example"])
    assert upload(admin_client_logged_in, chain, key_pem).status_code == 302
    localca.get_or_create_ca()
    out = StringIO()
    call_command("dumpdata", stdout=out)
    dump = out.getvalue()
    assert '"model": "proxyadmin.certificate"' in dump
    assert '"model": "proxyadmin.localca"' in dump
    assert not PRIVATE_KEY_PEM.search(dump)
    assert all(line not in dump for line in key_body_lines(key_pem))


# --- the certificate list -------------------------------------------------------------------


@pytest.mark.django_db
def test_certificate_list_shows_days_to_expiry_and_warns_under_thirty_days(
    admin_client_logged_in: Client,
) -> None:
    now = timezone.now()
    store("soon", ["soon.example"], now + dt.timedelta(days=10, hours=1))
    store("later", ["later.example"], now + dt.timedelta(days=200, hours=1))
    store("gone", ["gone.example"], now - dt.timedelta(days=5, hours=1), now=now - dt.timedelta(days=30))
    response = admin_client_logged_in.get("/admin/proxyadmin/certificate/")
    assert response.status_code == 200
    text = page_text(response)
    assert "⚠ in 10 days" in changelist_row(text, "soon")
    assert "in 200 days" in changelist_row(text, "later")
    assert "⚠" not in changelist_row(text, "later")
    assert "expired 5 days ago" in changelist_row(text, "gone")
    assert "Download the local CA certificate" in text


@pytest.mark.django_db
def test_certificate_list_search_finds_a_certificate_by_name_in_its_sans(
    admin_client_logged_in: Client,
) -> None:
    store("first", ["alpha.example"], timezone.now() + dt.timedelta(days=90))
    store("second", ["beta.example"], timezone.now() + dt.timedelta(days=90))
    response = admin_client_logged_in.get("/admin/proxyadmin/certificate/", {"q": "beta"})
    assert response.status_code == 200
    text = page_text(response)
    assert ">second</a>" in text
    assert ">first</a>" not in text


# --- the host admin -------------------------------------------------------------------------


@pytest.fixture
def upstream(db: None) -> Upstream:
    upstream = Upstream.objects.create(name="app")
    upstream.targets.create(host="127.0.0.1", port=9000)
    return upstream


@pytest.mark.django_db
def test_required_client_certificates_without_a_client_ca_are_refused(
    admin_client_logged_in: Client, upstream: Upstream
) -> None:
    response = admin_client_logged_in.post(
        "/admin/proxyadmin/host/add/",
        host_post(upstream, ["www.example.com"], client_auth="required"),
    )
    assert response.status_code == 200
    assert "Client authentication needs a client CA bundle to verify against." in page_text(response)
    assert not Host.objects.exists()


@pytest.mark.django_db
def test_required_client_certificates_with_a_client_ca_are_accepted(
    admin_client_logged_in: Client, upstream: Upstream, ca: trustme.CA
) -> None:
    bundle = ClientCA(name="staff")
    bundle.set_bundle(pki.inspect_ca_bundle(ca.cert_pem.bytes(), timezone.now()))
    bundle.save()
    store("site", ["www.example.com"], timezone.now() + dt.timedelta(days=90))
    response = admin_client_logged_in.post(
        "/admin/proxyadmin/host/add/",
        host_post(upstream, ["www.example.com"], client_auth="required", client_ca=str(bundle.pk)),
    )
    assert response.status_code == 302, page_text(response)
    assert Host.objects.get(name="web").client_ca == bundle


# --- the upstream admin ---------------------------------------------------------------------


def upstream_post(targets: list[tuple[str, str]], **fields: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "app",
        "balancing": "round_robin",
        "connect_timeout": "5",
        "read_timeout": "60",
        "tls_verify": "on",
        "tls_ca_bundle": "",
        "tls_server_name": "",
        "tls_client_certificate": "",
        "health_check_path": "/",
        "health_check_interval": "5",
        "health_check_timeout": "2",
        "healthy_threshold": "2",
        "unhealthy_threshold": "3",
        "passive_failures": "3",
        "passive_cooldown": "10",
        "targets-TOTAL_FORMS": str(len(targets)),
        "targets-INITIAL_FORMS": "0",
        "targets-MIN_NUM_FORMS": "1",
        "targets-MAX_NUM_FORMS": "1000",
        "_save": "Save",
    }
    for index, (host, port) in enumerate(targets):
        data.update({
            f"targets-{index}-host": host,
            f"targets-{index}-port": port,
            f"targets-{index}-weight": "1",
            f"targets-{index}-enabled": "on",
        })
    data.update(fields)
    return data


@pytest.mark.django_db
def test_upstream_add_page_has_the_targets_inline(admin_client_logged_in: Client) -> None:
    body = admin_client_logged_in.get(UPSTREAM_ADD_URL).content.decode()
    for field in ("TOTAL_FORMS", "INITIAL_FORMS", "MIN_NUM_FORMS", "MAX_NUM_FORMS"):
        assert f'name="targets-{field}"' in body
    assert 'name="targets-0-host"' in body


@pytest.mark.django_db
def test_upstream_with_targets_is_saved_with_normalised_hosts(admin_client_logged_in: Client) -> None:
    response = admin_client_logged_in.post(
        UPSTREAM_ADD_URL, upstream_post([("App.Internal.", "8080"), ("[::1]", "9000")])
    )
    assert response.status_code == 302, page_text(response)
    upstream = Upstream.objects.get(name="app")
    assert [str(t) for t in upstream.targets.all()] == ["app.internal:8080", "::1:9000"]


@pytest.mark.django_db
def test_upstream_needs_at_least_one_target(admin_client_logged_in: Client) -> None:
    response = admin_client_logged_in.post(UPSTREAM_ADD_URL, upstream_post([]))
    assert response.status_code == 200
    assert "An upstream needs at least one target: enter its host and port." in page_text(response)
    assert not Upstream.objects.exists()


@pytest.mark.django_db
def test_upstream_whose_only_target_is_deleted_is_refused(admin_client_logged_in: Client) -> None:
    upstream = Upstream.objects.create(name="app")
    target = upstream.targets.create(host="app.internal", port=80)
    data = upstream_post([("app.internal", "80")], **{
        "targets-INITIAL_FORMS": "1",
        "targets-0-id": str(target.pk),
        "targets-0-upstream": str(upstream.pk),
        "targets-0-DELETE": "on",
    })
    response = admin_client_logged_in.post(f"/admin/proxyadmin/upstream/{upstream.pk}/change/", data)
    assert response.status_code == 200
    assert "An upstream needs at least one target: enter its host and port." in page_text(response)
    assert upstream.targets.count() == 1


@pytest.mark.django_db
def test_upstream_with_an_empty_first_target_asks_for_its_host_and_port(
    admin_client_logged_in: Client,
) -> None:
    response = admin_client_logged_in.post(UPSTREAM_ADD_URL, upstream_post([("", "")]))
    assert response.status_code == 200
    errors = response.context["inline_admin_formsets"][0].formset.errors
    assert errors == [{"host": ["This field is required."], "port": ["This field is required."]}]
    assert not Upstream.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("target", "message"),
    [
        (("not a host!", "80"), "may hold only letters, digits and inner hyphens"),
        (("*.app.internal", "80"), "An upstream server needs a real name, not a wildcard."),
        (("app.internal", "0"), "Ensure this value is greater than or equal to 1."),
        (("app.internal", "65536"), "Ensure this value is less than or equal to 65535."),
        (("app.internal", "http"), "Enter a whole number."),
    ],
)
def test_upstream_with_an_invalid_target_is_refused(
    admin_client_logged_in: Client, target: tuple[str, str], message: str
) -> None:
    response = admin_client_logged_in.post(UPSTREAM_ADD_URL, upstream_post([target]))
    assert response.status_code == 200
    assert message in page_text(response)
    assert not Upstream.objects.exists()


@pytest.mark.django_db
def test_upstream_with_the_same_target_twice_is_refused(admin_client_logged_in: Client) -> None:
    response = admin_client_logged_in.post(
        UPSTREAM_ADD_URL, upstream_post([("app.internal", "80"), ("APP.internal", "80")])
    )
    assert response.status_code == 200
    assert "Please correct the duplicate data for host and port" in page_text(response)
    assert not Upstream.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("field", "value"),
    [("tls_server_name", "app.internal"), ("tls_ca_bundle", "CA")],
)
def test_upstream_tls_settings_without_tls_are_refused(
    admin_client_logged_in: Client, ca: trustme.CA, field: str, value: str
) -> None:
    if value == "CA":
        value = ca.cert_pem.bytes().decode()
    response = admin_client_logged_in.post(
        UPSTREAM_ADD_URL, upstream_post([("app.internal", "443")], **{field: value})
    )
    assert response.status_code == 200
    assert "Only used with TLS to the upstream: tick TLS or clear this." in page_text(response)
    assert not Upstream.objects.exists()


@pytest.mark.django_db
def test_upstream_ca_bundle_that_is_not_pem_is_refused(admin_client_logged_in: Client) -> None:
    response = admin_client_logged_in.post(
        UPSTREAM_ADD_URL,
        upstream_post([("app.internal", "443")], tls="on", tls_ca_bundle="not a bundle"),
    )
    assert response.status_code == 200
    assert (
        "The CA bundle is not PEM: paste blocks that start with '-----BEGIN CERTIFICATE-----'."
        in page_text(response)
    )


@pytest.mark.django_db
def test_upstream_tls_without_verification_is_flagged_on_its_page_and_in_the_list(
    admin_client_logged_in: Client,
) -> None:
    data = upstream_post([("app.internal", "443")], tls="on")
    del data["tls_verify"]
    response = admin_client_logged_in.post(UPSTREAM_ADD_URL, data)
    assert response.status_code == 302, page_text(response)
    upstream = Upstream.objects.get(name="app")
    assert upstream.tls and not upstream.tls_verify
    change = page_text(admin_client_logged_in.get(f"/admin/proxyadmin/upstream/{upstream.pk}/change/"))
    assert (
        "⚠ Certificate verification is off: the proxy accepts any certificate from these targets."
        in change
    )
    listing = page_text(admin_client_logged_in.get("/admin/proxyadmin/upstream/"))
    assert "⚠ TLS, not verified" in listing


@pytest.mark.django_db
def test_upstream_tls_with_verification_shows_no_warning(admin_client_logged_in: Client) -> None:
    response = admin_client_logged_in.post(
        UPSTREAM_ADD_URL, upstream_post([("app.internal", "443")], tls="on")
    )
    assert response.status_code == 302, page_text(response)
    upstream = Upstream.objects.get(name="app")
    change = page_text(admin_client_logged_in.get(f"/admin/proxyadmin/upstream/{upstream.pk}/change/"))
    assert "Certificate verification is off" not in change
    assert "TLS, verified" in page_text(admin_client_logged_in.get("/admin/proxyadmin/upstream/"))


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["health", "/health check", "/health\r\nX-Injected: 1", "/\x7f"])
def test_upstream_health_check_path_must_be_a_plain_absolute_path(
    admin_client_logged_in: Client, path: str
) -> None:
    response = admin_client_logged_in.post(
        UPSTREAM_ADD_URL,
        upstream_post([("app.internal", "80")], health_check_enabled="on", health_check_path=path),
    )
    assert response.status_code == 200
    assert (
        "The health check path must start with '/' and hold no spaces or control characters."
        in page_text(response)
    )
    assert not Upstream.objects.exists()


@pytest.mark.django_db
def test_upstream_health_check_path_with_a_query_is_accepted(admin_client_logged_in: Client) -> None:
    response = admin_client_logged_in.post(
        UPSTREAM_ADD_URL,
        upstream_post([("app.internal", "80")], health_check_enabled="on",
                      health_check_path="/healthz?full=1"),
    )
    assert response.status_code == 302, page_text(response)
    assert Upstream.objects.get(name="app").health_check_path == "/healthz?full=1"


# --- client CA bundles, and every page renders -------------------------------------------


@pytest.mark.django_db
def test_client_ca_that_is_not_a_ca_is_refused(admin_client_logged_in: Client, ca: trustme.CA) -> None:
    leaf = ca.issue_cert("site.example", common_name="site.example")
    response = admin_client_logged_in.post(
        "/admin/proxyadmin/clientca/add/",
        {"name": "staff", "bundle_pem": leaf.cert_chain_pems[0].bytes().decode(), "_save": "Save"},
    )
    assert response.status_code == 200
    subject = pki.describe(x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()))
    assert (
        f"'{subject}' is not a CA certificate (basicConstraints CA:FALSE); a bundle holds the CAs "
        "that issue certificates, not the certificates themselves." in page_text(response)
    )
    assert not ClientCA.objects.exists()


@pytest.mark.django_db
def test_every_admin_page_renders_with_configuration_present(
    admin_client_logged_in: Client, upstream: Upstream, ca: trustme.CA
) -> None:
    cert = store("site", ["www.example.com"], timezone.now() + dt.timedelta(days=90))
    bundle = ClientCA(name="staff")
    bundle.set_bundle(pki.inspect_ca_bundle(ca.cert_pem.bytes(), timezone.now()))
    bundle.save()
    response = admin_client_logged_in.post(
        "/admin/proxyadmin/host/add/",
        host_post(upstream, ["www.example.com"], certificate=str(cert.pk)),
    )
    assert response.status_code == 302, page_text(response)
    host = Host.objects.get(name="web")
    objects = {"certificate": cert, "clientca": bundle, "upstream": upstream, "host": host}
    urls = ["/admin/", "/admin/proxyadmin/proxysettings/"]
    for model, obj in objects.items():
        base = f"/admin/proxyadmin/{model}/"
        urls += [base, f"{base}add/", f"{base}{obj.pk}/change/", f"{base}{obj.pk}/history/",
                 f"{base}{obj.pk}/delete/", f"{base}?q=www"]
    urls += ["/admin/proxyadmin/hstspolicy/add/", "/admin/proxyadmin/configrevision/"]
    for url in urls:
        page = admin_client_logged_in.get(url, follow=True)
        assert page.status_code == 200, url
        assert "PRIVATE KEY" not in page_text(page), url

