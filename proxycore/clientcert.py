"""RFC 9440: the verified client certificate, passed to the upstream in a header.

``Client-Cert`` carries the end-entity certificate the TLS layer verified, as a
Structured Field byte sequence (``:base64(DER):``). ``Client-Cert-Chain``, when a
host asks for it, lists the certificates from the leaf's issuer up to the
trusted CA. Python 3.11 does not expose the chain the client sent, so the chain
is rebuilt from the host's CA bundle: the certificates that verified it. A
client-sent ``Client-Cert*`` header is always dropped (``routing``), so these
headers are only ever the proxy's own. Computed once per connection.
"""

from __future__ import annotations

import base64
import functools

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding

from proxycore.config import ClientAuth, ClientAuthMode

Header = tuple[bytes, bytes]
MAX_CHAIN = 8


def sf_binary(der: bytes) -> bytes:
    return b":" + base64.b64encode(der) + b":"


@functools.lru_cache(maxsize=64)
def _ca_certificates(ca_pem: bytes) -> tuple[x509.Certificate, ...]:
    try:
        return tuple(x509.load_pem_x509_certificates(ca_pem))
    except ValueError:
        return ()


def _issuer_in(cert: x509.Certificate, candidates: tuple[x509.Certificate, ...]) -> x509.Certificate | None:
    for candidate in candidates:
        if candidate.subject != cert.issuer:
            continue
        try:
            cert.verify_directly_issued_by(candidate)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return candidate
    return None


def chain_from_bundle(leaf_der: bytes, ca_pem: bytes) -> list[bytes]:
    """DER of the certificates from the leaf's issuer up to a root of the bundle."""
    try:
        cert = x509.load_der_x509_certificate(leaf_der)
    except ValueError:
        return []
    bundle = _ca_certificates(ca_pem)
    chain: list[bytes] = []
    while len(chain) < MAX_CHAIN:
        issuer = _issuer_in(cert, bundle)
        if issuer is None or issuer == cert:
            break
        chain.append(issuer.public_bytes(Encoding.DER))
        cert = issuer
    return chain


def client_cert_headers(leaf_der: bytes | None, auth: ClientAuth) -> tuple[Header, ...]:
    """The RFC 9440 headers for a connection's verified client certificate, if any."""
    if leaf_der is None or auth.mode is ClientAuthMode.OFF or not auth.forward_cert:
        return ()
    headers: list[Header] = [(b"client-cert", sf_binary(leaf_der))]
    if auth.forward_chain:
        chain = chain_from_bundle(leaf_der, auth.ca_pem)
        if chain:
            headers.append((b"client-cert-chain", b", ".join(sf_binary(der) for der in chain)))
    return tuple(headers)
