"""Reading the ClientHello before TLS starts: the pure parser, then the HTTPS listener.

The parser is fed real ClientHellos made by Python's ``ssl`` (a MemoryBIO client's
first flight), cut, re-framed and mutated; it may only answer ``None`` (wait for
more), a ``ClientHello``, or raise ``NotTLS``. The listener tests cross a running
node over sockets on 127.0.0.1: plain HTTP on the HTTPS port, strict SNI, silence,
and a ClientHello that arrives a byte at a time, on both event loops.
"""

from __future__ import annotations

import random
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import trustme

from proxycore import config as core
from proxycore.clienthello import (
    ALERT_DECODE_ERROR,
    ALERT_UNRECOGNIZED_NAME,
    MAX_HELLO,
    ClientHello,
    NotTLS,
    parse_client_hello,
)
from proxycore.limits import Limits
from tests.proxyharness import Upstream, bundle, handshake_failures, route, running_node, tls_connect

TLS12 = pytest.param(ssl.TLSVersion.TLSv1_2, id="tls1.2")
TLS13 = pytest.param(ssl.TLSVersion.TLSv1_3, id="tls1.3")


# ---- real ClientHellos -------------------------------------------------------------


def client_hello_and_session(
    server_name: str | None, *, alpn: list[str] | None = None, version: ssl.TLSVersion | None = None,
    ctx: ssl.SSLContext | None = None,
) -> tuple[bytes, ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    """A client's first flight, and the client (with its BIOs) to finish the handshake."""
    if ctx is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read(), client, incoming, outgoing


def client_hello(server_name: str | None, **kwargs: object) -> bytes:
    return client_hello_and_session(server_name, **kwargs)[0]  # type: ignore[arg-type]


def record(body: bytes, content_type: int = 0x16) -> bytes:
    return bytes([content_type, 3, 1]) + len(body).to_bytes(2, "big") + body


@dataclass(frozen=True)
class Layout:
    """Offsets of the length fields in a one-record ClientHello."""

    handshake_length: int
    session_id_length: int
    cipher_suites_length: int
    compression_length: int
    extensions_length: int
    extensions: dict[int, int]  # extension type -> offset of its type field


def layout(hello: bytes) -> Layout:
    assert hello[0] == 0x16 and int.from_bytes(hello[3:5], "big") == len(hello) - 5
    pos = 5 + 4 + 2 + 32
    session_id = pos
    pos += 1 + hello[pos]
    suites = pos
    pos += 2 + int.from_bytes(hello[pos:pos + 2], "big")
    compression = pos
    pos += 1 + hello[pos]
    extensions_length = pos
    end = pos + 2 + int.from_bytes(hello[pos:pos + 2], "big")
    assert end == len(hello)
    pos += 2
    extensions = {}
    while pos < end:
        extensions[int.from_bytes(hello[pos:pos + 2], "big")] = pos
        pos += 4 + int.from_bytes(hello[pos + 2:pos + 4], "big")
    return Layout(6, session_id, suites, compression, extensions_length, extensions)


def with_field(data: bytes, offset: int, size: int, change: Callable[[int], int]) -> bytes:
    value = change(int.from_bytes(data[offset:offset + size], "big")) % (1 << (8 * size))
    return data[:offset] + value.to_bytes(size, "big") + data[offset + size:]


@pytest.fixture(scope="module")
def hello() -> bytes:
    return client_hello("a.example", alpn=["h2", "http/1.1"])


# ---- the parser ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", [TLS12, TLS13])
def test_server_name_and_alpn_are_read_from_a_real_client_hello(version: ssl.TLSVersion) -> None:
    data = client_hello("Shop.Example.", alpn=["h2", "http/1.1"], version=version)
    assert parse_client_hello(data) == ClientHello("shop.example", (b"h2", b"http/1.1"))


@pytest.mark.parametrize("version", [TLS12, TLS13])
def test_client_hello_without_sni_or_alpn_has_neither(version: ssl.TLSVersion) -> None:
    assert parse_client_hello(client_hello(None, version=version)) == ClientHello(None, ())
    # An IP address is never sent as SNI.
    assert parse_client_hello(client_hello("127.0.0.1", version=version)) == ClientHello(None, ())


def test_every_prefix_of_a_client_hello_is_incomplete(hello: bytes) -> None:
    for end in range(len(hello)):
        assert parse_client_hello(hello[:end]) is None, end


@pytest.mark.parametrize("split", [1, 3, 4, 40, 100, -1])
def test_client_hello_split_across_two_records_parses(hello: bytes, split: int) -> None:
    handshake = hello[5:]
    two = record(handshake[:split]) + record(handshake[split:])
    assert parse_client_hello(two) == ClientHello("a.example", (b"h2", b"http/1.1"))
    for end in range(len(two)):
        assert parse_client_hello(two[:end]) is None, end


def test_a_client_hello_interrupted_by_another_record_is_not_tls(hello: bytes) -> None:
    # Cut right before the extensions: read on, the rest would look like "no extensions".
    cut = layout(hello).extensions_length - 5
    alert = record(b"\x01\x00", content_type=0x15)
    with pytest.raises(NotTLS, match="interrupted"):
        parse_client_hello(record(hello[5:5 + cut]) + alert + record(hello[5 + cut:]))


@pytest.mark.parametrize("data", [
    b"\x00" * 16, b"SSH-2.0-OpenSSH_9.6\r\n", b"\x80\x2e\x01\x00\x02\x00\x15",  # SSLv2 hello
    b"\x17\x03\x03\x00\x05hello", b"GEX / HTTP/1.1\r\n", b"\x16\x02\x00\x00\x05hello",
])
def test_bytes_that_are_not_a_tls_handshake_are_not_tls(data: bytes) -> None:
    with pytest.raises(NotTLS) as caught:
        parse_client_hello(data)
    assert caught.value.http is False


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n", b"GET ", b"GE", b"G", b"P",
    b"POST /form HTTP/1.1\r\n", b"HEAD / HTTP/1.0\r\n", b"PRI * HTTP/2.0\r\n", b"OPTIONS * HTTP/1.1",
])
def test_http_requests_are_recognised_from_their_first_bytes(data: bytes) -> None:
    with pytest.raises(NotTLS) as caught:
        parse_client_hello(data)
    assert caught.value.http is True


def test_a_handshake_that_is_not_a_client_hello_is_not_tls(hello: bytes) -> None:
    server_hello = hello[:5] + b"\x02" + hello[6:]
    with pytest.raises(NotTLS, match="not a ClientHello"):
        parse_client_hello(server_hello)


def test_bad_record_headers_are_not_tls(hello: bytes) -> None:
    for bad in (hello[:1] + b"\x02" + hello[2:],  # record version 2.x
                hello[:3] + b"\x00\x00" + hello[5:],  # empty record
                hello[:3] + b"\x50\x00" + hello[5:]):  # longer than TLS allows
        with pytest.raises(NotTLS):
            parse_client_hello(bad)


def test_oversize_client_hello_is_refused(hello: bytes) -> None:
    # Declared far beyond the cap: refused from the first record, not after 64 KiB.
    huge = with_field(hello, 6, 3, lambda _: 0x100000)
    with pytest.raises(NotTLS, match="too large"):
        parse_client_hello(huge)
    # Many full records of one enormous ClientHello, or just too many bytes.
    body = b"\x01" + (MAX_HELLO * 2).to_bytes(3, "big") + b"\x00" * 16380
    with pytest.raises(NotTLS, match="too large"):
        parse_client_hello(record(body))
    with pytest.raises(NotTLS, match="too large"):
        parse_client_hello(hello[:100] + b"\x00" * MAX_HELLO)


def truncations(hello: bytes) -> dict[str, bytes]:
    at = layout(hello)
    sni, alpn = at.extensions[0x0000], at.extensions[0x0010]
    return {
        "session id past the end": with_field(hello, at.session_id_length, 1, lambda _: 255),
        "cipher suites past the end": with_field(hello, at.cipher_suites_length, 2, lambda _: 0xFFFF),
        "compression past the end": with_field(hello, at.compression_length, 1, lambda _: 255),
        "extensions one too long": with_field(hello, at.extensions_length, 2, lambda n: n + 1),
        "extensions one too short": with_field(hello, at.extensions_length, 2, lambda n: n - 1),
        "handshake one too short": with_field(hello, at.handshake_length, 3, lambda n: n - 1),
        "sni extension too long": with_field(hello, sni + 2, 2, lambda n: n + 1),
        "sni extension too short": with_field(hello, sni + 2, 2, lambda n: n - 1),
        "sni list too long": with_field(hello, sni + 4, 2, lambda n: n + 1),
        "sni list too short": with_field(hello, sni + 4, 2, lambda n: n - 1),
        "sni name too long": with_field(hello, sni + 7, 2, lambda n: n + 1),
        "sni name too short": with_field(hello, sni + 7, 2, lambda n: n - 1),
        "sni extension empty": with_field(hello, sni + 2, 2, lambda _: 0),
        "alpn list too long": with_field(hello, alpn + 4, 2, lambda n: n + 1),
        "alpn list too short": with_field(hello, alpn + 4, 2, lambda n: n - 1),
        "alpn name too long": with_field(hello, alpn + 6, 1, lambda n: n + 1),
        "alpn name empty": with_field(hello, alpn + 6, 1, lambda _: 0),
    }


@pytest.mark.parametrize("case", list(truncations(client_hello("a.example", alpn=["h2", "http/1.1"]))))
def test_truncated_or_overrunning_lengths_are_not_tls(hello: bytes, case: str) -> None:
    with pytest.raises(NotTLS):
        parse_client_hello(truncations(hello)[case])


def test_a_hostname_that_is_not_printable_ascii_is_not_tls(hello: bytes) -> None:
    name_at = layout(hello).extensions[0x0000] + 9
    assert hello[name_at:name_at + 9] == b"a.example"
    for bad in (b"a\xffexample", b"a example", b"a\x00example"):
        with pytest.raises(NotTLS, match="server name"):
            parse_client_hello(hello[:name_at] + bad + hello[name_at + 9:])


def mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.randrange(6)
        at = rng.randrange(len(out)) if out else 0
        if choice == 0 and out:
            out[at] ^= 1 << rng.randrange(8)
        elif choice == 1 and out:
            out[at] = rng.choice((0x00, 0x01, 0x7F, 0x80, 0xFF))
        elif choice == 2:
            del out[at:at + rng.randint(1, 8)]
        elif choice == 3:
            out[at:at] = rng.randbytes(rng.randint(1, 8))
        elif choice == 4:
            del out[rng.randrange(len(out) + 1):]
        elif len(out) > 2:  # a length-like 16-bit field nudged
            at = min(at, len(out) - 2)
            value = (int.from_bytes(out[at:at + 2], "big") + rng.choice((-2, -1, 1, 2, 255))) & 0xFFFF
            out[at:at + 2] = value.to_bytes(2, "big")
    return bytes(out)


def test_random_mutations_only_ever_parse_wait_or_raise_not_tls() -> None:
    rng = random.Random(20240611)
    seeds = [client_hello("a.example", alpn=["h2", "http/1.1"]),
             client_hello("b.example", version=ssl.TLSVersion.TLSv1_2), client_hello(None)]
    outcomes = {"hello": 0, "wait": 0, "not_tls": 0}
    for _ in range(4000):
        data = mutate(rng, rng.choice(seeds))
        try:
            result = parse_client_hello(data)
        except NotTLS:
            outcomes["not_tls"] += 1
            continue
        if result is None:
            outcomes["wait"] += 1
        else:
            assert isinstance(result, ClientHello)
            assert result.server_name is None or result.server_name.isascii()
            outcomes["hello"] += 1
    assert all(outcomes.values()), outcomes  # the fuzz reached every outcome


# ---- through the HTTPS listener --------------------------------------------------------------


@pytest.fixture(params=["uvloop", "asyncio"])
def loop_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both event loops: they hand bytes read before ``start_tls`` over differently."""
    if request.param == "asyncio":
        monkeypatch.setenv("PROXY_TEST_ASYNCIO", "1")
    else:
        monkeypatch.delenv("PROXY_TEST_ASYNCIO", raising=False)
    return str(request.param)


def snapshot(ca: trustme.CA, port: int, *, strict: bool = False) -> core.Snapshot:
    return core.Snapshot(
        revision=1,
        hosts=(route("a", ("a.example",), port, bundle(ca, "a.example")),),
        default_certificate=bundle(ca, "default.example", name="default"),
        strict_sni=strict,
    )


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def test_plain_http_on_the_https_port_gets_a_plain_400(ca: trustme.CA, upstream: Upstream) -> None:
    with running_node(snapshot(ca, upstream.port)) as node:
        with socket.create_connection(("127.0.0.1", node.https_port), timeout=10) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
            reply = read_until_closed(sock)
        assert handshake_failures(node, "-", {"http_request": 1}) == {"http_request": 1}
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"HTTPS" in body
    assert f"\r\ncontent-length: {len(body)}\r\n".encode() in head.lower() + b"\r\n"  # the whole body
    assert upstream.requests == []


def test_bytes_that_are_not_tls_get_a_decode_error_alert(ca: trustme.CA, upstream: Upstream) -> None:
    with running_node(snapshot(ca, upstream.port)) as node:
        with socket.create_connection(("127.0.0.1", node.https_port), timeout=10) as sock:
            sock.sendall(b"\x00" * 32)
            assert read_until_closed(sock) == ALERT_DECODE_ERROR
        assert handshake_failures(node, "-", {"not_tls": 1}) == {"not_tls": 1}


def test_unknown_sni_in_strict_mode_gets_unrecognized_name_in_clear(
    ca: trustme.CA, upstream: Upstream
) -> None:
    with running_node(snapshot(ca, upstream.port, strict=True)) as node:
        with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
            tls_connect(node.https_port, ca, "nobody.example")
        with socket.create_connection(("127.0.0.1", node.https_port), timeout=10) as sock:
            sock.sendall(client_hello("nobody.example"))
            assert read_until_closed(sock) == ALERT_UNRECOGNIZED_NAME  # a plaintext alert record
        assert handshake_failures(node, "-", {"unknown_sni": 2}) == {"unknown_sni": 2}
        with tls_connect(node.https_port, ca, "a.example") as ok:
            assert ok.version() == "TLSv1.3"


def test_a_silent_client_is_closed_after_the_handshake_timeout(
    ca: trustme.CA, upstream: Upstream, loop_kind: str
) -> None:
    with running_node(snapshot(ca, upstream.port), Limits(handshake_timeout=0.5)) as node:
        with socket.create_connection(("127.0.0.1", node.https_port), timeout=10) as sock:
            started = time.monotonic()
            assert read_until_closed(sock) == b""
            waited = time.monotonic() - started
        assert handshake_failures(node, "-", {"timeout": 1}) == {"timeout": 1}
    assert 0.4 < waited < 3


def test_a_client_stalling_after_its_client_hello_times_out_on_its_host(
    ca: trustme.CA, upstream: Upstream, loop_kind: str
) -> None:
    with running_node(snapshot(ca, upstream.port), Limits(handshake_timeout=0.5)) as node:
        with socket.create_connection(("127.0.0.1", node.https_port), timeout=10) as sock:
            started = time.monotonic()
            sock.sendall(client_hello("a.example"))
            assert read_until_closed(sock)[:1] == b"\x16"  # the ServerHello, then nothing
            waited = time.monotonic() - started
        assert handshake_failures(node, "a", {"timeout": 1}) == {"timeout": 1}
    assert 0.4 < waited < 3


def send_in_pieces(sock: socket.socket, data: bytes, pieces: str) -> None:
    if pieces == "bytes":
        chunks = [data[i:i + 1] for i in range(len(data))]
    else:
        third = len(data) // 3
        chunks = [data[:third], data[third:2 * third], data[2 * third:]]
    for chunk in chunks:
        sock.sendall(chunk)
        time.sleep(0.001 if pieces == "bytes" else 0.05)


def pump(sock: socket.socket, client: ssl.SSLObject, incoming: ssl.MemoryBIO,
         outgoing: ssl.MemoryBIO, step: Callable[[], bytes | None]) -> bytes:
    """Run ``step`` on the client until it returns, moving TLS records over ``sock``."""
    while True:
        try:
            result = step()
        except ssl.SSLWantReadError:
            result = None
        if pending := outgoing.read():
            sock.sendall(pending)
        if result is not None:
            return result
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed by the node")
        incoming.write(chunk)


@pytest.fixture
def byte_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(ctx)
    return ctx


@pytest.mark.parametrize("pieces", ["bytes", "thirds"])
def test_a_client_hello_arriving_in_pieces_still_completes(
    ca: trustme.CA, upstream: Upstream, byte_ctx: ssl.SSLContext, loop_kind: str, pieces: str
) -> None:
    hello_bytes, client, incoming, outgoing = client_hello_and_session("a.example", ctx=byte_ctx,
                                                                       alpn=["http/1.1"])
    with running_node(snapshot(ca, upstream.port)) as node, socket.create_connection(
        ("127.0.0.1", node.https_port), timeout=10
    ) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        send_in_pieces(sock, hello_bytes, pieces)

        def handshake() -> bytes:
            client.do_handshake()
            return b""

        pump(sock, client, incoming, outgoing, handshake)
        assert client.selected_alpn_protocol() == "http/1.1"
        client.write(b"GET /pieces HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n")
        response = b""
        while b"\r\n\r\n" not in response:
            response += pump(sock, client, incoming, outgoing, lambda: client.read(65536))
        stats = node.stats()
    assert response.startswith(b"HTTP/1.1 200 ")
    assert stats["hosts"]["a"]["handshakes_ok"] == 1
    assert stats["hosts"].get("-", {}).get("handshakes_failed", {}) == {}
    assert [r.target for r in upstream.requests] == ["/pieces"]
