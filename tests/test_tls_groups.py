"""Key exchange as Mozilla's "intermediate" profile has it: every context the proxy builds
offers X25519, P-256 and P-384, and nothing else (no X448, no P-521, no finite-field
group in TLS 1.3). Checked with openssl s_client against a running node, and on the
upstream side with a handshake over memory; a context whose OpenSSL handle cannot be
found safely falls back to P-256 alone, with a warning."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from proxycore import config as core
from proxycore import sslctx, tls, tlsgroups
from tests.proxyharness import RunningNode, bundle, route, running_node
from tests.test_tls_contexts import bundle_of, handshake

NEEDS_OPENSSL = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is installed by .ci/run")
VERSIONS = [pytest.param("-tls1_3", id="tls1.3"), pytest.param("-tls1_2", id="tls1.2")]
# s_client's -groups name, and how its "Server Temp Key" line names the group.
OFFERED = {"X25519": "X25519", "P-256": "ECDH, prime256v1", "P-384": "ECDH, secp384r1"}


@pytest.fixture(scope="module")
def module_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def node(module_ca: trustme.CA) -> Iterator[RunningNode]:
    # RSA: in TLS 1.2 a client's groups also bound the curve of an ECDSA certificate, and
    # the groups alone should decide these handshakes.
    cert = bundle_of(module_ca.issue_cert("a.example", key_type=trustme.KeyType.RSA), "a")
    # Nothing listens on port 9: the handshake is all these tests look at.
    snapshot = core.Snapshot(revision=1, hosts=(route("a", ("a.example",), 9, cert),))
    with running_node(snapshot) as running:
        yield running


@pytest.fixture(scope="module")
def ca_file(module_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    module_ca.cert_pem.write_to_path(str(path))
    return path


def s_client(port: int, ca_file: Path, version: str, group: str) -> tuple[bool, str]:
    """openssl s_client to the node's host offering only ``group``: (handshake ok, output)."""
    argv = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "a.example",
            "-CAfile", str(ca_file), "-verify_return_error", version, "-groups", group]
    if version == "-tls1_2":
        argv += ["-cipher", "ECDHE"]  # the group is what ECDHE agrees on; DHE has its own
    out = subprocess.run(argv, input=b"", capture_output=True, timeout=30)
    text = (out.stdout + out.stderr).decode(errors="replace")
    return out.returncode == 0 and "Verification: OK" in text, text


@NEEDS_OPENSSL
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("group", list(OFFERED))
def test_x25519_p256_and_p384_are_each_negotiated(
    node: RunningNode, ca_file: Path, version: str, group: str
) -> None:
    ok, text = s_client(node.https_port, ca_file, version, group)
    assert ok, text
    assert f"Server Temp Key: {OFFERED[group]}," in text


@NEEDS_OPENSSL
@pytest.mark.parametrize(("version", "group"), [
    pytest.param("-tls1_3", "X448", id="X448-tls1.3"),
    pytest.param("-tls1_2", "X448", id="X448-tls1.2"),
    pytest.param("-tls1_3", "secp521r1", id="P-521-tls1.3"),
    pytest.param("-tls1_2", "secp521r1", id="P-521-tls1.2"),
    pytest.param("-tls1_3", "ffdhe2048", id="ffdhe2048-tls1.3"),
])
def test_other_groups_fail_the_handshake(node: RunningNode, ca_file: Path, version: str, group: str) -> None:
    ok, text = s_client(node.https_port, ca_file, version, group)
    assert not ok, text
    assert "Server Temp Key" not in text


# ---- the upstream side, and the fallback: handshakes over memory -----------------------------


def server_offering(ca: trustme.CA, group: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("up.example").configure_cert(ctx)
    ctx.set_ecdh_curve(group)  # one group: the handshake works only if the client offers it
    return ctx


def client_offering(ca: trustme.CA, group: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(ctx)
    ctx.set_ecdh_curve(group)
    return ctx


GROUPS = [("X25519", True), ("prime256v1", True), ("secp384r1", True),
          ("X448", False), ("secp521r1", False), ("ffdhe2048", False)]


@pytest.mark.parametrize(("group", "offered"), GROUPS)
def test_upstream_connections_offer_the_same_groups(ca: trustme.CA, group: str, offered: bool) -> None:
    client = tls.upstream_context(core.UpstreamTLS(verify=True, ca_pem=ca.cert_pem.bytes(), server_name=""))
    assert handshake(server_offering(ca, group), client, "up.example").ok is offered


def test_every_kind_of_context_passes_the_guard(
    ca: trustme.CA, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(tlsgroups, "_warned", False)
    cert, ca_pem = bundle(ca, "a.example"), ca.cert_pem.bytes()
    for mode in core.ClientAuthMode:  # verify modes none, optional and required
        tls.server_context(cert, alpn=tls.HTTP_ALPN, client_auth=core.ClientAuth(mode=mode, ca_pem=ca_pem))
    for verify in (True, False):
        tls.upstream_context(core.UpstreamTLS(verify=verify, ca_pem=ca_pem, server_name=""))
    assert "falling back" not in caplog.text


@pytest.fixture(params=["another-context", "unknown"])
def fallback(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The handle read from a context is another context's (alike in options and verify
    mode, so only the guard's flip tells them apart), or cannot be read at all."""
    decoy = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    real = sslctx.ssl_ctx_address

    def address(ctx: ssl.SSLContext) -> int | None:
        if request.param == "unknown":
            return None
        decoy.options, decoy.verify_mode = ctx.options, ctx.verify_mode
        return real(decoy)

    monkeypatch.setattr(sslctx, "ssl_ctx_address", address)
    monkeypatch.setattr(tlsgroups, "_warned", False)


@pytest.mark.usefixtures("fallback")
def test_a_context_whose_handle_fails_the_guard_offers_p256_alone(
    ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    server = tls.server_context(bundle(ca, "a.example"), alpn=(), client_auth=None)
    assert "falling back to P-256 alone" in caplog.text
    assert handshake(server, client_offering(ca, "prime256v1"), "a.example").ok
    for group in ("X25519", "secp384r1", "X448", "secp521r1"):
        assert not handshake(server, client_offering(ca, group), "a.example").ok, group
