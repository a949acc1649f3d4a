"""The idle upstream connections a target's pool keeps follow the load's concurrency.

A fixed cap below the number of requests in flight (nginx's ``keepalive 32``) closes
connections that the next wave of requests opens again. The pool keeps as many idle
connections as were lent out at once in the last 30 to 60 s, at least 64 and at most
1,024 (proxycore.upstream).
"""

from __future__ import annotations

import asyncio
import socket
import ssl

import trustme

from proxycore import config as core
from proxycore.upstream import MAX_IDLE_PER_TARGET, MIN_IDLE_KEPT, PEAK_WINDOW, TargetPool
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

CLIENTS = 100  # above MIN_IDLE_KEPT: a cap of 64 idle would close 36 after every wave
WAVES = 4


def test_waves_of_concurrent_requests_reuse_their_upstream_connections(
    ca: trustme.CA, loop_thread: LoopThread,
) -> None:
    arrived = 0
    release = asyncio.Event()

    async def all_at_once(ex: Exchange) -> None:
        # Answer only once every client's request of this wave is in: CLIENTS in flight.
        nonlocal arrived
        arrived += 1
        if arrived % CLIENTS == 0:
            release.set()
        await release.wait()
        ex.respond(200, b"ok")

    upstream = Upstream(loop_thread, all_at_once)
    upstream.start()
    snapshot = core.Snapshot(revision=1, hosts=(
        route("a", ("a.example",), upstream.port, bundle(ca, "a.example")),))
    try:
        with running_node(snapshot) as node:
            socks: list[ssl.SSLSocket] = [tls_connect(node.https_port, ca, "a.example")
                                          for _ in range(CLIENTS)]
            for wave in range(WAVES):
                loop_thread.call(release.clear)
                for sock in socks:
                    sock.sendall(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
                for sock in socks:
                    assert read_response(sock)[0] == 200, f"wave {wave}"
            for sock in socks:
                sock.close()
    finally:
        upstream.stop()
    assert arrived == CLIENTS * WAVES
    # Every wave needs CLIENTS connections at once; after the first, all come from the pool.
    assert upstream.connections == CLIENTS


def test_the_idle_limit_follows_the_peak_of_two_windows_within_its_bounds() -> None:
    pool = TargetPool(core.Target("127.0.0.1", 9), None, "")
    assert pool.idle_limit() == MIN_IDLE_KEPT  # nothing lent out yet
    pool.peak = 300
    assert pool.idle_limit() == 300
    start = pool.window_start
    pool.close_stale(start + PEAK_WINDOW)  # a new window: the last one's peak still counts
    assert (pool.last_peak, pool.peak) == (300, 0)
    assert pool.idle_limit() == 300
    pool.close_stale(start + 2 * PEAK_WINDOW)  # two windows without load: back to the floor
    assert pool.idle_limit() == MIN_IDLE_KEPT
    pool.peak = 100 * MAX_IDLE_PER_TARGET
    assert pool.idle_limit() == MAX_IDLE_PER_TARGET  # never more than the bound


def test_a_connection_returned_above_the_limit_is_closed(loop_thread: LoopThread) -> None:
    """The bound holds: with the limit reached, a returned connection is closed, not kept."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    pool = TargetPool(core.Target("127.0.0.1", port), None, "")

    async def scenario() -> tuple[int, int, bool, bool]:
        first = await pool.connect(5.0)
        second = await pool.connect(5.0)
        third = await pool.connect(5.0)
        try:
            pool.idle.extend([first] * (pool.idle_limit() - 1))  # one place left
            pool.give_back(second, reusable=True)
            kept = second in pool.idle
            pool.give_back(third, reusable=True)  # the pool is full now
            return len(pool.idle), pool.idle_limit(), kept, third.closed
        finally:
            pool.idle.clear()
            for conn in (first, second, third):
                conn.close()

    try:
        idle, limit, kept, closed = loop_thread.run(scenario())
    finally:
        listener.close()
    assert kept and closed
    assert idle == limit == MIN_IDLE_KEPT
