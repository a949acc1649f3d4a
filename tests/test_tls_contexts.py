"""TLS contexts: one per host setting, chosen by SNI, each with its own client-cert rules.

``build_sni_table`` and ``lookup`` are pure and tested as such. Handshakes against a
host's own context (``table.exact[name][1]``, what the node passes to ``start_tls``)
run over two ``ssl.MemoryBIO`` pairs, no sockets. Client certificates and session
resumption across hosts are tested end to end through a running node, because
what matters there is that the node starts TLS with the right host's context.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import ssl
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from proxycore import tls
from proxycore.config import (
    CertificateBundle,
    ClientAuth,
    ClientAuthMode,
    HostRoute,
    Mode,
    Snapshot,
    Target,
    Upstream,
    UpstreamTLS,
)
from tests.proxyharness import TLS_VERSIONS, bundle, handshake_failures, read_response, running_node
from tests.proxyharness import Upstream as HarnessUpstream
from tests.proxyharness import client_context as node_client

UPSTREAM = Upstream("app", (Target("127.0.0.1", 9),))

# OpenSSL's message callback and its enums are private in ``ssl``; they are the one way
# to see which handshake messages a server sent (is there a CertificateRequest?).
TLSMessage: Any = ssl._TLSMessageType  # type: ignore[attr-defined]
TLSContent: Any = ssl._TLSContentType  # type: ignore[attr-defined]

# ---- PKI and snapshots -------------------------------------------------------------


def der(leaf: trustme.LeafCert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())


def bundle_of(leaf: trustme.LeafCert, name: str) -> CertificateBundle:
    cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    return CertificateBundle(
        name=name,
        chain_pem=b"".join(blob.bytes() for blob in leaf.cert_chain_pems),
        key_pem=leaf.private_key_pem.bytes(),
        fingerprint_sha256=hashlib.sha256(der(leaf)).hexdigest(),
        serial=format(cert.serial_number, "x"),
        sans=(),
        not_after=cert.not_valid_after_utc,
    )


@dataclass
class PKI:
    ca: trustme.CA
    leaves: dict[str, trustme.LeafCert]
    bundles: dict[str, CertificateBundle]
    client_ca: trustme.CA
    client: trustme.LeafCert  # issued by client_ca
    stranger: trustme.LeafCert  # issued by a CA nobody trusts


@pytest.fixture(scope="module")
def pki() -> PKI:
    ca = trustme.CA()
    names = {"a": "a.example", "b": "b.example", "wild": "*.w.example", "x": "x.w.example",
             "default": "default.example", "m": "m.example", "o": "o.example"}
    leaves = {key: ca.issue_cert(name) for key, name in names.items()}
    client_ca = trustme.CA()
    return PKI(ca, leaves, {key: bundle_of(leaf, key) for key, leaf in leaves.items()},
               client_ca, client_ca.issue_cert("client@example"),
               trustme.CA().issue_cert("client@example"))


def host(name: str, names: tuple[str, ...], cert: CertificateBundle | None, **fields: Any) -> HostRoute:
    fields.setdefault("mode", Mode.HTTP)
    fields.setdefault("upstream", UPSTREAM)
    return HostRoute(name=name, names=names, certificate=cert, **fields)


def client_auth(pki: PKI, mode: ClientAuthMode) -> ClientAuth:
    return ClientAuth(mode=mode, ca_pem=pki.client_ca.cert_pem.bytes())


def standard_snapshot(pki: PKI, **fields: Any) -> Snapshot:
    b = pki.bundles
    hosts = (
        host("a", ("a.example",), b["a"]),
        host("b", ("b.example",), b["b"]),
        host("wild", ("*.w.example",), b["wild"]),
        host("x", ("x.w.example",), b["x"]),
        host("tcp", ("o.example",), b["o"], mode=Mode.TCP),
        host("mtls", ("m.example",), b["m"], client_auth=client_auth(pki, ClientAuthMode.REQUIRED)),
    )
    return Snapshot(revision=1, hosts=hosts, default_certificate=b["default"], **fields)


def context_of(table: tls.SNITable, name: str) -> ssl.SSLContext:
    """The context the node starts TLS with for ``name``."""
    _, ctx = tls.lookup(table, name)
    assert ctx is not None
    return ctx


# ---- a handshake without sockets -----------------------------------------------------


@dataclass
class Handshake:
    server: ssl.SSLObject
    client: ssl.SSLObject
    server_error: ssl.SSLError | None
    client_error: ssl.SSLError | None

    @property
    def ok(self) -> bool:
        return self.server_error is None and self.client_error is None

    def served(self) -> bytes | None:
        return self.client.getpeercert(binary_form=True)


def client_context(pki: PKI, *, cert: trustme.LeafCert | None = None, check_hostname: bool = True,
                   max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    pki.ca.configure_trust(ctx)
    ctx.check_hostname = check_hostname
    if max_version is not None:
        ctx.maximum_version = max_version
    if cert is not None:
        cert.configure_cert(ctx)
    return ctx


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, sni: str | None) -> Handshake:
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=sni)
    result = Handshake(server, client, None, None)
    client_done = server_done = False
    for _ in range(10):
        if not client_done and result.client_error is None:
            try:
                client.do_handshake()
                client_done = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                result.client_error = exc
        s_in.write(c_out.read())
        if not server_done and result.server_error is None:
            try:
                server.do_handshake()
                server_done = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                result.server_error = exc
        c_in.write(s_out.read())
        if (client_done or result.client_error) and (server_done or result.server_error):
            break
    return result


# ---- choosing the context ---------------------------------------------------------------


def test_lookup_picks_exact_name_then_one_label_wildcard_then_default(pki: PKI) -> None:
    table = tls.build_sni_table(standard_snapshot(pki))
    for name, key in (("a.example", "a"), ("b.example", "b"), ("y.w.example", "wild"),
                      ("o.example", "tcp"), ("m.example", "mtls")):
        expected = table.exact[name] if name in table.exact else table.wildcard["w.example"]
        assert tls.lookup(table, name) == expected
        assert expected[0].name == key
    # A wildcard covers one label: not two, not the bare parent.
    for unknown in ("z.y.w.example", "w.example", "nobody.example", None):
        assert tls.lookup(table, unknown) == (None, table.default), unknown


def test_exact_name_beats_wildcard(pki: PKI) -> None:
    table = tls.build_sni_table(standard_snapshot(pki))
    route, ctx = tls.lookup(table, "x.w.example")
    assert route is not None and route.name == "x"
    assert ctx is not None and handshake(ctx, client_context(pki), "x.w.example").served() == der(
        pki.leaves["x"])


@pytest.mark.parametrize("sni", ["nobody.example", "q.r.w.example", None])
def test_strict_mode_has_nothing_for_unknown_or_missing_sni(pki: PKI, sni: str | None) -> None:
    table = tls.build_sni_table(standard_snapshot(pki, strict_sni=True))
    assert tls.lookup(table, sni) == (None, None)
    route, _ = tls.lookup(table, "a.example")
    assert route is not None and route.name == "a"


def test_lookup_lowercases_and_strips_trailing_dot(pki: PKI) -> None:
    table = tls.build_sni_table(standard_snapshot(pki))
    route, ctx = tls.lookup(table, "A.Example.")
    assert route is not None and route.name == "a" and ctx is table.exact["a.example"][1]
    wild, _ = tls.lookup(table, "Q.W.EXAMPLE")
    assert wild is not None and wild.name == "wild"
    assert tls.lookup(table, "") == (None, table.default)


def test_without_default_certificate_unknown_sni_has_no_context(pki: PKI) -> None:
    table = tls.build_sni_table(replace(standard_snapshot(pki), default_certificate=None))
    assert tls.lookup(table, "nobody.example") == (None, None)
    assert tls.lookup(table, "a.example")[1] is not None


def test_a_host_without_certificate_is_refused_never_given_the_default(pki: PKI) -> None:
    # The default certificate is for clients that name no known host; a named host with no
    # certificate of its own would get another host's (browsers refuse it): refused instead.
    snap = Snapshot(1, (host("bare", ("bare.example",), None),), default_certificate=pki.bundles["default"])
    for table in (tls.build_sni_table(snap), tls.build_sni_table(replace(snap, default_certificate=None))):
        route, ctx = tls.lookup(table, "bare.example")
        assert route is not None and route.name == "bare" and ctx is None
    assert tls.lookup(tls.build_sni_table(snap), "nobody.example")[1] is not None  # still the default


def test_each_host_context_serves_that_hosts_certificate(pki: PKI) -> None:
    table = tls.build_sni_table(standard_snapshot(pki))
    for name, key in (("a.example", "a"), ("b.example", "b"), ("x.w.example", "x"), ("o.example", "o")):
        result = handshake(table.exact[name][1], client_context(pki), name)
        assert result.ok, name
        assert result.served() == der(pki.leaves[key])
    assert table.default is not None
    result = handshake(table.default, client_context(pki, check_hostname=False), None)
    assert result.ok and result.served() == der(pki.leaves["default"])


# ---- building contexts ----------------------------------------------------------------


@pytest.fixture
def built_contexts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the certificates ``server_context`` builds a context for."""
    built: list[str] = []
    real = tls.server_context

    def counting(bundle: CertificateBundle, **kwargs: Any) -> ssl.SSLContext:
        built.append(bundle.name)
        return real(bundle, **kwargs)

    monkeypatch.setattr(tls, "server_context", counting)
    return built


def test_hosts_sharing_a_certificate_share_one_context(pki: PKI, built_contexts: list[str]) -> None:
    wild = pki.bundles["wild"]
    hosts = tuple(host(f"h{i}", (f"h{i}.w.example",), wild) for i in range(1000))
    started = time.perf_counter()
    table = tls.build_sni_table(Snapshot(1, hosts))
    assert time.perf_counter() - started < 2
    assert built_contexts == ["wild"]
    assert len({id(ctx) for _, ctx in table.exact.values()}) == 1


def test_a_context_is_built_per_certificate_client_auth_and_alpn(pki: PKI, built_contexts: list[str]) -> None:
    cert = pki.bundles["wild"]
    required = client_auth(pki, ClientAuthMode.REQUIRED)
    hosts = (
        host("h0", ("h0.w.example",), cert),
        host("h1", ("h1.w.example",), cert),
        host("tcp", ("h2.w.example",), cert, mode=Mode.TCP),  # no ALPN
        host("m0", ("h3.w.example",), cert, client_auth=required),
        host("m1", ("h4.w.example",), cert, client_auth=required),
        host("opt", ("h5.w.example",), cert, client_auth=client_auth(pki, ClientAuthMode.OPTIONAL)),
        host("off", ("h6.w.example",), cert, client_auth=ClientAuth(ClientAuthMode.OFF, b"ignored")),
    )
    table = tls.build_sni_table(Snapshot(1, hosts))
    ctx = {name[:2]: choice[1] for name, choice in table.exact.items()}
    assert ctx["h0"] is ctx["h1"] is ctx["h6"]
    assert ctx["h3"] is ctx["h4"]
    assert len({id(c) for c in (ctx["h0"], ctx["h2"], ctx["h3"], ctx["h5"])}) == 4
    assert len(built_contexts) == 4
    assert ctx["h3"].verify_mode == ssl.CERT_REQUIRED
    assert ctx["h5"].verify_mode == ssl.CERT_OPTIONAL
    assert ctx["h0"].verify_mode == ctx["h2"].verify_mode == ssl.CERT_NONE


def test_context_settings_follow_mozilla_intermediate(pki: PKI) -> None:
    table = tls.build_sni_table(standard_snapshot(pki))
    assert table.default is not None
    for ctx in (table.exact["a.example"][1], table.exact["m.example"][1], table.default):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
        assert ctx.options & ssl.OP_NO_COMPRESSION
        assert ctx.options & ssl.OP_NO_RENEGOTIATION
        assert not ctx.options & ssl.OP_CIPHER_SERVER_PREFERENCE
        assert not ctx.options & ssl.OP_NO_TICKET
        tls12 = {c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"}
        assert tls12 == set(tls.INTERMEDIATE_CIPHERS.split(":"))


def test_bad_key_raises_config_error_naming_the_certificate(pki: PKI) -> None:
    wrong = replace(pki.bundles["a"], name="shop", key_pem=pki.bundles["b"].key_pem)
    with pytest.raises(tls.TLSConfigError, match="certificate 'shop': key does not match"):
        tls.build_sni_table(Snapshot(1, (host("a", ("a.example",), wrong),)))
    garbage = replace(pki.bundles["a"], name="junk", chain_pem=b"not a certificate")
    with pytest.raises(tls.TLSConfigError, match="certificate 'junk': chain or key is not valid PEM"):
        tls.build_sni_table(Snapshot(1, (), default_certificate=garbage))
    no_key = replace(pki.bundles["a"], name="keyless", key_pem=b"-----BEGIN PRIVATE KEY-----\nxx\n")
    with pytest.raises(tls.TLSConfigError, match="certificate 'keyless'"):
        tls.build_sni_table(Snapshot(1, (host("a", ("a.example",), no_key),)))


def test_encrypted_key_is_refused_without_prompting(pki: PKI) -> None:
    key = serialization.load_pem_private_key(pki.bundles["a"].key_pem, password=None)
    locked = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.BestAvailableEncryption(b"secret"))
    with pytest.raises(tls.TLSConfigError, match="certificate 'a': key is encrypted"):
        tls.build_sni_table(Snapshot(1, (host("a", ("a.example",), replace(pki.bundles["a"], key_pem=locked)),)))


def test_bad_client_ca_bundle_names_the_host(pki: PKI) -> None:
    bad = ClientAuth(mode=ClientAuthMode.REQUIRED, ca_pem=b"-----BEGIN CERTIFICATE-----\nxx\n")
    snap = Snapshot(1, (host("api", ("a.example",), pki.bundles["a"], client_auth=bad),))
    with pytest.raises(tls.TLSConfigError, match="host 'api': client CA bundle is not valid PEM"):
        tls.build_sni_table(snap)
    binary = replace(snap, hosts=(replace(snap.hosts[0], client_auth=replace(bad, ca_pem=b"\xff\xfe")),))
    with pytest.raises(tls.TLSConfigError, match="host 'api': client CA bundle is not valid PEM"):
        tls.build_sni_table(binary)
    empty = replace(snap, hosts=(replace(snap.hosts[0], client_auth=ClientAuth(ClientAuthMode.OPTIONAL)),))
    with pytest.raises(tls.TLSConfigError, match=r"host 'api': .* no CA bundle"):
        tls.build_sni_table(empty)


def test_a_name_claimed_by_two_hosts_is_refused(pki: PKI) -> None:
    b = pki.bundles
    snap = Snapshot(1, (host("one", ("a.example",), b["a"]), host("two", ("A.example.",), b["a"])))
    claimed = re.escape("host 'two': name 'a.example' is already served by host 'one'")
    with pytest.raises(tls.TLSConfigError, match=claimed):
        tls.build_sni_table(snap)
    wild = Snapshot(1, (host("one", ("*.w.example",), b["wild"]), host("two", ("*.W.example",), b["wild"])))
    with pytest.raises(tls.TLSConfigError, match=re.escape("name '*.w.example' is already served")):
        tls.build_sni_table(wild)


@pytest.fixture
def file_writes() -> Iterator[list[str]]:
    """Paths opened for writing (or created) through Python while the test runs."""
    seen: list[str] = []
    active = [True]
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if not active[0] or event != "open":
            return
        path, mode, flags = args
        if (isinstance(mode, str) and set(mode) & set("wax+")) or (flags or 0) & write_flags:
            seen.append(str(path))

    sys.addaudithook(hook)  # hooks cannot be removed: this one goes quiet after the test
    yield seen
    active[0] = False


def test_private_key_is_never_written_to_a_file(
    pki: PKI, file_writes: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    memfds: list[str] = []
    real_memfd = os.memfd_create

    def spy(name: str, flags: int = os.MFD_CLOEXEC) -> int:
        memfds.append(name)
        return real_memfd(name, flags)

    monkeypatch.setattr(os, "memfd_create", spy)
    table = tls.build_sni_table(standard_snapshot(pki))
    assert memfds, "keys are loaded through memfd"
    assert file_writes == []
    assert handshake(context_of(table, "a.example"), client_context(pki), "a.example").ok


def test_without_memfd_the_key_goes_through_an_unlinked_tmpfs_file(
    pki: PKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    shm = tls._tmpfs_directory()
    if shm is None:
        pytest.skip("no tmpfs on this machine")

    def unavailable(*args: Any) -> int:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(os, "memfd_create", unavailable)
    before = set(os.listdir(shm))
    created: list[str] = []
    real_mkstemp = tls.tempfile.mkstemp

    def mkstemp(**kwargs: Any) -> tuple[int, str]:
        fd, path = real_mkstemp(**kwargs)
        created.append(path)
        assert os.stat(fd).st_mode & 0o777 == 0o600
        return fd, path

    monkeypatch.setattr(tls.tempfile, "mkstemp", mkstemp)
    table = tls.build_sni_table(standard_snapshot(pki))
    assert created and all(p.startswith(shm) for p in created)
    assert not set(os.listdir(shm)) - before
    assert handshake(context_of(table, "b.example"), client_context(pki), "b.example").ok


def test_without_memfd_or_tmpfs_the_build_fails_rather_than_write_to_disk(
    pki: PKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unavailable(*args: Any) -> int:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(os, "memfd_create", unavailable)
    monkeypatch.setattr(tls, "_tmpfs_directory", lambda: None)
    with pytest.raises(tls.TLSConfigError, match="refusing to write it to disk"):
        tls.build_sni_table(standard_snapshot(pki))


# ---- protocol versions, ciphers, ALPN --------------------------------------------------


def test_tls11_client_is_refused(pki: PKI) -> None:
    ctx = client_context(pki)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    table = tls.build_sni_table(standard_snapshot(pki))
    result = handshake(context_of(table, "a.example"), ctx, "a.example")
    assert result.server_error is not None
    assert tls.handshake_failure_reason(result.server_error) == "protocol_version"


@pytest.mark.parametrize("version", TLS_VERSIONS)
def test_alpn_http11_for_http_hosts_and_none_for_tcp_hosts(pki: PKI, version: ssl.TLSVersion) -> None:
    table = tls.build_sni_table(standard_snapshot(pki))
    ctx = client_context(pki, max_version=version)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    http = handshake(context_of(table, "a.example"), ctx, "a.example")
    assert http.ok and http.client.selected_alpn_protocol() == "http/1.1"
    tcp = handshake(context_of(table, "o.example"), ctx, "o.example")
    assert tcp.ok and tcp.client.selected_alpn_protocol() is None
    h2_only = client_context(pki, max_version=version)
    h2_only.set_alpn_protocols(["h2"])
    # No overlap: the handshake carries on without ALPN rather than failing.
    no_overlap = handshake(context_of(table, "a.example"), h2_only, "a.example")
    assert no_overlap.ok and no_overlap.client.selected_alpn_protocol() is None


def test_ecdhe_suites_are_negotiated_by_default(pki: PKI) -> None:
    table = tls.build_sni_table(standard_snapshot(pki))
    result = handshake(context_of(table, "a.example"),
                       client_context(pki, max_version=ssl.TLSVersion.TLSv1_2), "a.example")
    cipher = result.client.cipher()
    assert result.ok and cipher is not None and cipher[0] in tls.INTERMEDIATE_CIPHERS.split(":")
    assert cipher[0].startswith("ECDHE-")


def test_dhe_suites_work_with_an_rsa_certificate() -> None:
    ca = trustme.CA(key_type=trustme.KeyType.RSA)
    leaf = ca.issue_cert("rsa.example", key_type=trustme.KeyType.RSA)
    table = tls.build_sni_table(Snapshot(1, (host("rsa", ("rsa.example",), bundle_of(leaf, "rsa")),)))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(ctx)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("DHE-RSA-AES128-GCM-SHA256")
    result = handshake(context_of(table, "rsa.example"), ctx, "rsa.example")
    assert result.ok
    assert result.client.cipher() == ("DHE-RSA-AES128-GCM-SHA256", "TLSv1.2", 128)


def test_a_suite_outside_the_intermediate_list_is_refused(pki: PKI) -> None:
    ctx = client_context(pki, max_version=ssl.TLSVersion.TLSv1_2)
    ctx.set_ciphers("AES128-SHA")  # RSA key exchange, CBC: not intermediate
    table = tls.build_sni_table(standard_snapshot(pki))
    result = handshake(context_of(table, "a.example"), ctx, "a.example")
    assert result.server_error is not None
    assert tls.handshake_failure_reason(result.server_error) == "no_shared_cipher"


# ---- client certificates against one host context ---------------------------------------


def received_handshake_messages(ctx: ssl.SSLContext) -> list[int]:
    """Handshake messages ``ctx``'s connections receive (OpenSSL's message callback)."""
    seen: list[int] = []

    def record(conn: object, direction: str, version: object, content_type: object,
               msg_type: int, data: bytes) -> None:
        if direction == "read" and content_type == TLSContent.HANDSHAKE:
            seen.append(msg_type)

    ctx._msg_callback = record  # type: ignore[attr-defined]
    return seen


@pytest.mark.parametrize("version", TLS_VERSIONS)
def test_host_without_client_auth_requests_no_certificate(pki: PKI, version: ssl.TLSVersion) -> None:
    table = tls.build_sni_table(standard_snapshot(pki))
    ctx = client_context(pki, cert=pki.client, max_version=version)
    seen = received_handshake_messages(ctx)
    result = handshake(context_of(table, "a.example"), ctx, "a.example")
    assert result.ok
    assert TLSMessage.CERTIFICATE in seen
    assert TLSMessage.CERTIFICATE_REQUEST not in seen
    assert result.server.getpeercert() is None
    seen.clear()
    mtls = handshake(context_of(table, "m.example"), ctx, "m.example")
    assert mtls.ok and TLSMessage.CERTIFICATE_REQUEST in seen  # the check can see one


def test_the_client_ca_list_is_the_hosts_own(pki: PKI) -> None:
    table = tls.build_sni_table(standard_snapshot(pki))
    assert context_of(table, "a.example").get_ca_certs() == []
    client_ca = ssl.PEM_cert_to_DER_cert(pki.client_ca.cert_pem.bytes().decode())
    assert context_of(table, "m.example").get_ca_certs(binary_form=True) == [client_ca]


# ---- client certificates through the node ------------------------------------------------


def node_snapshot(ca: trustme.CA, client_ca: trustme.CA, port: int, mode: ClientAuthMode) -> Snapshot:
    """Hosts a (no client auth) and m (``mode``), on ONE certificate: only the auth differs."""
    shared = bundle(ca, "a.example", "m.example", name="shared")
    auth = ClientAuth(mode=mode, ca_pem=client_ca.cert_pem.bytes())
    return Snapshot(
        revision=1,
        hosts=(host("a", ("a.example",), shared, upstream=Upstream("a-up", (Target("127.0.0.1", port),))),
               host("m", ("m.example",), shared, client_auth=auth,
                    upstream=Upstream("m-up", (Target("127.0.0.1", port),)))),
    )


@pytest.fixture(scope="module")
def client_ca() -> trustme.CA:
    return trustme.CA()


@dataclass
class Exchange:
    """One HTTPS request through the node, or why it did not get a response."""

    status: int | None = None
    error: BaseException | None = None
    session: ssl.SSLSession | None = None
    session_reused: bool = False
    version: str | None = None


def exchange(port: int, ctx: ssl.SSLContext, name: str, session: ssl.SSLSession | None = None) -> Exchange:
    result = Exchange()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, ctx.wrap_socket(
            raw, server_hostname=name, session=session
        ) as sock:
            result.version = sock.version()
            sock.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\n\r\n".encode())
            # In TLS 1.3 the client's handshake ends first: a refusal comes on this read.
            result.status, _, _ = read_response(sock)
            result.session, result.session_reused = sock.session, bool(sock.session_reused)
    except (ssl.SSLError, OSError) as exc:
        result.error = exc
    return result


@pytest.mark.parametrize("version", TLS_VERSIONS)
def test_required_client_cert_missing_or_foreign_fails_and_good_one_passes(
    ca: trustme.CA, client_ca: trustme.CA, upstream: HarnessUpstream, version: ssl.TLSVersion
) -> None:
    good, stranger = client_ca.issue_cert("client@example"), trustme.CA().issue_cert("client@example")
    with running_node(node_snapshot(ca, client_ca, upstream.port, ClientAuthMode.REQUIRED)) as node:
        port = node.https_port
        missing = exchange(port, node_client(ca, version=version), "m.example")
        assert missing.status is None and missing.error is not None
        assert handshake_failures(node, "m", {"no_client_cert": 1}) == {"no_client_cert": 1}
        foreign = exchange(port, node_client(ca, stranger, version), "m.example")
        assert foreign.status is None and foreign.error is not None
        expected = {"no_client_cert": 1, "bad_client_cert": 1}
        assert handshake_failures(node, "m", expected) == expected
        passed = exchange(port, node_client(ca, good, version), "m.example")
        assert passed.error is None and passed.status == 200
        assert passed.version == ("TLSv1.3" if version is ssl.TLSVersion.TLSv1_3 else "TLSv1.2")
        # The same certificate without client auth, on the same node: no certificate asked.
        assert exchange(port, node_client(ca, version=version), "a.example").status == 200
        stats = node.stats()["hosts"]
    assert stats["m"]["handshakes_ok"] == 1 and stats["a"]["handshakes_ok"] == 1
    assert stats["a"]["handshakes_failed"] == {}
    assert len(upstream.requests) == 2


@pytest.mark.parametrize("version", TLS_VERSIONS)
def test_optional_client_cert_may_be_absent_but_not_foreign(
    ca: trustme.CA, client_ca: trustme.CA, upstream: HarnessUpstream, version: ssl.TLSVersion
) -> None:
    good, stranger = client_ca.issue_cert("client@example"), trustme.CA().issue_cert("client@example")
    with running_node(node_snapshot(ca, client_ca, upstream.port, ClientAuthMode.OPTIONAL)) as node:
        port = node.https_port
        assert exchange(port, node_client(ca, version=version), "m.example").status == 200
        assert exchange(port, node_client(ca, good, version), "m.example").status == 200
        foreign = exchange(port, node_client(ca, stranger, version), "m.example")
        assert foreign.status is None
        assert handshake_failures(node, "m", {"bad_client_cert": 1}) == {"bad_client_cert": 1}
        assert node.stats()["hosts"]["m"]["handshakes_ok"] == 2


@pytest.mark.parametrize("version", TLS_VERSIONS)
def test_node_never_asks_a_certificate_for_a_host_without_client_auth(
    ca: trustme.CA, client_ca: trustme.CA, upstream: HarnessUpstream, version: ssl.TLSVersion
) -> None:
    ctx = node_client(ca, client_ca.issue_cert("client@example"), version)
    seen = received_handshake_messages(ctx)
    with running_node(node_snapshot(ca, client_ca, upstream.port, ClientAuthMode.REQUIRED)) as node:
        assert exchange(node.https_port, ctx, "a.example").status == 200
        assert TLSMessage.CERTIFICATE_REQUEST not in seen
        assert exchange(node.https_port, ctx, "m.example").status == 200
        assert TLSMessage.CERTIFICATE_REQUEST in seen


@pytest.mark.parametrize("version", TLS_VERSIONS)
def test_a_session_from_another_host_does_not_resume_past_client_auth(
    ca: trustme.CA, client_ca: trustme.CA, upstream: HarnessUpstream, version: ssl.TLSVersion
) -> None:
    """a and m share a certificate; only m requires client certificates. A session (ticket)
    from a must not let a client skip m's certificate check: each host context has its own
    ticket keys and session cache, so it is not even resumed."""
    with running_node(node_snapshot(ca, client_ca, upstream.port, ClientAuthMode.REQUIRED)) as node:
        port = node.https_port
        plain = node_client(ca, version=version)
        first = exchange(port, plain, "a.example")
        assert first.status == 200 and first.session is not None and first.session.has_ticket
        again = exchange(port, plain, "a.example", session=first.session)
        assert again.status == 200 and again.session_reused  # the session is a good one

        stolen = exchange(port, plain, "m.example", session=first.session)
        assert stolen.status is None and stolen.error is not None
        assert handshake_failures(node, "m", {"no_client_cert": 1}) == {"no_client_cert": 1}

        # Python ties a session to the context that made it: a second client, with a cert.
        with_cert = node_client(ca, client_ca.issue_cert("client@example"), version)
        own = exchange(port, with_cert, "a.example")
        assert own.status == 200 and own.session is not None
        crossed = exchange(port, with_cert, "m.example", session=own.session)
        assert crossed.status == 200 and crossed.session_reused is False
        stats = node.stats()["hosts"]
    assert stats["a"]["handshakes_ok"] == 3 and stats["m"]["handshakes_ok"] == 1


# ---- failure reasons, upstream contexts ---------------------------------------------------


def test_handshake_failure_reasons_are_short_stable_keys() -> None:
    aborted = ConnectionAbortedError("SSL handshake is taking longer than 5 seconds: aborting the connection")
    cases: list[tuple[BaseException | type[BaseException], str]] = [
        (TimeoutError(), "timeout"),
        (aborted, "timeout"),
        (ConnectionResetError, "eof"),  # uvloop passes the class
        (ConnectionResetError(104, "reset"), "eof"),
        (ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), "eof"),
        (ssl.SSLCertVerificationError(1, "certificate verify failed"), "bad_client_cert"),
        (ValueError("odd"), "other"),
    ]
    for exc, key in cases:
        assert tls.handshake_failure_reason(exc) == key
        assert key in tls.HANDSHAKE_FAILURE_REASONS


@pytest.mark.parametrize("version", TLS_VERSIONS)
def test_client_cert_failures_of_a_host_context_have_their_reasons(
    pki: PKI, version: ssl.TLSVersion
) -> None:
    table = tls.build_sni_table(standard_snapshot(pki))
    mtls = context_of(table, "m.example")
    missing = handshake(mtls, client_context(pki, max_version=version), "m.example")
    assert missing.server_error is not None
    assert tls.handshake_failure_reason(missing.server_error) == "no_client_cert"
    foreign = handshake(mtls, client_context(pki, cert=pki.stranger, max_version=version), "m.example")
    assert foreign.server_error is not None
    assert tls.handshake_failure_reason(foreign.server_error) == "bad_client_cert"
    good = handshake(mtls, client_context(pki, cert=pki.client, max_version=version), "m.example")
    assert good.ok and good.server.getpeercert(binary_form=True) == der(pki.client)


def backend(pki: PKI) -> ssl.SSLContext:
    """An upstream that serves backend.internal and requires a client cert from client_ca."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    pki.ca.issue_cert("backend.internal").configure_cert(ctx)
    ctx.verify_mode = ssl.CERT_REQUIRED
    pki.client_ca.configure_trust(ctx)
    return ctx


def test_upstream_context_verifies_name_and_ca_and_presents_client_cert(pki: PKI) -> None:
    server = backend(pki)
    settings = UpstreamTLS(verify=True, ca_pem=pki.ca.cert_pem.bytes(), server_name="backend.internal",
                           client_certificate=bundle_of(pki.client, "to-backend"))
    ctx = tls.upstream_context(settings)
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    assert tls.upstream_server_name(settings, "10.0.0.7") == "backend.internal"
    assert tls.upstream_server_name(replace(settings, server_name=""), "10.0.0.7") == "10.0.0.7"
    result = handshake(server, ctx, tls.upstream_server_name(settings, "10.0.0.7"))
    assert result.ok and result.server.getpeercert(binary_form=True) == der(pki.client)
    wrong_name = handshake(server, ctx, "other.internal")
    assert isinstance(wrong_name.client_error, ssl.SSLCertVerificationError)
    other_ca = tls.upstream_context(replace(settings, ca_pem=trustme.CA().cert_pem.bytes()))
    assert isinstance(handshake(server, other_ca, "backend.internal").client_error,
                      ssl.SSLCertVerificationError)


def test_upstream_context_without_verification_accepts_any_certificate(pki: PKI) -> None:
    settings = UpstreamTLS(verify=False, ca_pem=b"", server_name="",
                           client_certificate=bundle_of(pki.client, "to-backend"))
    loose = tls.upstream_context(settings)
    assert loose.verify_mode == ssl.CERT_NONE and not loose.check_hostname
    assert handshake(backend(pki), loose, "other.internal").ok
    no_cert = tls.upstream_context(replace(settings, client_certificate=None))
    failed = handshake(backend(pki), no_cert, "backend.internal")
    assert failed.server_error is not None  # the backend wanted one


def test_upstream_context_rejects_bad_ca_and_uses_system_store_when_empty(
    pki: PKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(tls.TLSConfigError, match="upstream 'app': CA bundle is not valid PEM"):
        tls.upstream_context(UpstreamTLS(True, b"\xff\xfe", ""), label="upstream 'app'")
    with pytest.raises(tls.TLSConfigError, match="upstream 'app': CA bundle is not valid PEM"):
        tls.upstream_context(UpstreamTLS(True, b"-----BEGIN CERTIFICATE-----\nxx\n", ""),
                             label="upstream 'app'")
    loaded: list[ssl.Purpose] = []
    real = ssl.SSLContext.load_default_certs

    def spy(self: ssl.SSLContext, purpose: ssl.Purpose = ssl.Purpose.SERVER_AUTH) -> None:
        loaded.append(purpose)
        real(self, purpose)

    monkeypatch.setattr(ssl.SSLContext, "load_default_certs", spy)
    system = tls.upstream_context(UpstreamTLS(True, b"", ""))
    assert loaded == [ssl.Purpose.SERVER_AUTH]
    assert system.verify_mode == ssl.CERT_REQUIRED and system.check_hostname
    assert system.minimum_version == ssl.TLSVersion.TLSv1_2
    assert system.options & ssl.OP_NO_COMPRESSION
    # An explicit CA bundle replaces the system store.
    loaded.clear()
    tls.upstream_context(UpstreamTLS(True, pki.ca.cert_pem.bytes(), ""))
    assert loaded == []


def test_upstream_context_names_a_bad_client_certificate(pki: PKI) -> None:
    wrong = replace(bundle_of(pki.client, "to-backend"), key_pem=pki.bundles["a"].key_pem)
    with pytest.raises(tls.TLSConfigError, match="certificate 'to-backend': key does not match"):
        tls.upstream_context(UpstreamTLS(True, b"", "", client_certificate=wrong))


def test_upstream_alpn_is_offered_when_asked(pki: PKI) -> None:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    pki.ca.issue_cert("backend.internal").configure_cert(server)
    server.set_alpn_protocols(["http/1.1"])
    ctx = tls.upstream_context(UpstreamTLS(True, pki.ca.cert_pem.bytes(), ""), alpn=("http/1.1",))
    result = handshake(server, ctx, "backend.internal")
    assert result.ok and result.client.selected_alpn_protocol() == "http/1.1"


def test_every_failure_reason_is_listed() -> None:
    assert set(tls._SSL_REASONS.values()) <= set(tls.HANDSHAKE_FAILURE_REASONS)
    assert {"timeout", "eof", "other"} <= set(tls.HANDSHAKE_FAILURE_REASONS)
