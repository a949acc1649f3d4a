"""The plain HTTP listener: redirects to HTTPS, ACME http-01 answers, and plain proxying when asked.

As rama's example (a): plain HTTP gets a permanent redirect to the same host,
path and query over HTTPS (with the HTTPS port when it is not 443), and never an
HSTS header; the HTTPS response it leads to carries the host's HSTS. The Host
header decides the redirect, so an unknown one is refused (421), never turned
into an open redirect.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import trustme

from proxycore import config as core
from tests.proxyharness import (
    HSTS,
    Exchange,
    LoopThread,
    Upstream,
    bundle,
    read_response,
    route,
    running_node,
    tls_connect,
)

STS = b"strict-transport-security"


def snapshot_for(ca: trustme.CA, port: int) -> core.Snapshot:
    return core.Snapshot(
        revision=1,
        hosts=(
            route("a", ("a.example",), port, bundle(ca, "a.example"), hsts=HSTS),
            route("m", ("m.example",), port, bundle(ca, "m.example"), hsts=HSTS,
                  redirect=core.Redirect(enabled=True, status=301)),
            # Plain HTTP proxied as is; its HSTS policy must still never show on plain HTTP.
            route("p", ("p.example",), port, bundle(ca, "p.example"), hsts=HSTS,
                  redirect=core.Redirect(enabled=False)),
        ),
        acme_challenges=(("tok", "tok.keyauth"),),
    )


def plain_get(port: int, path: str = "/", host: str | None = "a.example", extra: str = "",
              version: str = "1.1") -> tuple[int, dict[bytes, list[bytes]], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        host_line = f"Host: {host}\r\n" if host is not None else ""
        sock.sendall(f"GET {path} HTTP/{version}\r\n{host_line}{extra}\r\n".encode())
        return read_response(sock)


def test_plain_http_gets_308_to_https_and_following_it_gets_hsts(ca: trustme.CA, upstream: Upstream) -> None:
    with running_node(snapshot_for(ca, upstream.port)) as node:
        status, headers, _ = plain_get(node.http_port, "/path?query")
        assert status == 308
        location = headers[b"location"]
        assert location == [f"https://a.example:{node.https_port}/path?query".encode()]
        assert STS not in headers  # never HSTS on plain HTTP
        assert b"connection" not in headers  # a redirect keeps the connection

        url = urlsplit(location[0].decode())
        assert url.port is not None and url.hostname is not None
        sock = tls_connect(url.port, ca, url.hostname)
        sock.sendall(f"GET {url.path}?{url.query} HTTP/1.1\r\nHost: {url.netloc}\r\n\r\n".encode())
        status, headers, body = read_response(sock)
    assert status == 200
    assert headers[STS] == [b"max-age=31536000"]
    assert json.loads(body)["target"] == "/path?query"
    assert len(upstream.requests) == 1  # the redirect itself never reached the upstream


def test_redirect_keeps_only_the_name_of_the_host_and_uses_the_https_port(
    ca: trustme.CA, upstream: Upstream
) -> None:
    with running_node(snapshot_for(ca, upstream.port)) as node:
        status, headers, _ = plain_get(node.http_port, "/x", host=f"A.Example:{node.http_port}")
    assert status == 308
    assert headers[b"location"] == [f"https://a.example:{node.https_port}/x".encode()]


def test_absolute_form_target_redirects_to_its_path(ca: trustme.CA, upstream: Upstream) -> None:
    with running_node(snapshot_for(ca, upstream.port)) as node:
        status, headers, _ = plain_get(node.http_port, "http://a.example/abs?q=1")
    assert status == 308
    assert headers[b"location"] == [f"https://a.example:{node.https_port}/abs?q=1".encode()]


def test_host_with_redirect_status_301_gets_301(ca: trustme.CA, upstream: Upstream) -> None:
    with running_node(snapshot_for(ca, upstream.port)) as node:
        status, headers, _ = plain_get(node.http_port, "/old", host="m.example")
    assert status == 301
    assert headers[b"location"] == [f"https://m.example:{node.https_port}/old".encode()]
    assert STS not in headers
    assert upstream.connections == 0


def test_unknown_host_gets_421_not_a_redirect(ca: trustme.CA, upstream: Upstream) -> None:
    with running_node(snapshot_for(ca, upstream.port)) as node:
        status, headers, body = plain_get(node.http_port, "/x", host="evil.example")
    assert status == 421
    assert b"location" not in headers
    assert STS not in headers
    assert body.startswith(b"421 Misdirected Request")
    assert upstream.connections == 0


def test_missing_host_on_http11_gets_400(ca: trustme.CA, upstream: Upstream) -> None:
    with running_node(snapshot_for(ca, upstream.port)) as node:
        status, headers, _ = plain_get(node.http_port, "/x", host=None)
    assert status == 400
    assert headers[b"connection"] == [b"close"]
    assert b"location" not in headers
    assert upstream.connections == 0


# Every way a client might try to steer the redirect to a host of its choosing.
OPEN_REDIRECT_ATTEMPTS = [
    pytest.param("/x", "evil.example", "", "1.1", id="host-header"),
    pytest.param("/x", "evil.example:443", "", "1.1", id="host-header-with-port"),
    pytest.param("http://evil.example/x", "a.example", "", "1.1", id="absolute-form-other-host"),
    pytest.param("http://evil.example/x", None, "", "1.0", id="absolute-form-no-host-http10"),
    pytest.param("/x", "a.example@evil.example", "", "1.1", id="userinfo-in-host"),
    pytest.param("/x", "a.example", "Host: evil.example\r\n", "1.1", id="second-host-header"),
    pytest.param("/x", "a.example", "X-Forwarded-Host: evil.example\r\n", "1.1", id="x-forwarded-host"),
    pytest.param("/x", "a.example", "Forwarded: host=evil.example\r\n", "1.1", id="forwarded-host"),
    pytest.param("/x", None, "", "1.0", id="http10-without-host"),
]


@pytest.mark.parametrize(("path", "host", "extra", "version"), OPEN_REDIRECT_ATTEMPTS)
def test_no_client_input_makes_an_open_redirect(
    ca: trustme.CA, upstream: Upstream, path: str, host: str | None, extra: str, version: str
) -> None:
    with running_node(snapshot_for(ca, upstream.port)) as node:
        status, headers, _ = plain_get(node.http_port, path, host=host, extra=extra, version=version)
    for location in headers.get(b"location", []):
        assert b"evil.example" not in location
        assert location.startswith(b"https://a.example:")
    if status in (301, 302, 303, 307, 308):
        assert host == "a.example"  # only a Host the snapshot serves is ever redirected
    else:
        assert status in (400, 421)
    assert upstream.connections == 0


def test_acme_challenge_is_answered_not_redirected(ca: trustme.CA, upstream: Upstream) -> None:
    with running_node(snapshot_for(ca, upstream.port)) as node:
        status, headers, body = plain_get(node.http_port, "/.well-known/acme-challenge/tok")
    assert status == 200
    assert body == b"tok.keyauth"
    assert b"location" not in headers
    assert STS not in headers
    assert upstream.connections == 0


def test_acme_challenge_is_answered_for_a_host_that_proxies_plain_http(
    ca: trustme.CA, upstream: Upstream
) -> None:
    with running_node(snapshot_for(ca, upstream.port)) as node:
        status, _, body = plain_get(node.http_port, "/.well-known/acme-challenge/tok", host="p.example")
    assert (status, body) == (200, b"tok.keyauth")
    assert upstream.connections == 0


def test_unknown_acme_token_is_404_not_a_redirect(ca: trustme.CA, upstream: Upstream) -> None:
    with running_node(snapshot_for(ca, upstream.port)) as node:
        status, headers, _ = plain_get(node.http_port, "/.well-known/acme-challenge/nope")
    assert status == 404
    assert b"location" not in headers
    assert STS not in headers
    assert upstream.connections == 0


def test_host_with_redirect_off_is_proxied_over_plain_http_without_hsts(
    ca: trustme.CA, loop_thread: LoopThread
) -> None:
    async def with_sts(ex: Exchange) -> None:
        body = json.dumps({"headers": ex.headers, "target": ex.target}).encode()
        ex.respond(200, body, [("Content-Length", str(len(body))),
                               ("Strict-Transport-Security", "max-age=5; includeSubDomains")])

    server = Upstream(loop_thread, with_sts).start()
    with running_node(snapshot_for(ca, server.port)) as node:
        status, headers, body = plain_get(node.http_port, "/plain?x=1", host="p.example",
                                          extra="X-Forwarded-Proto: https\r\n")
    server.stop()
    assert status == 200
    assert STS not in headers  # the upstream's is stripped and the host's policy not added
    seen = json.loads(body)
    forwarded = [(n.lower(), v) for n, v in seen["headers"]]
    assert seen["target"] == "/plain?x=1"
    assert ("x-forwarded-proto", "http") in forwarded
    assert ("x-forwarded-proto", "https") not in forwarded
    assert ("host", "p.example") in forwarded


def test_two_redirects_on_one_keep_alive_connection(ca: trustme.CA, upstream: Upstream) -> None:
    with running_node(snapshot_for(ca, upstream.port)) as node, \
            socket.create_connection(("127.0.0.1", node.http_port), timeout=10) as sock:
        sock.sendall(b"GET /one HTTP/1.1\r\nHost: a.example\r\n\r\n")
        status, headers, _ = read_response(sock)
        assert status == 308
        assert headers[b"location"] == [f"https://a.example:{node.https_port}/one".encode()]
        sock.sendall(b"GET /two HTTP/1.1\r\nHost: m.example\r\n\r\n")
        status, headers, _ = read_response(sock)
        assert status == 301
        assert headers[b"location"] == [f"https://m.example:{node.https_port}/two".encode()]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is installed by .ci/run")
def test_curl_follows_the_redirect_to_https_and_gets_hsts(
    ca: trustme.CA, upstream: Upstream, tmp_path: Path
) -> None:
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    with running_node(snapshot_for(ca, upstream.port)) as node:
        out = subprocess.run(
            ["curl", "-sS", "-i", "-L", "--cacert", str(ca_file),
             "--resolve", f"a.example:{node.http_port}:127.0.0.1",
             "--resolve", f"a.example:{node.https_port}:127.0.0.1",
             f"http://a.example:{node.http_port}/x"],
            capture_output=True, text=True, timeout=30,
        )
    assert out.returncode == 0, out.stderr
    # -i prints each response's head and body; the next response starts at a status line.
    first, *_, last = re.split(r"(?m)^(?=HTTP/1\.1 \d{3} )", out.stdout)[1:]
    assert first.startswith("HTTP/1.1 308")
    assert "strict-transport-security" not in first.lower()
    assert last.startswith("HTTP/1.1 200")
    assert "strict-transport-security: max-age=31536000" in last.lower()
    assert '"target": "/x"' in last
