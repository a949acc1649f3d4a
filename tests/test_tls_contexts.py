"""TLS contexts and SNI: real handshakes between a client and the listener context.

Most handshakes run over two ``ssl.MemoryBIO`` pairs (no sockets): the server side is
wrapped by ``listener_context``, exactly as the event loop wraps it, the client side
by an ordinary client context trusting a trustme CA. One test per event loop runs
the same over real sockets on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import os
import re
import ssl
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import pytest
import trustme
from cryptography import x509

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

UPSTREAM = Upstream("app", (Target("127.0.0.1", 9),))


# ---- PKI and snapshots -------------------------------------------------------------


def make_bundle(leaf: trustme.LeafCert, name: str) -> CertificateBundle:
    cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    return CertificateBundle(
        name=name,
        chain_pem=b"".join(blob.bytes() for blob in leaf.cert_chain_pems),
        key_pem=leaf.private_key_pem.bytes(),
        fingerprint_sha256=cert.fingerprint(cert.signature_hash_algorithm or x509.hashes.SHA256()).hex(),
        serial=format(cert.serial_number, "x"),
        sans=tuple(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
                   .value.get_values_for_type(x509.DNSName)),
        not_after=cert.not_valid_after_utc,
    )


def der(leaf: trustme.LeafCert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())


@dataclass
class PKI:
    ca: trustme.CA
    leaves: dict[str, trustme.LeafCert]
    bundles: dict[str, CertificateBundle]
    client_ca: trustme.CA
    client: trustme.LeafCert
    stranger: trustme.LeafCert


@pytest.fixture(scope="module")
def pki() -> PKI:
    ca = trustme.CA()
    names = {"a": "a.example", "b": "b.example", "wild": "*.w.example", "x": "x.w.example",
             "default": "default.example", "m": "m.example", "o": "o.example"}
    leaves = {key: ca.issue_cert(name) for key, name in names.items()}
    client_ca = trustme.CA()
    return PKI(ca, leaves, {key: make_bundle(leaf, key) for key, leaf in leaves.items()},
               client_ca, client_ca.issue_cert("client.example"), trustme.CA().issue_cert("x.example"))


def host(name: str, names: tuple[str, ...], cert: CertificateBundle | None, **fields: Any) -> HostRoute:
    fields.setdefault("mode", Mode.HTTP)
    return HostRoute(name=name, names=names, upstream=UPSTREAM, certificate=cert, **fields)


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


def listener_for(snapshot: Snapshot) -> ssl.SSLContext:
    table = tls.build_sni_table(snapshot)
    return tls.listener_context(lambda: table)


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
        """The certificate the client received; None when the handshake never got there."""
        try:
            return self.client.getpeercert(binary_form=True)
        except ValueError:  # handshake not done
            return None


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


def handshake(listener: ssl.SSLContext, client_ctx: ssl.SSLContext, sni: str | None,
              session: ssl.SSLSession | None = None) -> Handshake:
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    server = listener.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=sni, session=session)
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
    if client_done and server_done:
        # TLS 1.3 session tickets travel after the handshake: let the client read them.
        server.write(b"x")
        c_in.write(s_out.read())
        client.read(1)
    elif client_done and result.server_error is not None:
        # In TLS 1.3 the client finishes first and hears of a refusal on its next read.
        with pytest.raises(ssl.SSLError) as caught:
            client.read(1)
        result.client_error = caught.value
    return result


TLS_VERSIONS = [pytest.param(None, id="tls1.3"), pytest.param(ssl.TLSVersion.TLSv1_2, id="tls1.2")]


# ---- choosing the certificate ----------------------------------------------------------


def test_each_host_gets_its_own_certificate_by_sni(pki: PKI) -> None:
    listener = listener_for(standard_snapshot(pki))
    for name, key in (("a.example", "a"), ("b.example", "b")):
        result = handshake(listener, client_context(pki), name)
        assert result.ok
        assert result.served() == der(pki.leaves[key])
        assert result.client.getpeercert()["subjectAltName"] == (("DNS", name),)
        route = tls.chosen_route(result.server)
        assert route is not None and route.name == key


def test_wildcard_host_matches_one_label_but_not_two(pki: PKI) -> None:
    listener = listener_for(standard_snapshot(pki))
    one = handshake(listener, client_context(pki), "y.w.example")
    assert one.ok and one.served() == der(pki.leaves["wild"])
    two = handshake(listener, client_context(pki, check_hostname=False), "z.y.w.example")
    assert two.ok and two.served() == der(pki.leaves["default"])
    assert tls.chosen_route(two.server) is None
    bare = handshake(listener, client_context(pki, check_hostname=False), "w.example")
    assert bare.served() == der(pki.leaves["default"])


def test_exact_name_beats_wildcard(pki: PKI) -> None:
    result = handshake(listener_for(standard_snapshot(pki)), client_context(pki), "x.w.example")
    assert result.ok and result.served() == der(pki.leaves["x"])
    route = tls.chosen_route(result.server)
    assert route is not None and route.name == "x"


def test_no_sni_gets_default_certificate(pki: PKI) -> None:
    result = handshake(listener_for(standard_snapshot(pki)), client_context(pki, check_hostname=False), None)
    assert result.ok and result.served() == der(pki.leaves["default"])
    assert tls.chosen_route(result.server) is None


def test_unknown_sni_gets_default_certificate(pki: PKI) -> None:
    listener = listener_for(standard_snapshot(pki))
    result = handshake(listener, client_context(pki, check_hostname=False), "nobody.example")
    assert result.ok and result.served() == der(pki.leaves["default"])


@pytest.mark.parametrize("sni", ["nobody.example", None])
def test_strict_mode_fails_unknown_or_missing_sni_with_unrecognized_name(pki: PKI, sni: str | None) -> None:
    listener = listener_for(standard_snapshot(pki, strict_sni=True))
    result = handshake(listener, client_context(pki, check_hostname=False), sni)
    assert result.server_error is not None and result.client_error is not None
    assert result.client_error.reason == "TLSV1_UNRECOGNIZED_NAME"
    assert tls.handshake_failure_reason(result.server_error, result.server) == "unknown_sni"
    assert tls.handshake_failure_reason(result.server_error) == "unknown_sni"
    assert result.served() is None


def test_without_default_certificate_unknown_sni_fails_and_known_names_work(pki: PKI) -> None:
    listener = listener_for(replace(standard_snapshot(pki), default_certificate=None))
    assert handshake(listener, client_context(pki, check_hostname=False), "nobody.example").server_error
    assert handshake(listener, client_context(pki), "a.example").ok


def test_lookup_lowercases_and_strips_trailing_dot(pki: PKI) -> None:
    table = tls.build_sni_table(standard_snapshot(pki))
    route, ctx = tls.lookup(table, "A.Example.")
    assert route is not None and route.name == "a" and ctx is table.exact["a.example"][1]
    wild, _ = tls.lookup(table, "Q.W.EXAMPLE")
    assert wild is not None and wild.name == "wild"
    assert tls.lookup(table, "") == (None, table.default)
    strict = tls.build_sni_table(standard_snapshot(pki, strict_sni=True))
    assert tls.lookup(strict, None) == (None, None)
    assert tls.lookup(strict, "q.r.w.example") == (None, None)


def test_reload_applies_to_new_handshakes(pki: PKI) -> None:
    b = pki.bundles
    current = [tls.build_sni_table(Snapshot(1, (host("a", ("a.example",), b["a"]),)))]
    listener = tls.listener_context(lambda: current[0])
    assert handshake(listener, client_context(pki), "a.example").served() == der(pki.leaves["a"])
    current[0] = tls.build_sni_table(Snapshot(2, (host("a", ("a.example", "b.example"), b["b"]),)))
    result = handshake(listener, client_context(pki, check_hostname=False), "a.example")
    assert result.served() == der(pki.leaves["b"])


def test_host_without_certificate_uses_default_or_is_left_out(pki: PKI) -> None:
    snap = Snapshot(1, (host("bare", ("bare.example",), None),), default_certificate=pki.bundles["default"])
    route, ctx = tls.lookup(tls.build_sni_table(snap), "bare.example")
    assert route is not None and route.name == "bare" and ctx is not None
    alone = tls.build_sni_table(replace(snap, default_certificate=None))
    assert tls.lookup(alone, "bare.example") == (None, None)


# ---- building contexts ----------------------------------------------------------------


def test_hosts_sharing_a_certificate_share_one_context(pki: PKI, monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[str] = []
    real = tls.server_context

    def counting(bundle: CertificateBundle, **kwargs: Any) -> ssl.SSLContext:
        built.append(bundle.name)
        return real(bundle, **kwargs)

    monkeypatch.setattr(tls, "server_context", counting)
    wild = pki.bundles["wild"]
    hosts = tuple(host(f"h{i}", (f"h{i}.w.example",), wild) for i in range(1000))
    started = time.perf_counter()
    table = tls.build_sni_table(Snapshot(1, hosts))
    assert time.perf_counter() - started < 2
    assert built == ["wild"]
    assert len({id(ctx) for _, ctx in table.exact.values()}) == 1
    tcp = tls.build_sni_table(Snapshot(1, (*hosts[:2], replace(hosts[2], mode=Mode.TCP))))
    assert tcp.exact["h0.w.example"][1] is tcp.exact["h1.w.example"][1]
    assert tcp.exact["h0.w.example"][1] is not tcp.exact["h2.w.example"][1]  # other ALPN


def test_context_settings_follow_mozilla_intermediate(pki: PKI) -> None:
    table = tls.build_sni_table(standard_snapshot(pki))
    for ctx in (table.exact["a.example"][1], tls.listener_context(lambda: table)):
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


def test_encrypted_key_is_refused_without_prompting(pki: PKI) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pki.bundles["a"].key_pem, password=None)
    locked = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.BestAvailableEncryption(b"secret"))
    with pytest.raises(tls.TLSConfigError, match="certificate 'a': key is encrypted"):
        tls.server_context(replace(pki.bundles["a"], key_pem=locked), alpn=(), client_auth=None)


def test_bad_client_ca_bundle_names_the_host(pki: PKI) -> None:
    bad = ClientAuth(mode=ClientAuthMode.REQUIRED, ca_pem=b"-----BEGIN CERTIFICATE-----\nxx\n")
    snap = Snapshot(1, (host("api", ("a.example",), pki.bundles["a"], client_auth=bad),))
    with pytest.raises(tls.TLSConfigError, match="host 'api': client CA bundle is not valid PEM"):
        tls.build_sni_table(snap)
    empty = replace(snap, hosts=(replace(snap.hosts[0], client_auth=ClientAuth(ClientAuthMode.OPTIONAL)),))
    with pytest.raises(tls.TLSConfigError, match=r"host 'api': .* no CA bundle"):
        tls.build_sni_table(empty)


def test_a_name_claimed_by_two_hosts_is_refused(pki: PKI) -> None:
    b = pki.bundles
    snap = Snapshot(1, (host("one", ("a.example",), b["a"]), host("two", ("A.example.",), b["a"])))
    claimed = re.escape("host 'two': name 'a.example' is already served by host 'one'")
    with pytest.raises(tls.TLSConfigError, match=claimed):
        tls.build_sni_table(snap)


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
    assert handshake(tls.listener_context(lambda: table), client_context(pki), "a.example").ok


def test_without_memfd_the_key_goes_through_an_unlinked_tmpfs_file(
    pki: PKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    if tls._tmpfs_directory() is None:
        pytest.skip("no tmpfs on this machine")

    def unavailable(*args: Any) -> int:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(os, "memfd_create", unavailable)
    shm = tls._tmpfs_directory()
    assert shm is not None
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
    assert handshake(tls.listener_context(lambda: table), client_context(pki), "b.example").ok


# ---- protocol versions, ciphers, ALPN --------------------------------------------------


def test_tls11_client_is_refused(pki: PKI) -> None:
    ctx = client_context(pki)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    result = handshake(listener_for(standard_snapshot(pki)), ctx, "a.example")
    assert result.server_error is not None
    assert tls.handshake_failure_reason(result.server_error) == "protocol_version"


@pytest.mark.parametrize("version", TLS_VERSIONS)
def test_alpn_http11_for_http_hosts_and_none_for_tcp_hosts(pki: PKI, version: ssl.TLSVersion | None) -> None:
    listener = listener_for(standard_snapshot(pki))
    ctx = client_context(pki, max_version=version)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    http = handshake(listener, ctx, "a.example")
    assert http.ok and http.client.selected_alpn_protocol() == "http/1.1"
    tcp = handshake(listener, ctx, "o.example")
    assert tcp.ok and tcp.client.selected_alpn_protocol() is None


def test_dhe_suites_work_with_an_rsa_certificate() -> None:
    ca = trustme.CA(key_type=trustme.KeyType.RSA)
    leaf = ca.issue_cert("rsa.example", key_type=trustme.KeyType.RSA)
    table = tls.build_sni_table(Snapshot(1, (host("rsa", ("rsa.example",), make_bundle(leaf, "rsa")),)))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(ctx)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("DHE-RSA-AES128-GCM-SHA256")
    result = handshake(tls.listener_context(lambda: table), ctx, "rsa.example")
    assert result.ok
    assert result.client.cipher() == ("DHE-RSA-AES128-GCM-SHA256", "TLSv1.2", 128)


# ---- client certificates -----------------------------------------------------------------


def mtls_listener(pki: PKI, mode: ClientAuthMode) -> ssl.SSLContext:
    b = pki.bundles
    hosts = (host("m", ("m.example",), b["m"], client_auth=client_auth(pki, mode)),
             host("a", ("a.example",), b["a"]))
    return listener_for(Snapshot(1, hosts, default_certificate=b["default"]))


@pytest.mark.parametrize("version", TLS_VERSIONS)
def test_required_client_cert_missing_fails_the_handshake(pki: PKI, version: ssl.TLSVersion | None) -> None:
    result = handshake(mtls_listener(pki, ClientAuthMode.REQUIRED), client_context(pki, max_version=version),
                       "m.example")
    assert result.server_error is not None
    assert tls.handshake_failure_reason(result.server_error, result.server) == "no_client_cert"


@pytest.mark.parametrize("version", TLS_VERSIONS)
def test_required_client_cert_good_is_seen_by_the_server(pki: PKI, version: ssl.TLSVersion | None) -> None:
    ctx = client_context(pki, cert=pki.client, max_version=version)
    result = handshake(mtls_listener(pki, ClientAuthMode.REQUIRED), ctx, "m.example")
    assert result.ok
    assert result.server.getpeercert(binary_form=True) == der(pki.client)


@pytest.mark.parametrize("version", TLS_VERSIONS)
def test_client_cert_from_another_ca_is_refused(pki: PKI, version: ssl.TLSVersion | None) -> None:
    for mode in (ClientAuthMode.REQUIRED, ClientAuthMode.OPTIONAL):
        ctx = client_context(pki, cert=pki.stranger, max_version=version)
        result = handshake(mtls_listener(pki, mode), ctx, "m.example")
        assert result.server_error is not None
        assert tls.handshake_failure_reason(result.server_error) == "bad_client_cert"


@pytest.mark.parametrize("version", TLS_VERSIONS)
def test_optional_client_cert_may_be_absent(pki: PKI, version: ssl.TLSVersion | None) -> None:
    listener = mtls_listener(pki, ClientAuthMode.OPTIONAL)
    without = handshake(listener, client_context(pki, max_version=version), "m.example")
    assert without.ok and without.server.getpeercert(binary_form=True) is None
    with_cert = handshake(listener, client_context(pki, cert=pki.client, max_version=version), "m.example")
    assert with_cert.ok and with_cert.server.getpeercert(binary_form=True) == der(pki.client)


@pytest.mark.parametrize("version", TLS_VERSIONS)
def test_host_without_client_auth_requests_no_certificate(pki: PKI, version: ssl.TLSVersion | None) -> None:
    ctx = client_context(pki, cert=pki.client, max_version=version)
    result = handshake(mtls_listener(pki, ClientAuthMode.REQUIRED), ctx, "a.example")
    assert result.ok
    assert result.server.getpeercert(binary_form=True) is None
    assert result.server.getpeercert() is None


def test_session_of_another_host_cannot_skip_client_auth(pki: PKI) -> None:
    """TLS 1.3 resumes in the listener context, before SNI: refuse a foreign session."""
    listener = mtls_listener(pki, ClientAuthMode.REQUIRED)
    ctx = client_context(pki)
    first = handshake(listener, ctx, "a.example")
    assert first.ok and first.client.session is not None
    resumed = handshake(listener, ctx, "m.example", session=first.client.session)
    assert resumed.server_error is not None
    assert resumed.client_error is not None and "ACCESS_DENIED" in (resumed.client_error.reason or "")
    assert tls.handshake_failure_reason(resumed.server_error, resumed.server) == "resumption_rejected"


@pytest.mark.parametrize("version", TLS_VERSIONS)
def test_session_of_the_same_host_resumes_with_its_client_cert(
    pki: PKI, version: ssl.TLSVersion | None
) -> None:
    listener = mtls_listener(pki, ClientAuthMode.REQUIRED)
    ctx = client_context(pki, cert=pki.client, max_version=version)
    first = handshake(listener, ctx, "m.example")
    resumed = handshake(listener, ctx, "m.example", session=first.client.session)
    assert resumed.ok and resumed.server.session_reused
    assert resumed.server.getpeercert(binary_form=True) == der(pki.client)


def test_tls12_resumption_is_routed_to_the_sessions_own_host(pki: PKI) -> None:
    """In TLS 1.2 OpenSSL hands the callback the session's name, so the route follows it."""
    listener = mtls_listener(pki, ClientAuthMode.REQUIRED)
    ctx = client_context(pki, max_version=ssl.TLSVersion.TLSv1_2)
    first = handshake(listener, ctx, "a.example")
    resumed = handshake(listener, ctx, "m.example", session=first.client.session)
    route = tls.chosen_route(resumed.server)
    assert resumed.ok and route is not None and route.name == "a"
    assert resumed.server.getpeercert(binary_form=True) is None


def test_a_failing_table_fails_the_handshake_without_serving_anything(pki: PKI) -> None:
    def broken() -> tls.SNITable:
        raise RuntimeError("no table")

    result = handshake(tls.listener_context(broken), client_context(pki, check_hostname=False), "a.example")
    assert result.server_error is not None and result.served() is None
    assert tls.handshake_failure_reason(result.server_error, result.server) == "internal_error"


# ---- over real sockets, both event loops ----------------------------------------------------


def loop_factories() -> list[Any]:
    factories: list[Any] = [pytest.param(asyncio.new_event_loop, id="asyncio")]
    try:
        import uvloop
    except ImportError:
        return factories
    return [*factories, pytest.param(uvloop.new_event_loop, id="uvloop")]


@pytest.mark.parametrize("loop_factory", loop_factories())
def test_event_loops_pass_the_ssl_object_the_transport_exposes(
    pki: PKI, loop_factory: Callable[[], asyncio.AbstractEventLoop]
) -> None:
    table = tls.build_sni_table(standard_snapshot(pki))
    seen: dict[str, Any] = {}

    class Server(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            ssl_object = transport.get_extra_info("ssl_object")
            seen["route"] = tls.chosen_route(transport)
            seen["same_object"] = tls.chosen_route(ssl_object) is seen["route"]
            seen["peer"] = ssl_object.getpeercert(binary_form=True)
            transport.write(b"hello")  # type: ignore[attr-defined]  # uvloop's is no WriteTransport
            transport.close()

    async def main() -> bytes:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Server, "127.0.0.1", 0, ssl=tls.listener_context(lambda: table))
        port = server.sockets[0].getsockname()[1]
        ctx = client_context(pki, cert=pki.client)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname="m.example"
        )
        data = await reader.read()
        writer.close()
        server.close()
        await server.wait_closed()
        return data

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        assert runner.run(asyncio.wait_for(main(), 10)) == b"hello"
    assert seen["route"] is not None and seen["route"].name == "mtls"
    assert seen["same_object"] is True
    assert seen["peer"] == der(pki.client)


# ---- failure reasons, upstream contexts ---------------------------------------------------


def test_handshake_failure_reasons_are_short_stable_keys() -> None:
    aborted = ConnectionAbortedError("SSL handshake is taking longer than 5 seconds: aborting the connection")
    cases: list[tuple[BaseException | type[BaseException], str]] = [
        (TimeoutError(), "timeout"),
        (aborted, "timeout"),
        (ConnectionResetError, "eof"),  # uvloop passes the class
        (ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), "eof"),
        (ValueError("odd"), "other"),
    ]
    for exc, key in cases:
        assert tls.handshake_failure_reason(exc) == key
        assert key in tls.HANDSHAKE_FAILURE_REASONS


def upstream_handshake(client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext, name: str) -> Handshake:
    return handshake(server_ctx, client_ctx, name)


def test_upstream_context_verifies_name_and_ca_and_presents_client_cert(pki: PKI) -> None:
    backend_leaf = pki.ca.issue_cert("backend.internal")
    backend = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    backend_leaf.configure_cert(backend)
    backend.verify_mode = ssl.CERT_REQUIRED
    pki.client_ca.configure_trust(backend)
    client_cert = make_bundle(pki.client, "to-backend")
    settings = UpstreamTLS(verify=True, ca_pem=pki.ca.cert_pem.bytes(), server_name="backend.internal",
                           client_certificate=client_cert)
    ctx = tls.upstream_context(settings)
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    assert tls.upstream_server_name(settings, "10.0.0.7") == "backend.internal"
    result = upstream_handshake(ctx, backend, tls.upstream_server_name(settings, "10.0.0.7"))
    assert result.ok and result.server.getpeercert(binary_form=True) == der(pki.client)
    assert upstream_handshake(ctx, backend, "other.internal").client_error is not None
    loose = tls.upstream_context(replace(settings, verify=False))
    assert loose.verify_mode == ssl.CERT_NONE and not loose.check_hostname
    assert upstream_handshake(loose, backend, "other.internal").ok


def test_upstream_context_rejects_bad_ca_and_uses_system_store_when_empty(pki: PKI) -> None:
    with pytest.raises(tls.TLSConfigError, match="upstream 'app': CA bundle is not valid PEM"):
        tls.upstream_context(UpstreamTLS(True, b"\xff\xfe", ""), label="upstream 'app'")
    system = tls.upstream_context(UpstreamTLS(True, b"", ""))
    assert system.verify_mode == ssl.CERT_REQUIRED
    assert system.minimum_version == ssl.TLSVersion.TLSv1_2
