"""Timeouts through real sockets: a slow head gets 408, an idle keep-alive connection is
closed, and a connection or an upstream that keeps making progress is left alone.

The node watches deadlines in its sweep (every 0.25 s) rather than with a timer per
request: a timeout fires between its limit and about half a second after it.
"""

from __future__ import annotations

import asyncio
import socket
import time

import trustme

from proxycore import config as core
from proxycore.limits import Limits
from tests.proxyharness import (
    Exchange,
    LoopServer,
    LoopThread,
    Upstream,
    bundle,
    read_response,
    route,
    running_node,
    tls_connect,
)

LATE = 0.75  # two sweeps and some scheduling slack


def snapshot(ca: trustme.CA, port: int, **fields: object) -> core.Snapshot:
    cert = bundle(ca, "a.example")
    return core.Snapshot(revision=1, hosts=(route("a", ("a.example",), port, cert, **fields),),
                         default_certificate=cert)


def closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the peer closed the connection (EOF or reset), or None if it did not."""
    start = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return None
    except (ConnectionResetError, OSError):
        pass
    return time.monotonic() - start


def test_a_head_sent_byte_by_byte_gets_408_at_the_head_timeout(ca: trustme.CA, upstream: Upstream) -> None:
    with running_node(snapshot(ca, upstream.port), Limits(head_timeout=1.0, idle_timeout=30)) as node:
        sock = tls_connect(node.https_port, ca, "a.example")
        start = time.monotonic()
        sock.settimeout(0.2)
        answer = b""
        for byte in b"GET / HTTP/1.1\r\nHost: a.example\r\nX-Slow: " + b"s" * 40:  # never ends
            sock.sendall(bytes([byte]))
            try:
                answer = sock.recv(4096)
            except TimeoutError:
                continue
            break
        elapsed = time.monotonic() - start
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert 1.0 <= elapsed <= 1.0 + LATE + 0.2
        assert closed_within(sock, 2.0) is not None
        assert upstream.requests == []  # nothing of the slow head reached the upstream


def test_an_idle_keep_alive_connection_is_closed_at_the_idle_timeout(ca: trustme.CA, upstream: Upstream) -> None:
    with running_node(snapshot(ca, upstream.port), Limits(idle_timeout=1.0)) as node:
        sock = tls_connect(node.https_port, ca, "a.example")
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
        assert read_response(sock)[0] == 200
        waited = closed_within(sock, 5.0)
        assert waited is not None and 1.0 - 0.05 <= waited <= 1.0 + LATE


def test_a_connection_that_keeps_sending_requests_stays_open(ca: trustme.CA, upstream: Upstream) -> None:
    with running_node(snapshot(ca, upstream.port), Limits(idle_timeout=1.0)) as node:
        sock = tls_connect(node.https_port, ca, "a.example")
        for _ in range(8):  # 8 x 0.4 s: well past the idle timeout in all, never idle that long
            sock.sendall(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
            assert read_response(sock)[0] == 200
            time.sleep(0.4)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
        assert read_response(sock)[0] == 200
        assert len(upstream.requests) == 9


def test_an_upstream_that_keeps_sending_is_not_cut_at_the_read_timeout(
    ca: trustme.CA, loop_thread: LoopThread,
) -> None:
    async def trickle(ex: Exchange) -> None:  # 6 x 0.3 s: longer than the read timeout in all
        ex.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n")
        for piece in b"abcdef":
            await ex.writer.drain()
            await asyncio.sleep(0.3)
            ex.writer.write(bytes([piece]))

    server = Upstream(loop_thread, trickle).start()
    with running_node(snapshot(ca, server.port, read_timeout=1.0)) as node:
        sock = tls_connect(node.https_port, ca, "a.example")
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
        status, _, body = read_response(sock)
        assert (status, body) == (200, b"abcdef")
        assert node.stats()["hosts"]["a"]["upstream_errors"] == {}
    server.stop()


def test_an_upstream_that_stops_sending_mid_body_is_cut(ca: trustme.CA, loop_thread: LoopThread) -> None:
    async def stall(ex: Exchange) -> None:
        ex.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await ex.writer.drain()
        await asyncio.sleep(5)

    server = Upstream(loop_thread, stall).start()
    with running_node(snapshot(ca, server.port, read_timeout=1.0)) as node:
        sock = tls_connect(node.https_port, ca, "a.example")
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
        waited = closed_within(sock, 5.0)  # the response started: aborted, no error page spliced in
        assert waited is not None and waited <= 1.0 + LATE
        assert node.stats()["hosts"]["a"]["upstream_errors"] == {"read_timeout": 1}
    server.stop()


def test_a_client_that_stalls_mid_body_gets_408_not_504(ca: trustme.CA, upstream: Upstream) -> None:
    # The upstream waits for the rest of the body with a long read timeout: the stall is
    # the client's, so it is the client's timeout that answers.
    limits = Limits(body_timeout=1.0)
    with running_node(snapshot(ca, upstream.port, read_timeout=30.0), limits) as node:
        sock = tls_connect(node.https_port, ca, "a.example")
        start = time.monotonic()
        sock.sendall(b"POST / HTTP/1.1\r\nHost: a.example\r\nContent-Length: 10\r\n\r\nabc")
        sock.settimeout(5)
        status, headers, _ = read_response(sock)
        elapsed = time.monotonic() - start
        assert status == 408
        assert headers[b"connection"] == [b"close"]
        assert 1.0 <= elapsed <= 1.0 + LATE + 0.2
        assert closed_within(sock, 2.0) is not None
        stats = node.stats()["hosts"]["a"]
        assert stats["upstream_errors"] == {}  # nothing upstream failed
        assert stats["responses"]["4xx"] == 1


def test_a_body_that_keeps_arriving_slowly_is_not_cut(ca: trustme.CA, upstream: Upstream) -> None:
    with running_node(snapshot(ca, upstream.port), Limits(body_timeout=1.0)) as node:
        sock = tls_connect(node.https_port, ca, "a.example")
        sock.sendall(b"POST / HTTP/1.1\r\nHost: a.example\r\nContent-Length: 6\r\n\r\n")
        for piece in b"abcdef":  # 6 x 0.4 s: past the body timeout in all, never stalled that long
            time.sleep(0.4)
            sock.sendall(bytes([piece]))
        assert read_response(sock)[0] == 200
        assert upstream.requests[0].body == b"abcdef"


class SlowContinue(LoopServer):
    """Takes 1.5 s to say 100 (Continue), then reads the body and answers."""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(1.5)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = await reader.readexactly(3)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n" + body)
        await writer.drain()
        writer.close()


def test_a_client_waiting_for_100_continue_is_not_the_one_stalling(
    ca: trustme.CA, loop_thread: LoopThread,
) -> None:
    server = SlowContinue(loop_thread).start()
    with running_node(snapshot(ca, server.port), Limits(body_timeout=1.0)) as node:
        sock = tls_connect(node.https_port, ca, "a.example")
        sock.sendall(b"PUT / HTTP/1.1\r\nHost: a.example\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
        sock.settimeout(5)
        assert read_response(sock)[0] == 100
        sock.sendall(b"abc")
        status, _, body = read_response(sock)
        assert (status, body) == (200, b"abc")
    server.stop()
