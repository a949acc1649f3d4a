"""Reload under traffic: new connections use the new snapshot, in-flight ones finish on theirs,
a snapshot that cannot be built is rejected whole."""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
from dataclasses import replace

import pytest
import trustme
from cryptography import x509

from proxycore import config as core
from tests.proxyharness import (
    Exchange,
    LoopThread,
    Upstream,
    bundle,
    read_response,
    route,
    running_node,
    tls_connect,
    with_host,
)


def serial_seen(port: int, ca: trustme.CA, name: str) -> int:
    sock = tls_connect(port, ca, name)
    der = sock.getpeercert(binary_form=True)
    sock.close()
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


class Traffic(threading.Thread):
    """Keeps requesting host a: keep-alive runs of 5 requests, bounded in count and time."""

    def __init__(self, port: int, ca: trustme.CA) -> None:
        super().__init__(daemon=True)
        self.port, self.ca = port, ca
        self.stop_at = time.monotonic() + 20
        self.done = threading.Event()
        self.ok = 0
        self.failures: list[str] = []

    def run(self) -> None:
        while not self.done.is_set() and time.monotonic() < self.stop_at and self.ok < 5000:
            try:
                sock = tls_connect(self.port, self.ca, "a.example")
                for _ in range(5):
                    sock.sendall(b"GET /t HTTP/1.1\r\nHost: a.example\r\n\r\n")
                    status, _, _ = read_response(sock)
                    if status != 200:
                        self.failures.append(f"status {status}")
                    else:
                        self.ok += 1
                sock.close()
            except (OSError, ssl.SSLError) as exc:
                self.failures.append(repr(exc))


def test_reload_under_traffic_adds_replaces_and_removes_without_failing_requests(
    ca: trustme.CA, upstream: Upstream
) -> None:
    a1 = bundle(ca, "a.example")
    snap = core.Snapshot(revision=1, hosts=(
        route("a", ("a.example",), upstream.port, a1),
        route("b", ("b.example",), upstream.port, bundle(ca, "b.example")),
    ))
    with running_node(snap) as node:
        traffic = Traffic(node.https_port, ca)
        traffic.start()
        time.sleep(0.3)
        # 1. a host is added
        snap = with_host(snap, route("c", ("c.example",), upstream.port, bundle(ca, "c.example")))
        assert node.reload(snap)
        sock = tls_connect(node.https_port, ca, "c.example")
        sock.sendall(b"GET / HTTP/1.1\r\nHost: c.example\r\n\r\n")
        assert read_response(sock)[0] == 200
        time.sleep(0.3)
        # 2. a's certificate is replaced: the next handshake shows the new serial
        a2 = bundle(ca, "a.example")
        snap = replace(snap, revision=3, hosts=(
            replace(snap.hosts[0], certificate=a2), *snap.hosts[1:]))
        assert node.reload(snap)
        assert serial_seen(node.https_port, ca, "a.example") == int(a2.serial, 16)
        time.sleep(0.3)
        # 3. b is removed: no certificate for it any more (no default)
        snap = replace(snap, revision=4, hosts=(snap.hosts[0], snap.hosts[2]))
        assert node.reload(snap)
        with pytest.raises(ssl.SSLError):
            tls_connect(node.https_port, ca, "b.example")
        time.sleep(0.3)
        traffic.done.set()
        traffic.join(30)
        stats = node.stats()
    assert traffic.failures == []
    assert traffic.ok >= 20
    assert stats["config_revision"] == 4


def test_a_request_in_flight_finishes_on_its_snapshot(ca: trustme.CA, loop_thread: LoopThread) -> None:
    async def slow(ex: Exchange) -> None:
        await asyncio.sleep(0.8)
        ex.respond(200, b"slow answer")

    server = Upstream(loop_thread, slow).start()
    snap = core.Snapshot(revision=1, hosts=(route("a", ("a.example",), server.port, bundle(ca, "a.example")),))
    with running_node(snap) as node:
        sock = tls_connect(node.https_port, ca, "a.example")
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
        time.sleep(0.2)
        assert node.reload(core.Snapshot(revision=2))  # every host removed
        status, _, body = read_response(sock)
        assert (status, body) == (200, b"slow answer")
        with pytest.raises(ssl.SSLError):  # new connections see the new (empty) config
            tls_connect(node.https_port, ca, "a.example")
    server.stop()


def test_a_snapshot_that_cannot_be_built_is_rejected_and_the_old_one_keeps_serving(
    ca: trustme.CA, upstream: Upstream
) -> None:
    good = core.Snapshot(revision=1, hosts=(route("a", ("a.example",), upstream.port, bundle(ca, "a.example")),))
    broken_cert = replace(bundle(ca, "z.example"), key_pem=bundle(ca, "other.example").key_pem)
    bad = with_host(good, route("z", ("z.example",), upstream.port, broken_cert))
    with running_node(good) as node:
        assert node.reload(bad) is False
        stats = node.stats()
        sock = tls_connect(node.https_port, ca, "a.example")
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
        assert read_response(sock)[0] == 200
    assert stats["config_revision"] == 1
    assert stats["config_rejected"]["revision"] == 2
    assert "z.example" in stats["config_rejected"]["error"]
    assert "key does not match" in stats["config_rejected"]["error"]


def test_pooled_connections_to_a_target_that_left_are_not_reused(
    ca: trustme.CA, loop_thread: LoopThread
) -> None:
    old = Upstream(loop_thread).start()
    new = Upstream(loop_thread).start()
    cert = bundle(ca, "a.example")
    snap = core.Snapshot(revision=1, hosts=(route("a", ("a.example",), old.port, cert),))
    with running_node(snap) as node:
        sock = tls_connect(node.https_port, ca, "a.example")
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
        assert read_response(sock)[0] == 200
        assert node.reload(replace(snap, revision=2, hosts=(route("a", ("a.example",), new.port, cert),)))
        for _ in range(3):
            sock.sendall(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
            assert read_response(sock)[0] == 200
    # The client connection kept its snapshot, so its requests still go to the old target,
    # but the retired pool never hands out a connection again: one upstream connection each.
    assert len(old.requests) == 4
    assert old.connections == 4
    assert new.requests == []
    old.stop()
    new.stop()


def test_new_connections_after_reload_use_the_new_target(ca: trustme.CA, loop_thread: LoopThread) -> None:
    old = Upstream(loop_thread).start()
    new = Upstream(loop_thread).start()
    cert = bundle(ca, "a.example")
    snap = core.Snapshot(revision=1, hosts=(route("a", ("a.example",), old.port, cert),))
    with running_node(snap) as node:
        sock = tls_connect(node.https_port, ca, "a.example")
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
        assert read_response(sock)[0] == 200
        sock.close()
        assert node.reload(replace(snap, revision=2, hosts=(route("a", ("a.example",), new.port, cert),)))
        sock = tls_connect(node.https_port, ca, "a.example")
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
        assert read_response(sock)[0] == 200
        time.sleep(0.2)
        # the old target's idle pooled connection was closed by the reload
        old_closed = node.loop.call(lambda: sum(len(p.idle) for p in node.node.pools.pools.values()))
    assert len(old.requests) == 1 and len(new.requests) == 1
    assert old_closed == 1  # only the new target's connection is pooled
    old.stop()
    new.stop()
