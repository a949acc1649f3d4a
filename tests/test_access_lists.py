"""Access lists by client address through real sockets: 403, refusal before TLS, reload."""

from __future__ import annotations

import socket
import ssl
import threading

import pytest
import trustme

from proxycore import config as core
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

ALLOW, DENY = core.AccessAction.ALLOW, core.AccessAction.DENY


def office(*rules: tuple[core.AccessAction, str], default: core.AccessAction = DENY) -> core.AccessList:
    return core.AccessList("office", default, tuple(core.AccessRule(a, s) for a, s in rules))


def snapshot(ca: trustme.CA, port: int, acl: core.AccessList | None, **fields: object) -> core.Snapshot:
    return core.Snapshot(revision=1, hosts=(
        route("a", ("a.example",), port, bundle(ca, "a.example"), hsts=HSTS, access=acl, **fields),
    ))


def get_from(source: str, node_port: int, ca: trustme.CA, target: str = "127.0.0.1") -> int:
    sock = connect_from(source, node_port, ca, "a.example", target=target)
    try:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
        return read_response(sock)[0]
    finally:
        sock.close()


def refused_before_handshake(source: str, port: int, ca: trustme.CA, target: str = "127.0.0.1") -> bool:
    try:
        get_from(source, port, ca, target)
    except ssl.SSLError as exc:
        return "ACCESS_DENIED" in str(exc).upper()
    return False


def test_allowed_addresses_pass_and_others_are_refused_before_the_handshake(
    ca: trustme.CA, upstream: Upstream
) -> None:
    acl = office((DENY, "127.0.0.3"), (ALLOW, "127.0.0.0/30"))
    with running_node(snapshot(ca, upstream.port, acl)) as node:
        assert get_from("127.0.0.1", node.https_port, ca) == 200
        assert get_from("127.0.0.2", node.https_port, ca) == 200
        assert refused_before_handshake("127.0.0.3", node.https_port, ca)  # denied by the first rule
        assert refused_before_handshake("127.0.0.4", node.https_port, ca)  # outside the /30: the default
        wait_until(lambda: node.stats()["hosts"]["a"]["denied"] == 2)
        host = node.stats()["hosts"]["a"]
        assert host["handshakes_ok"] == 2  # the refused ones never cost a handshake


def test_a_denied_address_gets_403_with_hsts_when_the_list_has_users(
    ca: trustme.CA, upstream: Upstream
) -> None:
    from tests.proxyharness import password_hash

    acl = core.AccessList("office", DENY, (core.AccessRule(ALLOW, "127.0.0.1"),),
                          core.Satisfy.ALL, (core.BasicUser("ops", password_hash("pw")),))
    with running_node(snapshot(ca, upstream.port, acl)) as node:
        sock = connect_from("127.0.0.2", node.https_port, ca, "a.example")
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
        status, headers, _ = read_response(sock)
        assert status == 403
        assert headers[b"strict-transport-security"] == [HSTS.header]
        wait_until(lambda: node.stats()["hosts"]["a"]["denied"] == 1)
    assert upstream.requests == []


def test_ipv6_loopback_is_a_client_of_its_own(ca: trustme.CA, upstream: Upstream) -> None:
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    allowed = office((ALLOW, "::1/128"))
    with running_node(snapshot(ca, upstream.port, allowed), address="::1") as node:
        assert get_from("::1", node.https_port, ca, target="::1") == 200
    denied = office((DENY, "::1"), (ALLOW, "::/0"))
    with running_node(snapshot(ca, upstream.port, denied), address="::1") as node:
        assert refused_before_handshake("::1", node.https_port, ca, target="::1")


def test_a_tcp_host_refuses_a_denied_address_before_the_handshake(ca: trustme.CA, upstream: Upstream) -> None:
    acl = office((ALLOW, "127.0.0.1"))
    with running_node(snapshot(ca, upstream.port, acl, mode=core.Mode.TCP)) as node:
        assert refused_before_handshake("127.0.0.2", node.https_port, ca)
        sock = connect_from("127.0.0.1", node.https_port, ca, "a.example")
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
        assert read_response(sock)[0] == 200  # the upstream's answer, piped
        sock.close()


def test_the_plain_http_listener_answers_403(ca: trustme.CA, upstream: Upstream) -> None:
    acl = office((ALLOW, "127.0.0.1"))
    snap = snapshot(ca, upstream.port, acl, redirect=core.Redirect(enabled=False))
    with running_node(snap) as node:
        for source, expected in (("127.0.0.1", 200), ("127.0.0.2", 403)):
            sock = connect_from(source, node.http_port)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
            status, headers, _ = read_response(sock)
            assert status == expected
            assert b"strict-transport-security" not in headers  # never on plain HTTP
            sock.close()


def test_a_reload_changes_the_list_under_traffic(ca: trustme.CA, upstream: Upstream) -> None:
    first = snapshot(ca, upstream.port, office((ALLOW, "127.0.0.2")))
    second = core.Snapshot(revision=2, hosts=(
        route("a", ("a.example",), upstream.port, first.hosts[0].certificate, hsts=HSTS,
              access=office((DENY, "127.0.0.2"), default=ALLOW)),
    ))
    with running_node(first) as node:
        # A keep-alive connection made before the reload keeps its snapshot ...
        kept = connect_from("127.0.0.2", node.https_port, ca, "a.example")
        statuses: list[int] = []
        stop = threading.Event()

        def traffic() -> None:
            while not stop.is_set():
                kept.sendall(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
                statuses.append(read_response(kept)[0])

        worker = threading.Thread(target=traffic)
        worker.start()
        wait_until(lambda: len(statuses) >= 5)
        assert node.reload(second)
        # ... new ones get the new list, at once.
        assert refused_before_handshake("127.0.0.2", node.https_port, ca)
        assert get_from("127.0.0.1", node.https_port, ca) == 200
        stop.set()
        worker.join(10)
        kept.close()
    assert statuses and set(statuses) == {200}
