"""Client certificates (mTLS): per host off / optional / required against the host's CA bundle.

A handshake without a certificate, with one from another CA, or with an expired one fails
on a host that requires one, and is counted by reason. A verified certificate reaches the
upstream as the RFC 9440 ``Client-Cert`` header (``:base64(DER):``), and with
``forward_chain`` the ``Client-Cert-Chain`` header too. A ``Client-Cert*`` header the
client sends is never passed on, whatever the host's settings.

Python 3.11 does not expose the certificates the client sent after the leaf (3.13's
``get_verified_chain`` does not exist yet), so ``Client-Cert-Chain`` is rebuilt from the
host's own CA bundle: the issuers of the leaf, up to a root, that the bundle holds. An
intermediate the client sent but the bundle lacks cannot be put in the chain; the header
is then left out rather than sent incomplete.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import shutil
import socket
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from proxycore import config as core
from tests.proxyharness import (
    TLS_VERSIONS,
    RunningNode,
    Upstream,
    bundle,
    client_context,
    handshake_failures,
    read_response,
    route,
    running_node,
)

NAMES = ("m.example", "o.example", "a.example", "n.example", "c.example")


# ---- PKI, snapshot, requests ---------------------------------------------------------


def der_of(leaf: trustme.LeafCert | trustme.CA) -> bytes:
    pem = leaf.cert_pem if isinstance(leaf, trustme.CA) else leaf.cert_chain_pems[0]
    return ssl.PEM_cert_to_DER_cert(pem.bytes().decode())


def sf_binary_list(value: str) -> list[bytes]:
    """The DER blobs of an RFC 8941 list of byte sequences (``:b64:, :b64:``)."""
    items = [item.strip() for item in value.split(",")]
    assert all(item.startswith(":") and item.endswith(":") and len(item) > 2 for item in items), value
    return [base64.b64decode(item[1:-1], validate=True) for item in items]


@pytest.fixture
def client_ca() -> trustme.CA:
    return trustme.CA()


def auth(ca_pem: bytes, mode: core.ClientAuthMode, **fields: Any) -> core.ClientAuth:
    return core.ClientAuth(mode=mode, ca_pem=ca_pem, **fields)


def snapshot(ca: trustme.CA, client_ca: trustme.CA, port: int, *, chain_ca_pem: bytes = b"") -> core.Snapshot:
    """m: required; o: optional; a: off; n: required, not forwarded; c: required with chain.

    Every host shares one certificate, so only the client-auth settings differ.
    """
    shared = bundle(ca, *NAMES, name="shared")
    ca_pem = client_ca.cert_pem.bytes()
    required, optional = core.ClientAuthMode.REQUIRED, core.ClientAuthMode.OPTIONAL
    return core.Snapshot(revision=1, hosts=(
        route("m", ("m.example",), port, shared, client_auth=auth(ca_pem, required)),
        route("o", ("o.example",), port, shared, client_auth=auth(ca_pem, optional)),
        route("a", ("a.example",), port, shared),
        route("n", ("n.example",), port, shared, client_auth=auth(ca_pem, required, forward_cert=False)),
        route("c", ("c.example",), port, shared,
              client_auth=auth(chain_ca_pem or ca_pem, required, forward_chain=True)),
    ))


@dataclass
class Result:
    status: int | None = None
    seen: dict[str, list[str]] | None = None  # the upstream's request headers, lower-case names
    error: BaseException | None = None


def get(node: RunningNode, ctx: ssl.SSLContext, name: str, headers: bytes = b"", requests: int = 1) -> Result:
    """``requests`` GETs on one connection; the last one's status and upstream headers."""
    result = Result()
    try:
        with socket.create_connection(("127.0.0.1", node.https_port), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname=name) as sock:
            for _ in range(requests):
                sock.sendall(b"GET / HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (name.encode(), headers))
                # In TLS 1.3 the client's handshake ends first: a refusal comes on this read.
                result.status, _, body = read_response(sock)
                seen: dict[str, list[str]] = {}
                for n, v in json.loads(body)["headers"]:
                    seen.setdefault(n.lower(), []).append(v)
                result.seen = seen
    except (ssl.SSLError, OSError) as exc:
        result.error = exc
    return result


def expired_cert(client_ca: trustme.CA) -> trustme.LeafCert:
    now = dt.datetime.now(dt.UTC)
    return client_ca.issue_cert("client@example.com", not_before=now - dt.timedelta(days=30),
                                not_after=now - dt.timedelta(days=1))


# ---- required: who gets in -------------------------------------------------------------


@pytest.mark.parametrize("version", TLS_VERSIONS)
def test_required_client_cert_refuses_none_foreign_and_expired_each_by_reason(
    ca: trustme.CA, client_ca: trustme.CA, upstream: Upstream, version: ssl.TLSVersion
) -> None:
    foreign = trustme.CA().issue_cert("client@example.com")
    with running_node(snapshot(ca, client_ca, upstream.port)) as node:
        missing = get(node, client_context(ca, version=version), "m.example")
        assert missing.status is None and missing.error is not None
        assert handshake_failures(node, "m", {"no_client_cert": 1}) == {"no_client_cert": 1}

        stranger = get(node, client_context(ca, foreign, version), "m.example")
        assert stranger.status is None and stranger.error is not None
        expected = {"no_client_cert": 1, "bad_client_cert": 1}
        assert handshake_failures(node, "m", expected) == expected

        expired = get(node, client_context(ca, expired_cert(client_ca), version), "m.example")
        assert expired.status is None and expired.error is not None
        expected = {"no_client_cert": 1, "bad_client_cert": 1, "expired_client_cert": 1}
        assert handshake_failures(node, "m", expected) == expected
        stats = node.stats()["hosts"]["m"]
    assert stats["handshakes_ok"] == 0 and stats["requests"] == 0
    assert upstream.requests == []


@pytest.mark.parametrize("version", TLS_VERSIONS)
def test_verified_client_cert_reaches_the_upstream_as_client_cert_header(
    ca: trustme.CA, client_ca: trustme.CA, upstream: Upstream, version: ssl.TLSVersion
) -> None:
    good = client_ca.issue_cert("client@example.com")
    with running_node(snapshot(ca, client_ca, upstream.port)) as node:
        # Two requests on one connection: the header is made once and sent with each.
        result = get(node, client_context(ca, good, version), "m.example", requests=2)
    assert result.error is None and result.status == 200 and result.seen is not None
    assert [sf_binary_list(v) for v in result.seen["client-cert"]] == [[der_of(good)]]
    assert "client-cert-chain" not in result.seen  # forward_chain is off
    assert [len(ex.header("client-cert")) for ex in upstream.requests] == [1, 1]


def test_client_cert_chain_is_rebuilt_from_the_hosts_bundle(
    ca: trustme.CA, upstream: Upstream
) -> None:
    """Root -> intermediate -> client. The client sends its leaf and the intermediate; the
    host's bundle holds both CAs. The chain header lists the leaf's issuer first, then the
    root: what verified the leaf (RFC 9440 lets the trust anchor be included)."""
    root = trustme.CA()
    intermediate = root.create_child_ca()
    leaf = intermediate.issue_cert("client@example.com")
    both = root.cert_pem.bytes() + intermediate.cert_pem.bytes()
    with running_node(snapshot(ca, root, upstream.port, chain_ca_pem=both)) as node:
        result = get(node, client_context(ca, leaf), "c.example")
    assert result.status == 200 and result.seen is not None
    assert [sf_binary_list(v) for v in result.seen["client-cert"]] == [[der_of(leaf)]]
    assert [sf_binary_list(v) for v in result.seen["client-cert-chain"]] == [
        [der_of(intermediate), der_of(root)]
    ]


def test_client_cert_chain_is_left_out_when_the_bundle_lacks_the_intermediate(
    ca: trustme.CA, upstream: Upstream
) -> None:
    """The 3.11 limitation: the bundle has only the root, the client sent the intermediate.
    The handshake verifies (OpenSSL uses the client's intermediate), but the proxy cannot
    see that intermediate, so it sends ``Client-Cert`` alone, never a chain with a gap."""
    root = trustme.CA()
    intermediate = root.create_child_ca()
    leaf = intermediate.issue_cert("client@example.com")
    with running_node(snapshot(ca, root, upstream.port, chain_ca_pem=root.cert_pem.bytes())) as node:
        result = get(node, client_context(ca, leaf), "c.example")
    assert result.status == 200 and result.seen is not None
    assert [sf_binary_list(v) for v in result.seen["client-cert"]] == [[der_of(leaf)]]
    assert "client-cert-chain" not in result.seen


def test_client_cert_chain_of_a_leaf_issued_by_the_root_is_the_root(
    ca: trustme.CA, client_ca: trustme.CA, upstream: Upstream
) -> None:
    good = client_ca.issue_cert("client@example.com")
    with running_node(snapshot(ca, client_ca, upstream.port)) as node:
        result = get(node, client_context(ca, good), "c.example")
    assert result.status == 200 and result.seen is not None
    assert [sf_binary_list(v) for v in result.seen["client-cert-chain"]] == [[der_of(client_ca)]]


# ---- forged headers, optional, off, not forwarded -----------------------------------------

FORGED = (b"Client-Cert: :Zm9yZ2Vk:\r\nCLIENT-CERT-CHAIN: :Zm9yZ2Vk:, :Zm9yZ2Vk:\r\n"
          b"client-cert: :YWdhaW4=:\r\n")


@pytest.mark.parametrize(("name", "with_cert", "expected"), [
    pytest.param("m.example", True, "own", id="required"),
    pytest.param("o.example", True, "own", id="optional-with-cert"),
    pytest.param("o.example", False, "none", id="optional-without-cert"),
    pytest.param("a.example", True, "none", id="no-client-auth"),
    pytest.param("n.example", True, "none", id="not-forwarded"),
])
def test_client_sent_client_cert_headers_are_never_passed_on(
    ca: trustme.CA, client_ca: trustme.CA, upstream: Upstream, name: str, with_cert: bool, expected: str
) -> None:
    good = client_ca.issue_cert("client@example.com")
    with running_node(snapshot(ca, client_ca, upstream.port)) as node:
        result = get(node, client_context(ca, good if with_cert else None), name, FORGED)
    assert result.status == 200 and result.seen is not None
    own = [[der_of(good)]] if expected == "own" else []
    assert [sf_binary_list(v) for v in result.seen.get("client-cert", [])] == own
    assert "client-cert-chain" not in result.seen
    assert b"Zm9yZ2Vk" not in upstream.raw and b"YWdhaW4" not in upstream.raw


@pytest.mark.parametrize("name", ["a.example", "o.example"])
def test_client_cert_with_an_underscore_is_not_passed_on_either(
    ca: trustme.CA, client_ca: trustme.CA, upstream: Upstream, name: str
) -> None:
    with running_node(snapshot(ca, client_ca, upstream.port)) as node:
        result = get(node, client_context(ca), name,
                     b"Client_Cert: :Zm9yZ2Vk:\r\nClient-Cert_Chain: :Zm9yZ2Vk:\r\n")
    assert result.status == 200
    assert b"Zm9yZ2Vk" not in upstream.raw


@pytest.mark.parametrize("version", TLS_VERSIONS)
def test_optional_client_cert_works_with_and_without_a_certificate(
    ca: trustme.CA, client_ca: trustme.CA, upstream: Upstream, version: ssl.TLSVersion
) -> None:
    good = client_ca.issue_cert("client@example.com")
    with running_node(snapshot(ca, client_ca, upstream.port)) as node:
        without = get(node, client_context(ca, version=version), "o.example")
        with_cert = get(node, client_context(ca, good, version), "o.example")
        expired = get(node, client_context(ca, expired_cert(client_ca), version), "o.example")
        # Optional means "may be absent", not "may be bad".
        assert expired.status is None
        assert handshake_failures(node, "o", {"expired_client_cert": 1}) == {"expired_client_cert": 1}
        assert node.stats()["hosts"]["o"]["handshakes_ok"] == 2
    assert without.status == 200 and without.seen is not None
    assert "client-cert" not in without.seen
    assert with_cert.status == 200 and with_cert.seen is not None
    assert [sf_binary_list(v) for v in with_cert.seen["client-cert"]] == [[der_of(good)]]


def test_host_without_client_auth_never_forwards_a_client_cert(
    ca: trustme.CA, client_ca: trustme.CA, upstream: Upstream
) -> None:
    """The client has a certificate ready; the host never asks for it, so none is sent."""
    good = client_ca.issue_cert("client@example.com")
    with running_node(snapshot(ca, client_ca, upstream.port)) as node:
        result = get(node, client_context(ca, good), "a.example")
    assert result.status == 200 and result.seen is not None
    assert "client-cert" not in result.seen and "client-cert-chain" not in result.seen


def test_forward_cert_off_still_requires_a_certificate_but_sends_none(
    ca: trustme.CA, client_ca: trustme.CA, upstream: Upstream
) -> None:
    good = client_ca.issue_cert("client@example.com")
    with running_node(snapshot(ca, client_ca, upstream.port)) as node:
        assert get(node, client_context(ca), "n.example").status is None
        result = get(node, client_context(ca, good), "n.example")
    assert result.status == 200 and result.seen is not None
    assert "client-cert" not in result.seen


def test_a_request_for_another_host_on_an_mtls_connection_carries_no_client_cert(
    ca: trustme.CA, client_ca: trustme.CA, upstream: Upstream
) -> None:
    """SNI m, Host a: misdirected (421), so m's verified certificate never reaches a."""
    good = client_ca.issue_cert("client@example.com")
    with running_node(snapshot(ca, client_ca, upstream.port)) as node, \
            socket.create_connection(("127.0.0.1", node.https_port), timeout=10) as raw, \
            client_context(ca, good).wrap_socket(raw, server_hostname="m.example") as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
        status, _, _ = read_response(sock)
    assert status == 421
    assert upstream.requests == []


# ---- a real client ---------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_with_cert_and_key_is_let_in_and_without_is_refused(
    ca: trustme.CA, client_ca: trustme.CA, upstream: Upstream, tmp_path: Path
) -> None:
    good = client_ca.issue_cert("client@example.com")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    good.cert_chain_pems[0].write_to_path(str(tmp_path / "client.pem"))
    good.private_key_pem.write_to_path(str(tmp_path / "client.key"))

    def curl(port: int, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["curl", "--silent", "--show-error", "--max-time", "10", "--cacert", str(tmp_path / "ca.pem"),
             "--resolve", f"m.example:{port}:127.0.0.1", *args, f"https://m.example:{port}/"],
            capture_output=True, text=True, timeout=30, check=False,
        )

    with running_node(snapshot(ca, client_ca, upstream.port)) as node:
        port = node.https_port
        let_in = curl(port, "--cert", str(tmp_path / "client.pem"), "--key", str(tmp_path / "client.key"))
        refused = curl(port)
        assert handshake_failures(node, "m", {"no_client_cert": 1}) == {"no_client_cert": 1}
    assert let_in.returncode == 0, let_in.stderr
    headers = {n.lower(): v for n, v in json.loads(let_in.stdout)["headers"]}
    assert sf_binary_list(headers["client-cert"]) == [der_of(good)]
    # 35: handshake failed, 56: receive failed (TLS 1.3: the alert comes after curl's side of
    # the handshake is done). Either way curl got the node's alert and says so.
    assert refused.returncode in (35, 56), (refused.returncode, refused.stderr)
    assert "alert certificate required" in refused.stderr
    assert len(upstream.requests) == 1
