"""HTTP edge cases through real sockets: TRACE, HTTP/1.0 keep-alive, answers during a stop."""

from __future__ import annotations

import socket

import trustme

from proxycore import config as core
from tests.proxyharness import HSTS, Upstream, bundle, read_response, route, running_node, tls_connect


def snapshot(ca: trustme.CA, port: int, **fields: object) -> core.Snapshot:
    cert = bundle(ca, "a.example")
    return core.Snapshot(
        revision=1,
        hosts=(route("a", ("a.example",), port, cert, hsts=HSTS, **fields),
               route("p", ("p.example",), port, None, redirect=core.Redirect(enabled=False))),
        default_certificate=cert,
        acme_challenges=(("tok", "tok.keyauth"),),
    )


def test_trace_is_refused_with_405_and_never_reaches_the_upstream(ca: trustme.CA, upstream: Upstream) -> None:
    with running_node(snapshot(ca, upstream.port)) as node:
        sock = tls_connect(node.https_port, ca, "a.example")
        sock.sendall(b"TRACE / HTTP/1.1\r\nHost: a.example\r\nCookie: session=secret\r\n\r\n")
        status, headers, body = read_response(sock)
        assert status == 405
        assert b"secret" not in body
        assert headers[b"strict-transport-security"] == [HSTS.header]
        # the connection stays usable
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
        assert read_response(sock)[0] == 200
        sock.close()
    assert [r.method for r in upstream.requests] == ["GET"]


def test_trace_is_forwarded_for_a_host_that_allows_it(ca: trustme.CA, upstream: Upstream) -> None:
    with running_node(snapshot(ca, upstream.port, allow_trace=True)) as node:
        sock = tls_connect(node.https_port, ca, "a.example")
        sock.sendall(b"TRACE / HTTP/1.1\r\nHost: a.example\r\n\r\n")
        assert read_response(sock)[0] == 200
        sock.close()
    assert [r.method for r in upstream.requests] == ["TRACE"]


def test_an_http_1_0_keep_alive_client_is_told_the_connection_stays_open(
    ca: trustme.CA, upstream: Upstream,
) -> None:
    with running_node(snapshot(ca, upstream.port)) as node:
        sock = tls_connect(node.https_port, ca, "a.example")
        for _ in range(2):  # a proxied answer, on the same connection twice
            sock.sendall(b"GET / HTTP/1.0\r\nHost: a.example\r\nConnection: keep-alive\r\n\r\n")
            status, headers, _ = read_response(sock)
            assert status == 200
            assert headers[b"connection"] == [b"keep-alive"]
        sock.sendall(b"TRACE / HTTP/1.0\r\nHost: a.example\r\nConnection: keep-alive\r\n\r\n")
        status, headers, _ = read_response(sock)  # and one the proxy makes
        assert (status, headers[b"connection"]) == (405, [b"keep-alive"])
        sock.sendall(b"GET / HTTP/1.0\r\nHost: a.example\r\n\r\n")  # no keep-alive: closed after
        status, headers, _ = read_response(sock)
        assert (status, headers[b"connection"]) == (200, [b"close"])
        assert sock.recv(1) == b""
        sock.close()
    assert len(upstream.requests) == 3


def test_an_acme_answer_during_a_stop_closes_the_connection(ca: trustme.CA, upstream: Upstream) -> None:
    with running_node(snapshot(ca, upstream.port)) as node:
        sock = socket.create_connection(("127.0.0.1", node.http_port), timeout=10)
        sock.sendall(b"GET /.well-known/acme-challenge/tok HTTP/1.1\r\nHost: a.example\r\n\r\n")
        assert read_response(sock)[:3:2] == (200, b"tok.keyauth")
        # a request in flight keeps the connection busy while the node stops
        node.loop.call(lambda: setattr(node.node, "stopping", True))
        sock.sendall(b"GET /.well-known/acme-challenge/tok HTTP/1.1\r\nHost: a.example\r\n\r\n")
        status, headers, body = read_response(sock)
        assert (status, body, headers[b"connection"]) == (200, b"tok.keyauth", [b"close"])
        assert sock.recv(1) == b""
        sock.close()


def test_a_disabled_host_answers_a_503_page_with_its_hsts(ca: trustme.CA, upstream: Upstream) -> None:
    cert = bundle(ca, "a.example")
    snap = core.Snapshot(revision=1, hosts=(
        route("a", ("a.example",), upstream.port, cert, hsts=HSTS, enabled=False),))
    with running_node(snap) as node:
        sock = tls_connect(node.https_port, ca, "a.example")
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
        status, headers, body = read_response(sock)
        assert (status, body) == (503, b"503 Service Unavailable: this host is disabled.\n")
        assert headers[b"strict-transport-security"] == [HSTS.header]
        sock.close()
        plain = socket.create_connection(("127.0.0.1", node.http_port), timeout=10)
        plain.sendall(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
        status, headers, _ = read_response(plain)  # no redirect to a host that is off
        assert status == 503 and b"location" not in headers and b"strict-transport-security" not in headers
        plain.close()
    assert upstream.requests == []
