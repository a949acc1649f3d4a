"""TLS session resumption: on by default (tickets, and session IDs on TLS 1.2), and a switch
that turns every way of resuming off, so that every handshake is a full one."""

from __future__ import annotations

import socket
import ssl
import subprocess

import pytest
import trustme

from proxycore import config as core
from tests.proxyharness import (
    TLS_VERSIONS,
    Upstream,
    bundle,
    client_context,
    read_response,
    route,
    running_node,
)


def snapshot(ca: trustme.CA, port: int) -> core.Snapshot:
    return core.Snapshot(revision=1, hosts=(route("a", ("a.example",), port, bundle(ca, "a.example")),))


def two_connections(port: int, ctx: ssl.SSLContext) -> tuple[bool, bool]:
    """Whether each of two connections resumed, the second offering the first one's session."""
    reused = []
    session = None
    for _ in range(2):
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock = ctx.wrap_socket(raw, server_hostname="a.example", session=session)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
        assert read_response(sock)[0] == 200  # (a TLS 1.3 ticket arrives with the first data)
        reused.append(sock.session_reused)
        session = sock.session
        sock.close()
    return reused[0], reused[1]


@pytest.mark.parametrize("version", TLS_VERSIONS)
def test_sessions_resume_by_default(ca: trustme.CA, upstream: Upstream, version: ssl.TLSVersion) -> None:
    with running_node(snapshot(ca, upstream.port)) as node:
        assert two_connections(node.https_port, client_context(ca, version=version)) == (False, True)


@pytest.mark.parametrize("version", TLS_VERSIONS)
def test_with_resumption_off_every_handshake_is_full(
    ca: trustme.CA, upstream: Upstream, version: ssl.TLSVersion,
) -> None:
    ctx = client_context(ca, version=version)
    with running_node(snapshot(ca, upstream.port), session_resumption=False) as node:
        assert two_connections(node.https_port, ctx) == (False, False)


def reconnects_resumed(port: int) -> int:
    """Of openssl's five reconnections with TLS 1.2 and no tickets, how many resumed (by session ID)."""
    out = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "a.example",
         "-tls1_2", "-no_ticket", "-reconnect"], input=b"", capture_output=True, timeout=30, check=False,
    ).stdout.decode()
    assert out.count("New, TLSv1.2") + out.count("Reused, TLSv1.2") == 6, out
    return out.count("Reused, TLSv1.2")


def test_tls_1_2_session_ids_resume_only_while_resumption_is_on(ca: trustme.CA, upstream: Upstream) -> None:
    # Without tickets only OpenSSL's server-side session cache can resume: ssl cannot turn
    # it off, proxycore.tlssessions does.
    with running_node(snapshot(ca, upstream.port)) as node:
        assert reconnects_resumed(node.https_port) == 5
    with running_node(snapshot(ca, upstream.port), session_resumption=False) as node:
        assert reconnects_resumed(node.https_port) == 0
