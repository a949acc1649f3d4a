"""Head rewriting: what goes upstream and back to the client is the head as it came, less the
field lines a proxy must drop, plus the lines it adds (``routing.upstream_request_head`` and
``routing.client_response_head``)."""

from __future__ import annotations

import random

import pytest

from proxycore.config import HSTS
from proxycore.http1 import Framing, RequestHead, RequestParser, ResponseHead, ResponseParser
from proxycore.routing import client_response_head, upstream_request_head

# The rules, written out here rather than taken from proxycore, so that the tests check them.
REQUEST_HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade",
    b"proxy-authenticate", b"proxy-authorization",
})  # Transfer-Encoding too is hop-by-hop, but a request's single "chunked" line stays
RESPONSE_HOP_BY_HOP = REQUEST_HOP_BY_HOP | {b"transfer-encoding"}
FORWARDING = frozenset({
    b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-port",
    b"forwarded", b"x-real-ip", b"client-cert", b"client-cert-chain",
})  # set by the proxy alone: a client's are dropped, also spelt with "_"
NEVER_LISTED = frozenset({b"host", b"content-length", b"transfer-encoding"})
STS = b"strict-transport-security"

KEEP = HSTS(max_age=31536000, include_subdomains=True, preload=False, override_upstream=False)
OVERRIDE = HSTS(max_age=600, include_subdomains=False, preload=True, override_upstream=True)
ADDED = b"x-forwarded-for: 203.0.113.7\r\nx-forwarded-proto: https\r\n"


def msg(*lines: bytes, body: bytes = b"") -> bytes:
    """A head from its lines (CRLF added) followed by ``body``."""
    return b"".join(line + b"\r\n" for line in lines) + b"\r\n" + body


def request_head(raw: bytes) -> RequestHead:
    head = RequestParser().feed(raw)[0]
    assert isinstance(head, RequestHead)
    return head


def response_head(raw: bytes, method: bytes = b"GET") -> ResponseHead:
    parser = ResponseParser()
    parser.expect(method)
    head = parser.feed(raw)[0]
    assert isinstance(head, ResponseHead)
    return head


def forwarded(raw: bytes, added: bytes = ADDED) -> bytes:
    return upstream_request_head(request_head(raw), added)


def name_of(line: bytes) -> bytes:
    return line.partition(b":")[0].lower()


def value_of(line: bytes) -> bytes:
    return line.partition(b":")[2].strip(b" \t")


def head_lines(out: bytes) -> list[bytes]:
    """Start line and field lines of a whole head, without CRLFs."""
    assert out.endswith(b"\r\n\r\n")
    return out[:-4].split(b"\r\n")


def field_lines(out: bytes) -> list[bytes]:
    return head_lines(out)[1:]


def named(out: bytes, name: bytes) -> list[bytes]:
    return [line for line in field_lines(out) if name_of(line) == name]


def listed_tokens(lines: list[bytes]) -> frozenset[bytes]:
    """The options the Connection lines among ``lines`` name, lower-cased."""
    tokens: set[bytes] = set()
    for line in lines:
        if name_of(line) == b"connection":
            tokens.update(t.strip(b" \t").lower() for t in value_of(line).split(b","))
    return frozenset(tokens - {b""})


# --- requests: what is kept ---------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        msg(b"GET /a/b?c=d HTTP/1.1", b"Host: Example.COM:8443", b"User-Agent:  curl/8.5  ", b"accept: */*",
            b"X-Mixed-CASE:\tv\t"),
        msg(b"OPTIONS * HTTP/1.1", b"host: a.example"),
        msg(b"POST /upload HTTP/1.1", b"Content-Length: 5", b"HOST: a.example", b"Expect: 100-continue"),
        msg(b"PUT /x HTTP/1.1", b"Host: a.example", b"transfer-encoding:  Chunked ", b"X-A: 1"),
    ],
    ids=["get", "options-star", "post-expect", "chunked"],
)
def test_plain_request_goes_upstream_byte_for_byte_with_added_lines_before_the_end(raw: bytes) -> None:
    assert forwarded(raw) == raw[:-2] + ADDED + b"\r\n"
    assert forwarded(raw, b"") == raw


# --- requests: what is dropped ------------------------------------------------

REQUEST_HOP_LINES = [
    b"Connection: keep-alive",
    b"KEEP-ALIVE: timeout=5, max=100",
    b"Proxy-Connection:keep-alive",
    b"tE:\t trailers \t",
    b"Trailer: Expires",
    b"Upgrade: h2c",
    b"Proxy-Authenticate: Basic realm=x",
    b"proxy-AUTHORIZATION:  Basic YTpi",
]
FORWARDING_LINES = [
    b"X-Forwarded-For: 10.0.0.1",
    b"x_forwarded_for: 10.0.0.2",
    b"X-FORWARDED-PROTO: http",
    b"X_Forwarded_Host: evil.example",
    b"x-forwarded-port: 80",
    b"X-Forwarded_Port: 81",
    b"Forwarded: for=10.0.0.3",
    b"FORWARDED:for=10.0.0.4",
    b"X-Real-IP: 10.0.0.5",
    b"x_real_ip: 10.0.0.6",
    b"Client-Cert: :Zm9v:",
    b"client_cert: :YmFy:",
    b"CLIENT-CERT-CHAIN: :Zm9v:",
    b"Client_Cert_Chain:\t:YmFy:",
]
# Names that merely begin (or end) like dropped ones: ordinary fields.
LOOKALIKE_LINES = [
    b"Test: 1",
    b"Tea: green",
    b"Te-Foo: 2",
    b"Connectionx: close",
    b"X-Connection: close",
    b"Keep-Alive-Timeout: 5",
    b"Proxy-Connections: 3",
    b"Trailers: none",
    b"Upgrade-Insecure-Requests: 1",
    b"X-Forwarded-Foo: bar",
    b"X_Forwarded_Foo: bar",
    b"Forwarded-For: 10.0.0.7",
    b"X-Real-IPs: 10.0.0.8",
    b"Client-Certificate: x",
    b"Client-Cert-Chains: y",
    b"X-Note: Connection: close",
]


@pytest.mark.parametrize("position", [0, 1, 2])
@pytest.mark.parametrize("line", REQUEST_HOP_LINES + FORWARDING_LINES)
def test_hop_by_hop_and_forwarding_fields_are_dropped_from_requests_wherever_they_stand(
    line: bytes, position: int
) -> None:
    kept = [b"Host: a.example", b"Accept: */*"]
    fields = [*kept]
    fields.insert(position, line)
    out = forwarded(msg(b"GET /p HTTP/1.1", *fields))
    assert out == msg(b"GET /p HTTP/1.1", *kept)[:-2] + ADDED + b"\r\n"


@pytest.mark.parametrize("with_dropped", [False, True], ids=["nothing-dropped", "one-dropped"])
def test_fields_that_only_look_like_dropped_ones_are_kept(with_dropped: bool) -> None:
    fields = [b"Host: a.example", *LOOKALIKE_LINES]
    if with_dropped:  # the head must then be cut, not forwarded whole
        fields.insert(8, b"X-Forwarded-For: 10.0.0.1")
    out = forwarded(msg(b"GET / HTTP/1.1", *fields))
    assert out == msg(b"GET / HTTP/1.1", b"Host: a.example", *LOOKALIKE_LINES)[:-2] + ADDED + b"\r\n"


def test_fields_named_by_connection_are_dropped_from_requests() -> None:
    raw = msg(
        b"GET / HTTP/1.1",
        b"x-SECRET: before",
        b"Host: a.example",
        b"Connection: keep-alive ,X-Secret,  x-two",
        b"X-Secret-Other: kept",
        b"X-Two: 2",
        b"connection: X-Three",
        b"X-Three: 3",
        b"X-Secret: after",
        b"X-Kept: yes",
    )
    out = forwarded(raw)
    assert out == msg(b"GET / HTTP/1.1", b"Host: a.example", b"X-Secret-Other: kept", b"X-Kept: yes")[:-2] + (
        ADDED + b"\r\n")


def test_connection_cannot_drop_host_or_content_length_from_a_request() -> None:
    raw = msg(b"POST /f HTTP/1.1", b"Host: a.example", b"Connection: host, Content-Length, x-a",
              b"Content-Length: 5", b"X-A: 1")
    out = forwarded(raw)
    assert out == msg(b"POST /f HTTP/1.1", b"Host: a.example", b"Content-Length: 5")[:-2] + ADDED + b"\r\n"
    again = request_head(out)
    assert (again.host, again.framing, again.content_length) == (b"a.example", Framing.LENGTH, 5)


@pytest.mark.parametrize("connection", [None, b"Connection: transfer-encoding", b"Connection: keep-alive"])
def test_chunked_request_keeps_its_transfer_encoding_line(connection: bytes | None) -> None:
    fields = [b"Host: a.example", b"Transfer-Encoding:  chunked", b"X-A: 1"]
    raw = msg(b"POST /f HTTP/1.1", *fields, *([connection] if connection else []))
    out = forwarded(raw)
    assert out == msg(b"POST /f HTTP/1.1", *fields)[:-2] + ADDED + b"\r\n"
    assert request_head(out).framing is Framing.CHUNKED


# --- requests: the request line and upgrades -----------------------------------


@pytest.mark.parametrize(
    ("line", "host", "expected"),
    [
        (b"GET /x?y HTTP/1.0", b"a.example", b"GET /x?y HTTP/1.1"),
        (b"POST /x HTTP/1.0", b"A.Example", b"POST /x HTTP/1.1"),
        (b"GET http://a.example/x?y HTTP/1.1", b"a.example", b"GET /x?y HTTP/1.1"),
        (b"GET https://A.example:8443/p/q HTTP/1.1", b"a.example:8443", b"GET /p/q HTTP/1.1"),
        (b"GET http://a.example HTTP/1.1", b"a.example", b"GET / HTTP/1.1"),
        (b"DELETE http://a.example?q=1 HTTP/1.1", b"a.example", b"DELETE /?q=1 HTTP/1.1"),
        (b"GET http://a.example/z HTTP/1.0", b"a.example", b"GET /z HTTP/1.1"),
    ],
)
def test_http10_and_absolute_form_request_lines_are_rewritten(
    line: bytes, host: bytes, expected: bytes
) -> None:
    fields = [b"Host: " + host, b"Accept:  */* "]
    assert forwarded(msg(line, *fields)) == msg(expected, *fields)[:-2] + ADDED + b"\r\n"
    # and with a field to drop, the other way through
    out = forwarded(msg(line, b"Keep-Alive: 5", *fields, b"Connection: keep-alive"))
    assert out == msg(expected, *fields)[:-2] + ADDED + b"\r\n"


def test_http10_absolute_form_request_without_host_goes_upstream_with_a_host() -> None:
    head = request_head(msg(b"GET http://a.example/z HTTP/1.0", b"Accept: */*"))
    assert (head.host, head.target) == (b"a.example", b"/z")  # routed by its target's authority
    out = upstream_request_head(head, ADDED)
    assert head_lines(out)[0] == b"GET /z HTTP/1.1"
    # An HTTP/1.1 request must carry Host, the target's authority (RFC 9112 section 3.2).
    assert [value_of(f) for f in named(out, b"host")] == [b"a.example"]
    assert request_head(out).host == b"a.example"


@pytest.mark.parametrize(
    "connection",
    [b"Connection: Upgrade", b"connection:keep-alive, upgrade", b"CONNECTION: Upgrade, X-Secret "],
)
def test_upgrade_request_gets_exactly_one_connection_and_one_upgrade_line(connection: bytes) -> None:
    kept = [b"Host: a.example", b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", b"Sec-WebSocket-Version: 13"]
    raw = msg(b"GET /chat HTTP/1.1", kept[0], connection, b"Upgrade: WebSocket", b"X-Secret: s", *kept[1:])
    head = request_head(raw)
    assert head.upgrade == b"websocket"
    out = upstream_request_head(head, ADDED)
    lines = head_lines(out)
    assert lines[0] == b"GET /chat HTTP/1.1"
    expected_kept = [kept[0], *([] if b"X-Secret" in connection else [b"X-Secret: s"]), *kept[1:]]
    assert lines[1 : 1 + len(expected_kept)] == expected_kept
    tail = lines[1 + len(expected_kept) :]
    assert sorted(tail) == sorted([*ADDED.splitlines(), b"connection: upgrade", b"upgrade: websocket"])
    assert named(out, b"connection") == [b"connection: upgrade"]
    assert named(out, b"upgrade") == [b"upgrade: websocket"]
    assert request_head(out).upgrade == b"websocket"


def test_upgrade_field_without_connection_upgrade_is_only_dropped() -> None:
    raw = msg(b"GET / HTTP/1.1", b"Host: a", b"Upgrade: websocket", b"Connection: keep-alive")
    assert request_head(raw).upgrade is None
    assert forwarded(raw, b"") == msg(b"GET / HTTP/1.1", b"Host: a")


# --- responses: fields ---------------------------------------------------------


def test_plain_response_is_kept_byte_for_byte_with_added_lines_last() -> None:
    raw = msg(b"HTTP/1.1 200 Fine Thanks", b"Content-Length:  2 ", b"server: x", b"X-Forwarded-For: 1.2.3.4",
              b"Host: a", b"Client-Cert: :x:")
    head = response_head(raw)
    assert client_response_head(head, None, https=False) == raw
    added = b"via: 1.1 proxy\r\nx-cache: MISS\r\n"
    assert client_response_head(head, None, https=True, added=added) == raw[:-2] + added + b"\r\n"


RESPONSE_HOP_LINES = [
    b"Connection: x-anything",
    b"KEEP-ALIVE: timeout=5",
    b"Proxy-Connection: close",
    b"te: trailers",
    b"Trailer:  Expires ",
    b"Upgrade: h2c",
    b"Proxy-Authenticate: Basic realm=x",
    b"Proxy-Authorization: Basic YTpi",
    b"Transfer-Encoding: chunked",
]


@pytest.mark.parametrize("position", [0, 1, 2])
@pytest.mark.parametrize("line", RESPONSE_HOP_LINES)
def test_hop_by_hop_fields_are_dropped_from_responses_wherever_they_stand(line: bytes, position: int) -> None:
    kept = [b"Server: s", b"Test: t"]
    fields = [*kept]
    fields.insert(position, line)
    out = client_response_head(response_head(msg(b"HTTP/1.1 200 OK", *fields)), None, https=False,
                               added=b"transfer-encoding: chunked\r\n")
    assert out == msg(b"HTTP/1.1 200 OK", *kept, b"transfer-encoding: chunked")


def test_fields_named_by_connection_are_dropped_from_responses() -> None:
    raw = msg(b"HTTP/1.1 200 OK", b"X-Secret: 1", b"Connection: close, X-SECRET, content-length, host",
              b"Content-Length: 0", b"Host: h", b"x-secret: 2", b"X-Secret-Not: kept", *LOOKALIKE_LINES)
    out = client_response_head(response_head(raw), None, https=False)
    assert out == msg(b"HTTP/1.1 200 OK", b"Content-Length: 0", b"Host: h", b"X-Secret-Not: kept",
                      *LOOKALIKE_LINES)


# Spellings that a search finds (the usual ones), then spellings only a pattern finds.
FAST_CONNECTION = [
    name + b": " + value
    for name in (b"Connection", b"connection")
    for value in (b"keep-alive", b"close", b"Keep-Alive", b"Close")
]
GENERAL_CONNECTION = [
    b"CONNECTION:   keep-alive  ",
    b"Connection:close",
    b"connection: KEEP-ALIVE",
    b"Connection: keep-alive\t",
    b"cOnNeCtIoN: Close",
    b"Connection: close, keep-alive",
    b"Connection:\tclose",
]
OTHERS = [b"Content-Length: 0", b"X-Connection: close", b"X-Note: Connection: keep-alive", b"Server: s"]


@pytest.mark.parametrize("position", ["only", "first", "middle", "last"])
@pytest.mark.parametrize("connection", FAST_CONNECTION + GENERAL_CONNECTION)
@pytest.mark.parametrize("version", [b"1.1", b"1.0"])
def test_connection_line_is_cut_in_every_position_and_spelling(
    connection: bytes, position: str, version: bytes
) -> None:
    others = [] if position == "only" else OTHERS
    at = {"only": 0, "first": 0, "middle": 2, "last": len(others)}[position]
    fields = [*others[:at], connection, *others[at:]]
    head = response_head(msg(b"HTTP/%s 200 OK" % version, *fields))
    expected = msg(b"HTTP/1.1 200 OK", *others)
    assert client_response_head(head, None, https=False) == expected
    added = b"x-added: 1\r\n"
    assert client_response_head(head, None, https=False, added=added) == expected[:-2] + added + b"\r\n"
    # with a policy: its line goes in, before the added lines
    assert client_response_head(head, OVERRIDE, https=True, added=added) == expected[:-2] + (
        OVERRIDE.line + added + b"\r\n")


@pytest.mark.parametrize("connection", FAST_CONNECTION[:2] + GENERAL_CONNECTION[:2])
def test_connection_line_is_cut_beside_a_kept_upstream_sts(connection: bytes) -> None:
    sts = b"Strict-Transport-Security: max-age=99; Preload"
    head = response_head(msg(b"HTTP/1.1 200 OK", b"Server: s", connection, sts, b"Content-Length: 0"))
    assert client_response_head(head, KEEP, https=True) == msg(
        b"HTTP/1.1 200 OK", b"Server: s", sts, b"Content-Length: 0")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"HTTP/1.0 200 OK", b"HTTP/1.1 200 OK"),
        (b"HTTP/1.0 404 Not Found", b"HTTP/1.1 404 Not Found"),
        (b"HTTP/1.0 503 ", b"HTTP/1.1 503 "),
        (b"HTTP/1.0 200", b"HTTP/1.1 200 "),
        (b"HTTP/1.1 200 Whatever it is", b"HTTP/1.1 200 Whatever it is"),
        (b"HTTP/1.1 204", b"HTTP/1.1 204"),
    ],
)
def test_status_line_is_kept_from_http11_and_rewritten_from_http10(line: bytes, expected: bytes) -> None:
    fields = [b"Content-Length: 0", b"Server: s"]
    head = response_head(msg(line, *fields))
    assert client_response_head(head, None, https=False) == msg(expected, *fields)
    head = response_head(msg(line, b"Connection: keep-alive", *fields))
    assert client_response_head(head, None, https=False) == msg(expected, *fields)
    head = response_head(msg(line, b"Keep-Alive: timeout=1", *fields, b"CONNECTION: Keep-Alive "))
    assert client_response_head(head, None, https=False) == msg(expected, *fields)


# --- responses: Strict-Transport-Security ----------------------------------------

UPSTREAM_STS = [b"Strict-Transport-Security: max-age=63072000; includeSubDomains; Preload",
                b"strict-TRANSPORT-security:  max-age=0  "]


def sts_response(count: int) -> tuple[bytes, list[bytes]]:
    """A response with ``count`` upstream STS fields among others, and those others."""
    others = [b"Server: s", b"Content-Length: 0", b"X-A: 1"]
    sts = UPSTREAM_STS[:count]
    fields = [others[0], *sts[:1], others[1], *sts[1:], others[2]]
    return msg(b"HTTP/1.1 200 OK", *fields), others


@pytest.mark.parametrize("count", [0, 1, 2])
@pytest.mark.parametrize(
    ("https", "hsts"),
    [(False, None), (False, KEEP), (False, OVERRIDE), (True, None)],
)
def test_no_sts_without_https_and_a_policy(https: bool, hsts: HSTS | None, count: int) -> None:
    raw, others = sts_response(count)
    out = client_response_head(response_head(raw), hsts, https=https, added=b"x-b: 2\r\n")
    assert out == msg(b"HTTP/1.1 200 OK", *others, b"x-b: 2")
    assert named(out, STS) == []


@pytest.mark.parametrize(("hsts", "count"), [(OVERRIDE, 0), (OVERRIDE, 1), (OVERRIDE, 2), (KEEP, 0)])
def test_policy_sts_line_replaces_the_upstreams_and_comes_before_added_lines(hsts: HSTS, count: int) -> None:
    raw, others = sts_response(count)
    out = client_response_head(response_head(raw), hsts, https=True, added=b"x-b: 2\r\n")
    assert out == msg(b"HTTP/1.1 200 OK", *others)[:-2] + hsts.line + b"x-b: 2\r\n\r\n"
    assert named(out, STS) == [hsts.line[:-2]]


def test_policy_line_is_the_configured_value() -> None:
    assert KEEP.line == b"strict-transport-security: max-age=31536000; includeSubDomains\r\n"
    assert OVERRIDE.line == b"strict-transport-security: max-age=600; preload\r\n"


@pytest.mark.parametrize("position", [0, 1, 3])
def test_one_upstream_sts_is_kept_where_it_stands_when_the_policy_does_not_override(position: int) -> None:
    fields = [b"Server: s", b"Content-Length: 0", b"Connection: x-a", b"X-A: 1", b"Vary: *"]
    fields.insert(position, UPSTREAM_STS[1])
    out = client_response_head(response_head(msg(b"HTTP/1.1 200 OK", *fields)), KEEP, https=True,
                               added=b"x-b: 2\r\n")
    assert out == msg(b"HTTP/1.1 200 OK", *[f for f in fields if name_of(f) not in (b"connection", b"x-a")],
                      b"x-b: 2")


def test_two_upstream_sts_give_one_line_with_the_first_value_as_it_came() -> None:
    raw, others = sts_response(2)
    out = client_response_head(response_head(raw), KEEP, https=True, added=b"x-b: 2\r\n")
    sts = named(out, STS)
    assert len(sts) == 1
    assert value_of(sts[0]) == b"max-age=63072000; includeSubDomains; Preload"
    assert [f for f in field_lines(out) if name_of(f) != STS] == [*others, b"x-b: 2"]
    assert field_lines(out)[-1] == b"x-b: 2"


def test_two_upstream_sts_keep_the_first_line_with_its_original_case() -> None:
    raw, _ = sts_response(2)
    out = client_response_head(response_head(raw), KEEP, https=True)
    assert named(out, STS) == [UPSTREAM_STS[0]]


@pytest.mark.parametrize(
    ("hsts", "count"),
    [
        (KEEP, 1),
        (KEEP, 0),
        (KEEP, 2),
        (OVERRIDE, 1),
    ],
    ids=["keep-one-upstream", "keep-none", "keep-two-upstream", "override-one-upstream"],
)
def test_sts_named_by_connection_still_leaves_exactly_one_sts_line(hsts: HSTS, count: int) -> None:
    raw, _ = sts_response(count)
    raw = raw[:-2] + b"Connection: strict-transport-security\r\n\r\n"
    out = client_response_head(response_head(raw), hsts, https=True)
    assert len(named(out, STS)) == 1


# --- property: random heads --------------------------------------------------------


def random_case(rng: random.Random, text: bytes) -> bytes:
    return bytes(c ^ 0x20 if chr(c).isalpha() and rng.random() < 0.4 else c for c in text)


def random_ows(rng: random.Random) -> bytes:
    return rng.choice([b"", b"", b" ", b" ", b"  ", b"\t", b" \t "])


def field(rng: random.Random, name: bytes, value: bytes) -> bytes:
    """``name: value`` with the name in random case and random OWS around the value."""
    after = random_ows(rng)
    if name == b"Transfer-Encoding":  # llhttp refuses "chunked" followed by a tab
        after = after.replace(b"\t", b"")
    return random_case(rng, name) + b":" + random_ows(rng) + value + after


VALUES = [b"1", b"abc", b"a b  c", b"x=1; y=2", b"Connection: close", b"x-forwarded-for: 1", b"\"q\", r", b"",
          b"*/*", b"Mozilla/5.0 (X11)"]
ORDINARY_REQUEST = [b"Accept", b"User-Agent", b"Cookie", b"X-Request-Id", b"Content-Type", b"X-Secret",
                    b"X-Other"] + [line.partition(b":")[0] for line in LOOKALIKE_LINES]
ORDINARY_RESPONSE = [b"Server", b"Date", b"Set-Cookie", b"Cache-Control", b"Vary", b"X-Secret", b"X-Other",
                     b"X-Forwarded-For", b"Forwarded", b"X-Real-IP", b"Client-Cert", b"Host",
                     b"Strict-Transport-Securityx"] + [line.partition(b":")[0] for line in LOOKALIKE_LINES]
ADDED_CHOICES = [b"", b"x-cache: HIT\r\n", b"x-forwarded-for: 192.0.2.1\r\nforwarded: for=192.0.2.1\r\n"]


def connection_field(rng: random.Random, candidates: list[bytes]) -> bytes:
    tokens = [random_case(rng, t) for t in rng.sample(candidates, rng.randint(1, 3))]
    return field(rng, b"Connection", rng.choice([b",", b", ", b" , "]).join(tokens))


def random_request(rng: random.Random) -> tuple[bytes, bytes, list[bytes]]:
    """(raw head, the request line expected upstream, its field lines)."""
    method = rng.choice([b"GET", b"POST", b"PUT", b"DELETE"])
    path = rng.choice([b"/", b"/a/b", b"/a?b=c&d=e", b"/%7Efoo;p"])
    version = rng.choice([b"1.1", b"1.1", b"1.0"])
    host = rng.choice([b"a.example", b"A.Example:8443", b"192.0.2.1"])
    absolute = rng.random() < 0.25
    target = b"%s://%s%s" % (rng.choice([b"http", b"https"]), host.lower(), path) if absolute else path
    fields = [field(rng, b"Host", host)]
    present = rng.sample(ORDINARY_REQUEST, rng.randint(0, 6))
    fields += [field(rng, name, rng.choice(VALUES)) for name in present]
    for name in rng.sample(sorted(REQUEST_HOP_BY_HOP - {b"connection"} | FORWARDING), rng.randint(0, 4)):
        if name in FORWARDING and rng.random() < 0.5:
            name = name.replace(b"-", b"_")
        fields.append(field(rng, name, rng.choice([b"websocket", b"h2c"]) if name == b"upgrade" else b"v"))
    framing = rng.choice(["none", "none", "length", "chunked"])
    if framing == "chunked" and version == b"1.0":
        framing = "length"  # HTTP/1.0 has no Transfer-Encoding: refused (test_request_smuggling)
    if framing == "length":
        fields.append(field(rng, b"Content-Length", rng.choice([b"0", b"12"])))
    elif framing == "chunked":
        fields.append(field(rng, b"Transfer-Encoding", rng.choice([b"chunked", b"Chunked"])))
    candidates = [b"keep-alive", b"close", b"upgrade", b"host", b"content-length", b"transfer-encoding",
                  b"te", b"x-absent", b"x-forwarded-for", *(n.lower() for n in ORDINARY_REQUEST)]
    for _ in range(rng.choice([0, 0, 1, 1, 2])):
        fields.append(connection_field(rng, candidates))
    rng.shuffle(fields)
    line = b"%s %s HTTP/%s" % (method, target, version)
    expected_line = line if version == b"1.1" and not absolute else b"%s %s HTTP/1.1" % (method, path)
    return msg(line, *fields), expected_line, fields


def request_drops(fields: list[bytes]) -> frozenset[bytes]:
    """The lower-cased names a request must lose."""
    listed = listed_tokens(fields) - NEVER_LISTED
    names = {name_of(f) for f in fields}
    return frozenset(
        name for name in names
        if name in REQUEST_HOP_BY_HOP or name.replace(b"_", b"-") in FORWARDING or name in listed
    )


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_random_request_heads_lose_exactly_the_fields_they_must(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(100):
        raw, expected_line, fields = random_request(rng)
        head = request_head(raw)
        added = rng.choice(ADDED_CHOICES)
        out = upstream_request_head(head, added)

        drop = request_drops(fields)
        kept = [f for f in fields if name_of(f) not in drop]
        lines = head_lines(out)
        assert lines[0] == expected_line, raw
        assert lines[1 : 1 + len(kept)] == kept, raw  # byte for byte, in order
        tail = lines[1 + len(kept) :]
        upgrade = [] if head.upgrade is None else [b"connection: upgrade", b"upgrade: " + head.upgrade]
        assert sorted(tail) == sorted(added.splitlines() + upgrade), raw
        assert not [f for f in lines[1 : 1 + len(kept)] if name_of(f) in drop], raw
        assert not [f for f in tail if name_of(f) in drop and f not in upgrade and f + b"\r\n" not in added]

        again = request_head(out)
        assert (again.method, again.target, again.version) == (head.method, head.target, b"1.1")
        assert again.headers[: len(kept)] == tuple((name_of(f), value_of(f)) for f in kept), raw
        assert again.upgrade == head.upgrade


def random_response(rng: random.Random) -> tuple[bytes, bytes, bytes, list[bytes]]:
    """(raw head, the request method, the status line expected, its field lines)."""
    version = rng.choice([b"1.1", b"1.1", b"1.0"])
    status = rng.choice([200, 200, 201, 204, 301, 404, 500, 503])
    reason = rng.choice([b"OK", b"", b"Whatever It Is"])
    line = b"HTTP/%s %d %s" % (version, status, reason) if reason or rng.random() < 0.5 else (
        b"HTTP/%s %d" % (version, status))
    present = rng.sample(ORDINARY_RESPONSE, rng.randint(0, 6))
    fields = [field(rng, name, rng.choice(VALUES)) for name in present]
    for name in rng.sample(sorted(RESPONSE_HOP_BY_HOP - {b"connection", b"transfer-encoding"}),
                           rng.choice([0, 0, 0, 1, 2, 3])):
        fields.append(field(rng, name, b"v"))
    for _ in range(rng.choice([0, 0, 1, 1, 2])):
        sts = rng.choice([b"max-age=100", b"max-age=5; includeSubDomains", b"Max-Age=7; PRELOAD"])
        fields.append(field(rng, STS, sts))
    framing = rng.choice(["none", "length", "length", "length", "chunked"])
    if framing == "chunked" and version == b"1.0":
        framing = "length"  # HTTP/1.0 has no Transfer-Encoding: refused (502)
    if framing == "length":
        fields.append(field(rng, b"Content-Length", rng.choice([b"0", b"12"])))
    elif framing == "chunked":
        fields.append(field(rng, b"Transfer-Encoding", b"chunked"))
    candidates = [b"keep-alive", b"close", b"host", b"content-length", b"transfer-encoding", b"te",
                  b"trailer", b"x-absent", *(n.lower() for n in ORDINARY_RESPONSE)]
    for _ in range(rng.choice([0, 1, 1, 2])):
        if rng.random() < 0.5:  # the usual spellings, cut by a plain search
            fields.append(rng.choice(FAST_CONNECTION))
        else:
            fields.append(connection_field(rng, candidates))
    rng.shuffle(fields)
    expected_line = line if version == b"1.1" else b"HTTP/1.1 %d %s" % (status, reason)
    return msg(line, *fields), rng.choice([b"GET", b"HEAD"]), expected_line, fields


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_random_response_heads_lose_exactly_the_fields_they_must(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(100):
        raw, method, expected_line, fields = random_response(rng)
        head = response_head(raw, method)
        https = rng.random() < 0.7
        hsts = rng.choice([None, KEEP, OVERRIDE])
        added = rng.choice(ADDED_CHOICES)
        out = client_response_head(head, hsts, https=https, added=added)

        drop = RESPONSE_HOP_BY_HOP | (listed_tokens(fields) - NEVER_LISTED)
        upstream_sts = [f for f in fields if name_of(f) == STS]
        kept = [f for f in fields if name_of(f) not in drop and name_of(f) != STS]
        lines = head_lines(out)
        out_fields = lines[1:]
        context = (raw, https, hsts)
        assert lines[0] == expected_line, context
        assert [f for f in out_fields if name_of(f) != STS] == kept + added.splitlines(), context
        assert out_fields[len(out_fields) - len(added.splitlines()) :] == added.splitlines(), context
        assert not [f for f in out_fields[: len(out_fields) - len(added.splitlines())] if name_of(f) in drop]

        sts = [f for f in out_fields if name_of(f) == STS]
        if not (https and hsts is not None):
            assert sts == [], context
        elif hsts.override_upstream or not upstream_sts:
            assert sts == [hsts.line[:-2]], context
        else:
            assert [value_of(f) for f in sts] == [value_of(upstream_sts[0])], context
            if len(upstream_sts) == 1:  # kept as it came, where it stood
                expected = [f for f in fields if name_of(f) not in drop]
                assert out_fields == expected + added.splitlines(), context

        again = response_head(out, method)
        assert (again.status, again.version) == (head.status, b"1.1")
        assert [h for h in again.headers if h[0] != STS] == [(name_of(f), value_of(f)) for f in kept] + [
            (name_of(f), value_of(f)) for f in added.splitlines()], context
