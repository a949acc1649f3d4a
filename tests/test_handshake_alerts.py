"""A refused TLS handshake ends with OpenSSL's alert, on uvloop and on plain asyncio.

Both event loops' TLS protocols close the connection without sending the alert OpenSSL
wrote when a handshake fails (CPython gh-98078); ``proxycore.tlsalert`` sends it first.
Each refusal is checked with ``openssl s_client``, which prints the alert it received,
and is still counted by its reason.
"""

from __future__ import annotations

import collections
import datetime as dt
import shutil
import socket
import ssl
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from proxycore import config as core
from proxycore import tlsalert
from tests.proxyharness import Upstream, bundle, client_context, read_response, route, running_node

NOW = dt.datetime.now(dt.UTC)


@pytest.fixture(params=["uvloop", "asyncio"])
def event_loop_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The node runs on uvloop (production) or on asyncio's own loop (tests.proxyharness)."""
    if request.param == "asyncio":
        monkeypatch.setenv("PROXY_TEST_ASYNCIO", "1")
    else:
        monkeypatch.delenv("PROXY_TEST_ASYNCIO", raising=False)
    yield request.param


def crl(ca: trustme.CA, revoked: trustme.LeafCert) -> bytes:
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    serial = x509.load_pem_x509_certificate(revoked.cert_chain_pems[0].bytes()).serial_number
    built = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(NOW - dt.timedelta(days=1))
        .next_update(NOW + dt.timedelta(days=7))
        .add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(NOW).build())
        .sign(key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return built.public_bytes(serialization.Encoding.PEM)


def snapshot(ca: trustme.CA, client_ca: trustme.CA, revoked: trustme.LeafCert, port: int) -> core.Snapshot:
    """a: no client certificates; m: required; r: required, with a CRL revoking ``revoked``."""
    shared = bundle(ca, "a.example", "m.example", "r.example", name="shared")
    ca_pem = client_ca.cert_pem.bytes()
    required = core.ClientAuthMode.REQUIRED
    return core.Snapshot(revision=1, hosts=(
        route("a", ("a.example",), port, shared),
        route("m", ("m.example",), port, shared, client_auth=core.ClientAuth(mode=required, ca_pem=ca_pem)),
        route("r", ("r.example",), port, shared,
              client_auth=core.ClientAuth(mode=required, ca_pem=ca_pem, crl_pem=crl(client_ca, revoked))),
    ))


# (what the client does, SNI, s_client options, the alert s_client must print)
CASES = [
    ("offers TLS 1.1 at most", "a.example", ["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"],
     "alert protocol version"),
    ("shares no cipher", "a.example", ["-tls1_2", "-cipher", "AES128-SHA"], "alert handshake failure"),
    ("no certificate, TLS 1.3", "m.example", ["-tls1_3"], "alert certificate required"),
    ("no certificate, TLS 1.2", "m.example", ["-tls1_2"], "alert handshake failure"),
    ("certificate of another CA", "m.example", ["-cert", "foreign"], "alert unknown ca"),
    ("expired certificate", "m.example", ["-cert", "expired"], "alert certificate expired"),
    ("revoked certificate, TLS 1.3", "r.example", ["-cert", "revoked"], "alert certificate revoked"),
    ("revoked certificate, TLS 1.2", "r.example", ["-tls1_2", "-cert", "revoked"], "alert certificate revoked"),
]


def s_client(port: int, server_name: str, options: list[str], files: Path) -> str:
    args = []
    for option in options:
        if option in ("foreign", "expired", "revoked"):  # a certificate: its file, then its key
            args += [str(files / f"{option}.pem"), "-key", str(files / f"{option}.key")]
        else:
            args.append(option)
    # -ign_eof: in TLS 1.3 the client's side of the handshake is over before the server
    # checks its certificate, so the alert comes after; wait for it rather than quit.
    out = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", server_name,
         "-CAfile", str(files / "ca.pem"), "-ign_eof", *args],
        input=b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", capture_output=True, timeout=30, check=False,
    )
    return (out.stdout + out.stderr).decode(errors="replace")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is installed by .ci/run")
def test_each_refused_handshake_ends_with_its_alert_and_is_counted_by_reason(
    event_loop_kind: str, ca: trustme.CA, upstream: Upstream, tmp_path: Path
) -> None:
    client_ca = trustme.CA()
    revoked = client_ca.issue_cert("revoked@example")
    leaves = {
        "foreign": trustme.CA().issue_cert("foreign@example"),
        "expired": client_ca.issue_cert("expired@example", not_before=NOW - dt.timedelta(days=30),
                                        not_after=NOW - dt.timedelta(days=1)),
        "revoked": revoked,
    }
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    for name, leaf in leaves.items():
        leaf.cert_chain_pems[0].write_to_path(str(tmp_path / f"{name}.pem"))
        leaf.private_key_pem.write_to_path(str(tmp_path / f"{name}.key"))

    with running_node(snapshot(ca, client_ca, revoked, upstream.port)) as node:
        seen = {}
        for case, server_name, options, alert in CASES:
            text = s_client(node.https_port, server_name, options, tmp_path)
            seen[case] = alert if alert in text else text[-300:]
        assert seen == {case: alert for case, _, _, alert in CASES}
        hosts = node.stats()["hosts"]
        assert node.loop.call(lambda: node.node.listeners[0].handshaking) == 0
    assert hosts["a"]["handshakes_failed"] == {"protocol_version": 1, "no_shared_cipher": 1}
    assert hosts["m"]["handshakes_failed"] == {"no_client_cert": 2, "bad_client_cert": 1,
                                               "expired_client_cert": 1}
    assert hosts["r"]["handshakes_failed"] == {"revoked_client_cert": 2}
    assert tlsalert._waiting == {}


def test_concurrent_handshakes_each_get_their_own_outcome(
    event_loop_kind: str, ca: trustme.CA, upstream: Upstream
) -> None:
    """Refused and accepted handshakes interleaved: each refusal is the alert of its own
    connection, and no accepted connection is closed by another's failure."""
    client_ca = trustme.CA()
    good = client_ca.issue_cert("good@example")
    kinds = ["good", "none, TLS 1.3", "none, TLS 1.2", "no client auth"]

    def connect(i: int) -> tuple[str, str]:
        kind = kinds[i % len(kinds)]
        version = ssl.TLSVersion.TLSv1_2 if kind == "none, TLS 1.2" else None
        ctx = client_context(ca, good if kind == "good" else None, version)
        name = "a.example" if kind == "no client auth" else "m.example"
        try:
            with socket.create_connection(("127.0.0.1", node.https_port), timeout=10) as raw, \
                    ctx.wrap_socket(raw, server_hostname=name) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % name.encode())
                return kind, str(read_response(sock)[0])
        except ssl.SSLError as exc:
            return kind, str(exc.reason)
        except OSError as exc:
            return kind, type(exc).__name__

    with running_node(snapshot(ca, client_ca, good, upstream.port)) as node, ThreadPoolExecutor(16) as pool:
        outcomes = collections.Counter(pool.map(connect, range(160)))
        hosts = node.stats()["hosts"]
    assert outcomes == {
        ("good", "200"): 40,
        ("none, TLS 1.3", "TLSV13_ALERT_CERTIFICATE_REQUIRED"): 40,
        ("none, TLS 1.2", "SSLV3_ALERT_HANDSHAKE_FAILURE"): 40,
        ("no client auth", "200"): 40,
    }
    assert hosts["m"]["handshakes_failed"] == {"no_client_cert": 80}
    assert hosts["m"]["handshakes_ok"] == 40 and hosts["a"]["handshakes_ok"] == 40


def test_a_handshake_that_never_made_its_ssl_object_leaves_no_trace() -> None:
    """start_tls cancelled before the protocol wrapped its BIOs: the record leaves the queue,
    so the next handshake on that context is not given it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.sslobject_class = tlsalert.AlertingSSLObject
    first = tlsalert.Handshake.expect(ctx, None, None, print)  # type: ignore[arg-type]
    second = tlsalert.Handshake.expect(ctx, None, None, print)  # type: ignore[arg-type]
    first.forget()
    obj = ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True)
    assert obj._handshake is second
    second.forget()
    assert tlsalert._waiting == {}
