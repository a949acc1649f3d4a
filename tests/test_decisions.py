"""What the proxy does with a request, decided without sockets: ``proxycore.decide``."""

from __future__ import annotations

from dataclasses import replace

import pytest

from proxycore import config as core
from proxycore import decide as d
from proxycore.http1 import RequestHead, RequestParser

UPSTREAM = core.Upstream(name="up", targets=(core.Target("127.0.0.1", 9),))
A = core.HostRoute(name="a", names=("a.example",), mode=core.Mode.HTTP, upstream=UPSTREAM,
                   max_body_size=100)
B = replace(A, name="b", names=("b.example",))
STREAM = replace(A, name="t", names=("t.example",), mode=core.Mode.TCP)
NO_REDIRECT = replace(A, redirect=core.Redirect(enabled=False))


def head(start: str = "GET / HTTP/1.1", *fields: str, host: str = "a.example") -> RequestHead:
    raw = "\r\n".join([start, f"Host: {host}", *fields]) + "\r\n\r\n"
    parsed = RequestParser().feed(raw.encode())[0]
    assert isinstance(parsed, RequestHead)
    return parsed


def on_https(request: RequestHead, route: core.HostRoute | None, sni: core.HostRoute | None = A) -> d.Decision:
    return d.decide(request, route, sni, https=True, https_port=8443)


def on_http(request: RequestHead, route: core.HostRoute | None, https_port: int = 8443) -> d.Decision:
    return d.decide(request, route, None, https=False, https_port=https_port)


def test_a_request_for_the_sni_host_is_forwarded() -> None:
    assert on_https(head(), A).action == d.FORWARD


def test_a_host_of_another_host_than_the_sni_is_421_with_the_sni_host_hsts() -> None:
    decision = on_https(head(host="b.example"), B)
    assert (decision.action, decision.status, decision.route) == (d.LOCAL, 421, A)


@pytest.mark.parametrize("route", [None, STREAM], ids=["unknown", "tcp-host"])
def test_an_unknown_or_stream_host_over_https_is_421(route: core.HostRoute | None) -> None:
    decision = on_https(head(host="x.example"), route)
    assert (decision.action, decision.status) == (d.LOCAL, 421)


def test_the_default_certificate_serves_any_known_host() -> None:
    assert on_https(head(host="b.example"), B, sni=None).action == d.FORWARD


def test_plain_http_redirects_to_https_on_the_https_port() -> None:
    decision = on_http(head("GET /p?q=1 HTTP/1.1"), A)
    assert (decision.action, decision.status, decision.location) == (
        d.REDIRECT, 308, b"https://a.example:8443/p?q=1")
    assert on_http(head(), A, https_port=443).location == b"https://a.example/"


def test_a_301_host_redirects_with_301() -> None:
    decision = on_http(head(), replace(A, redirect=core.Redirect(enabled=True, status=301)))
    assert (decision.action, decision.status) == (d.REDIRECT, 301)


@pytest.mark.parametrize("route", [None, STREAM], ids=["unknown", "tcp-host"])
def test_plain_http_for_an_unknown_host_is_421_never_a_redirect(route: core.HostRoute | None) -> None:
    decision = on_http(head(host="evil.example"), route)
    assert (decision.action, decision.status, decision.location) == (d.LOCAL, 421, b"")


def test_acme_challenges_are_answered_before_any_host_rule() -> None:
    for route in (A, None, STREAM):
        decision = on_http(head("GET /.well-known/acme-challenge/tok-1 HTTP/1.1"), route)
        assert (decision.action, decision.token) == (d.ACME, "tok-1")


def test_acme_challenges_are_not_answered_over_https() -> None:
    assert on_https(head("GET /.well-known/acme-challenge/tok-1 HTTP/1.1"), A).action == d.FORWARD


def test_plain_http_without_redirect_is_forwarded() -> None:
    assert on_http(head(), NO_REDIRECT).action == d.FORWARD


def test_trace_is_405_unless_the_host_allows_it() -> None:
    decision = on_https(head("TRACE / HTTP/1.1"), A)
    assert (decision.action, decision.status, decision.route) == (d.LOCAL, 405, A)
    assert on_http(head("TRACE / HTTP/1.1"), NO_REDIRECT).status == 405
    allowed = replace(A, allow_trace=True)
    assert on_https(head("TRACE / HTTP/1.1"), allowed, sni=allowed).action == d.FORWARD


def test_a_declared_body_over_the_limit_is_413_at_the_limit_it_is_forwarded() -> None:
    assert on_https(head("POST / HTTP/1.1", "Content-Length: 100"), A).action == d.FORWARD
    decision = on_https(head("POST / HTTP/1.1", "Content-Length: 101"), A)
    assert (decision.action, decision.status) == (d.LOCAL, 413)
    unlimited = replace(A, max_body_size=0)
    assert on_https(head("POST / HTTP/1.1", "Content-Length: 10000000"), unlimited,
                    sni=unlimited).action == d.FORWARD


def test_a_chunked_body_is_forwarded_and_counted_as_it_comes() -> None:
    # Its size is unknown at the head: the exchange counts it (413 past the limit).
    assert on_https(head("POST / HTTP/1.1", "Transfer-Encoding: chunked"), A).action == d.FORWARD


def test_a_redirect_comes_before_the_body_limit_and_trace() -> None:
    assert on_http(head("POST / HTTP/1.1", "Content-Length: 101"), A).action == d.REDIRECT
    assert on_http(head("TRACE / HTTP/1.1"), A).action == d.REDIRECT


def test_a_disabled_host_gets_a_503_page_that_says_so_never_a_redirect() -> None:
    off = replace(A, enabled=False)
    for decision in (on_https(head(), off, sni=off), on_http(head(), off)):
        assert (decision.action, decision.status, decision.route) == (d.LOCAL, 503, off)
        assert decision.body == d.DISABLED_BODY
    assert on_http(head("GET /.well-known/acme-challenge/t HTTP/1.1"), off).action == d.ACME
