"""The client's real address behind trusted proxies: X-Forwarded-For, Forwarded, inbound PROXY."""

from __future__ import annotations

import json
import socket

import pytest
import trustme

from proxycore import config as core
from proxycore import proxyproto
from proxycore.limits import Limits
from tests.proxyharness import (
    Upstream,
    bundle,
    client_context,
    connect_from,
    read_response,
    route,
    running_node,
    wait_until,
)

ALLOW, DENY = core.AccessAction.ALLOW, core.AccessAction.DENY
OFFICE = core.AccessList("office", DENY, (core.AccessRule(ALLOW, "10.0.0.0/8"),))


def snapshot(ca: trustme.CA, port: int, *trust: core.ListenerTrust, **fields: object) -> core.Snapshot:
    return core.Snapshot(revision=1, listener_trust=trust, hosts=(
        route("a", ("a.example",), port, bundle(ca, "a.example"), access=OFFICE,
              redirect=core.Redirect(enabled=False), **fields),
    ))


def trusted(listener: str, proxy_protocol: bool = False) -> core.ListenerTrust:
    return core.ListenerTrust(listener, ("127.0.0.2/32",), proxy_protocol)


def http_get(sock: socket.socket, extra: str = "") -> tuple[int, dict[str, str]]:
    sock.sendall(f"GET / HTTP/1.1\r\nHost: a.example\r\n{extra}\r\n".encode())
    status, _, body = read_response(sock)
    headers = {n.lower(): v for n, v in json.loads(body)["headers"]} if status == 200 else {}
    return status, headers


def test_a_trusted_proxys_x_forwarded_for_is_the_client(ca: trustme.CA, upstream: Upstream) -> None:
    with running_node(snapshot(ca, upstream.port, trusted("https"))) as node:
        sock = connect_from("127.0.0.2", node.https_port, ca, "a.example")
        status, headers = http_get(sock, "X-Forwarded-For: 192.0.2.9, 10.1.2.3\r\n")
        assert status == 200
        assert headers["x-forwarded-for"] == "10.1.2.3"
        assert headers["forwarded"].startswith("for=10.1.2.3;")
        assert http_get(sock, "X-Forwarded-For: 192.0.2.9\r\n")[0] == 403  # per request
        assert http_get(sock, 'Forwarded: for="[2001:db8::1]:80", for=10.9.9.9\r\n')[0] == 200
    assert any(b"Z 10.1.2.3 https a " in line for line in node.access_lines)


def test_an_untrusted_peers_x_forwarded_for_is_ignored(ca: trustme.CA, upstream: Upstream) -> None:
    with running_node(snapshot(ca, upstream.port, trusted("https"), trusted("http"))) as node:
        plain = connect_from("127.0.0.3", node.http_port)
        plain.sendall(b"GET / HTTP/1.1\r\nHost: a.example\r\nX-Forwarded-For: 10.1.2.3\r\n\r\n")
        assert read_response(plain)[0] == 403  # the peer's own address, not the spoofed one
        wait_until(lambda: node.stats()["hosts"]["a"]["denied"] == 1)


def test_inbound_proxy_protocol_from_a_trusted_peer_names_the_client(ca: trustme.CA, upstream: Upstream) -> None:
    snap = snapshot(ca, upstream.port, trusted("https", True), trusted("http", True))
    with running_node(snap) as node:
        # HTTPS: the header comes before the ClientHello
        raw = connect_from("127.0.0.2", node.https_port)
        raw.sendall(proxyproto.encode_v2(("10.7.7.7", 4242), ("127.0.0.1", 443)))
        sock = client_context(ca).wrap_socket(raw, server_hostname="a.example")
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a.example\r\nX-Forwarded-For: 192.0.2.1\r\n\r\n")
        status, _, body = read_response(sock)
        assert status == 200
        seen = json.loads(body)
        assert ["x-forwarded-for", "10.7.7.7"] in seen["headers"]
        # HTTP, v1; a denied client behind the proxy
        plain = connect_from("127.0.0.2", node.http_port)
        plain.sendall(proxyproto.encode_v1(("192.0.2.5", 4242), ("127.0.0.1", 80)))
        plain.sendall(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
        assert read_response(plain)[0] == 403


def test_a_proxy_header_from_an_untrusted_peer_is_not_read(ca: trustme.CA, upstream: Upstream) -> None:
    snap = snapshot(ca, upstream.port, trusted("http", True))
    with running_node(snap) as node:
        plain = connect_from("127.0.0.3", node.http_port)
        plain.sendall(proxyproto.encode_v1(("10.1.1.1", 1), ("127.0.0.1", 80)))
        plain.sendall(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
        assert read_response(plain)[0] == 400


def test_a_trusted_peer_must_send_the_proxy_header_when_the_listener_wants_one(
    ca: trustme.CA, upstream: Upstream
) -> None:
    with running_node(snapshot(ca, upstream.port, trusted("http", True), trusted("https", True))) as node:
        plain = connect_from("127.0.0.2", node.http_port)
        plain.sendall(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
        assert read_response(plain)[0] == 400
        raw = connect_from("127.0.0.2", node.https_port)
        try:
            client_context(ca).wrap_socket(raw, server_hostname="a.example")
            handshake = True
        except OSError:
            handshake = False
        assert not handshake
        wait_until(lambda: node.stats()["hosts"]["-"]["handshakes_failed"].get("bad_proxy_header") == 1)


@pytest.mark.parametrize("mode", [core.Mode.HTTP, core.Mode.TCP])
def test_the_proxy_header_sent_upstream_names_the_real_client(
    ca: trustme.CA, upstream: Upstream, mode: core.Mode
) -> None:
    snap = snapshot(ca, upstream.port, trusted("https", True), proxy_protocol=core.ProxyProtocol.V1,
                    mode=mode, hsts=None)
    with running_node(snap) as node:
        raw = connect_from("127.0.0.2", node.https_port)
        raw.sendall(proxyproto.encode_v1(("10.7.7.7", 4242), ("127.0.0.1", 443)))
        sock = client_context(ca).wrap_socket(raw, server_hostname="a.example")
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
        read_response(sock)
        wait_until(lambda: bytes(upstream.raw).startswith(b"PROXY TCP4 10.7.7.7 "))


def test_a_proxy_header_that_never_ends_times_out(ca: trustme.CA, upstream: Upstream) -> None:
    limits = Limits(head_timeout=0.5, handshake_timeout=0.5)
    with running_node(snapshot(ca, upstream.port, trusted("http", True), trusted("https", True)), limits) as node:
        plain = connect_from("127.0.0.2", node.http_port)
        plain.sendall(b"PROXY TCP4 10.0.0.1")
        assert read_response(plain)[0] == 408
        tls = connect_from("127.0.0.2", node.https_port)
        tls.sendall(b"PROXY TCP4 10.0.0.1")
        assert tls.recv(100) == b""  # closed at the handshake timeout
        wait_until(lambda: node.stats()["hosts"]["-"]["handshakes_failed"].get("timeout") == 1)
