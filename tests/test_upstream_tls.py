"""TLS to upstreams: re-encryption with verification, SNI, and a client certificate.

An upstream with ``tls`` set is reached over TLS: its certificate is verified against
the upstream's CA bundle (or the system store when the bundle is empty) and the name
``UpstreamTLS.server_name`` (or the target's host), which is also the SNI sent. With
``verify`` off any certificate is accepted. A client certificate, when set, is presented
to upstreams that ask for one. A failed verification is a 502, counted in the host's
``upstream_errors`` and logged with OpenSSL's reason. In TCP mode the same settings make
the node a TLS-to-mTLS tunnel (rama's ``mtls_tunnel_and_service``).

The upstreams here are asyncio servers on the test's own loop, each with a certificate
from a CA of its own, so trusting the proxy's CA never makes an upstream trusted.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import Any

import pytest
import trustme

from proxycore import config as core
from proxycore import tls
from tests.proxyharness import (
    TLS_VERSIONS,
    LoopServer,
    LoopThread,
    RunningNode,
    Upstream,
    bundle,
    host_counts,
    read_response,
    route,
    running_node,
    tls_connect,
)

BACKEND = "backend.internal"
# The upstream_errors keys of a handshake the proxy refused or that broke off (HTTP and TCP
# paths both count them by tls.upstream_connect_failure).
HTTP_VERIFY_FAILED = "tls_verify_failed"
HTTP_HANDSHAKE_FAILED = "tls_handshake_failed"


# ---- TLS upstreams ---------------------------------------------------------------------


def backend_context(backend_ca: trustme.CA, *names: str, client_ca: trustme.CA | None = None,
                    max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    """A server context for ``names`` (default ``backend.internal``); mTLS with ``client_ca``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    backend_ca.issue_cert(*(names or (BACKEND,))).configure_cert(ctx)
    if client_ca is not None:
        client_ca.configure_trust(ctx)
        ctx.verify_mode = ssl.CERT_REQUIRED
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


class TLSRecorder:
    """What a TLS upstream saw of each handshake: the SNI, and the client's certificate."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.server_names: list[str | None] = []
        self.peer_certs: list[bytes | None] = []
        context.sni_callback = self.sni

    def sni(self, _obj: Any, name: str | None, _ctx: ssl.SSLContext) -> None:
        self.server_names.append(name)

    def handshake_done(self, writer: asyncio.StreamWriter) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        self.peer_certs.append(ssl_object.getpeercert(binary_form=True) if ssl_object else None)


class TLSUpstream(Upstream):
    """The harness's recording echo upstream, behind TLS."""

    def __init__(self, loop: LoopThread, context: ssl.SSLContext) -> None:
        super().__init__(loop)
        self.tls = TLSRecorder(context)
        self.ssl_context = context

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.tls.handshake_done(writer)
        await super()._serve(reader, writer)


class TLSLineEcho(LoopServer):
    """A TLS (often mTLS-only) service that answers each line: ``echo=<line>``."""

    def __init__(self, loop: LoopThread, context: ssl.SSLContext) -> None:
        super().__init__(loop)
        self.tls = TLSRecorder(context)
        self.ssl_context = context
        self.received = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.tls.handshake_done(writer)
        try:
            while line := await reader.readline():
                self.received += len(line)
                writer.write(b"echo=" + line)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()


# ---- snapshots and requests --------------------------------------------------------------


def upstream_tls(*, verify: bool = True, ca: trustme.CA | None = None, server_name: str = BACKEND,
                 client_certificate: core.CertificateBundle | None = None) -> core.UpstreamTLS:
    return core.UpstreamTLS(verify=verify, ca_pem=ca.cert_pem.bytes() if ca else b"",
                            server_name=server_name, client_certificate=client_certificate)


def snapshot(ca: trustme.CA, port: int, settings: core.UpstreamTLS, *, host: str = "127.0.0.1",
             mode: core.Mode = core.Mode.HTTP, **fields: Any) -> core.Snapshot:
    upstream = core.Upstream(name="backend", targets=(core.Target(host, port),), connect_timeout=2.0,
                             read_timeout=5.0, tls=settings)
    return core.Snapshot(revision=1, hosts=(
        route("app", ("app.example",), port, bundle(ca, "app.example"), upstream=upstream, mode=mode,
              **fields),
    ))


def get(node: RunningNode, ca: trustme.CA, ctx: ssl.SSLContext | None = None) -> int:
    with tls_connect(node.https_port, ca, "app.example", ctx) as sock:
        sock.sendall(b"GET /hello HTTP/1.1\r\nHost: app.example\r\n\r\n")
        status, _, _ = read_response(sock)
    return status


def upstream_errors(node: RunningNode, expected: dict[str, int]) -> dict[str, int]:
    """The host's upstream error counts, once they reach ``expected`` (or after 3 s)."""
    return host_counts(node, "app", "upstream_errors", expected)


def proxycore_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "proxycore" and r.levelno >= logging.WARNING]


def der_of(cert: core.CertificateBundle) -> bytes:
    first = cert.chain_pem.split(b"-----END CERTIFICATE-----")[0] + b"-----END CERTIFICATE-----\n"
    return ssl.PEM_cert_to_DER_cert(first.decode())


@pytest.fixture
def backend_ca() -> trustme.CA:
    return trustme.CA()


# ---- verification ---------------------------------------------------------------------


def test_upstream_verified_against_its_ca_bundle_answers(
    ca: trustme.CA, backend_ca: trustme.CA, loop_thread: LoopThread
) -> None:
    backend = TLSUpstream(loop_thread, backend_context(backend_ca)).start()
    with running_node(snapshot(ca, backend.port, upstream_tls(ca=backend_ca))) as node:
        assert get(node, ca) == 200
        assert get(node, ca) == 200
        stats = node.stats()["hosts"]["app"]
    assert [ex.target for ex in backend.requests] == ["/hello", "/hello"]
    assert backend.requests[0].header("x-forwarded-proto") == ["https"]
    assert backend.connections == 1  # the TLS connection is pooled and reused
    assert backend.tls.server_names == [BACKEND]
    assert stats["upstream_errors"] == {}


def test_upstream_signed_by_another_ca_is_a_502_logged_as_a_verification_failure(
    ca: trustme.CA, backend_ca: trustme.CA, loop_thread: LoopThread, caplog: pytest.LogCaptureFixture
) -> None:
    backend = TLSUpstream(loop_thread, backend_context(backend_ca)).start()
    caplog.set_level(logging.WARNING, logger="proxycore")
    with running_node(snapshot(ca, backend.port, upstream_tls(ca=trustme.CA()))) as node:
        assert get(node, ca) == 502
        errors = upstream_errors(node, {HTTP_VERIFY_FAILED: 1})
    assert errors == {HTTP_VERIFY_FAILED: 1}
    assert backend.requests == []
    logged = proxycore_warnings(caplog)
    assert len(logged) == 1, logged
    assert logged[0].startswith(f"upstream 127.0.0.1:{backend.port}: ")
    assert "certificate verify failed" in logged[0] and "unable to get local issuer certificate" in logged[0]


def test_empty_ca_bundle_means_the_system_store_which_does_not_know_a_private_ca(
    ca: trustme.CA, backend_ca: trustme.CA, loop_thread: LoopThread, caplog: pytest.LogCaptureFixture
) -> None:
    backend = TLSUpstream(loop_thread, backend_context(backend_ca)).start()
    caplog.set_level(logging.WARNING, logger="proxycore")
    with running_node(snapshot(ca, backend.port, upstream_tls(ca=None))) as node:
        assert get(node, ca) == 502
        assert upstream_errors(node, {HTTP_VERIFY_FAILED: 1}) == {HTTP_VERIFY_FAILED: 1}
    assert any("certificate verify failed" in line for line in proxycore_warnings(caplog))


def test_sni_and_verify_name_come_from_the_upstreams_server_name(
    ca: trustme.CA, backend_ca: trustme.CA, loop_thread: LoopThread
) -> None:
    """The target is 127.0.0.1; the upstream is known as backend.internal."""
    backend = TLSUpstream(loop_thread, backend_context(backend_ca)).start()
    with running_node(snapshot(ca, backend.port, upstream_tls(ca=backend_ca, server_name=BACKEND))) as node:
        assert get(node, ca) == 200
    assert backend.tls.server_names == [BACKEND]
    assert len(backend.requests) == 1


def test_a_server_name_the_certificate_does_not_cover_is_a_502(
    ca: trustme.CA, backend_ca: trustme.CA, loop_thread: LoopThread, caplog: pytest.LogCaptureFixture
) -> None:
    backend = TLSUpstream(loop_thread, backend_context(backend_ca)).start()
    caplog.set_level(logging.WARNING, logger="proxycore")
    settings = upstream_tls(ca=backend_ca, server_name="other.internal")
    with running_node(snapshot(ca, backend.port, settings)) as node:
        assert get(node, ca) == 502
        assert upstream_errors(node, {HTTP_VERIFY_FAILED: 1}) == {HTTP_VERIFY_FAILED: 1}
    assert backend.tls.server_names == ["other.internal"]  # what was asked for, and refused
    assert backend.requests == []
    logged = proxycore_warnings(caplog)
    assert len(logged) == 1 and "Hostname mismatch" in logged[0] and "other.internal" in logged[0], logged


@pytest.mark.parametrize(("target", "cert_name", "sni"), [
    pytest.param("localhost", "localhost", "localhost", id="name"),
    pytest.param("127.0.0.1", "127.0.0.1", None, id="ip-address"),  # no SNI for an address
])
def test_without_a_server_name_the_targets_host_is_sent_and_verified(
    ca: trustme.CA, backend_ca: trustme.CA, loop_thread: LoopThread, target: str, cert_name: str,
    sni: str | None,
) -> None:
    backend = TLSUpstream(loop_thread, backend_context(backend_ca, cert_name)).start()
    settings = upstream_tls(ca=backend_ca, server_name="")
    with running_node(snapshot(ca, backend.port, settings, host=target)) as node:
        assert get(node, ca) == 200
    assert backend.tls.server_names == [sni]


def test_verify_off_accepts_an_unknown_ca_and_a_wrong_name(
    ca: trustme.CA, backend_ca: trustme.CA, loop_thread: LoopThread
) -> None:
    backend = TLSUpstream(loop_thread, backend_context(backend_ca, "elsewhere.example")).start()
    with running_node(snapshot(ca, backend.port, upstream_tls(verify=False))) as node:
        assert get(node, ca) == 200
    assert backend.tls.server_names == [BACKEND]  # SNI is still sent
    assert len(backend.requests) == 1


def test_plain_http_upstream_behind_a_tls_setting_is_a_502(
    ca: trustme.CA, loop_thread: LoopThread, caplog: pytest.LogCaptureFixture
) -> None:
    """TLS switched on for an upstream that speaks plain HTTP (and, like nginx, answers a
    ClientHello with a 400): a 502 that says why, not a hang."""

    async def plain_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    async def start() -> asyncio.Server:
        return await asyncio.start_server(plain_http, "127.0.0.1", 0)

    server = loop_thread.run(start())
    port = server.sockets[0].getsockname()[1]
    caplog.set_level(logging.WARNING, logger="proxycore")
    with running_node(snapshot(ca, port, upstream_tls(verify=False))) as node:
        assert get(node, ca) == 502
        assert upstream_errors(node, {HTTP_HANDSHAKE_FAILED: 1}) == {HTTP_HANDSHAKE_FAILED: 1}
    logged = proxycore_warnings(caplog)
    assert len(logged) == 1 and "WRONG_VERSION_NUMBER" in logged[0], logged


# ---- a client certificate for the upstream -----------------------------------------------


@pytest.mark.parametrize("version", TLS_VERSIONS)
def test_upstream_requiring_a_client_cert_gets_the_proxys(
    ca: trustme.CA, backend_ca: trustme.CA, loop_thread: LoopThread, version: ssl.TLSVersion
) -> None:
    proxy_ca = trustme.CA()  # the upstream trusts this CA for its clients, nothing else
    proxy_cert = bundle(proxy_ca, "proxy.example", name="proxy-to-backend")
    context = backend_context(backend_ca, client_ca=proxy_ca, max_version=version)
    backend = TLSUpstream(loop_thread, context).start()
    with_cert = upstream_tls(ca=backend_ca, client_certificate=proxy_cert)
    with running_node(snapshot(ca, backend.port, with_cert)) as node:
        assert get(node, ca) == 200
    assert backend.tls.peer_certs == [der_of(proxy_cert)]
    assert len(backend.requests) == 1


def test_upstream_requiring_a_client_cert_refuses_the_proxy_without_one_in_the_handshake(
    ca: trustme.CA, backend_ca: trustme.CA, loop_thread: LoopThread, caplog: pytest.LogCaptureFixture
) -> None:
    """TLS 1.2: the upstream refuses inside the handshake; asyncio servers send no alert, so
    the proxy sees the connection close mid-handshake, and says so."""
    context = backend_context(backend_ca, client_ca=trustme.CA(), max_version=ssl.TLSVersion.TLSv1_2)
    backend = TLSUpstream(loop_thread, context).start()
    caplog.set_level(logging.WARNING, logger="proxycore")
    with running_node(snapshot(ca, backend.port, upstream_tls(ca=backend_ca))) as node:
        assert get(node, ca) == 502
        assert upstream_errors(node, {HTTP_HANDSHAKE_FAILED: 1}) == {HTTP_HANDSHAKE_FAILED: 1}
    assert backend.requests == []
    assert proxycore_warnings(caplog) == [
        f"upstream 127.0.0.1:{backend.port}: the upstream closed the connection during the TLS handshake"
    ]


def test_upstream_requiring_a_client_cert_refuses_the_proxy_without_one_after_the_handshake(
    ca: trustme.CA, backend_ca: trustme.CA, loop_thread: LoopThread
) -> None:
    """TLS 1.3: the proxy's side of the handshake is over before the upstream checks the
    (absent) certificate, so the refusal closes the connection the request went out on."""
    context = backend_context(backend_ca, client_ca=trustme.CA(), max_version=ssl.TLSVersion.TLSv1_3)
    backend = TLSUpstream(loop_thread, context).start()
    with running_node(snapshot(ca, backend.port, upstream_tls(ca=backend_ca))) as node:
        assert get(node, ca) == 502
        errors = upstream_errors(node, {"closed": 1})
    assert errors in ({"closed": 1}, {"reset": 1}), errors
    assert backend.requests == []


def test_a_foreign_client_cert_is_refused_by_the_upstream(
    ca: trustme.CA, backend_ca: trustme.CA, loop_thread: LoopThread
) -> None:
    context = backend_context(backend_ca, client_ca=trustme.CA())
    backend = TLSUpstream(loop_thread, context).start()
    foreign = bundle(trustme.CA(), "proxy.example", name="foreign")
    with running_node(snapshot(ca, backend.port, upstream_tls(ca=backend_ca, client_certificate=foreign))) as node:
        assert get(node, ca) == 502
    assert backend.requests == []


# ---- TCP mode: rama's mtls_tunnel_and_service ------------------------------------------------


def read_lines(sock: socket.socket, count: int) -> bytes:
    data = b""
    while data.count(b"\n") < count:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


@pytest.mark.parametrize("client_auth", [
    pytest.param(False, id="tls-to-mtls"),
    pytest.param(True, id="mtls-both-sides"),
])
def test_tcp_host_tunnels_tls_clients_to_an_mtls_only_service(
    ca: trustme.CA, backend_ca: trustme.CA, loop_thread: LoopThread, client_auth: bool
) -> None:
    """client --TLS--> node (TCP mode) --mTLS, the node's own certificate--> service.

    With ``client_auth`` the client must also show the node a certificate of its own CA:
    mutual TLS on both hops, each with its own PKI.
    """
    proxy_ca, client_ca = trustme.CA(), trustme.CA()
    proxy_cert = bundle(proxy_ca, "tunnel.example", name="tunnel")
    service = TLSLineEcho(loop_thread, backend_context(backend_ca, client_ca=proxy_ca)).start()
    settings = upstream_tls(ca=backend_ca, client_certificate=proxy_cert)
    fields: dict[str, Any] = {}
    ctx = None
    if client_auth:
        fields["client_auth"] = core.ClientAuth(core.ClientAuthMode.REQUIRED, client_ca.cert_pem.bytes())
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        client_ca.issue_cert("client@example.com").configure_cert(ctx)
    payload = [b"%05d" % i + b"y" * 200 for i in range(500)]
    with running_node(snapshot(ca, service.port, settings, mode=core.Mode.TCP, **fields)) as node:
        with tls_connect(node.https_port, ca, "app.example", ctx) as sock:
            sock.sendall(b"hello\n")
            assert read_lines(sock, 1) == b"echo=hello\n"
            sock.sendall(b"\n".join(payload) + b"\n")
            expected = b"".join(b"echo=" + line + b"\n" for line in payload)
            assert read_lines(sock, len(payload)) == expected
        stats = node.stats()["hosts"]["app"]
    assert service.tls.peer_certs == [der_of(proxy_cert)]
    assert service.tls.server_names == [BACKEND]
    assert stats["bytes_in"] == service.received
    assert stats["bytes_out"] == len(b"echo=hello\n") + len(expected)
    service.stop()


def test_tcp_host_closes_the_client_when_the_service_fails_verification(
    ca: trustme.CA, backend_ca: trustme.CA, loop_thread: LoopThread, caplog: pytest.LogCaptureFixture
) -> None:
    proxy_ca = trustme.CA()
    service = TLSLineEcho(loop_thread, backend_context(backend_ca, client_ca=proxy_ca)).start()
    caplog.set_level(logging.WARNING, logger="proxycore")
    settings = upstream_tls(ca=trustme.CA(), client_certificate=bundle(proxy_ca, "tunnel.example"))
    with running_node(snapshot(ca, service.port, settings, mode=core.Mode.TCP)) as node:
        with tls_connect(node.https_port, ca, "app.example") as sock:
            sock.sendall(b"hello\n")
            assert sock.recv(100) == b""
        assert upstream_errors(node, {"tls_verify_failed": 1}) == {"tls_verify_failed": 1}
    assert service.received == 0
    assert any("certificate verify failed" in line for line in proxycore_warnings(caplog))
    service.stop()


@pytest.mark.parametrize("version", TLS_VERSIONS)
def test_tcp_host_without_the_client_cert_the_service_wants_gets_nothing_through(
    ca: trustme.CA, backend_ca: trustme.CA, loop_thread: LoopThread, version: ssl.TLSVersion
) -> None:
    context = backend_context(backend_ca, client_ca=trustme.CA(), max_version=version)
    service = TLSLineEcho(loop_thread, context).start()
    with running_node(snapshot(ca, service.port, upstream_tls(ca=backend_ca), mode=core.Mode.TCP)) as node:
        with tls_connect(node.https_port, ca, "app.example") as sock:
            sock.sendall(b"hello\n")
            assert read_lines(sock, 1) == b""
        tls12 = version is ssl.TLSVersion.TLSv1_2
        expected = {"tls_handshake_failed": 1} if tls12 else {}
        errors = upstream_errors(node, expected)
    # In TLS 1.3 the service hangs up after the proxy's handshake is over, which a byte
    # stream cannot tell from an ordinary close: nothing is counted.
    assert errors == expected
    assert service.received == 0
    service.stop()


def test_upstream_connect_failures_are_counted_by_what_failed() -> None:
    verify = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    cases: list[tuple[BaseException, str]] = [
        (verify, "tls_verify_failed"),
        (ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"), "tls_handshake_failed"),
        (ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), "tls_handshake_failed"),
        (ConnectionRefusedError(111, "Connection refused"), "connect_refused"),
        (ConnectionResetError(104, "Connection reset by peer"), "connect_refused"),
    ]
    assert [tls.upstream_connect_failure(exc) for exc, _ in cases] == [key for _, key in cases]
