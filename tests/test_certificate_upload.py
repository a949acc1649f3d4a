"""Certificate upload: every rule of a chain and key, through the form and through the admin."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from proxyadmin import crypto
from proxyadmin.forms import CertificateForm
from proxyadmin.models import Certificate, Host, HostName, Upstream
from tests.conftest import make_cert, page_text, pem_chain_with_root

ADD_URL = "/admin/proxyadmin/certificate/add/"
UTC = dt.UTC


pytestmark = pytest.mark.usefixtures("fast_password_hashing")


def certificate_form(
    chain: bytes = b"",
    key: bytes = b"",
    *,
    name: str = "site",
    passphrase: str = "",
    allow_incomplete: bool = False,
    files: dict[str, SimpleUploadedFile] | None = None,
    instance: Certificate | None = None,
) -> CertificateForm:
    data: dict[str, Any] = {
        "name": name,
        "chain_pem": chain.decode(),
        "key_pem": key.decode(),
        "passphrase": passphrase,
    }
    if allow_incomplete:
        data["allow_incomplete"] = "on"
    return CertificateForm(data=data, files=files or {}, instance=instance)


def errors_of(form: CertificateForm) -> dict[str, list[str]]:
    assert not form.is_valid()
    return {field: list(messages) for field, messages in form.errors.items()}


def saved(form: CertificateForm) -> Certificate:
    assert form.is_valid(), form.errors
    return form.save()


def damaged(pem: bytes) -> bytes:
    """The same PEM block with its DER body replaced by valid base64 of garbage."""
    lines = pem.decode().splitlines()
    lines[2] = "A" * len(lines[2])
    return ("\n".join(lines) + "\n").encode()


def leaf_objects(leaf: trustme.LeafCert) -> tuple[x509.Certificate, Any]:
    cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None)
    return cert, key


def admin_upload(client: Client, follow: bool = False, **fields: Any) -> Any:
    data: dict[str, Any] = {"name": "site", "chain_pem": "", "key_pem": "", "passphrase": "",
                            "_save": "Save"}
    data.update(fields)
    return client.post(ADD_URL, data, follow=follow)


# --- what is not a certificate or key --------------------------------------------------------


@pytest.mark.django_db
def test_chain_that_is_not_pem_is_refused() -> None:
    _, key = make_cert(["site.example"])
    assert errors_of(certificate_form(b"hello, I am a certificate", key)) == {
        "chain_pem": [
            "The certificate chain is not PEM: paste blocks that start with "
            "'-----BEGIN CERTIFICATE-----'."
        ]
    }


@pytest.mark.django_db
def test_key_that_is_not_pem_is_refused() -> None:
    cert, _ = make_cert(["site.example"])
    assert errors_of(certificate_form(cert, b"not a key")) == {
        "key_pem": [
            "The private key is not PEM: paste a block that starts with "
            "'-----BEGIN PRIVATE KEY-----' (or RSA / EC PRIVATE KEY)."
        ]
    }


@pytest.mark.django_db
def test_damaged_certificate_is_refused_naming_its_place_in_the_chain(ca: trustme.CA) -> None:
    leaf = ca.issue_cert("site.example")
    chain = leaf.cert_chain_pems[0].bytes() + damaged(ca.cert_pem.bytes())
    assert errors_of(certificate_form(chain, leaf.private_key_pem.bytes()))["chain_pem"] == [
        "The certificate chain: certificate number 2 is damaged and cannot be read."
    ]


@pytest.mark.django_db
def test_damaged_key_is_refused() -> None:
    cert, key = make_cert(["site.example"])
    assert errors_of(certificate_form(cert, damaged(key)))["key_pem"] == [
        "The private key is damaged and cannot be read."
    ]


@pytest.mark.django_db
def test_missing_chain_and_missing_key_are_asked_for() -> None:
    cert, key = make_cert(["site.example"])
    assert errors_of(certificate_form(b"", key))["chain_pem"] == [
        "Paste or upload the certificate chain (PEM)."
    ]
    assert errors_of(certificate_form(cert, b""))["key_pem"] == [
        "Paste or upload the private key (PEM)."
    ]


@pytest.mark.django_db
def test_two_keys_are_refused() -> None:
    cert, key = make_cert(["site.example"])
    _, other_key = make_cert(["other.example"])
    assert errors_of(certificate_form(cert, key + other_key))["key_pem"] == [
        "Paste exactly one private key, not several."
    ]


@pytest.mark.django_db
def test_file_larger_than_one_mebibyte_is_refused() -> None:
    _, key = make_cert(["site.example"])
    big = SimpleUploadedFile("chain.pem", b"A" * (1024 * 1024 + 1))
    form = certificate_form(b"", key, files={"chain_file": big})
    assert errors_of(form)["__all__"] == [
        "The chain file is larger than 1 MiB; that is not a certificate file."
    ]


# --- key and certificate rules ---------------------------------------------------------------


@pytest.mark.django_db
def test_key_of_another_certificate_is_refused() -> None:
    cert, _ = make_cert(["site.example"])
    _, other_key = make_cert(["site.example"])
    assert errors_of(certificate_form(cert, other_key)) == {
        "key_pem": ["The private key does not match the certificate: they are not a pair."]
    }


@pytest.mark.django_db
def test_expired_certificate_is_refused_with_its_date() -> None:
    cert, key = make_cert(
        ["site.example"],
        not_before=dt.datetime(2019, 1, 1, tzinfo=UTC),
        not_after=dt.datetime(2020, 1, 2, 3, 4, tzinfo=UTC),
    )
    assert errors_of(certificate_form(cert, key)) == {
        "chain_pem": ["The certificate expired on 2020-01-02 03:04 UTC."]
    }


@pytest.mark.django_db
def test_not_yet_valid_certificate_is_refused_with_its_start_date() -> None:
    starts = dt.datetime.now(UTC).replace(microsecond=0) + dt.timedelta(days=3)
    cert, key = make_cert(
        ["site.example"], not_before=starts, not_after=starts + dt.timedelta(days=90)
    )
    assert errors_of(certificate_form(cert, key)) == {
        "chain_pem": [f"The certificate is not valid yet: it starts on {starts:%Y-%m-%d %H:%M} UTC."]
    }


@pytest.mark.django_db
def test_expired_intermediate_is_refused_naming_it() -> None:
    root_pem, root_key_pem = make_cert(["Root CA"])
    root = x509.load_pem_x509_certificate(root_pem)
    root_key = serialization.load_pem_private_key(root_key_pem, None)
    inter_pem, inter_key_pem = make_cert(
        ["Intermediate CA"],
        issuer=(root, root_key),
        not_before=dt.datetime(2019, 1, 1, tzinfo=UTC),
        not_after=dt.datetime(2020, 6, 1, tzinfo=UTC),
    )
    inter = x509.load_pem_x509_certificate(inter_pem)
    inter_key = serialization.load_pem_private_key(inter_key_pem, None)
    leaf_pem, leaf_key_pem = make_cert(["site.example"], issuer=(inter, inter_key))
    form = certificate_form(leaf_pem + inter_pem + root_pem, leaf_key_pem)
    assert errors_of(form)["chain_pem"] == [
        "The chain certificate 'CN=Intermediate CA' expired on 2020-06-01 00:00 UTC."
    ]


@pytest.mark.django_db
def test_rsa_1024_key_is_refused(small_rsa_key: rsa.RSAPrivateKey) -> None:
    cert, key = make_cert(["site.example"], key=small_rsa_key)
    assert errors_of(certificate_form(cert, key)) == {
        "key_pem": ["The RSA key has 1024 bits; at least 2048 are required."]
    }


@pytest.mark.django_db
def test_rsa_2048_key_is_accepted() -> None:
    cert, key = make_cert(["site.example"], key=rsa.generate_private_key(65537, 2048))
    stored = saved(certificate_form(cert, key))
    assert (stored.key_type, stored.key_size) == ("RSA", 2048)


@pytest.mark.django_db
def test_ec_key_on_a_curve_clients_refuse_is_refused() -> None:
    cert, key = make_cert(["site.example"], key=ec.generate_private_key(ec.SECP256K1()))
    assert errors_of(certificate_form(cert, key)) == {
        "key_pem": ["The EC key uses the curve secp256k1; use P-256, P-384 or P-521."]
    }


# --- chain order and completeness -----------------------------------------------------------


@pytest.mark.django_db
def test_chain_out_of_order_is_stored_leaf_first(ca: trustme.CA) -> None:
    intermediate = ca.create_child_ca()
    leaf = intermediate.issue_cert("site.example")
    leaf_pem = leaf.cert_chain_pems[0].bytes()
    inter_pem = intermediate.cert_pem.bytes()
    root_pem = ca.cert_pem.bytes()
    form = certificate_form(root_pem + leaf_pem + inter_pem, leaf.private_key_pem.bytes())
    stored = saved(form)
    assert form.inspected is not None and form.inspected.reordered
    assert stored.chain_pem.encode() == leaf_pem + inter_pem + root_pem
    assert stored.chain_complete


@pytest.mark.django_db
def test_chain_in_order_is_not_reported_as_reordered(ca: trustme.CA) -> None:
    leaf = ca.issue_cert("site.example")
    form = certificate_form(pem_chain_with_root(ca, leaf), leaf.private_key_pem.bytes())
    saved(form)
    assert form.inspected is not None and not form.inspected.reordered


@pytest.mark.django_db
def test_leaf_without_its_issuer_is_refused_naming_the_missing_intermediate(ca: trustme.CA) -> None:
    intermediate = ca.create_child_ca()
    leaf = intermediate.issue_cert("site.example")
    leaf_cert, _ = leaf_objects(leaf)
    inter_subject = x509.load_pem_x509_certificate(intermediate.cert_pem.bytes()).subject
    form = certificate_form(leaf.cert_chain_pems[0].bytes(), leaf.private_key_pem.bytes())
    assert errors_of(form)["chain_pem"] == [
        f"The chain is incomplete: the intermediate certificate '{inter_subject.rfc4514_string()}', "
        f"which issued '{leaf_cert.subject.rfc4514_string()}', is missing. Append it after the "
        "certificate (CAs send it with the certificate, often as chain.pem or fullchain.pem), "
        "or tick 'Accept an incomplete chain' if your clients trust that issuer directly."
    ]


@pytest.mark.django_db
def test_chain_ending_at_an_intermediate_is_refused_naming_the_untrusted_root(ca: trustme.CA) -> None:
    intermediate = ca.create_child_ca()
    leaf = intermediate.issue_cert("site.example")
    inter_subject = x509.load_pem_x509_certificate(intermediate.cert_pem.bytes()).subject
    root_subject = x509.load_pem_x509_certificate(ca.cert_pem.bytes()).subject
    chain = leaf.cert_chain_pems[0].bytes() + intermediate.cert_pem.bytes()
    form = certificate_form(chain, leaf.private_key_pem.bytes())
    assert errors_of(form)["chain_pem"] == [
        f"The chain is incomplete: it ends at the intermediate '{inter_subject.rfc4514_string()}', "
        f"whose issuer, the root '{root_subject.rfc4514_string()}', is neither included nor trusted "
        "by this machine. Append that root certificate after the intermediate, or tick "
        "'Accept an incomplete chain' if your clients trust that issuer directly."
    ]


@pytest.mark.django_db
def test_incomplete_chain_is_accepted_when_allowed_and_marked_incomplete(ca: trustme.CA) -> None:
    leaf = ca.issue_cert("site.example")
    form = certificate_form(
        leaf.cert_chain_pems[0].bytes(), leaf.private_key_pem.bytes(), allow_incomplete=True
    )
    assert saved(form).chain_complete is False


@pytest.mark.django_db
def test_unrelated_extra_certificate_is_refused(ca: trustme.CA) -> None:
    leaf = ca.issue_cert("site.example", common_name="site.example")
    stranger, _ = make_cert(["stranger.example"])
    form = certificate_form(pem_chain_with_root(ca, leaf) + stranger, leaf.private_key_pem.bytes())
    [message] = errors_of(form)["chain_pem"]
    assert message.startswith("'CN=stranger.example' is not part of the chain of 'CN=site.example,")
    assert message.endswith("': remove it, or add the certificates that link it.")


# --- encrypted keys and PKCS#12 -------------------------------------------------------------


def encrypted_key(key_format: serialization.PrivateFormat) -> tuple[bytes, bytes, bytes]:
    """(certificate PEM, encrypted key PEM, unencrypted PKCS#8 key PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert, plain = make_cert(["site.example"], key=key)
    locked = key.private_bytes(
        serialization.Encoding.PEM, key_format, serialization.BestAvailableEncryption(b"open sesame")
    )
    return cert, locked, plain


KEY_FORMATS = [serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL]


@pytest.mark.django_db
@pytest.mark.parametrize("key_format", KEY_FORMATS)
def test_encrypted_key_without_passphrase_asks_for_it(
    key_format: serialization.PrivateFormat,
) -> None:
    cert, locked, _ = encrypted_key(key_format)
    assert errors_of(certificate_form(cert, locked)) == {
        "passphrase": ["The private key is encrypted: enter its passphrase."]
    }


@pytest.mark.django_db
@pytest.mark.parametrize("key_format", KEY_FORMATS)
def test_encrypted_key_with_wrong_passphrase_says_so(
    key_format: serialization.PrivateFormat,
) -> None:
    cert, locked, _ = encrypted_key(key_format)
    assert errors_of(certificate_form(cert, locked, passphrase="open barley")) == {
        "passphrase": ["The passphrase does not open the private key."]
    }


@pytest.mark.django_db
@pytest.mark.parametrize("key_format", KEY_FORMATS)
def test_encrypted_key_with_right_passphrase_is_stored_decrypted(
    key_format: serialization.PrivateFormat,
) -> None:
    cert, locked, plain = encrypted_key(key_format)
    stored = saved(certificate_form(cert, locked, passphrase="open sesame"))
    assert crypto.decrypt(stored.key_token) == plain


def pkcs12_of(ca: trustme.CA, leaf: trustme.LeafCert, passphrase: bytes) -> bytes:
    cert, key = leaf_objects(leaf)
    root = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    return pkcs12.serialize_key_and_certificates(
        b"site", key, cert, [root], serialization.BestAvailableEncryption(passphrase)
    )


@pytest.mark.django_db
def test_pkcs12_with_right_passphrase_is_accepted(ca: trustme.CA) -> None:
    leaf = ca.issue_cert("site.example")
    p12 = SimpleUploadedFile("site.p12", pkcs12_of(ca, leaf, b"p12 pass"))
    stored = saved(certificate_form(passphrase="p12 pass", files={"pkcs12_file": p12}))
    assert stored.chain_pem.encode() == pem_chain_with_root(ca, leaf)
    assert stored.sans == ["site.example"]
    _, key = leaf_objects(leaf)
    stored_key = serialization.load_pem_private_key(crypto.decrypt(stored.key_token), None)
    assert stored_key.private_numbers() == key.private_numbers()  # type: ignore[union-attr]


@pytest.mark.django_db
def test_pkcs12_without_its_passphrase_asks_for_it(ca: trustme.CA) -> None:
    leaf = ca.issue_cert("site.example")
    p12 = SimpleUploadedFile("site.p12", pkcs12_of(ca, leaf, b"p12 pass"))
    assert errors_of(certificate_form(files={"pkcs12_file": p12})) == {
        "passphrase": ["The PKCS#12 file is protected by a passphrase: enter it."]
    }


@pytest.mark.django_db
def test_pkcs12_with_a_wrong_passphrase_says_so(ca: trustme.CA) -> None:
    leaf = ca.issue_cert("site.example")
    p12 = SimpleUploadedFile("site.p12", pkcs12_of(ca, leaf, b"p12 pass"))
    assert errors_of(certificate_form(passphrase="wrong pass", files={"pkcs12_file": p12})) == {
        "passphrase": ["The passphrase does not open the PKCS#12 file."]
    }


@pytest.mark.django_db
@pytest.mark.parametrize("passphrase", ["", "p12 pass"])
def test_file_that_is_not_pkcs12_is_refused_as_such(passphrase: str) -> None:
    cert, _ = make_cert(["site.example"])
    p12 = SimpleUploadedFile("site.p12", cert)
    assert errors_of(certificate_form(passphrase=passphrase, files={"pkcs12_file": p12})) == {
        "pkcs12_file": ["The PKCS#12 file is not PKCS#12 (.p12/.pfx), or it is damaged."]
    }


@pytest.mark.django_db
def test_pkcs12_without_a_key_is_refused(ca: trustme.CA) -> None:
    root = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    only_certs = pkcs12.serialize_key_and_certificates(
        b"cas", None, None, [root], serialization.BestAvailableEncryption(b"p12 pass")
    )
    form = certificate_form(
        passphrase="p12 pass", files={"pkcs12_file": SimpleUploadedFile("cas.p12", only_certs)}
    )
    assert errors_of(form) == {
        "pkcs12_file": ["The PKCS#12 file must hold a certificate and its private key."]
    }


@pytest.mark.django_db
def test_chain_and_key_in_one_paste_are_accepted(ca: trustme.CA) -> None:
    leaf = ca.issue_cert("site.example")
    paste = leaf.private_key_pem.bytes() + pem_chain_with_root(ca, leaf)
    stored = saved(certificate_form(paste))
    assert stored.chain_pem.encode() == pem_chain_with_root(ca, leaf)
    assert "PRIVATE KEY" not in stored.chain_pem
    assert b"PRIVATE KEY" in crypto.decrypt(stored.key_token)


@pytest.mark.django_db
def test_chain_and_key_files_are_accepted(ca: trustme.CA) -> None:
    leaf = ca.issue_cert("site.example")
    files = {
        "chain_file": SimpleUploadedFile("chain.pem", pem_chain_with_root(ca, leaf)),
        "key_file": SimpleUploadedFile("key.pem", leaf.private_key_pem.bytes()),
    }
    assert saved(certificate_form(files=files)).sans == ["site.example"]


# --- editing ---------------------------------------------------------------------------------


@pytest.mark.django_db
def test_edit_with_key_left_blank_keeps_the_stored_key_for_a_new_chain() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    first_chain, key_pem = make_cert(["site.example"], key=key)
    stored = saved(certificate_form(first_chain, key_pem))
    renewed_chain, _ = make_cert(["site.example", "www.site.example"], key=key)
    edited = saved(certificate_form(renewed_chain, b"", instance=stored))
    edited.refresh_from_db()
    assert edited.chain_pem.encode() == renewed_chain
    assert edited.sans == ["site.example", "www.site.example"]
    assert crypto.decrypt(edited.key_token) == key_pem


@pytest.mark.django_db
def test_edit_with_key_left_blank_refuses_a_chain_of_another_key() -> None:
    first_chain, key_pem = make_cert(["site.example"])
    stored = saved(certificate_form(first_chain, key_pem))
    other_chain, _ = make_cert(["site.example"])
    assert errors_of(certificate_form(other_chain, b"", instance=stored)) == {
        "key_pem": [
            "The new certificate is not for the stored private key: paste or upload its own key too."
        ]
    }


@pytest.mark.django_db
def test_new_chain_that_drops_a_name_used_by_a_host_is_refused() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    chain, key_pem = make_cert(["a.example.com", "b.example.com"], key=key)
    stored = saved(certificate_form(chain, key_pem))
    upstream = Upstream.objects.create(name="app")
    host = Host.objects.create(name="web", upstream=upstream, certificate=stored)
    HostName.objects.create(host=host, name="a.example.com")
    HostName.objects.create(host=host, name="b.example.com")
    narrower, _ = make_cert(["a.example.com"], key=key)
    assert errors_of(certificate_form(narrower, b"", instance=stored)) == {
        "chain_pem": ["Host 'web' uses this certificate, but the new one does not cover b.example.com."]
    }
    stored.refresh_from_db()
    assert stored.sans == ["a.example.com", "b.example.com"]


# --- through the admin ------------------------------------------------------------------------


@pytest.mark.django_db
def test_admin_upload_of_chain_and_key_files_stores_the_certificate(
    admin_client_logged_in: Client, ca: trustme.CA
) -> None:
    leaf = ca.issue_cert("site.example")
    response = admin_upload(
        admin_client_logged_in,
        chain_file=SimpleUploadedFile("chain.pem", pem_chain_with_root(ca, leaf)),
        key_file=SimpleUploadedFile("key.pem", leaf.private_key_pem.bytes()),
    )
    assert response.status_code == 302, page_text(response)
    stored = Certificate.objects.get(name="site")
    assert stored.sans == ["site.example"]
    assert stored.source == Certificate.Source.UPLOADED


@pytest.mark.django_db
def test_admin_reorders_a_chain_and_says_so(admin_client_logged_in: Client, ca: trustme.CA) -> None:
    leaf = ca.issue_cert("site.example")
    leaf_pem = leaf.cert_chain_pems[0].bytes()
    response = admin_upload(
        admin_client_logged_in,
        follow=True,
        chain_pem=(ca.cert_pem.bytes() + leaf_pem).decode(),
        key_pem=leaf.private_key_pem.bytes().decode(),
    )
    assert response.status_code == 200
    assert (
        "The chain was out of order; it was stored leaf first, each certificate followed by "
        "its issuer." in page_text(response)
    )
    assert Certificate.objects.get(name="site").chain_pem.encode() == leaf_pem + ca.cert_pem.bytes()


@pytest.mark.django_db
def test_admin_refuses_an_incomplete_chain_then_accepts_it_when_allowed_with_a_warning(
    admin_client_logged_in: Client, ca: trustme.CA
) -> None:
    leaf = ca.issue_cert("site.example")
    fields = {
        "chain_pem": leaf.cert_chain_pems[0].bytes().decode(),
        "key_pem": leaf.private_key_pem.bytes().decode(),
    }
    refused = admin_upload(admin_client_logged_in, **fields)
    assert refused.status_code == 200
    assert "The chain is incomplete:" in page_text(refused)
    assert not Certificate.objects.exists()
    accepted = admin_upload(admin_client_logged_in, follow=True, allow_incomplete="on", **fields)
    assert accepted.status_code == 200
    assert (
        "The chain is incomplete; clients that do not trust its last issuer directly will "
        "refuse it." in page_text(accepted)
    )
    assert Certificate.objects.get(name="site").chain_complete is False


@pytest.mark.django_db
def test_admin_asks_for_the_passphrase_of_an_encrypted_key_then_accepts_it(
    admin_client_logged_in: Client,
) -> None:
    cert, locked, plain = encrypted_key(serialization.PrivateFormat.PKCS8)
    fields = {"chain_file": cert, "key_file": locked}

    def post(passphrase: str) -> Any:
        return admin_upload(
            admin_client_logged_in,
            passphrase=passphrase,
            chain_file=SimpleUploadedFile("chain.pem", fields["chain_file"]),
            key_file=SimpleUploadedFile("key.pem", fields["key_file"]),
        )

    asked = post("")
    assert asked.status_code == 200
    assert "The private key is encrypted: enter its passphrase." in page_text(asked)
    wrong = post("open barley")
    assert wrong.status_code == 200
    assert "The passphrase does not open the private key." in page_text(wrong)
    assert not Certificate.objects.exists()
    right = post("open sesame")
    assert right.status_code == 302, page_text(right)
    assert crypto.decrypt(Certificate.objects.get(name="site").key_token) == plain


@pytest.mark.django_db
def test_admin_opens_a_pkcs12_file_only_with_its_passphrase(
    admin_client_logged_in: Client, ca: trustme.CA
) -> None:
    leaf = ca.issue_cert("site.example")
    data = pkcs12_of(ca, leaf, b"p12 pass")
    wrong = admin_upload(
        admin_client_logged_in,
        passphrase="nope",
        pkcs12_file=SimpleUploadedFile("site.p12", data, "application/x-pkcs12"),
    )
    assert wrong.status_code == 200
    assert "The passphrase does not open the PKCS#12 file." in page_text(wrong)
    right = admin_upload(
        admin_client_logged_in,
        passphrase="p12 pass",
        pkcs12_file=SimpleUploadedFile("site.p12", data, "application/x-pkcs12"),
    )
    assert right.status_code == 302, page_text(right)
    assert Certificate.objects.get(name="site").sans == ["site.example"]


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"chain_pem": "garbage", "key_pem": "garbage"}, "The certificate chain is not PEM"),
        ({"chain_pem": "", "key_pem": ""}, "Paste or upload the certificate chain (PEM)."),
        ({"name": ""}, "This field is required."),
    ],
)
def test_admin_invalid_upload_is_shown_again_with_the_error(
    admin_client_logged_in: Client, fields: dict[str, str], message: str
) -> None:
    response = admin_upload(admin_client_logged_in, **fields)
    assert response.status_code == 200
    assert "Please correct the error below." in page_text(response)
    assert message in page_text(response)


@pytest.mark.django_db
def test_admin_edit_with_key_left_blank_keeps_the_stored_key(admin_client_logged_in: Client) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    chain, key_pem = make_cert(["site.example"], key=key)
    stored = saved(certificate_form(chain, key_pem))
    renewed, _ = make_cert(["site.example"], key=key)
    response = admin_edit(admin_client_logged_in, stored, renewed)
    assert response.status_code == 302, page_text(response)
    stored.refresh_from_db()
    assert stored.chain_pem.encode() == renewed
    assert crypto.decrypt(stored.key_token) == key_pem


@pytest.mark.django_db
def test_admin_edit_refuses_a_chain_that_drops_a_host_name(admin_client_logged_in: Client) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    chain, key_pem = make_cert(["a.example.com", "b.example.com"], key=key)
    stored = saved(certificate_form(chain, key_pem))
    host = Host.objects.create(
        name="web", upstream=Upstream.objects.create(name="app"), certificate=stored
    )
    HostName.objects.create(host=host, name="b.example.com")
    narrower, _ = make_cert(["a.example.com"], key=key)
    response = admin_edit(admin_client_logged_in, stored, narrower)
    assert response.status_code == 200
    assert (
        "Host 'web' uses this certificate, but the new one does not cover b.example.com."
        in page_text(response)
    )
    stored.refresh_from_db()
    assert stored.chain_pem.encode() == chain


def admin_edit(client: Client, cert: Certificate, chain: bytes) -> Any:
    return client.post(
        f"/admin/proxyadmin/certificate/{cert.pk}/change/",
        {"name": cert.name, "chain_pem": chain.decode(), "key_pem": "", "passphrase": "",
         "_save": "Save"},
    )


@pytest.mark.django_db
def test_admin_accepts_a_paste_with_browser_crlf_line_endings(
    admin_client_logged_in: Client, ca: trustme.CA
) -> None:
    leaf = ca.issue_cert("site.example")
    chain = pem_chain_with_root(ca, leaf).decode().replace("\n", "\r\n")
    key = leaf.private_key_pem.bytes().decode().replace("\n", "\r\n")
    response = admin_upload(admin_client_logged_in, chain_pem=chain, key_pem=key)
    assert response.status_code == 302, page_text(response)
    assert Certificate.objects.get(name="site").chain_pem.encode() == pem_chain_with_root(ca, leaf)


def admin_edit_page_post(client: Client, cert: Certificate, **fields: Any) -> Any:
    """The edit form as a browser sends it: the textarea still holds the stored chain."""
    data: dict[str, Any] = {"name": cert.name, "chain_pem": cert.chain_pem.replace("\n", "\r\n"),
                            "key_pem": "", "passphrase": "", "_save": "Save"}
    data.update(fields)
    return client.post(f"/admin/proxyadmin/certificate/{cert.pk}/change/", data)


@pytest.mark.django_db
def test_admin_edit_with_a_chain_file_replaces_the_stored_chain(admin_client_logged_in: Client) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    chain, key_pem = make_cert(["site.example"], key=key)
    stored = saved(certificate_form(chain, key_pem))
    renewed, _ = make_cert(["site.example", "www.site.example"], key=key)
    response = admin_edit_page_post(
        admin_client_logged_in, stored, chain_file=SimpleUploadedFile("renewed.pem", renewed)
    )
    assert response.status_code == 302, page_text(response)
    stored.refresh_from_db()
    assert stored.chain_pem.encode() == renewed
    assert crypto.decrypt(stored.key_token) == key_pem


@pytest.mark.django_db
def test_admin_edit_with_a_pkcs12_file_replaces_the_stored_chain_and_key(
    admin_client_logged_in: Client, ca: trustme.CA
) -> None:
    chain, key_pem = make_cert(["site.example"])
    stored = saved(certificate_form(chain, key_pem))
    leaf = ca.issue_cert("site.example")
    response = admin_edit_page_post(
        admin_client_logged_in,
        stored,
        passphrase="p12 pass",
        pkcs12_file=SimpleUploadedFile("site.p12", pkcs12_of(ca, leaf, b"p12 pass")),
    )
    assert response.status_code == 302, page_text(response)
    stored.refresh_from_db()
    assert stored.chain_pem.encode() == pem_chain_with_root(ca, leaf)
    assert crypto.decrypt(stored.key_token) != key_pem


@pytest.mark.django_db
def test_pkcs12_without_intermediates_is_completed_by_a_pasted_chain(ca: trustme.CA) -> None:
    leaf = ca.issue_cert("site.example")
    cert, key = leaf_objects(leaf)
    bare = pkcs12.serialize_key_and_certificates(
        b"site", key, cert, None, serialization.BestAvailableEncryption(b"p12 pass")
    )
    form = certificate_form(
        ca.cert_pem.bytes(), passphrase="p12 pass",
        files={"pkcs12_file": SimpleUploadedFile("site.p12", bare)},
    )
    assert saved(form).chain_pem.encode() == pem_chain_with_root(ca, leaf)
