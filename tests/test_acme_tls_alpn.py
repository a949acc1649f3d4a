"""ACME tls-alpn-01 (RFC 8737) on the HTTPS listener: a ClientHello offering only
``acme-tls/1`` for a challenged name gets the challenge certificate, and nothing else does."""

from __future__ import annotations

import hashlib
import socket
import ssl
import subprocess

import pytest
import trustme
from cryptography import x509

from proxycore import acmealpn
from proxycore import config as core
from tests.proxyharness import Upstream, bundle, handshake_failures, read_response, route, running_node

DIGEST = hashlib.sha256(b"token.thumbprint").digest()


def snapshot(ca: trustme.CA, port: int) -> core.Snapshot:
    return core.Snapshot(
        revision=1,
        hosts=(route("a", ("a.example", "b.example"), port, bundle(ca, "a.example", "b.example")),),
        acme_tls_alpn=(("A.example.", DIGEST),),  # names are matched as normalised
    )


def connect(port: int, name: str, alpn: list[str]) -> ssl.SSLSocket:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # as a CA's validator: it reads the certificate, trusts nothing
    ctx.set_alpn_protocols(alpn)
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return ctx.wrap_socket(raw, server_hostname=name)


def test_the_challenge_certificate_carries_the_digest_in_a_critical_extension() -> None:
    bundle_ = acmealpn.challenge_certificate("a.example", DIGEST)
    cert = x509.load_pem_x509_certificate(bundle_.chain_pem)
    ext = cert.extensions.get_extension_for_oid(acmealpn.ID_PE_ACME_IDENTIFIER)
    assert ext.critical
    assert ext.value.value == b"\x04\x20" + DIGEST  # DER OCTET STRING of the SHA-256 digest
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName) == ["a.example"]
    assert cert.issuer == cert.subject


def test_a_validation_gets_the_challenge_certificate_and_the_connection_closes(
    ca: trustme.CA, upstream: Upstream,
) -> None:
    with running_node(snapshot(ca, upstream.port)) as node:
        sock = connect(node.https_port, "a.example", ["acme-tls/1"])
        assert sock.selected_alpn_protocol() == "acme-tls/1"
        cert = x509.load_der_x509_certificate(sock.getpeercert(binary_form=True))
        value = cert.extensions.get_extension_for_oid(acmealpn.ID_PE_ACME_IDENTIFIER).value
        assert value.value == b"\x04\x20" + DIGEST
        assert sock.recv(1) == b""  # the handshake is the whole answer
        sock.close()
    assert upstream.connections == 0


@pytest.mark.parametrize("alpn", [["http/1.1"], ["acme-tls/1", "http/1.1"], []],
                         ids=["http", "acme-and-http", "none"])
def test_a_client_that_offers_more_than_acme_tls_gets_the_hosts_certificate(
    ca: trustme.CA, upstream: Upstream, alpn: list[str],
) -> None:
    with running_node(snapshot(ca, upstream.port)) as node:
        sock = connect(node.https_port, "a.example", alpn)
        cert = x509.load_der_x509_certificate(sock.getpeercert(binary_form=True))
        with pytest.raises(x509.ExtensionNotFound):
            cert.extensions.get_extension_for_oid(acmealpn.ID_PE_ACME_IDENTIFIER)
        assert sock.selected_alpn_protocol() in (None, "http/1.1")
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
        assert read_response(sock)[0] == 200
        sock.close()


def test_acme_tls_alone_for_a_name_without_a_challenge_is_refused(ca: trustme.CA, upstream: Upstream) -> None:
    with running_node(snapshot(ca, upstream.port)) as node:
        with pytest.raises(ssl.SSLError, match=r"(?i)no.application.protocol"):
            connect(node.https_port, "b.example", ["acme-tls/1"])
        assert handshake_failures(node, "-", {"no_acme_challenge": 1}) == {"no_acme_challenge": 1}


def test_a_reload_adds_and_removes_challenges(ca: trustme.CA, upstream: Upstream) -> None:
    plain = core.Snapshot(revision=1, hosts=snapshot(ca, upstream.port).hosts)
    with running_node(plain) as node:
        with pytest.raises(ssl.SSLError):
            connect(node.https_port, "a.example", ["acme-tls/1"])
        assert node.reload(snapshot(ca, upstream.port))
        connect(node.https_port, "a.example", ["acme-tls/1"]).close()
        assert node.reload(plain)
        with pytest.raises(ssl.SSLError):
            connect(node.https_port, "a.example", ["acme-tls/1"])


def test_openssl_sees_the_acme_protocol_and_the_challenge_name(ca: trustme.CA, upstream: Upstream) -> None:
    with running_node(snapshot(ca, upstream.port)) as node:
        done = subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{node.https_port}", "-servername", "a.example",
             "-alpn", "acme-tls/1"], input=b"", capture_output=True, timeout=20, check=False)
    out = done.stdout.decode()
    assert "ALPN protocol: acme-tls/1" in out
    assert "CN=a.example" in out or "CN = a.example" in out
