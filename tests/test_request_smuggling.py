"""Request smuggling: every ambiguous or malformed request is refused before the upstream sees a byte.

A proxy and its upstream must never disagree on where a request ends. So a
request whose framing, line endings or fields could be read two ways gets a
400 with ``Connection: close``, the proxy closes the connection, and nothing of
it is forwarded: the recording upstream sees no connection at all. These run
through the real node over TLS, and a few over the plain HTTP listener for a
host that proxies plain HTTP (redirect off).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import Callable

import pytest
import trustme

from proxycore import config as core
from tests.proxyharness import (
    HSTS,
    Exchange,
    LoopThread,
    Upstream,
    bundle,
    echo_handler,
    read_response,
    route,
    running_node,
    tls_connect,
)

SETTLE = 0.3  # seconds for anything the proxy might (wrongly) still forward to reach the upstream


def snapshot_for(ca: trustme.CA, port: int) -> core.Snapshot:
    return core.Snapshot(revision=1, hosts=(
        route("a", ("a.example",), port, bundle(ca, "a.example"), hsts=HSTS),
        route("p", ("p.example",), port, None, redirect=core.Redirect(enabled=False)),
    ))


def head(*fields: str, start: str = "POST / HTTP/1.1", host: str = "a.example") -> bytes:
    lines = [start, f"Host: {host}", *fields]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# Each: a whole request (head, and a body where one belongs) the proxy must refuse with 400.
MALFORMED: list[tuple[str, bytes]] = [
    # Content-Length and Transfer-Encoding together (CL.TE / TE.CL)
    ("cl-and-te", head("Content-Length: 5", "Transfer-Encoding: chunked") + b"0\r\n\r\n"),
    ("te-and-cl", head("Transfer-Encoding: chunked", "Content-Length: 5") + b"0\r\n\r\n"),
    # duplicate Content-Length
    ("duplicate-cl-same", head("Content-Length: 5", "Content-Length: 5") + b"hello"),
    ("duplicate-cl-different", head("Content-Length: 5", "Content-Length: 6") + b"hello!"),
    # malformed Content-Length
    ("cl-plus", head("Content-Length: +5") + b"hello"),
    ("cl-two-numbers", head("Content-Length: 5 5") + b"hello"),
    ("cl-hex", head("Content-Length: 0x5") + b"hello"),
    ("cl-negative", head("Content-Length: -1") + b"hello"),
    ("cl-empty", head("Content-Length: ") + b"hello"),
    ("cl-list", head("Content-Length: 5, 5") + b"hello"),
    # Transfer-Encoding other than one single chunked
    ("te-gzip-chunked", head("Transfer-Encoding: gzip, chunked") + b"0\r\n\r\n"),
    ("te-chunked-chunked", head("Transfer-Encoding: chunked, chunked") + b"0\r\n\r\n"),
    ("te-two-fields", head("Transfer-Encoding: chunked", "Transfer-Encoding: chunked") + b"0\r\n\r\n"),
    ("te-identity", head("Transfer-Encoding: identity") + b"hello"),
    ("te-xchunked", head("Transfer-Encoding: xchunked") + b"0\r\n\r\n"),
    # HTTP/1.0 has no Transfer-Encoding: its framing is faulty (RFC 9112 §6.1)
    ("te-on-http-1.0", head("Transfer-Encoding: chunked", start="POST / HTTP/1.0") + b"5\r\nhello\r\n0\r\n\r\n"),
    ("te-on-http-1.0-keep-alive", head("Connection: keep-alive", "Transfer-Encoding: chunked",
                                       start="POST / HTTP/1.0") + b"0\r\n\r\n"),
    # obs-fold (a continuation line)
    ("obs-fold", head("X-A: a", " b", start="GET / HTTP/1.1")),
    ("obs-fold-tab-te", head("Transfer-Encoding:", "\tchunked") + b"0\r\n\r\n"),
    # line endings other than CRLF
    ("bare-lf-everywhere", b"GET / HTTP/1.1\nHost: a.example\n\n"),
    ("bare-lf-one-line", b"GET / HTTP/1.1\r\nHost: a.example\nX-A: b\r\n\r\n"),
    ("bare-cr-in-value", b"GET / HTTP/1.1\r\nHost: a.example\r\nX-A: a\rb\r\n\r\n"),
    ("bare-cr-line-end", b"GET / HTTP/1.1\r\nHost: a.example\rX-A: b\r\n\r\n"),
    # whitespace between a field name and its colon
    ("space-before-colon", head("X-A : b", start="GET / HTTP/1.1")),
    ("space-before-colon-te", head("Transfer-Encoding : chunked") + b"0\r\n\r\n"),
    ("tab-before-colon", head("X-A\t: b", start="GET / HTTP/1.1")),
    # control bytes in a field name and in a field value
    ("nul-in-name", head("X-\x00A: b", start="GET / HTTP/1.1")),
    ("ctl-01-in-name", head("X-\x01A: b", start="GET / HTTP/1.1")),
    ("del-in-name", head("X-\x7fA: b", start="GET / HTTP/1.1")),
    ("nul-in-value", head("X-A: a\x00b", start="GET / HTTP/1.1")),
    ("ctl-01-in-value", head("X-A: a\x01b", start="GET / HTTP/1.1")),
    ("del-in-value", head("X-A: a\x7fb", start="GET / HTTP/1.1")),
    # Host: missing on HTTP/1.1, or twice
    ("missing-host", b"GET / HTTP/1.1\r\nX-A: b\r\n\r\n"),
    ("duplicate-host-same", head("Host: a.example", start="GET / HTTP/1.1")),
    ("duplicate-host-different", head("Host: b.example", start="GET / HTTP/1.1")),
]

# A few of them on the plain HTTP listener, to a host that proxies plain HTTP.
PLAIN_CASES = ("cl-and-te", "duplicate-cl-different", "te-gzip-chunked", "obs-fold",
               "bare-lf-one-line", "space-before-colon-te", "nul-in-value", "missing-host",
               "duplicate-host-different", "te-on-http-1.0")
PLAIN: list[tuple[str, bytes]] = [
    (name, request.replace(b"Host: a.example", b"Host: p.example"))
    for name, request in MALFORMED if name in PLAIN_CASES
]


def ids(cases: list[tuple[str, bytes]]) -> list[str]:
    return [name for name, _ in cases]


def plain_connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def assert_closed_by_proxy(sock: socket.socket) -> None:
    """After its last response the proxy closes: the client reads end-of-stream, nothing more."""
    sock.settimeout(5)
    try:
        rest = sock.recv(65536)
    except (ConnectionResetError, ssl.SSLEOFError):
        return  # closed, if not politely
    assert rest == b"", f"the proxy sent more after its 400: {rest!r}"


def assert_refused(sock: socket.socket) -> dict[bytes, list[bytes]]:
    status, headers, body = read_response(sock)
    assert status == 400, body
    assert headers[b"connection"] == [b"close"]
    assert body.startswith(b"400 Bad Request")
    assert_closed_by_proxy(sock)
    return headers


def assert_upstream_untouched(upstream: Upstream) -> None:
    time.sleep(SETTLE)
    assert upstream.raw == b""
    assert upstream.connections == 0


@pytest.mark.parametrize("request_bytes", [r for _, r in MALFORMED], ids=ids(MALFORMED))
def test_malformed_request_over_tls_is_400_closed_and_never_forwarded(
    ca: trustme.CA, upstream: Upstream, request_bytes: bytes
) -> None:
    with running_node(snapshot_for(ca, upstream.port)) as node:
        sock = tls_connect(node.https_port, ca, "a.example")
        sock.sendall(request_bytes)
        assert_refused(sock)
        assert_upstream_untouched(upstream)


@pytest.mark.parametrize("request_bytes", [r for _, r in PLAIN], ids=ids(PLAIN))
def test_malformed_request_on_the_http_listener_is_400_closed_and_never_forwarded(
    ca: trustme.CA, upstream: Upstream, request_bytes: bytes
) -> None:
    with running_node(snapshot_for(ca, upstream.port)) as node:
        sock = plain_connect(node.http_port)
        sock.sendall(request_bytes)
        headers = assert_refused(sock)
        assert b"strict-transport-security" not in headers  # never on plain HTTP
        assert_upstream_untouched(upstream)


@pytest.mark.parametrize("name", ["cl-and-te", "te-gzip-chunked", "obs-fold", "nul-in-value",
                                  "missing-host", "duplicate-host-different"])
def test_the_400_carries_the_hsts_of_the_host_chosen_by_sni(
    ca: trustme.CA, upstream: Upstream, name: str
) -> None:
    request_bytes = dict(MALFORMED)[name]
    with running_node(snapshot_for(ca, upstream.port)) as node:
        sock = tls_connect(node.https_port, ca, "a.example")
        sock.sendall(request_bytes)
        headers = assert_refused(sock)
    assert headers[b"strict-transport-security"] == [b"max-age=31536000"]  # exactly once


# ---- bad chunked bodies ---------------------------------------------------------------
#
# A chunked request's head is valid, and bodies are streamed, not buffered: by the
# time a bad chunk-size line arrives the head (and earlier good chunks) may already
# be at the upstream. What must hold either way:
#   * the bad bytes, and anything after them, never reach the upstream;
#   * an upstream connection that carries the unfinished request is closed, never
#     pooled, so that no later request can be read as the rest of this body;
#   * the client is told: 400 + Connection: close while no response byte has been
#     sent -- whether or not the head was forwarded, as for a 413 found mid-body.
#     Only once a response has started is aborting the client connection right
#     (an error page spliced into a response would be a second response). The
#     upstream below never answers, so these tests always expect the 400.

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: a.example\r\n\r\n"
BAD_CHUNKS: list[tuple[str, bytes]] = [
    ("size-not-hex", b"zz\r\nhello\r\n0\r\n\r\n" + SMUGGLED),
    ("size-negative", b"-1\r\nhello\r\n0\r\n\r\n" + SMUGGLED),
    ("size-20-hex-digits", b"00000000000000000005\r\nhello\r\n0\r\n\r\n" + SMUGGLED),
    ("size-line-ends-in-bare-lf", b"5\nhello\r\n0\r\n\r\n" + SMUGGLED),
    ("size-line-missing", b"hello\r\n0\r\n\r\n" + SMUGGLED),
    ("data-not-followed-by-crlf", b"5\r\nhelloXX0\r\n\r\n" + SMUGGLED),
]
CHUNKED_HEAD = head("Transfer-Encoding: chunked", start="POST /upload HTTP/1.1")
GOOD_CHUNK = b"3\r\nabc\r\n"


class RawUpstream(Upstream):
    """Records every byte it receives, verbatim, and never answers; counts connections it saw end."""

    def __init__(self, loop: LoopThread) -> None:
        super().__init__(loop)
        self.ended = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while data := await reader.read(65536):
                self.raw += data
        except ConnectionError:
            pass
        finally:
            self.ended += 1
            writer.close()


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def assert_only_head_and_good_chunk_forwarded(upstream: RawUpstream) -> None:
    time.sleep(SETTLE)
    raw = bytes(upstream.raw)
    assert raw.startswith(b"POST /upload HTTP/1.1\r\n")
    assert raw.endswith(b"\r\n\r\n" + GOOD_CHUNK)  # nothing after the last good chunk
    assert raw.count(b"\r\n\r\n") == 1
    assert b"hello" not in raw
    assert b"/smuggled" not in raw


@pytest.mark.parametrize("bad", [b for _, b in BAD_CHUNKS], ids=ids(BAD_CHUNKS))
def test_bad_chunk_in_the_same_packet_as_the_head_is_400_and_nothing_is_forwarded(
    ca: trustme.CA, loop_thread: LoopThread, bad: bytes
) -> None:
    server = RawUpstream(loop_thread).start()
    with running_node(snapshot_for(ca, server.port)) as node:
        sock = tls_connect(node.https_port, ca, "a.example")
        sock.sendall(CHUNKED_HEAD + GOOD_CHUNK + bad)
        assert_refused(sock)
        time.sleep(SETTLE)
    assert server.raw == b""
    server.stop()


@pytest.mark.parametrize("bad", [b for _, b in BAD_CHUNKS], ids=ids(BAD_CHUNKS))
def test_bad_chunk_after_the_head_was_forwarded_never_reaches_the_upstream(
    ca: trustme.CA, loop_thread: LoopThread, bad: bytes
) -> None:
    server = RawUpstream(loop_thread).start()
    with running_node(snapshot_for(ca, server.port)) as node:
        sock = tls_connect(node.https_port, ca, "a.example")
        sock.sendall(CHUNKED_HEAD + GOOD_CHUNK)
        assert wait_for(lambda: bytes(server.raw).endswith(GOOD_CHUNK)), bytes(server.raw)
        sock.sendall(bad)
        assert_refused(sock)
        assert_only_head_and_good_chunk_forwarded(server)
        # The upstream connection holding the unfinished request is closed, not pooled.
        assert wait_for(lambda: server.ended == 1)
    server.stop()


# ---- pipelining -------------------------------------------------------------------------

GOOD = b"GET /first HTTP/1.1\r\nHost: a.example\r\n\r\n"
BAD_SECOND = b"POST /second HTTP/1.1\r\nHost: a.example\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx"


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the proxy sends until it closes (pipelined responses may share a read)."""
    sock.settimeout(5)
    data = b""
    with contextlib.suppress(ConnectionResetError, ssl.SSLEOFError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def split_responses(data: bytes) -> list[tuple[int, dict[bytes, list[bytes]], bytes]]:
    """Responses framed by Content-Length, as ``read_response`` returns them, in order."""
    out = []
    while data:
        head, sep, data = data.partition(b"\r\n\r\n")
        assert sep, f"incomplete response head: {head!r}"
        lines = head.split(b"\r\n")
        headers: dict[bytes, list[bytes]] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
        length = int(headers[b"content-length"][0])
        out.append((int(lines[0].split()[1]), headers, data[:length]))
        data = data[length:]
    return out


def assert_first_answered_then_400(sock: socket.socket, upstream: Upstream) -> None:
    responses = split_responses(read_until_closed(sock))
    assert [status for status, _, _ in responses] == [200, 400]
    (_, first_headers, first_body), (_, headers, body) = responses
    assert b'"/first"' in first_body
    assert b"connection" not in first_headers  # the first exchange was a normal keep-alive one
    assert headers[b"connection"] == [b"close"]
    assert body.startswith(b"400 Bad Request")
    time.sleep(SETTLE)
    assert [ex.target for ex in upstream.requests] == ["/first"]
    assert b"/second" not in upstream.raw


def test_pipelined_malformed_second_request_in_one_packet(ca: trustme.CA, upstream: Upstream) -> None:
    with running_node(snapshot_for(ca, upstream.port)) as node:
        sock = tls_connect(node.https_port, ca, "a.example")
        sock.sendall(GOOD + BAD_SECOND)
        assert_first_answered_then_400(sock, upstream)


def test_pipelined_malformed_second_request_while_the_first_is_at_the_upstream(
    ca: trustme.CA, loop_thread: LoopThread
) -> None:
    async def slow(ex: Exchange) -> None:
        await asyncio.sleep(0.5)
        await echo_handler(ex)

    server = Upstream(loop_thread, slow).start()
    with running_node(snapshot_for(ca, server.port)) as node:
        sock = tls_connect(node.https_port, ca, "a.example")
        sock.sendall(GOOD)
        assert wait_for(lambda: len(server.requests) == 1)
        sock.sendall(BAD_SECOND)
        assert_first_answered_then_400(sock, server)
    server.stop()


def test_pipelined_malformed_second_request_on_the_http_listener(
    ca: trustme.CA, upstream: Upstream
) -> None:
    with running_node(snapshot_for(ca, upstream.port)) as node:
        sock = plain_connect(node.http_port)
        sock.sendall(GOOD.replace(b"a.example", b"p.example") + BAD_SECOND.replace(b"a.example", b"p.example"))
        assert_first_answered_then_400(sock, upstream)


def test_a_refused_request_does_not_disturb_the_next_connection(ca: trustme.CA, upstream: Upstream) -> None:
    with running_node(snapshot_for(ca, upstream.port)) as node:
        sock = tls_connect(node.https_port, ca, "a.example")
        sock.sendall(dict(MALFORMED)["cl-and-te"])
        assert_refused(sock)
        sock = tls_connect(node.https_port, ca, "a.example")
        sock.sendall(GOOD)
        assert read_response(sock)[0] == 200
        stats = node.stats()
    assert [ex.target for ex in upstream.requests] == ["/first"]
    assert stats["hosts"]["a"]["responses"]["4xx"] == 1
