"""rama's SNI example through the running proxy: each host its own chain, a default for
the rest, a refused handshake in strict mode; checked with Python's ssl and openssl s_client."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
from dataclasses import replace

import pytest
import trustme
from cryptography import x509

from proxycore import config as core
from tests.proxyharness import Upstream, bundle, route, running_node


def served_certificate(port: int, server_name: str | None) -> x509.Certificate:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, ctx.wrap_socket(
        raw, server_hostname=server_name
    ) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def serial_of(b: core.CertificateBundle) -> int:
    return int(b.serial, 16)


@pytest.fixture
def certs(ca: trustme.CA) -> dict[str, core.CertificateBundle]:
    return {
        "a": bundle(ca, "a.example"),
        "b": bundle(ca, "b.example"),
        "wild": bundle(ca, "*.w.example", name="wild"),
        "default": bundle(ca, "default.example", name="default"),
    }


def snapshot(certs: dict[str, core.CertificateBundle], port: int, strict: bool) -> core.Snapshot:
    return core.Snapshot(
        revision=1,
        hosts=(
            route("a", ("a.example",), port, certs["a"]),
            route("b", ("b.example",), port, certs["b"]),
            route("w", ("*.w.example",), port, certs["wild"]),
        ),
        default_certificate=certs["default"],
        strict_sni=strict,
    )


def test_each_host_gets_its_own_certificate_and_unknown_names_the_default(
    certs: dict[str, core.CertificateBundle], upstream: Upstream
) -> None:
    with running_node(snapshot(certs, upstream.port, strict=False)) as node:
        port = node.https_port
        assert served_certificate(port, "a.example").serial_number == serial_of(certs["a"])
        assert served_certificate(port, "b.example").serial_number == serial_of(certs["b"])
        assert served_certificate(port, "x.w.example").serial_number == serial_of(certs["wild"])
        # A wildcard covers one label only; an unknown name and no SNI get the default.
        for name in ("x.y.w.example", "unknown.example", None):
            assert served_certificate(port, name).serial_number == serial_of(certs["default"])
        stats = node.stats()
    assert stats["hosts"]["a"]["handshakes_ok"] == 1
    assert stats["hosts"]["-"]["handshakes_ok"] == 3
    assert stats["listeners"]["https"]["tls_versions"] == {"TLSv1.3": 6}


def test_strict_sni_refuses_unknown_names_and_missing_sni(
    certs: dict[str, core.CertificateBundle], upstream: Upstream
) -> None:
    with running_node(snapshot(certs, upstream.port, strict=True)) as node:
        port = node.https_port
        assert served_certificate(port, "a.example").serial_number == serial_of(certs["a"])
        for name in ("unknown.example", None):
            with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
                served_certificate(port, name)
        stats = node.stats()
    assert stats["hosts"]["-"]["handshakes_failed"] == {"unknown_sni": 2}


def test_without_a_default_certificate_unknown_names_fail(
    certs: dict[str, core.CertificateBundle], upstream: Upstream
) -> None:
    snap = replace(snapshot(certs, upstream.port, strict=False), default_certificate=None)
    with running_node(snap) as node, pytest.raises(ssl.SSLError):
        served_certificate(node.https_port, "unknown.example")


def test_a_host_without_a_certificate_is_refused_not_served_the_default(
    certs: dict[str, core.CertificateBundle], upstream: Upstream
) -> None:
    base = snapshot(certs, upstream.port, strict=False)
    snap = replace(base, hosts=(*base.hosts, route("bare", ("bare.example",), upstream.port, None)))
    with running_node(snap) as node:
        with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
            served_certificate(node.https_port, "bare.example")
        assert served_certificate(node.https_port, "unknown.example").serial_number == serial_of(certs["default"])
        stats = node.stats()
    assert stats["hosts"]["bare"]["handshakes_failed"] == {"no_certificate": 1}


def test_tls_1_1_is_refused(certs: dict[str, core.CertificateBundle], upstream: Upstream) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    except (ValueError, ssl.SSLError):
        pytest.skip("this OpenSSL cannot even offer TLS 1.1")
    with running_node(snapshot(certs, upstream.port, strict=False)) as node, socket.create_connection(
        ("127.0.0.1", node.https_port), timeout=10
    ) as raw, pytest.raises(ssl.SSLError):
        ctx.wrap_socket(raw, server_hostname="a.example")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is installed by .ci/run")
def test_openssl_s_client_sees_the_hosts_chain_and_http_1_1_alpn(
    ca: trustme.CA, certs: dict[str, core.CertificateBundle], upstream: Upstream, tmp_path: object
) -> None:
    from pathlib import Path

    ca_file = Path(str(tmp_path)) / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    with running_node(snapshot(certs, upstream.port, strict=False)) as node:
        out = subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{node.https_port}",
             "-servername", "b.example", "-alpn", "http/1.1", "-CAfile", str(ca_file),
             "-verify_hostname", "b.example", "-verify_return_error"],
            input=b"", capture_output=True, timeout=30,
        )
    text = (out.stdout + out.stderr).decode()
    assert out.returncode == 0, text
    assert "Verification: OK" in text  # chain to our CA, and the SAN matches b.example
    assert "Verified peername: b.example" in text
    assert "ALPN protocol: http/1.1" in text
