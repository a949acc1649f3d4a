"""HTTP Basic users of an access list through real sockets: 401, the header kept from upstreams."""

from __future__ import annotations

import base64
import json

import pytest
import trustme

from proxycore import access, credentials
from proxycore import config as core
from tests.proxyharness import (
    HSTS,
    Upstream,
    basic,
    bundle,
    connect_from,
    password_hash,
    read_response,
    route,
    running_node,
    wait_until,
)

USERS = (core.BasicUser("ops", password_hash("right horse")),)


def staging(satisfy: core.Satisfy = core.Satisfy.ANY, **fields: object) -> core.AccessList:
    return core.AccessList("staging", core.AccessAction.DENY, (core.AccessRule(core.AccessAction.ALLOW, "127.0.0.1"),),
                           satisfy, USERS, realm="Staging", **fields)  # type: ignore[arg-type]


def snapshot(ca: trustme.CA, port: int, acl: core.AccessList) -> core.Snapshot:
    return core.Snapshot(revision=1, hosts=(
        route("a", ("a.example",), port, bundle(ca, "a.example"), hsts=HSTS, access=acl),
    ))


def ask(sock: object, extra: str = "") -> tuple[int, dict[bytes, list[bytes]], bytes]:
    sock.sendall(f"GET / HTTP/1.1\r\nHost: a.example\r\n{extra}\r\n".encode())  # type: ignore[attr-defined]
    return read_response(sock)  # type: ignore[arg-type]


def test_a_missing_password_gets_401_with_the_realm_and_hsts(ca: trustme.CA, upstream: Upstream) -> None:
    with running_node(snapshot(ca, upstream.port, staging())) as node:
        sock = connect_from("127.0.0.2", node.https_port, ca, "a.example")
        status, headers, _ = ask(sock)
        assert status == 401
        assert headers[b"www-authenticate"] == [b'Basic realm="Staging", charset="UTF-8"']
        assert headers[b"strict-transport-security"] == [HSTS.header]
        wait_until(lambda: node.stats()["hosts"]["a"]["unauthorized"] == 1)
    assert upstream.requests == []


def test_the_right_password_passes_and_the_header_is_not_forwarded(ca: trustme.CA, upstream: Upstream) -> None:
    with running_node(snapshot(ca, upstream.port, staging())) as node:
        sock = connect_from("127.0.0.2", node.https_port, ca, "a.example")
        for _ in range(3):  # keep-alive: verified once for the connection
            status, _, body = ask(sock, basic("ops", "right horse"))
            assert status == 200
            names = [n.lower() for n, _ in json.loads(body)["headers"]]
            assert "authorization" not in names
        assert node.node.verifier.cache.entries  # remembered by the node for other connections


def test_the_header_passes_through_when_the_list_says_so(ca: trustme.CA, upstream: Upstream) -> None:
    with running_node(snapshot(ca, upstream.port, staging(pass_authorization=True))) as node:
        sock = connect_from("127.0.0.2", node.https_port, ca, "a.example")
        status, _, body = ask(sock, basic("ops", "right horse"))
    assert status == 200
    assert ["Authorization", "Basic " + base64.b64encode(b"ops:right horse").decode()] in json.loads(body)["headers"]


@pytest.mark.parametrize("line", [
    basic("ops", "wrong"), basic("nobody", "right horse"), "Authorization: Basic !!!\r\n",
    "Authorization: Basic " + base64.b64encode(b"no-colon").decode() + "\r\n",
    "Authorization: Basic " + "A" * 8000 + "\r\n", "Authorization: Digest x\r\n",
], ids=["wrong-password", "unknown-user", "bad-base64", "no-colon", "huge", "other-scheme"])
def test_wrong_or_malformed_credentials_get_401(ca: trustme.CA, upstream: Upstream, line: str) -> None:
    with running_node(snapshot(ca, upstream.port, staging())) as node:
        sock = connect_from("127.0.0.2", node.https_port, ca, "a.example")
        assert ask(sock, line)[0] == 401
        assert ask(sock, basic("ops", "right horse"))[0] == 200  # the same connection can still log in
    assert len(upstream.requests) == 1


def test_satisfy_all_asks_an_allowed_address_for_its_password(ca: trustme.CA, upstream: Upstream) -> None:
    with running_node(snapshot(ca, upstream.port, staging(core.Satisfy.ALL))) as node:
        sock = connect_from("127.0.0.1", node.https_port, ca, "a.example")
        assert ask(sock)[0] == 401
        assert ask(sock, basic("ops", "right horse"))[0] == 200
        other = connect_from("127.0.0.2", node.https_port, ca, "a.example")
        assert ask(other, basic("ops", "right horse"))[0] == 403


def test_satisfy_any_lets_an_allowed_address_in_without_a_password(ca: trustme.CA, upstream: Upstream) -> None:
    with running_node(snapshot(ca, upstream.port, staging())) as node:
        sock = connect_from("127.0.0.1", node.https_port, ca, "a.example")
        assert ask(sock)[0] == 200


def test_a_flood_of_wrong_passwords_is_throttled_without_hashing(ca: trustme.CA, upstream: Upstream) -> None:
    with running_node(snapshot(ca, upstream.port, staging())) as node:
        sock = connect_from("127.0.0.2", node.https_port, ca, "a.example")
        for _ in range(credentials.MAX_FAILURES):
            assert ask(sock, basic("ops", "wrong"))[0] == 401
        status, headers, _ = ask(sock, basic("ops", "right horse"))
        assert status == 429 and headers[b"retry-after"] == [b"60"]
        # another client address is not affected
        other = connect_from("127.0.0.3", node.https_port, ca, "a.example")
        assert ask(other, basic("ops", "right horse"))[0] == 200


def test_the_longest_username_and_password_pass(ca: trustme.CA, upstream: Upstream) -> None:
    username, password = "u" * access.MAX_USERNAME, "p" * access.MAX_PASSWORD
    acl = core.AccessList("big", core.AccessAction.DENY, users=(core.BasicUser(username, password_hash(password)),))
    with running_node(snapshot(ca, upstream.port, acl)) as node:
        sock = connect_from("127.0.0.2", node.https_port, ca, "a.example")
        assert ask(sock, basic(username, password))[0] == 200
        assert ask(sock, basic(username, password + "p"))[0] == 401
