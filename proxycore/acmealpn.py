"""ACME tls-alpn-01 (RFC 8737): the challenge certificates a node answers with.

The CA validates a name by connecting to its port 443 with a ClientHello for the
name that offers only the ALPN protocol ``acme-tls/1``; the server must complete the
handshake with a self-signed certificate for that name carrying, in the critical
``id-pe-acmeIdentifier`` extension, the SHA-256 digest of the challenge's key
authorization. The snapshot carries (name, digest) pairs (``Snapshot.acme_tls_alpn``);
each node makes its own certificate and key for them when it loads the snapshot, so
no key travels. ``proxycore.acceptor`` answers such a ClientHello with the context
built here and closes the connection once the handshake is done: no application
data is ever exchanged on it (RFC 8737 §3).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ssl
from collections.abc import Iterable, Mapping
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, ObjectIdentifier

from proxycore import tls
from proxycore.config import CertificateBundle

ACME_TLS_1: Final = b"acme-tls/1"
ID_PE_ACME_IDENTIFIER: Final = ObjectIdentifier("1.3.6.1.5.5.7.1.31")
DIGEST_SIZE: Final = 32  # SHA-256
# An ALERT record in clear for a ClientHello that offers only acme-tls/1 for a name
# with no pending challenge: no_application_protocol (RFC 7301 §3.2).
ALERT_NO_APPLICATION_PROTOCOL: Final = b"\x15\x03\x03\x00\x02\x02\x78"


def wants_challenge(alpn: tuple[bytes, ...]) -> bool:
    """A ClientHello offering acme-tls/1 and nothing else is a validation, never a client."""
    return alpn == (ACME_TLS_1,)


def challenge_certificate(name: str, digest: bytes) -> CertificateBundle:
    """A self-signed certificate and fresh P-256 key for ``name``, carrying ``digest``."""
    if len(digest) != DIGEST_SIZE:
        raise tls.TLSConfigError(f"tls-alpn-01 challenge for {name}: the digest is not SHA-256")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        # The extension's value is the DER encoding of an OCTET STRING holding the digest.
        .add_extension(x509.UnrecognizedExtension(ID_PE_ACME_IDENTIFIER, b"\x04\x20" + digest),
                       critical=True)
        .sign(key, hashes.SHA256())
    )
    chain = cert.public_bytes(serialization.Encoding.PEM)
    return CertificateBundle(
        name=f"acme tls-alpn-01 {name}",
        chain_pem=chain,
        key_pem=key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()),
        fingerprint_sha256=hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest(),
        serial=f"{cert.serial_number:x}",
        sans=(name,),
        not_after=cert.not_valid_after_utc,
    )


def challenge_contexts(challenges: Iterable[tuple[str, bytes]]) -> Mapping[str, ssl.SSLContext]:
    """One server context per challenged name (lower case, no trailing dot), ALPN acme-tls/1."""
    contexts: dict[str, ssl.SSLContext] = {}
    for name, digest in challenges:
        normal = tls.normal_name(name)
        contexts[normal] = tls.server_context(
            challenge_certificate(normal, digest), alpn=(ACME_TLS_1.decode(),), client_auth=None,
        )
    return contexts
