"""Rate limits per host and client address through real sockets: 429, refill, connection limit."""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import replace

import trustme

from proxycore import config as core
from proxycore.access import address_key
from tests.proxyharness import (
    HSTS,
    Upstream,
    bundle,
    connect_from,
    read_response,
    route,
    running_node,
    wait_until,
)


def snapshot(ca: trustme.CA, port: int, limit: core.RateLimit) -> core.Snapshot:
    return core.Snapshot(revision=1, hosts=(
        route("a", ("a.example",), port, bundle(ca, "a.example"), hsts=HSTS, rate_limit=limit,
              redirect=core.Redirect(enabled=False)),
    ))


def ask(sock: socket.socket) -> tuple[int, dict[bytes, list[bytes]]]:
    sock.sendall(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
    status, headers, _ = read_response(sock)
    return status, headers


def test_requests_over_the_burst_get_429_then_pass_after_the_refill(ca: trustme.CA, upstream: Upstream) -> None:
    with running_node(snapshot(ca, upstream.port, core.RateLimit(requests_per_second=5, burst=3))) as node:
        sock = connect_from("127.0.0.2", node.https_port, ca, "a.example")
        assert [ask(sock)[0] for _ in range(3)] == [200, 200, 200]
        status, headers = ask(sock)
        assert status == 429
        assert headers[b"retry-after"] == [b"1"]
        assert headers[b"strict-transport-security"] == [HSTS.header]
        other = connect_from("127.0.0.3", node.https_port, ca, "a.example")
        assert ask(other)[0] == 200  # another client address has its own bucket
        time.sleep(0.25)  # one token back at 5 per second
        assert ask(sock)[0] == 200
        wait_until(lambda: node.stats()["hosts"]["a"]["rate_limited"] == 1)
        host = node.stats()["hosts"]["a"]
        assert host["limited_clients"] == {"127.0.0.2": 1}


def test_connections_over_the_limit_are_refused(ca: trustme.CA, upstream: Upstream) -> None:
    with running_node(snapshot(ca, upstream.port, core.RateLimit(connections_per_client=2))) as node:
        held = [connect_from("127.0.0.2", node.https_port, ca, "a.example") for _ in range(2)]
        for sock in held:
            assert ask(sock)[0] == 200
        try:
            third = connect_from("127.0.0.2", node.https_port, ca, "a.example")
            refused = ask(third)[0] != 200
        except (OSError, ssl.SSLError):
            refused = True
        assert refused
        assert ask(connect_from("127.0.0.3", node.https_port, ca, "a.example"))[0] == 200
        held[0].close()
        counts = node.node.limiters.host("a").connections
        wait_until(lambda: counts.get(address_key("127.0.0.2")) == 1)
        again = connect_from("127.0.0.2", node.https_port, ca, "a.example")
        assert ask(again)[0] == 200
        assert node.stats()["hosts"]["a"]["rate_limited"] >= 1


def test_plain_http_over_the_connection_limit_gets_429_and_close(ca: trustme.CA, upstream: Upstream) -> None:
    with running_node(snapshot(ca, upstream.port, core.RateLimit(connections_per_client=1))) as node:
        first = connect_from("127.0.0.2", node.http_port)
        assert ask(first)[0] == 200
        second = connect_from("127.0.0.2", node.http_port)
        status, headers = ask(second)
        assert status == 429 and headers[b"connection"] == [b"close"]
        assert b"strict-transport-security" not in headers


def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_limit(
    ca: trustme.CA, upstream: Upstream
) -> None:
    limit = core.RateLimit(requests_per_second=0.1, burst=1, connections_per_client=1)
    snap = replace(snapshot(ca, upstream.port, limit),
                   listener_trust=(core.ListenerTrust("https", ("127.0.0.2",)),))
    with running_node(snap) as node:
        # the proxy's connections carry many clients: not limited as one client's
        first, second = (connect_from("127.0.0.2", node.https_port, ca, "a.example") for _ in range(2))
        for sock, client, expected in ((first, "10.0.0.1", 200), (second, "10.0.0.1", 429),
                                       (first, "10.0.0.2", 200)):
            sock.sendall(f"GET / HTTP/1.1\r\nHost: a.example\r\nX-Forwarded-For: {client}\r\n\r\n".encode())
            assert read_response(sock)[0] == expected
        wait_until(lambda: node.stats()["hosts"]["a"]["limited_clients"] == {"10.0.0.1": 1})
