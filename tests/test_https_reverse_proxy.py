"""HTTP/1.1 reverse proxy over TLS: forwarding headers, keep-alive, streaming, HSTS, errors."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import socket
import subprocess

import pytest
import trustme

from proxycore import config as core
from tests.proxyharness import (
    HSTS,
    Exchange,
    LoopThread,
    Upstream,
    bundle,
    free_port,
    read_response,
    route,
    running_node,
    tls_connect,
)


def snapshot_for(ca: trustme.CA, port: int, **fields: object) -> core.Snapshot:
    return core.Snapshot(revision=1, hosts=(
        route("a", ("a.example",), port, bundle(ca, "a.example"), hsts=HSTS, **fields),
        route("b", ("b.example",), port, bundle(ca, "b.example")),
    ))


def get(sock: socket.socket, path: str = "/", host: str = "a.example", extra: str = "") -> bytes:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode())
    return b""


def test_forwarding_headers_are_set_by_the_proxy_and_client_values_replaced(
    ca: trustme.CA, upstream: Upstream
) -> None:
    with running_node(snapshot_for(ca, upstream.port)) as node:
        sock = tls_connect(node.https_port, ca, "a.example")
        get(sock, "/p?q=1", extra=(
            "X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: evil\r\n"
            "Forwarded: for=6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\nConnection: keep-alive, X-Secret\r\n"
            "X-Secret: hop\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nUser-Agent: t\r\n"
        ))
        status, _, body = read_response(sock)
    assert status == 200
    seen = json.loads(body)
    headers = [(n.lower(), v) for n, v in seen["headers"]]
    assert seen["target"] == "/p?q=1"
    assert ("host", "a.example") in headers
    assert ("x-forwarded-for", "127.0.0.1") in headers
    assert ("x-forwarded-proto", "https") in headers
    assert ("x-forwarded-host", "a.example") in headers
    assert ("forwarded", 'for=127.0.0.1;proto=https;host="a.example"') in headers
    names = [n for n, _ in headers]
    assert "6.6.6.6" not in body.decode()
    for hop in ("x-secret", "keep-alive", "te", "connection", "x-real-ip"):
        assert hop not in names
    assert names.count("x-forwarded-for") == 1
    assert ("user-agent", "t") in headers


def test_keep_alive_reuses_one_upstream_connection(ca: trustme.CA, upstream: Upstream) -> None:
    with running_node(snapshot_for(ca, upstream.port)) as node:
        for _ in range(3):  # three client connections ...
            sock = tls_connect(node.https_port, ca, "a.example")
            for _ in range(10):  # ... of ten requests each
                get(sock)
                assert read_response(sock)[0] == 200
            sock.close()
    assert len(upstream.requests) == 30
    assert upstream.connections == 1


def test_chunked_and_large_bodies_stream_both_ways_byte_exact(
    ca: trustme.CA, loop_thread: LoopThread
) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 17)

    async def big(ex: Exchange) -> None:
        if ex.method == "POST":  # echo the upload's digest, chunked
            digest = hashlib.sha256(ex.body).hexdigest().encode()
            ex.writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            ex.writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(digest), digest))
        else:
            ex.respond(200, payload)

    server = Upstream(loop_thread, big).start()
    with running_node(snapshot_for(ca, server.port)) as node:
        sock = tls_connect(node.https_port, ca, "a.example")
        get(sock, "/big")
        status, headers, body = read_response(sock)
        assert status == 200 and body == payload
        assert headers[b"content-length"] == [str(len(payload)).encode()]
        # A chunked upload of 2 MiB in uneven chunks arrives whole.
        sock.sendall(b"POST /up HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n\r\n")
        upload = payload[: 2 * 1024 * 1024]
        for i in range(0, len(upload), 70001):
            piece = upload[i : i + 70001]
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        sock.sendall(b"0\r\n\r\n")
        status, headers, body = read_response(sock)
        assert status == 200
        assert headers[b"transfer-encoding"] == [b"chunked"]
        assert body == hashlib.sha256(upload).hexdigest().encode()
    server.stop()


def test_expect_100_continue_is_relayed(ca: trustme.CA, loop_thread: LoopThread) -> None:
    async def continuing(ex: Exchange) -> None:
        ex.respond(201, b"stored %d" % len(ex.body))

    class ContinueUpstream(Upstream):
        async def _read_head(self, reader: asyncio.StreamReader) -> bytes:
            head = await super()._read_head(reader)
            if b"100-continue" in head.lower():
                writer = self._writer
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            return head

        async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self._writer = writer
            await super()._serve(reader, writer)

    server = ContinueUpstream(loop_thread, continuing).start()
    with running_node(snapshot_for(ca, server.port)) as node:
        sock = tls_connect(node.https_port, ca, "a.example")
        sock.sendall(b"PUT /f HTTP/1.1\r\nHost: a.example\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        status, _, _ = read_response(sock, head_only=True)
        assert status == 100
        sock.sendall(b"hello")
        status, _, body = read_response(sock)
    assert status == 201 and body == b"stored 5"
    server.stop()


def test_sni_of_one_host_with_host_header_of_another_gets_421(ca: trustme.CA, upstream: Upstream) -> None:
    with running_node(snapshot_for(ca, upstream.port)) as node:
        sock = tls_connect(node.https_port, ca, "a.example")
        get(sock, host="b.example")
        status, headers, _ = read_response(sock)
        assert status == 421
        assert headers[b"strict-transport-security"] == [b"max-age=31536000"]
        get(sock, host="a.example")  # the connection stays usable for its own host
        assert read_response(sock)[0] == 200
    assert all(ex.header("host") == ["a.example"] for ex in upstream.requests)


def test_hsts_exactly_once_replacing_or_keeping_the_upstreams(ca: trustme.CA, loop_thread: LoopThread) -> None:
    async def with_sts(ex: Exchange) -> None:
        ex.respond(200, b"x", [("Content-Length", "1"), ("Strict-Transport-Security", "max-age=5")])

    server = Upstream(loop_thread, with_sts).start()
    keep = core.HSTS(max_age=600, include_subdomains=True, preload=False, override_upstream=False)
    snap = core.Snapshot(revision=1, hosts=(
        route("a", ("a.example",), server.port, bundle(ca, "a.example"), hsts=HSTS),
        route("k", ("k.example",), server.port, bundle(ca, "k.example"), hsts=keep),
    ))
    with running_node(snap) as node:
        sock = tls_connect(node.https_port, ca, "a.example")
        get(sock)
        assert read_response(sock)[1][b"strict-transport-security"] == [b"max-age=31536000"]
        sock = tls_connect(node.https_port, ca, "k.example")
        get(sock, host="k.example")
        assert read_response(sock)[1][b"strict-transport-security"] == [b"max-age=5"]
    server.stop()


def test_hsts_on_a_proxy_made_502_and_502_when_the_upstream_refuses(ca: trustme.CA) -> None:
    dead = free_port()
    with running_node(snapshot_for(ca, dead)) as node:
        sock = tls_connect(node.https_port, ca, "a.example")
        get(sock)
        status, headers, body = read_response(sock)
        stats = node.stats()
    assert status == 502
    assert headers[b"strict-transport-security"] == [b"max-age=31536000"]
    assert body.startswith(b"502 Bad Gateway")
    assert stats["hosts"]["a"]["upstream_errors"] == {"connect_refused": 1}
    assert stats["hosts"]["a"]["responses"]["5xx"] == 1


def test_upstream_reset_before_a_response_is_502(ca: trustme.CA, loop_thread: LoopThread) -> None:
    async def reset(ex: Exchange) -> None:
        ex.writer.transport.abort()

    server = Upstream(loop_thread, reset).start()
    with running_node(snapshot_for(ca, server.port)) as node:
        sock = tls_connect(node.https_port, ca, "a.example")
        sock.sendall(b"POST / HTTP/1.1\r\nHost: a.example\r\nContent-Length: 2\r\n\r\nhi")
        assert read_response(sock)[0] == 502
    server.stop()


def test_upstream_silence_is_504(ca: trustme.CA, loop_thread: LoopThread) -> None:
    async def silent(ex: Exchange) -> None:
        await asyncio.sleep(5)

    server = Upstream(loop_thread, silent).start()
    with running_node(snapshot_for(ca, server.port, read_timeout=0.5)) as node:
        sock = tls_connect(node.https_port, ca, "a.example")
        get(sock)
        status, headers, _ = read_response(sock)
        assert status == 504
        assert headers[b"strict-transport-security"] == [b"max-age=31536000"]
        assert node.stats()["hosts"]["a"]["upstream_errors"] == {"read_timeout": 1}
    server.stop()


def test_failure_after_the_response_started_aborts_the_client(ca: trustme.CA, loop_thread: LoopThread) -> None:
    async def cut(ex: Exchange) -> None:
        ex.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await ex.writer.drain()
        ex.writer.transport.abort()

    server = Upstream(loop_thread, cut).start()
    with running_node(snapshot_for(ca, server.port)) as node:
        sock = tls_connect(node.https_port, ca, "a.example")
        get(sock)
        with pytest.raises(ConnectionError):
            read_response(sock)
    server.stop()


def test_body_over_the_host_limit_is_413_and_never_forwarded(ca: trustme.CA, upstream: Upstream) -> None:
    with running_node(snapshot_for(ca, upstream.port, max_body_size=1000)) as node:
        sock = tls_connect(node.https_port, ca, "a.example")
        sock.sendall(b"POST / HTTP/1.1\r\nHost: a.example\r\nContent-Length: 1001\r\n\r\n")
        status, headers, _ = read_response(sock)
        assert status == 413
        assert headers[b"connection"] == [b"close"]
        sock = tls_connect(node.https_port, ca, "a.example")
        sock.sendall(b"POST / HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n\r\n")
        sock.sendall(b"3e8\r\n" + b"x" * 1000 + b"\r\n5\r\nxxxxx\r\n0\r\n\r\n")
        assert read_response(sock)[0] == 413
    assert all(ex.method != "POST" for ex in upstream.requests)


def test_oversized_head_is_431_and_oversized_request_line_414(ca: trustme.CA, upstream: Upstream) -> None:
    with running_node(snapshot_for(ca, upstream.port)) as node:
        sock = tls_connect(node.https_port, ca, "a.example")
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a.example\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
        assert read_response(sock)[0] == 431
        sock = tls_connect(node.https_port, ca, "a.example")
        sock.sendall(b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a.example\r\n\r\n")
        status, headers, _ = read_response(sock)
        assert status == 414
        assert headers[b"strict-transport-security"] == [b"max-age=31536000"]
    assert upstream.raw == b""


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is installed by .ci/run")
def test_curl_gets_a_response_through_the_proxy(ca: trustme.CA, upstream: Upstream, tmp_path: object) -> None:
    from pathlib import Path

    ca_file = Path(str(tmp_path)) / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    with running_node(snapshot_for(ca, upstream.port)) as node:
        out = subprocess.run(
            ["curl", "-sS", "-i", "--cacert", str(ca_file),
             "--resolve", f"a.example:{node.https_port}:127.0.0.1",
             f"https://a.example:{node.https_port}/curl"],
            capture_output=True, text=True, timeout=30,
        )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("HTTP/1.1 200")
    assert "strict-transport-security: max-age=31536000" in out.stdout.lower()
    assert '"target": "/curl"' in out.stdout
