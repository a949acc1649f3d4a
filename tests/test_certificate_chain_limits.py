"""Certificate chain uploads are bounded: at most ten certificates and 256 KiB, ordered in
linear time, and checked before any transaction opens, so nothing else waits on the
database while a chain is checked."""

from __future__ import annotations

import datetime as dt
import random
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID
from django.contrib.auth.models import User
from django.db import connection
from django.test import Client

from proxyadmin import configio, pki
from proxyadmin.models import Certificate
from tests.conftest import page_text
from tests.test_certificate_upload import ADD_URL, admin_upload, certificate_form, errors_of, saved

pytestmark = pytest.mark.usefixtures("fast_password_hashing")

SAME_NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "same name")])


def same_name_chain(count: int, *, key_ids: bool = True) -> tuple[list[x509.Certificate], Any]:
    """``count`` certificates all named alike, each issued by the next, the last self-signed;
    returns them leaf first, and the leaf's key."""
    keys = [ed25519.Ed25519PrivateKey.generate() for _ in range(count)]
    now = dt.datetime.now(dt.UTC)
    chain = []
    for index, key in enumerate(keys):
        issuer_key = keys[min(index + 1, count - 1)]
        builder = (
            x509.CertificateBuilder().subject_name(SAME_NAME).issuer_name(SAME_NAME)
            .public_key(key.public_key()).serial_number(index + 1)
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
        )
        if key_ids:
            builder = builder.add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            ).add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
            )
        chain.append(builder.sign(issuer_key, None))
    return chain, keys[0]


def pem(certs: list[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def key_pem(key: Any) -> bytes:
    return key.private_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def shuffled(certs: list[x509.Certificate]) -> list[x509.Certificate]:
    out = certs[:]
    random.Random(9).shuffle(out)
    return out


@pytest.fixture
def signature_checks(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], list[int]]:
    """Counts ``pki.issued_by`` calls; the test fails as soon as they pass ``limit``."""

    def install(limit: int) -> list[int]:
        calls = [0]
        real = pki.issued_by

        def counted(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
            calls[0] += 1
            assert calls[0] <= limit, f"more than {limit} signature checks"
            return real(cert, issuer)

        monkeypatch.setattr(pki, "issued_by", counted)
        return calls

    return install


def chain_of(ca: trustme.CA, intermediates: int) -> tuple[bytes, bytes]:
    """A leaf, ``intermediates`` CAs and the root: ``intermediates + 2`` certificates, out of order."""
    issuer = ca
    for _ in range(intermediates):
        issuer = issuer.create_child_ca()
    leaf = issuer.issue_cert("site.example")
    blocks = [blob.bytes() for blob in leaf.cert_chain_pems] + [ca.cert_pem.bytes()]
    return b"".join(reversed(blocks)), leaf.private_key_pem.bytes()


# --- the limit -------------------------------------------------------------------------------


@pytest.mark.django_db
def test_chain_of_ten_certificates_is_accepted(ca: trustme.CA) -> None:
    chain, key = chain_of(ca, pki.MAX_CHAIN_CERTIFICATES - 2)
    certificate = saved(certificate_form(chain, key))
    assert len(certificate.chain()) == pki.MAX_CHAIN_CERTIFICATES == 10


@pytest.mark.django_db
def test_chain_of_eleven_certificates_is_refused_naming_the_count_and_the_limit(ca: trustme.CA) -> None:
    chain, key = chain_of(ca, pki.MAX_CHAIN_CERTIFICATES - 1)
    assert errors_of(certificate_form(chain, key))["chain_pem"] == [
        "The upload holds 11 certificates; a chain of at most 10 is accepted (a leaf and its "
        "intermediates are rarely more than 4). Keep only the certificate and the ones that issued it."
    ]


@pytest.mark.django_db
def test_two_hundred_same_name_certificates_are_refused_without_checking_one(
    signature_checks: Callable[[int], list[int]],
) -> None:
    chain, key = same_name_chain(200)
    calls = signature_checks(0)
    assert errors_of(certificate_form(pem(chain[::-1]), key_pem(key)))["chain_pem"][0].startswith(
        "The upload holds 200 certificates; a chain of at most 10 is accepted"
    )
    assert calls == [0]


def test_a_thousand_same_name_certificates_are_refused_by_the_admin_without_checking_one(
    admin_client_logged_in: Client, signature_checks: Callable[[int], list[int]],
) -> None:
    chain, key = same_name_chain(1000)
    calls = signature_checks(0)
    response = admin_upload(admin_client_logged_in, chain_pem=pem(chain[::-1]).decode(),
                            key_pem=key_pem(key).decode())
    assert response.status_code == 200
    assert re.search(r"The certificate chain is \d+ KiB; at most 256 KiB are accepted", page_text(response))
    assert calls == [0]
    assert not Certificate.objects.exists()


@pytest.mark.django_db
def test_chain_and_pkcs12_count_together_against_the_limit(ca: trustme.CA) -> None:
    from cryptography.hazmat.primitives.serialization import pkcs12

    chain, key = chain_of(ca, 3)  # 5 certificates, out of order
    certs = x509.load_pem_x509_certificates(chain)
    private = serialization.load_pem_private_key(key, None)
    leaf = next(c for c in certs if c.public_key() == private.public_key())
    p12 = pkcs12.serialize_key_and_certificates(
        b"site", private, leaf, [c for c in certs if c is not leaf],  # type: ignore[arg-type]
        serialization.NoEncryption(),
    )
    with pytest.raises(pki.CertificateProblem, match="The upload holds 11 certificates"):
        pki.inspect_upload(pkcs12_data=p12, chain_pem=pem(certs + certs[:1]),
                           now=dt.datetime.now(dt.UTC))


@pytest.mark.django_db
def test_pasted_chain_over_256_kib_is_refused() -> None:
    cert, key = same_name_chain(1)
    padding = b"# comment line between blocks\n" * 9000
    errors = errors_of(certificate_form(pem(cert) + padding, key_pem(key)))
    assert errors["chain_pem"] == [
        "The certificate chain is 264 KiB; at most 256 KiB are accepted, which is far more "
        "than any certificate needs."
    ]


def test_begin_lines_without_an_end_are_read_in_one_pass() -> None:
    # One lazy BEGIN…END pattern rescanned the rest of the text from each of these lines:
    # 20,000 of them took most of a minute. As before, the first BEGIN runs to the END.
    hostile = b"-----BEGIN CERTIFICATE-----\n" * 20_000
    cert, _ = same_name_chain(1)
    blocks, keys = pki.split_pem_blocks(hostile + pem(cert) + b"-----BEGIN PRIVATE KEY-----\n" * 20_000)
    assert blocks == [hostile + pem(cert).strip()] and keys == []


# --- ordering --------------------------------------------------------------------------------


def test_five_thousand_same_name_certificates_are_ordered_with_two_checks_each(
    signature_checks: Callable[[int], list[int]],
) -> None:
    chain, key = same_name_chain(5000)
    calls = signature_checks(2 * len(chain))
    ordered, reordered = pki.order_chain(shuffled(chain), key)
    assert list(ordered) == chain and reordered
    assert calls[0] <= 2 * len(chain)


def test_same_name_certificates_without_key_identifiers_cost_a_bounded_number_of_checks(
    signature_checks: Callable[[int], list[int]],
) -> None:
    chain, key = same_name_chain(5000, key_ids=False)
    calls = signature_checks((pki.MAX_ISSUER_TRIES + 1) * len(chain))
    with pytest.raises(pki.CertificateProblem, match="is not part of the chain"):
        pki.order_chain(shuffled(chain), key)
    assert calls[0] > 0


def test_chain_at_the_limit_without_key_identifiers_is_ordered() -> None:
    chain, key = same_name_chain(pki.MAX_CHAIN_CERTIFICATES, key_ids=False)
    ordered, _ = pki.order_chain(shuffled(chain), key)
    assert list(ordered) == chain


# --- no transaction while a chain is checked -------------------------------------------------


@pytest.fixture
def inspections_seen(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """Every ``pki.inspect_upload`` call: whether a transaction was open, and whether another
    thread could write to the database meanwhile."""
    seen: list[dict[str, Any]] = []
    real = pki.inspect_upload

    def write_from_another_thread() -> str:
        outcome: list[str] = []

        def write() -> None:
            try:
                User.objects.create(username=f"written-meanwhile-{len(seen)}")
                outcome.append("written")
            except Exception as exc:
                outcome.append(f"refused: {exc}")
            finally:
                connection.close()

        thread = threading.Thread(target=write)
        thread.start()
        thread.join(30)
        return outcome[0] if outcome else "still waiting"

    def watched(**kwargs: Any) -> pki.InspectedCertificate:
        seen.append({"in_transaction": connection.in_atomic_block,
                     "other_write": write_from_another_thread()})
        return real(**kwargs)

    monkeypatch.setattr(pki, "inspect_upload", watched)
    yield seen


@pytest.mark.django_db(transaction=True)
def test_admin_checks_the_chain_before_its_transaction_opens(
    inspections_seen: list[dict[str, Any]], ca: trustme.CA
) -> None:
    User.objects.create_superuser("admin", "admin@example.com", "correct horse battery")
    client = Client()
    assert client.login(username="admin", password="correct horse battery")
    chain, key = chain_of(ca, 1)
    response = client.post(ADD_URL, {"name": "site", "chain_pem": chain.decode(),
                                     "key_pem": key.decode(), "passphrase": "", "_save": "Save"})
    assert response.status_code == 302, page_text(response)
    assert Certificate.objects.get().name == "site"
    assert inspections_seen == [{"in_transaction": False, "other_write": "written"}]


@pytest.mark.django_db(transaction=True)
def test_importconfig_checks_every_chain_before_its_transaction_opens(
    inspections_seen: list[dict[str, Any]], ca: trustme.CA
) -> None:
    entries = []
    for name in ("one", "two"):
        chain, key = chain_of(ca, 1)
        entries.append({"name": name, "chain_pem": chain.decode(), "key_pem": key.decode()})
    outcomes = configio.import_config({"format": "proxyadmin-config", "version": 1,
                                       "certificates": entries})
    assert [o.line() for o in outcomes] == ["created certificate 'one'", "created certificate 'two'"]
    assert inspections_seen == [{"in_transaction": False, "other_write": "written"}] * 2
