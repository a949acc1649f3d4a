"""Graceful stop: no new connections, in-flight requests finish with Connection: close,
whatever is left at the deadline is cut."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
import trustme

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
)


def slow_upstream(loop: LoopThread, delay: float) -> Upstream:
    async def slow(ex: Exchange) -> None:
        await asyncio.sleep(delay)
        ex.respond(200, b"done")

    return Upstream(loop, slow).start()


def test_stop_lets_the_request_in_flight_finish_and_refuses_new_connections(
    ca: trustme.CA, loop_thread: LoopThread
) -> None:
    server = slow_upstream(loop_thread, 0.8)
    snap = core.Snapshot(revision=1, hosts=(route("a", ("a.example",), server.port, bundle(ca, "a.example")),))
    with running_node(snap) as node:
        busy = tls_connect(node.https_port, ca, "a.example")
        idle = tls_connect(node.https_port, ca, "a.example")
        busy.sendall(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
        time.sleep(0.2)
        stopper = threading.Thread(target=node.stop, args=(5.0,))
        started = time.monotonic()
        stopper.start()
        time.sleep(0.1)
        with pytest.raises(OSError):  # the listener is closed
            socket.create_connection(("127.0.0.1", node.https_port), timeout=2)
        assert idle.recv(10) == b""  # an idle keep-alive connection is closed at once
        status, headers, body = read_response(busy)
        stopper.join(10)
        elapsed = time.monotonic() - started
    assert (status, body) == (200, b"done")
    assert headers[b"connection"] == [b"close"]
    assert busy.recv(10) == b""
    assert elapsed < 3


def test_what_is_left_at_the_deadline_is_cut(ca: trustme.CA, loop_thread: LoopThread) -> None:
    server = slow_upstream(loop_thread, 10)
    snap = core.Snapshot(revision=1, hosts=(route("a", ("a.example",), server.port, bundle(ca, "a.example"),
                                                  read_timeout=30),))
    with running_node(snap) as node:
        sock = tls_connect(node.https_port, ca, "a.example")
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
        time.sleep(0.2)
        started = time.monotonic()
        node.stop(0.5)
        elapsed = time.monotonic() - started
        with pytest.raises((ConnectionError, OSError)):
            read_response(sock)
    assert 0.4 < elapsed < 3
