"""HTTP/1.1 parsing: strict heads, exact framing, and the same events however bytes arrive."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import pytest

from proxycore.http1 import (
    LAST_CHUNK,
    BodyData,
    Framing,
    MessageEnd,
    ParseError,
    RequestHead,
    RequestParser,
    ResponseHead,
    ResponseParser,
    Upgraded,
    connection_tokens,
    encode_chunk,
    serialize_response_head,
)


def msg(*lines: bytes, body: bytes = b"") -> bytes:
    """A head from its lines (CRLF added) followed by ``body``."""
    return b"".join(line + b"\r\n" for line in lines) + b"\r\n" + body


def coalesced(events: Sequence[object]) -> list[object]:
    """Adjacent BodyData (or Upgraded) merged: their slicing depends on how bytes arrived."""
    out: list[object] = []
    for event in events:
        last = out[-1] if out else None
        if isinstance(event, BodyData) and isinstance(last, BodyData):
            out[-1] = BodyData(last.data + event.data)
        elif isinstance(event, Upgraded) and isinstance(last, Upgraded):
            out[-1] = Upgraded(last.rest + event.rest)
        else:
            out.append(event)
    return out


def feed_bytewise(parser: RequestParser | ResponseParser, raw: bytes) -> list[object]:
    events: list[object] = []
    for i in range(len(raw)):
        events += parser.feed(raw[i : i + 1])
    return events


def refusal(raw: bytes, **limits: int) -> ParseError:
    """Feed ``raw`` whole and byte by byte; both must refuse it the same way, before its head."""
    with pytest.raises(ParseError) as whole:
        RequestParser(**limits).feed(raw)
    parser = RequestParser(**limits)
    seen: list[object] = []
    with pytest.raises(ParseError) as bytewise:
        for i in range(len(raw)):
            seen += parser.feed(raw[i : i + 1])
    assert bytewise.value.status == whole.value.status
    for exc, before in ((whole.value, []), (bytewise.value, seen)):
        assert not any(isinstance(e, RequestHead) for e in [*before, *exc.events])
    with pytest.raises(ParseError):  # a failed parser stays failed
        parser.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    return whole.value


def response_refusal(raw: bytes, method: bytes = b"GET") -> ParseError:
    parser = ResponseParser()
    parser.expect(method)
    with pytest.raises(ParseError) as exc:
        parser.feed(raw)
        parser.feed_eof()
    assert exc.value.status == 502
    assert not any(isinstance(e, ResponseHead) for e in exc.value.events)
    return exc.value


def request_head(raw: bytes) -> RequestHead:
    head = RequestParser().feed(raw)[0]
    assert isinstance(head, RequestHead)
    return head


def responses(raw: bytes, *methods: bytes, eof: bool = False) -> list[object]:
    parser = ResponseParser()
    for method in methods:
        parser.expect(method)
    events: list[object] = parser.feed(raw)
    if eof:
        events += parser.feed_eof()
    return events


GET = msg(b"GET / HTTP/1.1", b"Host: a")
PIPELINE = (
    msg(b"GET /one HTTP/1.1", b"Host: example.com", b"Accept:  */*  ")
    + msg(
        b"POST /two HTTP/1.1",
        b"Host: example.com",
        b"Transfer-Encoding: chunked",
        body=b"5;name=value\r\nhello\r\n1\r\n!\r\n0\r\nChecksum: abc\r\n\r\n",
    )
    + msg(b"PUT /three HTTP/1.1", b"Host: example.com", b"Content-Length: 11", body=b"hello world")
)


# --- valid requests ------------------------------------------------------------


def test_simple_get_is_one_head_then_end() -> None:
    raw = msg(b"GET /a?b=c HTTP/1.1", b"Host: Example.COM:8443", b"X-Thing: \t v \t")
    head, end = RequestParser().feed(raw)
    assert isinstance(head, RequestHead) and end == MessageEnd()
    assert (head.method, head.target, head.version, head.raw) == (b"GET", b"/a?b=c", b"1.1", raw)
    assert head.headers == ((b"host", b"Example.COM:8443"), (b"x-thing", b"v"))
    assert head.noted == {b"host": [b"example.com:8443"]}  # lower-cased: what the proxy decides on
    assert (head.host, head.framing, head.content_length) == (b"example.com:8443", Framing.NONE, 0)
    assert (head.keep_alive, head.upgrade, head.expect_continue) == (True, None, False)


def test_noted_fields_are_the_ones_the_proxy_acts_on_in_any_case() -> None:
    raw = msg(b"GET / HTTP/1.1", b"HOST: a", b"X-Forwarded-For: 1", b"x_forwarded_for: 2", b"Test: t",
              b"Connection: keep-alive", b"Te: trailers", b"Accept: */*")
    assert request_head(raw).noted == {
        b"host": [b"a"], b"x-forwarded-for": [b"1"], b"x_forwarded_for": [b"2"],
        b"connection": [b"keep-alive"], b"te": [b"trailers"],
    }


def test_pipelined_requests_come_out_in_order() -> None:
    events = coalesced(RequestParser().feed(PIPELINE))
    kinds = [type(e).__name__ for e in events]
    assert kinds == [
        *("RequestHead", "MessageEnd"),
        *("RequestHead", "BodyData", "MessageEnd"),
        *("RequestHead", "BodyData", "MessageEnd"),
    ]
    assert [e.target for e in events if isinstance(e, RequestHead)] == [b"/one", b"/two", b"/three"]
    assert events[3] == BodyData(b"hello!")
    assert events[4] == MessageEnd(trailers=((b"checksum", b"abc"),))
    assert events[6] == BodyData(b"hello world")


def test_byte_by_byte_feeding_yields_the_same_events() -> None:
    assert coalesced(feed_bytewise(RequestParser(), PIPELINE)) == coalesced(RequestParser().feed(PIPELINE))


def test_every_split_point_yields_the_same_events() -> None:
    expected = coalesced(RequestParser().feed(PIPELINE))
    for cut in range(1, len(PIPELINE)):
        parser = RequestParser()
        assert coalesced(parser.feed(PIPELINE[:cut]) + parser.feed(PIPELINE[cut:])) == expected, cut


def test_content_length_body_needs_no_copy_when_data_is_all_body() -> None:
    parser = RequestParser()
    parser.feed(msg(b"POST / HTTP/1.1", b"Host: a", b"Content-Length: 8"))
    chunk = bytes(range(8))
    assert parser.feed(chunk)[0].data is chunk  # type: ignore[union-attr]


def test_content_length_zero_ends_at_once() -> None:
    head, end = RequestParser().feed(msg(b"POST / HTTP/1.1", b"Host: a", b"Content-Length: 0"))
    assert isinstance(head, RequestHead)
    assert (head.framing, head.content_length, end) == (Framing.LENGTH, 0, MessageEnd())


def test_chunked_body_with_trailers() -> None:
    raw = msg(
        b"POST / HTTP/1.1",
        b"Host: a",
        b"Transfer-Encoding: chunked",
        body=b'3\r\nabc\r\nA; ext="quoted"; x\r\n0123456789\r\n0\r\nX-Sum: 1\r\nX-Other:  two \r\n\r\n',
    )
    events = coalesced(RequestParser().feed(raw))
    assert isinstance(events[0], RequestHead) and events[0].framing is Framing.CHUNKED
    assert events[1:] == [BodyData(b"abc0123456789"), MessageEnd(((b"x-sum", b"1"), (b"x-other", b"two")))]


def test_transfer_encoding_chunked_is_case_insensitive() -> None:
    raw = msg(b"POST / HTTP/1.1", b"Host: a", b"Transfer-Encoding: Chunked ", body=b"0\r\n\r\n")
    assert request_head(raw).framing is Framing.CHUNKED


def test_expect_100_continue_is_reported() -> None:
    raw = msg(b"PUT / HTTP/1.1", b"Host: a", b"Expect: 100-Continue", b"Content-Length: 3")
    head = request_head(raw)
    assert head.expect_continue
    assert (head.framing, head.content_length) == (Framing.LENGTH, 3)
    old = msg(b"PUT / HTTP/1.0", b"Expect: 100-continue", b"Content-Length: 3")
    assert not request_head(old).expect_continue  # RFC 9110 §10.1.1: ignored in HTTP/1.0


def test_websocket_upgrade_hands_over_the_bytes_after_the_head() -> None:
    parser = RequestParser()
    raw = msg(
        b"GET /chat HTTP/1.1",
        b"Host: a",
        b"Connection: keep-alive, Upgrade",
        b"Upgrade: WebSocket",
        b"Sec-WebSocket-Version: 13",
        body=b"\x81\x05hello",
    )
    head, upgraded = parser.feed(raw)
    assert isinstance(head, RequestHead) and head.upgrade == b"websocket"
    assert upgraded == Upgraded(b"\x81\x05hello")
    assert parser.feed(b"more frames") == [Upgraded(b"more frames")]


def test_upgrade_split_byte_by_byte_still_starts_the_tunnel_after_the_head() -> None:
    raw = msg(b"GET / HTTP/1.1", b"Host: a", b"Connection: upgrade", b"Upgrade: websocket", body=b"xy")
    events = feed_bytewise(RequestParser(), raw)
    assert isinstance(events[0], RequestHead)
    assert events[1:] == [Upgraded(b""), Upgraded(b"x"), Upgraded(b"y")]


def test_upgrade_on_a_request_with_a_body_is_ignored() -> None:
    raw = msg(
        b"POST / HTTP/1.1",
        b"Host: a",
        b"Connection: upgrade",
        b"Upgrade: h2c",
        b"Content-Length: 2",
        body=b"hi",
    )
    events = RequestParser().feed(raw)
    assert isinstance(events[0], RequestHead) and events[0].upgrade is None
    assert events[1:] == [BodyData(b"hi"), MessageEnd()]


def test_upgrade_header_without_connection_upgrade_is_no_upgrade() -> None:
    assert request_head(msg(b"GET / HTTP/1.1", b"Host: a", b"Upgrade: websocket")).upgrade is None


def test_http10_without_host_is_allowed_and_closes() -> None:
    parser = RequestParser()
    head, end = parser.feed(msg(b"GET / HTTP/1.0"))
    assert isinstance(head, RequestHead)
    assert (head.version, head.host, head.keep_alive, end) == (b"1.0", b"", False, MessageEnd())
    assert parser.feed(GET) == []  # nothing after a closing message is processed


def test_http10_keep_alive_persists() -> None:
    parser = RequestParser()
    assert request_head(msg(b"GET / HTTP/1.0", b"Connection: Keep-Alive")).keep_alive
    parser.feed(msg(b"GET / HTTP/1.0", b"Connection: keep-alive"))
    assert len(parser.feed(GET)) == 2


def test_connection_close_ends_parsing_even_of_garbage() -> None:
    parser = RequestParser()
    events = parser.feed(msg(b"GET / HTTP/1.1", b"Host: a", b"Connection: close") + b"\x00garbage")
    assert isinstance(events[0], RequestHead) and not events[0].keep_alive
    assert events[1:] == [MessageEnd()]
    assert parser.feed(b"more garbage") == []


def test_absolute_form_target_agreeing_with_host_is_reduced_to_origin_form() -> None:
    head = request_head(msg(b"GET HTTP://Example.com:8080?q=1 HTTP/1.1", b"Host: example.com:8080"))
    assert (head.target, head.host) == (b"/?q=1", b"example.com:8080")
    old = request_head(msg(b"GET http://a.example/p HTTP/1.0"))
    assert (old.target, old.host) == (b"/p", b"a.example")


def test_options_asterisk_and_ip_hosts_are_accepted() -> None:
    assert request_head(msg(b"OPTIONS * HTTP/1.1", b"Host: 192.0.2.1:80")).target == b"*"
    assert request_head(msg(b"GET / HTTP/1.1", b"Host: [2001:DB8::1]:8443")).host == b"[2001:db8::1]:8443"


def test_empty_lines_before_a_request_are_skipped() -> None:
    events = RequestParser().feed(b"\r\n\r\n" + GET)
    assert isinstance(events[0], RequestHead)


def test_obs_text_in_values_is_allowed() -> None:
    assert request_head(msg(b"GET / HTTP/1.1", b"Host: a", b"X: caf\xc3\xa9")).headers[1] == (
        b"x",
        b"caf\xc3\xa9",
    )


def test_end_of_input_between_requests_is_clean_but_inside_one_is_not() -> None:
    parser = RequestParser()
    parser.feed(GET)
    assert parser.feed_eof() == []
    parser = RequestParser()
    parser.feed(msg(b"POST / HTTP/1.1", b"Host: a", b"Content-Length: 5", body=b"abc"))
    with pytest.raises(ParseError) as exc:
        parser.feed_eof()
    assert exc.value.status == 400


def test_error_keeps_the_events_of_earlier_pipelined_requests() -> None:
    with pytest.raises(ParseError) as exc:
        RequestParser().feed(GET + msg(b"GET / HTTP/1.1", b"Host: a", b"Host: b"))
    assert coalesced(exc.value.events)[1:] == [MessageEnd()]
    assert isinstance(exc.value.events[0], RequestHead)


# --- refused requests ------------------------------------------------------------

H = b"Host: a"
CHUNKED = b"Transfer-Encoding: chunked"

SMUGGLING = {
    "cl-and-te": msg(b"POST / HTTP/1.1", H, b"Content-Length: 5", CHUNKED, body=b"0\r\n\r\n"),
    "te-and-cl": msg(b"POST / HTTP/1.1", H, CHUNKED, b"Content-Length: 5", body=b"0\r\n\r\n"),
    "duplicate-cl-equal": msg(
        b"POST / HTTP/1.1", H, b"Content-Length: 5", b"Content-Length: 5", body=b"hello"
    ),
    "duplicate-cl-differ": msg(b"POST / HTTP/1.1", H, b"Content-Length: 5", b"Content-Length: 6"),
    "cl-plus": msg(b"POST / HTTP/1.1", H, b"Content-Length: +5", body=b"hello"),
    "cl-minus": msg(b"POST / HTTP/1.1", H, b"Content-Length: -5"),
    "cl-inner-space": msg(b"POST / HTTP/1.1", H, b"Content-Length: 1 0", body=b"x" * 10),
    "cl-hex": msg(b"POST / HTTP/1.1", H, b"Content-Length: 0x5", body=b"hello"),
    "cl-empty": msg(b"POST / HTTP/1.1", H, b"Content-Length: "),
    "cl-list": msg(b"POST / HTTP/1.1", H, b"Content-Length: 5, 5", body=b"hello"),
    "cl-overflow": msg(b"POST / HTTP/1.1", H, b"Content-Length: 99999999999999999999"),
    "te-gzip-chunked": msg(b"POST / HTTP/1.1", H, b"Transfer-Encoding: gzip, chunked", body=b"0\r\n\r\n"),
    "te-chunked-chunked": msg(
        b"POST / HTTP/1.1", H, b"Transfer-Encoding: chunked, chunked", body=b"0\r\n\r\n"
    ),
    "te-two-fields": msg(b"POST / HTTP/1.1", H, CHUNKED, CHUNKED, body=b"0\r\n\r\n"),
    "te-gzip-then-chunked": msg(
        b"POST / HTTP/1.1", H, b"Transfer-Encoding: gzip", CHUNKED, body=b"0\r\n\r\n"
    ),
    "te-identity": msg(b"POST / HTTP/1.1", H, b"Transfer-Encoding: identity"),
    "te-chunked-x": msg(b"POST / HTTP/1.1", H, b"Transfer-Encoding: xchunked", body=b"0\r\n\r\n"),
    "obs-fold-space": msg(b"GET / HTTP/1.1", H, b"X: a", b" b"),
    "obs-fold-tab": msg(b"GET / HTTP/1.1", H, b"X: a", b"\tb"),
    "first-field-indented": msg(b"GET / HTTP/1.1", b" X: a", H),
    "bare-lf-request-line": b"GET / HTTP/1.1\nHost: a\r\n\r\n",
    "bare-lf-field": b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n",
    "bare-lf-everywhere": b"GET / HTTP/1.1\nHost: a\n\n",
    "bare-lf-final": b"GET / HTTP/1.1\r\nHost: a\r\n\n",
    "bare-cr-line-end": b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n",
    "bare-cr-in-value": b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n",
    "space-before-colon": msg(b"GET / HTTP/1.1", H, b"X : a"),
    "tab-before-colon": msg(b"GET / HTTP/1.1", H, b"X\t: a"),
    "cl-space-before-colon": msg(b"POST / HTTP/1.1", H, b"Content-Length : 5", body=b"hello"),
    "nul-in-value": msg(b"GET / HTTP/1.1", H, b"X: a\x00b"),
    "ctl-in-value": msg(b"GET / HTTP/1.1", H, b"X: a\x01b"),
    "del-in-value": msg(b"GET / HTTP/1.1", H, b"X: a\x7fb"),
    "ctl-in-name": msg(b"GET / HTTP/1.1", H, b"X\x01: a"),
    "paren-in-name": msg(b"GET / HTTP/1.1", H, b"X(y: a"),
    "slash-in-name": msg(b"GET / HTTP/1.1", H, b"X/y: a"),
    "non-ascii-name": msg(b"GET / HTTP/1.1", H, b"X-\xc3\xa9: a"),
    "empty-name": msg(b"GET / HTTP/1.1", H, b": a"),
    "no-colon": msg(b"GET / HTTP/1.1", H, b"X"),
}

BAD_CHUNKS = {
    "non-hex": b"z\r\nhello\r\n0\r\n\r\n",
    "negative": b"-5\r\nhello\r\n0\r\n\r\n",
    "0x-prefix": b"0x5\r\nhello\r\n0\r\n\r\n",
    "leading-zeros-17-digits": b"00000000000000005\r\nhello\r\n0\r\n\r\n",
    "overflow-17-digits": b"10000000000000005\r\nhello\r\n0\r\n\r\n",
    "empty-size": b"\r\nhello\r\n0\r\n\r\n",
    "trailing-space": b"5 \r\nhello\r\n0\r\n\r\n",
    "bare-cr-in-extension": b"5;a\rb\r\nhello\r\n0\r\n\r\n",
    "bare-lf-after-size": b"5\nhello\r\n0\r\n\r\n",
    "data-longer-than-size": b"5\r\nhelloXX\r\n0\r\n\r\n",
    "bare-lf-after-data": b"5\r\nhello\n0\r\n\r\n",
    "size-line-too-long": b"5;" + b"x" * 5000 + b"\r\nhello\r\n0\r\n\r\n",
    "bare-lf-final": b"0\r\n\n",
    "trailer-obs-fold": b"0\r\nX: 1\r\n y\r\n\r\n",
    "trailer-space-before-colon": b"0\r\nX : 1\r\n\r\n",
    "trailer-bare-lf": b"0\r\nX: 1\nY: 2\r\n\r\n",
    "trailer-bare-lf-before-crlf": b"0\r\nX: 1\n\r\n\r\n",
    "trailer-bare-cr": b"0\r\nX\r 1\r\n\r\n",
    "trailer-content-length": b"0\r\nContent-Length: 5\r\n\r\n",
    "trailer-transfer-encoding": b"0\r\nTransfer-Encoding: chunked\r\n\r\n",
}

BAD_HOSTS_AND_LINES = {
    "missing-host": msg(b"GET / HTTP/1.1"),
    "duplicate-host": msg(b"GET / HTTP/1.1", H, H),
    "different-hosts": msg(b"GET / HTTP/1.1", H, b"Host: b"),
    "empty-host": msg(b"GET / HTTP/1.1", b"Host: "),
    "host-with-space": msg(b"GET / HTTP/1.1", b"Host: a b"),
    "host-with-userinfo": msg(b"GET / HTTP/1.1", b"Host: user@a"),
    "host-with-path": msg(b"GET / HTTP/1.1", b"Host: a/b"),
    "host-port-letters": msg(b"GET / HTTP/1.1", b"Host: a:http"),
    "host-port-empty": msg(b"GET / HTTP/1.1", b"Host: a:"),
    "host-port-too-big": msg(b"GET / HTTP/1.1", b"Host: a:65536"),
    "host-two-ports": msg(b"GET / HTTP/1.1", b"Host: a:1:2"),
    "host-ipv6-unclosed": msg(b"GET / HTTP/1.1", b"Host: [::1"),
    "host-ipv6-bad": msg(b"GET / HTTP/1.1", b"Host: [zz::1]"),
    "host-ipv6-junk-after": msg(b"GET / HTTP/1.1", b"Host: [::1]x"),
    "http-1.2": msg(b"GET / HTTP/1.2", H),
    "http-2.0": msg(b"GET / HTTP/2.0", H),
    "http-0.9": msg(b"GET / HTTP/0.9", H),
    "no-version": b"GET /\r\n\r\n",
    "version-1.10": msg(b"GET / HTTP/1.10", H),
    "lower-case-http": msg(b"GET / http/1.1", H),
    "rtsp": msg(b"GET / RTSP/1.0", H),
    "h2-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "double-space": msg(b"GET  / HTTP/1.1", H),
    "trailing-space": msg(b"GET / HTTP/1.1 ", H),
    "tab-separator": msg(b"GET\t/ HTTP/1.1", H),
    "space-in-target": msg(b"GET /a b HTTP/1.1", H),
    "ctl-in-target": msg(b"GET /\x01 HTTP/1.1", H),
    "lower-case-method": msg(b"get / HTTP/1.1", H),
    "relative-target": msg(b"GET a/b HTTP/1.1", H),
    "asterisk-without-options": msg(b"GET * HTTP/1.1", H),
    "absolute-form-other-host": msg(b"GET http://b/ HTTP/1.1", H),
    "absolute-form-other-port": msg(b"GET http://a:8080/ HTTP/1.1", H),
    "absolute-form-ftp": msg(b"GET ftp://a/ HTTP/1.1", H),
    "absolute-form-userinfo": msg(b"GET http://u@a/ HTTP/1.1", H),
    "connect": msg(b"CONNECT a:443 HTTP/1.1", b"Host: a:443"),
}


@pytest.mark.parametrize("raw", SMUGGLING.values(), ids=SMUGGLING.keys())
def test_request_smuggling_vectors_are_refused_with_400(raw: bytes) -> None:
    assert refusal(raw).status == 400


@pytest.mark.parametrize("body", BAD_CHUNKS.values(), ids=BAD_CHUNKS.keys())
def test_invalid_chunked_framing_is_refused_with_400(body: bytes) -> None:
    raw = msg(b"POST / HTTP/1.1", H, CHUNKED, body=body)
    parser = RequestParser()
    with pytest.raises(ParseError) as exc:
        parser.feed(raw)
    assert exc.value.status == 400
    parser = RequestParser()
    with pytest.raises(ParseError) as exc:
        feed_bytewise(parser, raw)
    assert exc.value.status == 400


@pytest.mark.parametrize("raw", BAD_HOSTS_AND_LINES.values(), ids=BAD_HOSTS_AND_LINES.keys())
def test_bad_request_lines_versions_and_hosts_are_refused_with_400(raw: bytes) -> None:
    assert refusal(raw).status == 400


def test_long_request_line_gets_414_even_before_it_ends() -> None:
    line = b"GET /" + b"a" * 100 + b" HTTP/1.1"
    assert refusal(msg(line, H), max_request_line=100).status == 414
    with pytest.raises(ParseError) as exc:
        RequestParser(max_request_line=100).feed(line[:-10])
    assert exc.value.status == 414


def test_large_head_gets_431_even_before_it_ends() -> None:
    fields = [b"X-%d: %s" % (i, b"v" * 50) for i in range(5)]
    assert refusal(msg(b"GET / HTTP/1.1", H, *fields), max_head_size=300).status == 431
    with pytest.raises(ParseError) as exc:
        RequestParser(max_head_size=300).feed(b"GET / HTTP/1.1\r\n" + b"X: " + b"v" * 400)
    assert exc.value.status == 431


def test_head_exactly_at_the_limit_is_accepted() -> None:
    raw = msg(b"GET / HTTP/1.1", H)
    assert isinstance(RequestParser(max_head_size=len(raw)).feed(raw)[0], RequestHead)
    with pytest.raises(ParseError):
        RequestParser(max_head_size=len(raw) - 1).feed(raw)


def test_body_over_the_limit_gets_413() -> None:
    with pytest.raises(ParseError) as exc:
        RequestParser(max_body_size=4).feed(msg(b"POST / HTTP/1.1", H, b"Content-Length: 5"))
    assert exc.value.status == 413 and exc.value.events == []
    parser = RequestParser(max_body_size=4)
    with pytest.raises(ParseError) as exc:
        parser.feed(msg(b"POST / HTTP/1.1", H, CHUNKED, body=b"3\r\nabc\r\n2\r\nde\r\n"))
    assert exc.value.status == 413


def test_trailer_section_over_the_head_limit_gets_431() -> None:
    body = b"0\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 90) for i in range(5)) + b"\r\n"
    with pytest.raises(ParseError) as exc:
        RequestParser(max_head_size=300).feed(msg(b"POST / HTTP/1.1", H, CHUNKED, body=body))
    assert exc.value.status == 431


# --- responses -------------------------------------------------------------


def test_response_with_content_length() -> None:
    raw = msg(b"HTTP/1.1 200 OK", b"Content-Length: 2", b"Server: x")
    events = responses(raw + b"hi", b"GET")
    assert events == [ResponseHead(200, b"OK", b"1.1", raw, Framing.LENGTH, 2, True), BodyData(b"hi"), MessageEnd()]
    head = events[0]
    assert isinstance(head, ResponseHead)
    assert head.headers == ((b"content-length", b"2"), (b"server", b"x"))
    assert head.noted == {b"content-length": [b"2"]}


def test_head_response_has_no_body_whatever_its_content_length() -> None:
    second = msg(b"HTTP/1.1 200 OK", b"Content-Length: 2")
    events = responses(msg(b"HTTP/1.1 200 OK", b"Content-Length: 5") + second + b"hi", b"HEAD", b"GET")
    assert isinstance(events[0], ResponseHead)
    assert (events[0].framing, events[1]) == (Framing.NONE, MessageEnd())
    assert events[2:] == [
        ResponseHead(200, b"OK", b"1.1", second, Framing.LENGTH, 2, True),
        BodyData(b"hi"),
        MessageEnd(),
    ]


@pytest.mark.parametrize("status", [b"204 No Content", b"304 Not Modified"])
def test_204_and_304_have_no_body(status: bytes) -> None:
    raw = msg(b"HTTP/1.1 " + status, b"Content-Length: 5") + msg(b"HTTP/1.1 200 OK", b"Content-Length: 0")
    events = responses(raw, b"GET", b"GET")
    assert [type(e) for e in events] == [ResponseHead, MessageEnd, ResponseHead, MessageEnd]
    assert events[0].framing is Framing.NONE  # type: ignore[union-attr]


def test_100_continue_then_final_response() -> None:
    raw = msg(b"HTTP/1.1 100 Continue") + msg(b"HTTP/1.1 200 OK", b"Content-Length: 2", body=b"ok")
    parser = ResponseParser()
    parser.expect(b"POST")
    events = coalesced(feed_bytewise(parser, raw))
    assert [(type(e).__name__, getattr(e, "status", None)) for e in events] == [
        ("ResponseHead", 100),
        ("ResponseHead", 200),
        ("BodyData", None),
        ("MessageEnd", None),
    ]


def test_101_switching_protocols_starts_the_tunnel() -> None:
    parser = ResponseParser()
    parser.expect(b"GET")
    raw = msg(
        b"HTTP/1.1 101 Switching Protocols", b"Upgrade: websocket", b"Connection: Upgrade", body=b"\x81\x00"
    )
    head, upgraded = parser.feed(raw)
    assert isinstance(head, ResponseHead) and head.status == 101
    assert upgraded == Upgraded(b"\x81\x00")
    assert parser.feed(b"frame") == [Upgraded(b"frame")]
    assert parser.feed_eof() == []


def test_response_without_length_is_read_until_close() -> None:
    parser = ResponseParser()
    parser.expect(b"GET")
    head, *body = parser.feed(msg(b"HTTP/1.1 200 OK", body=b"part one "))
    assert isinstance(head, ResponseHead)
    assert (head.framing, head.keep_alive) == (Framing.UNTIL_CLOSE, False)
    assert body + parser.feed(b"part two") == [BodyData(b"part one "), BodyData(b"part two")]
    assert parser.feed_eof() == [MessageEnd()]


def test_chunked_response_with_trailers_split_everywhere() -> None:
    raw = msg(b"HTTP/1.1 200 OK", CHUNKED, body=b"4\r\nwiki\r\n5\r\npedia\r\n0\r\nX-Digest: z\r\n\r\n")
    expected = coalesced(responses(raw, b"GET"))
    assert expected[1:] == [BodyData(b"wikipedia"), MessageEnd(((b"x-digest", b"z"),))]
    for cut in range(1, len(raw)):
        parser = ResponseParser()
        parser.expect(b"GET")
        assert coalesced(parser.feed(raw[:cut]) + parser.feed(raw[cut:])) == expected, cut


@pytest.mark.parametrize(
    "raw",
    [
        msg(b"HTTP/1.1 200 OK", b"Content-Length: 10", body=b"short"),
        msg(b"HTTP/1.1 200 OK", CHUNKED, body=b"5\r\nhello\r\n"),
        b"HTTP/1.1 200 OK\r\nContent-Len",
    ],
    ids=["length", "chunked", "head"],
)
def test_response_cut_short_raises_at_eof(raw: bytes) -> None:
    parser = ResponseParser()
    parser.expect(b"GET")
    parser.feed(raw)
    with pytest.raises(ParseError) as exc:
        parser.feed_eof()
    assert exc.value.status == 502


def test_eof_before_any_response_byte_is_not_a_parse_error() -> None:
    parser = ResponseParser()
    parser.expect(b"GET")
    assert parser.feed_eof() == []


def test_response_keep_alive_follows_version_and_connection() -> None:
    def alive(*lines: bytes) -> bool:
        head = responses(msg(*lines, b"Content-Length: 0"), b"GET")[0]
        assert isinstance(head, ResponseHead)
        return head.keep_alive

    assert alive(b"HTTP/1.1 200 OK")
    assert not alive(b"HTTP/1.1 200 OK", b"Connection: close")
    assert not alive(b"HTTP/1.0 200 OK")
    assert alive(b"HTTP/1.0 200 OK", b"Connection: keep-alive")


@pytest.mark.parametrize(
    "raw",
    [
        msg(b"HTTP/1.1 200 OK", b"Content-Length: 2", CHUNKED, body=b"0\r\n\r\n"),
        msg(b"HTTP/1.1 200 OK", b"Content-Length: 2", b"Content-Length: 2", body=b"hi"),
        msg(b"HTTP/1.1 200 OK", b"Content-Length: 2 2"),
        msg(b"HTTP/1.1 200 OK", b"Transfer-Encoding: gzip", body=b"abc"),
        msg(b"HTTP/1.1 200 OK", b"Transfer-Encoding: gzip, chunked", body=b"0\r\n\r\n"),
        msg(b"HTTP/1.1 200 OK", b"X: a", b" folded", b"Content-Length: 0"),
        b"HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n",
        msg(b"HTTP/1.1 200 OK", b"X : a", b"Content-Length: 0"),
        msg(b"HTTP/1.1 200 O\x01K", b"Content-Length: 0"),
        msg(b"HTTP/1.1  200 OK", b"Content-Length: 0"),
        msg(b"HTTP/1.1 600 Odd", b"Content-Length: 0"),
        msg(b"HTTP/1.1 099 Odd", b"Content-Length: 0"),
        msg(b"HTTP/2.0 200 OK", b"Content-Length: 0"),
        msg(b"HTTP/1.1 200 OK", b"X-Big: " + b"v" * 70000, b"Content-Length: 0"),
    ],
    ids=[
        "cl-and-te",
        "duplicate-cl",
        "malformed-cl",
        "te-gzip",
        "te-gzip-chunked",
        "obs-fold",
        "bare-lf",
        "space-before-colon",
        "ctl-in-reason",
        "double-space",
        "status-600",
        "status-099",
        "http-2.0",
        "head-too-large",
    ],
)
def test_malformed_responses_are_refused_with_502(raw: bytes) -> None:
    response_refusal(raw)


def test_bad_chunk_in_a_response_body_is_refused_with_502() -> None:
    parser = ResponseParser()
    parser.expect(b"GET")
    with pytest.raises(ParseError) as exc:
        parser.feed(msg(b"HTTP/1.1 200 OK", CHUNKED, body=b"5\r\nhello\r\nzz\r\n"))
    assert exc.value.status == 502
    assert exc.value.events[1:] == [BodyData(b"hello")]  # the head was sound; the body broke


def test_response_with_no_request_outstanding_is_refused() -> None:
    ok = msg(b"HTTP/1.1 200 OK", b"Content-Length: 0")
    with pytest.raises(ParseError) as exc:
        responses(ok + ok, b"GET")
    assert exc.value.status == 502
    assert [type(e) for e in exc.value.events] == [ResponseHead, MessageEnd]


# --- any input, any split ---------------------------------------------------------

NOISE = b"\r\n :;,\t\x00\x7f\x80aZ09-/?#[]@"


def mutated(rng: random.Random, raw: bytes) -> bytes:
    out = bytearray(raw)
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(len(out))
        choice = rng.random()
        if choice < 0.4:
            out[at] = rng.choice(NOISE)
        elif choice < 0.7:
            out.insert(at, rng.choice(NOISE))
        else:
            del out[at]
    return bytes(out)


def outcome(make: Callable[[], RequestParser | ResponseParser], raw: bytes, sizes: list[int]) -> object:
    """(status or "ok", events without body data when failed): comparable across splits."""
    parser = make()
    events: list[object] = []
    try:
        at = 0
        for size in sizes:
            events += parser.feed(raw[at : at + size])
            at += size
        events += parser.feed_eof()
    except ParseError as exc:
        assert exc.status in (400, 413, 414, 431, 502)
        # A body that goes bad stops wherever the split let it get: compare the heads.
        return exc.status, [e for e in events + exc.events if not isinstance(e, BodyData)]
    assert all(e.data for e in events if isinstance(e, BodyData))
    return "ok", coalesced(events)


def three_responses_expected() -> ResponseParser:
    parser = ResponseParser()
    for _ in range(3):
        parser.expect(b"GET")
    return parser


@pytest.mark.parametrize("seed", range(4))
def test_mutated_messages_fail_cleanly_and_identically_however_split(seed: int) -> None:
    rng = random.Random(seed)
    samples: list[tuple[Callable[[], RequestParser | ResponseParser], bytes]] = [
        (RequestParser, PIPELINE),
        (RequestParser, msg(b"GET / HTTP/1.1", b"Host: a", b"Connection: upgrade", b"Upgrade: x", body=b"t")),
        (three_responses_expected, msg(b"HTTP/1.1 100 Continue") + msg(b"HTTP/1.1 200 OK", CHUNKED)
         + b"2\r\nhi\r\n0\r\nT: 1\r\n\r\n" + msg(b"HTTP/1.0 200 OK", body=b"rest")),
    ]  # fmt: skip
    for _ in range(100):
        make, valid = rng.choice(samples)
        raw = mutated(rng, valid)
        whole = outcome(make, raw, [len(raw)])
        assert outcome(make, raw, [1] * len(raw)) == whole, raw
        sizes = [rng.randint(1, 7) for _ in range(len(raw))]
        assert outcome(make, raw, sizes) == whole, raw


# --- serialisation and hop-by-hop fields ------------------------------------------


def test_chunk_encoding() -> None:
    assert encode_chunk(b"hello world, 26 bytes long") == b"1a\r\nhello world, 26 bytes long\r\n"
    assert encode_chunk(b"") == b""  # a 0-size chunk would end the body
    assert LAST_CHUNK == b"0\r\n\r\n"


def test_serialized_heads_parse_back() -> None:
    raw = serialize_response_head(404, b"Not Found", [(b"content-length", b"0")], version=b"1.0")
    assert raw == b"HTTP/1.0 404 Not Found\r\ncontent-length: 0\r\n\r\n"


@pytest.mark.parametrize("field", [(b"x", b"a\r\nInjected: 1"), (b"x", b"a\nb"), (b"x\r", b"a")])
def test_serializing_cr_or_lf_in_a_field_is_refused(field: tuple[bytes, bytes]) -> None:
    with pytest.raises(ValueError):
        serialize_response_head(200, b"OK", [field])


def test_connection_options_are_read_lower_cased_from_every_connection_field() -> None:
    headers = (
        (b"host", b"a"),
        (b"connection", b"Keep-Alive, X-Secret"),
        (b"connection", b" , host, content-length"),
        (b"x-secret", b"1"),
        (b"keep-alive", b"timeout=5"),
        (b"te", b"trailers"),
        (b"content-length", b"0"),
        (b"accept", b"*/*"),
    )
    assert connection_tokens(headers) == {b"keep-alive", b"x-secret", b"host", b"content-length"}


def test_transfer_encoding_in_http_1_0_is_faulty_framing() -> None:
    # RFC 9112 §6.1: HTTP/1.0 has no Transfer-Encoding; a message with one is refused whole.
    request = msg(b"POST / HTTP/1.0", b"Host: a", b"Transfer-Encoding: chunked", body=b"0\r\n\r\n")
    parser = RequestParser()
    with pytest.raises(ParseError) as exc:
        parser.feed(request)
    assert exc.value.status == 400
    assert not any(isinstance(e, RequestHead) for e in exc.value.events)
    response_refusal(b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
