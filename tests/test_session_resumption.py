"""TLS session resumption: on by default (tickets, and session IDs on TLS 1.2), and a switch
that turns every way of resuming off, so that every handshake is a full one."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import time
from dataclasses import replace

import pytest
import trustme

from proxycore import config as core
from proxycore.tlssessions import TicketKeys
from tests.proxyharness import (
    TLS_VERSIONS,
    Upstream,
    bundle,
    client_context,
    read_response,
    route,
    running_node,
    wait_until,
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
        assert node.stats()["listeners"]["https"]["resumed_sessions"] == 1  # counted, for the dashboard


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


def resumes(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession) -> bool:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock = ctx.wrap_socket(raw, server_hostname="a.example", session=session)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
    assert read_response(sock)[0] == 200
    reused = sock.session_reused
    sock.close()
    return reused


def first_session(port: int, ctx: ssl.SSLContext) -> ssl.SSLSession:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock = ctx.wrap_socket(raw, server_hostname="a.example")
    sock.sendall(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
    assert read_response(sock)[0] == 200
    session = sock.session
    sock.close()
    assert session is not None
    return session


@pytest.mark.parametrize("version", TLS_VERSIONS)
def test_sessions_resume_across_a_reload(ca: trustme.CA, upstream: Upstream, version: ssl.TLSVersion) -> None:
    # A reload builds new contexts; their ticket keys are derived, not random, so the
    # returning clients of an unchanged host keep resuming.
    ctx = client_context(ca, version=version)
    snap = snapshot(ca, upstream.port)
    with running_node(snap) as node:
        session = first_session(node.https_port, ctx)
        assert node.reload(replace(snap, revision=2))
        assert resumes(node.https_port, ctx, session)


def test_a_host_whose_client_certificate_rule_changed_does_not_resume_old_sessions(
    ca: trustme.CA, upstream: Upstream,
) -> None:
    ctx = client_context(ca)
    snap = snapshot(ca, upstream.port)
    with running_node(snap) as node:
        session = first_session(node.https_port, ctx)
        optional = core.ClientAuth(mode=core.ClientAuthMode.OPTIONAL, ca_pem=trustme.CA().cert_pem.bytes())
        changed = replace(snap, revision=2, hosts=(replace(snap.hosts[0], client_auth=optional),))
        assert node.reload(changed)
        assert not resumes(node.https_port, ctx, session)


def test_nodes_that_share_the_ticket_secret_resume_each_others_sessions(
    ca: trustme.CA, upstream: Upstream,
) -> None:
    # What a node's worker processes need: the same secret, the same keys.
    ctx = client_context(ca)
    secret = os.urandom(32)
    snap = snapshot(ca, upstream.port)
    with running_node(snap, ticket_keys=TicketKeys(secret)) as one, \
            running_node(snap, ticket_keys=TicketKeys(secret)) as two, \
            running_node(snap) as stranger:
        session = first_session(one.https_port, ctx)
        assert resumes(two.https_port, ctx, session)
        assert not resumes(stranger.https_port, ctx, session)


def test_tickets_stop_resuming_when_the_key_period_turns(ca: trustme.CA, upstream: Upstream) -> None:
    ctx = client_context(ca)
    with running_node(snapshot(ca, upstream.port), ticket_keys=TicketKeys(period=1.0)) as node:
        wait_until(lambda: time.time() % 1.0 < 0.5)  # the start of a period
        session = first_session(node.https_port, ctx)
        assert resumes(node.https_port, ctx, session)
        time.sleep(2.5)  # the sweep has given every context its next key
        assert not resumes(node.https_port, ctx, session)
