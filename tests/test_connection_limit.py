"""At the connection limit new connections are refused, before any TLS handshake, and the
refused ones never disturb the counts of the connections that are in."""

from __future__ import annotations

import socket
import ssl
import time

import pytest
import trustme

from proxycore import config as core
from proxycore.limits import Limits
from tests.proxyharness import (
    RunningNode,
    Upstream,
    bundle,
    read_response,
    route,
    running_node,
    tls_connect,
    wait_until,
)


def snapshot(ca: trustme.CA, port: int) -> core.Snapshot:
    cert = bundle(ca, "a.example")
    plain = route("p", ("p.example",), port, None, redirect=core.Redirect(enabled=False))
    return core.Snapshot(revision=1, hosts=(route("a", ("a.example",), port, cert), plain),
                         default_certificate=cert)


def host(node: RunningNode, name: str) -> dict[str, int]:
    return node.stats()["hosts"].get(name, {})


def listener(node: RunningNode, name: str) -> dict[str, int]:
    return node.stats()["listeners"][name]


def refused(sock: socket.socket) -> bool:
    """The proxy closed ``sock`` without a byte."""
    sock.settimeout(5)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_a_tls_client_over_the_limit_is_refused_before_its_handshake(ca: trustme.CA, upstream: Upstream) -> None:
    with running_node(snapshot(ca, upstream.port), Limits(max_connections=2)) as node:
        kept = [tls_connect(node.https_port, ca, "a.example") for _ in range(2)]
        for sock in kept:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
            assert read_response(sock)[0] == 200
        for _ in range(5):
            with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
                tls_connect(node.https_port, ca, "a.example").close()
        stats = host(node, "a")
        assert stats["active_connections"] == 2
        assert stats["handshakes_ok"] == 2  # no handshake spent on a refused client
        assert listener(node, "https")["rejected_connections"] == 5
        assert node.loop.call(lambda: node.node.listeners[0].handshaking) == 0
        # The kept connections still work, and the counts come back to zero when they close.
        kept[0].sendall(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
        assert read_response(kept[0])[0] == 200
        for sock in kept:
            sock.close()
        wait_until(lambda: host(node, "a")["active_connections"] == 0)
        time.sleep(0.3)
        assert host(node, "a")["active_connections"] == 0
        # and there is room again
        again = tls_connect(node.https_port, ca, "a.example")
        again.sendall(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
        assert read_response(again)[0] == 200
        again.close()


def test_a_connection_still_sending_its_client_hello_holds_a_slot(ca: trustme.CA, upstream: Upstream) -> None:
    with running_node(snapshot(ca, upstream.port), Limits(max_connections=2)) as node:
        silent = [socket.create_connection(("127.0.0.1", node.https_port)) for _ in range(2)]
        wait_until(lambda: node.loop.call(lambda: node.node.listeners[0].handshaking) == 2)
        late = socket.create_connection(("127.0.0.1", node.https_port))
        assert refused(late)
        for sock in silent:
            sock.close()
        wait_until(lambda: node.loop.call(lambda: node.node.listeners[0].handshaking) == 0)
        sock = tls_connect(node.https_port, ca, "a.example")
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
        assert read_response(sock)[0] == 200
        sock.close()


def test_refused_plain_connections_never_drive_the_active_count_negative(
    ca: trustme.CA, upstream: Upstream,
) -> None:
    with running_node(snapshot(ca, upstream.port), Limits(max_connections=2)) as node:
        kept = [socket.create_connection(("127.0.0.1", node.http_port)) for _ in range(2)]
        for sock in kept:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: p.example\r\n\r\n")
            assert read_response(sock)[0] == 200
        for _ in range(5):
            assert refused(socket.create_connection(("127.0.0.1", node.http_port)))
        time.sleep(0.2)
        assert host(node, "-")["active_connections"] == 2
        assert listener(node, "http")["rejected_connections"] == 5
        for sock in kept:
            sock.close()
        wait_until(lambda: host(node, "-")["active_connections"] == 0)
        time.sleep(0.3)
        assert host(node, "-")["active_connections"] == 0
