"""Certificate revocation lists on a client CA bundle: validated on upload, enforced in the handshake."""

from __future__ import annotations

import datetime as dt
import socket
import ssl

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from proxyadmin.forms import ClientCAForm
from proxycore import config as core
from tests.proxyharness import Upstream, bundle, read_response, route, running_node

NOW = dt.datetime.now(dt.UTC)


def make_crl(ca: trustme.CA, revoked: list[trustme.LeafCert], *, next_update: dt.datetime | None = None) -> bytes:
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(NOW - dt.timedelta(days=2))
        .next_update(next_update or NOW + dt.timedelta(days=7))
    )
    for leaf in revoked:
        serial = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).serial_number
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(NOW).build()
        )
    crl = builder.sign(key, hashes.SHA256())  # type: ignore[arg-type]
    return crl.public_bytes(serialization.Encoding.PEM)


def form(ca: trustme.CA, crl: bytes) -> ClientCAForm:
    return ClientCAForm(data={"name": "clients", "bundle_pem": ca.cert_pem.bytes().decode(),
                              "crl_pem": crl.decode()})


@pytest.mark.django_db
def test_a_crl_of_the_bundles_ca_is_stored_with_its_next_update() -> None:
    ca = trustme.CA()
    f = form(ca, make_crl(ca, [ca.issue_cert("gone@example")]))
    assert f.is_valid(), f.errors
    stored = f.save()
    assert "BEGIN X509 CRL" in stored.crl_pem
    assert stored.crl_next_update is not None and stored.crl_next_update > NOW


@pytest.mark.django_db
@pytest.mark.parametrize(("case", "message"), [
    ("other_ca", "was not issued by a CA of this bundle"),
    ("expired", "expired on"),
    ("garbage", "is not PEM"),
])
def test_a_bad_crl_is_refused_with_the_reason(case: str, message: str) -> None:
    ca = trustme.CA()
    crl = {
        "other_ca": lambda: make_crl(trustme.CA(), []),
        "expired": lambda: make_crl(ca, [], next_update=NOW - dt.timedelta(days=1)),
        "garbage": lambda: b"not a crl",
    }[case]()
    f = form(ca, crl)
    assert not f.is_valid()
    assert message in " ".join(f.errors["crl_pem"])


def handshake(port: int, ca: trustme.CA, leaf: trustme.LeafCert) -> int:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    leaf.configure_cert(ctx)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, ctx.wrap_socket(
        raw, server_hostname="m.example"
    ) as tls:
        tls.sendall(b"GET / HTTP/1.1\r\nHost: m.example\r\n\r\n")
        return read_response(tls)[0]


def test_a_revoked_client_certificate_is_refused_and_counted(ca: trustme.CA, upstream: Upstream) -> None:
    client_ca = trustme.CA()
    good, revoked = client_ca.issue_cert("good@example"), client_ca.issue_cert("revoked@example")
    auth = core.ClientAuth(mode=core.ClientAuthMode.REQUIRED, ca_pem=client_ca.cert_pem.bytes(),
                           crl_pem=make_crl(client_ca, [revoked]))
    snap = core.Snapshot(revision=1, hosts=(
        route("m", ("m.example",), upstream.port, bundle(ca, "m.example"), client_auth=auth),
    ))
    with running_node(snap) as node:
        assert handshake(node.https_port, ca, good) == 200
        with pytest.raises((ssl.SSLError, ConnectionError)):
            handshake(node.https_port, ca, revoked)
        stats = node.stats()
    assert stats["hosts"]["m"]["handshakes_failed"] == {"revoked_client_cert": 1}
