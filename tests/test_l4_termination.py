"""rama's tls_rustls_termination example: TCP-mode hosts get raw bytes after the handshake,
optionally behind a PROXY protocol header carrying the client's address."""

from __future__ import annotations

import asyncio
import ssl

import pytest
import trustme

from proxycore import config as core
from proxycore import proxyproto as pp
from tests import proxyproto_decode as ppd
from tests.proxyharness import LoopServer, LoopThread, bundle, free_port, route, running_node, tls_connect


class RawBackend(LoopServer):
    """Reads an optional PROXY header, then answers each line with what it learnt."""

    def __init__(self, loop: LoopThread, version: str) -> None:
        super().__init__(loop)
        self.version = version
        self.tls = ""  # the TLS version a v2 header told

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = b""
        source = "none"
        if self.version != "off":
            while True:
                buf += await reader.read(4096)
                try:
                    if self.version == "v2":
                        src, _dst, tlvs, buf = ppd.decode_v2(buf)
                        _client, _verify, tls = ppd.decode_ssl_tlv(tlvs[pp.PP2_TYPE_SSL])
                        self.tls = tls[pp.PP2_SUBTYPE_SSL_VERSION].decode()
                    else:
                        src, _dst, buf = ppd.decode_v1(buf)
                except ppd.IncompleteHeader:
                    continue
                source = f"{src[0]}:{src[1]}" if src else "unknown"
                break
        while True:
            while b"\n" not in buf:
                chunk = await reader.read(65536)
                if not chunk:
                    writer.close()
                    return
                buf += chunk
            line, _, buf = buf.partition(b"\n")
            writer.write(b"client=%s echo=%s\n" % (source.encode(), line))
            await writer.drain()


@pytest.mark.parametrize("version", ["v2", "v1", "off"])
def test_tcp_host_pipes_bytes_with_the_clients_address_in_a_proxy_header(
    ca: trustme.CA, loop_thread: LoopThread, version: str
) -> None:
    backend = RawBackend(loop_thread, version).start()
    snap = core.Snapshot(revision=1, hosts=(
        route("raw", ("raw.example",), backend.port, bundle(ca, "raw.example"),
              mode=core.Mode.TCP, proxy_protocol=core.ProxyProtocol(version)),
    ))
    with running_node(snap) as node:
        sock = tls_connect(node.https_port, ca, "raw.example")
        assert sock.selected_alpn_protocol() is None  # not an HTTP host
        local = sock.getsockname()
        sock.sendall(b"hello\nworld\n")
        data = b""
        while data.count(b"\n") < 2:
            data += sock.recv(4096)
        stats = node.stats()
    expected = f"{local[0]}:{local[1]}" if version != "off" else "none"
    assert data == f"client={expected} echo=hello\nclient={expected} echo=world\n".encode()
    assert stats["hosts"]["raw"]["bytes_in"] == 12
    assert stats["hosts"]["raw"]["active_connections"] == 1
    assert backend.tls == ("TLSv1.3" if version == "v2" else "")  # v2 tells the client's TLS too


def test_tcp_host_streams_a_large_payload_both_ways(ca: trustme.CA, loop_thread: LoopThread) -> None:
    backend = RawBackend(loop_thread, "off").start()
    snap = core.Snapshot(revision=1, hosts=(
        route("raw", ("raw.example",), backend.port, bundle(ca, "raw.example"), mode=core.Mode.TCP),
    ))
    lines = [b"%06d" % i + b"x" * 1000 for i in range(2000)]
    with running_node(snap) as node:
        sock = tls_connect(node.https_port, ca, "raw.example")
        sock.sendall(b"\n".join(lines) + b"\n")
        expected = b"".join(b"client=none echo=" + ln + b"\n" for ln in lines)
        data = b""
        while len(data) < len(expected):
            chunk = sock.recv(65536)
            assert chunk, "closed early"
            data += chunk
    assert data == expected


def test_tcp_host_with_a_dead_upstream_closes_the_connection(ca: trustme.CA) -> None:
    dead = free_port()
    snap = core.Snapshot(revision=1, hosts=(
        route("raw", ("raw.example",), dead, bundle(ca, "raw.example"), mode=core.Mode.TCP),
    ))
    with running_node(snap) as node:
        sock = tls_connect(node.https_port, ca, "raw.example")
        sock.sendall(b"x\n")
        assert sock.recv(10) == b""
        assert node.stats()["hosts"]["raw"]["upstream_errors"] == {"connect_refused": 1}


def test_a_v2_header_carries_the_verified_client_certificates_common_name(
    ca: trustme.CA, loop_thread: LoopThread,
) -> None:
    backend = CNBackend(loop_thread).start()
    client_ca = trustme.CA()
    auth = core.ClientAuth(mode=core.ClientAuthMode.REQUIRED, ca_pem=client_ca.cert_pem.bytes())
    snap = core.Snapshot(revision=1, hosts=(
        route("raw", ("raw.example",), backend.port, bundle(ca, "raw.example"), mode=core.Mode.TCP,
              proxy_protocol=core.ProxyProtocol.V2, client_auth=auth),
    ))
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    client_ca.issue_cert("alice.example", common_name="alice").configure_cert(ctx)
    with running_node(snap) as node:
        sock = tls_connect(node.https_port, ca, "raw.example", ctx)
        sock.sendall(b"x\n")
        sock.settimeout(5)
        answer = sock.recv(4096)
    client, verify, tls = answer.split(b" ", 2)
    assert int(client) & pp.PP2_CLIENT_CERT_CONN and int(verify) == 0  # presented, verified
    assert tls == b"alice"


class CNBackend(LoopServer):
    """Answers with the PP2_TYPE_SSL client flags, verify result and common name it was told."""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = b""
        while True:
            buf += await reader.read(4096)
            try:
                _src, _dst, tlvs, buf = ppd.decode_v2(buf)
                break
            except ppd.IncompleteHeader:
                continue
        client, verify, subs = ppd.decode_ssl_tlv(tlvs[pp.PP2_TYPE_SSL])
        writer.write(b"%d %d %s" % (client, verify, subs.get(pp.PP2_SUBTYPE_SSL_CN, b"-")))
        await writer.drain()
        writer.close()
