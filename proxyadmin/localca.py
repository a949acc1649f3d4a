"""The project's own certificate authority, so a newcomer can start without a PKI.

Created on first use (ECDSA P-256, ten years); it issues server certificates of
200 days with the SANs of the hosts they are for. Its certificate can be
downloaded from the admin and added to a trust store; its key is encrypted at
rest like every other key.
"""

from __future__ import annotations

import datetime as dt
import secrets

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from django.db import transaction
from django.utils import timezone

from proxyadmin import crypto, pki
from proxyadmin import models as m

CA_LIFETIME = dt.timedelta(days=3650)
# From notBefore to notAfter: the CA/Browser Forum's cap since March 2026 (it was 398
# days; Mozilla's "intermediate" profile, and so sslyze, wants under 366).
LEAF_LIFETIME = dt.timedelta(days=200)
BACKDATE = dt.timedelta(minutes=5)  # tolerate small clock skew on clients


def known_issuers() -> list[x509.Certificate]:
    """The local CA's certificate if it exists, for chain-completeness checks."""
    ca = m.LocalCA.objects.order_by("id").first()
    return [ca.certificate()] if ca else []


def _new_ca() -> m.LocalCA:
    key = ec.generate_private_key(ec.SECP256R1())
    now = timezone.now()
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "proxyadmin"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"proxyadmin local CA {secrets.token_hex(4)}"),
    ])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return m.LocalCA.objects.create(
        certificate_pem=pki.to_pem([cert]), key_token=crypto.encrypt(pki.key_to_pem(key))
    )


def get_or_create_ca() -> m.LocalCA:
    with transaction.atomic():
        ca = m.LocalCA.objects.select_for_update().order_by("id").first()
        return ca or _new_ca()


def issue(names: list[str], now: dt.datetime | None = None) -> tuple[x509.Certificate, bytes]:
    """Issue a server certificate for ``names``; returns (certificate, key PEM)."""
    if not names:
        raise ValueError("A certificate needs at least one name.")
    ca = get_or_create_ca()
    ca_cert = ca.certificate()
    ca_key = load_pem_private_key(crypto.decrypt(ca.key_token), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    not_before = (now or timezone.now()) - BACKDATE
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + LEAF_LIFETIME)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=False, crl_sign=False, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, pki.key_to_pem(key)


def _certificate_name(host_name: str, suffix: str) -> str:
    # A host name may use the whole column; the suffix must still fit.
    limit = m.Certificate._meta.get_field("name").max_length or 200
    return host_name[: limit - len(suffix)] + suffix


def certificate_for_host(host: m.Host) -> m.Certificate:
    """Issue a certificate for ``host``'s names, store it, and make the host use it."""
    names = host.hostnames()
    cert, key_pem = issue(names)
    inspected = pki.inspect_upload(
        chain_pem=pki.to_pem([cert]).encode(), key_pem=key_pem,
        now=timezone.now(), known_issuers=known_issuers(),
    )
    name, n = _certificate_name(host.name, " (local CA)"), 1
    while m.Certificate.objects.filter(name=name).exists():
        n += 1
        name = _certificate_name(host.name, f" (local CA) {n}")
    stored = m.Certificate(name=name, source=m.Certificate.Source.GENERATED)
    stored.set_inspected(inspected)
    stored.save()
    host.certificate = stored
    host.save(update_fields=["certificate"])
    return stored
