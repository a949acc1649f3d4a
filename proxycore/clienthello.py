"""Reading the server name out of a TLS ClientHello, before any TLS library sees it.

The HTTPS listener reads the first bytes of each connection itself, picks the
host by SNI (``tls.lookup``) and starts TLS with that host's own ``SSLContext``.
So the host's client-certificate settings apply natively (OpenSSL does not carry
the verify mode over when a context is switched in an SNI callback), a strict-SNI
refusal can send its ``unrecognized_name`` alert in clear before closing, and a
plain-HTTP request on the HTTPS port gets a plain 400. Pure functions over bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

HANDSHAKE = 0x16
CLIENT_HELLO = 0x01
EXT_SERVER_NAME = 0x0000
EXT_ALPN = 0x0010
MAX_HELLO = 64 * 1024  # a ClientHello larger than this is not a client we serve

# A fatal alert record in clear: level 2 (fatal), then the description.
ALERT_UNRECOGNIZED_NAME = b"\x15\x03\x03\x00\x02\x02\x70"
ALERT_DECODE_ERROR = b"\x15\x03\x03\x00\x02\x02\x32"

_HTTP_METHODS = (b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ", b"OPTIONS ", b"PATCH ",
                 b"CONNECT ", b"TRACE ", b"PRI ")


class NotTLS(ValueError):
    """The bytes are not a TLS ClientHello; ``http`` is true when they look like HTTP."""

    def __init__(self, reason: str, http: bool = False) -> None:
        super().__init__(reason)
        self.http = http


@dataclass(frozen=True, slots=True)
class ClientHello:
    server_name: str | None  # lower-case, no trailing dot; None when the client sent no SNI
    alpn: tuple[bytes, ...]


def _handshake_bytes(data: bytes) -> bytes | None:
    """Concatenate the handshake records at the start of ``data``; None if one is cut."""
    out = bytearray()
    pos = 0
    while True:
        if len(data) - pos < 5:
            return None
        if data[pos] != HANDSHAKE:
            if pos == 0:
                raise NotTLS("not a TLS handshake record",
                             http=any(data.startswith(m[: len(data)]) for m in _HTTP_METHODS))
            # Reading on would parse a ClientHello cut short as if it were whole.
            raise NotTLS("ClientHello interrupted by another record type")
        if data[pos + 1] != 0x03:
            raise NotTLS("unknown TLS record version")
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        if length == 0 or length > 16384 + 2048:
            raise NotTLS("bad TLS record length")
        if len(data) - pos - 5 < length:
            return None
        out += data[pos + 5 : pos + 5 + length]
        pos += 5 + length
        # Refuse at once what could only ever be refused after 64 KiB were buffered.
        if len(out) >= 4 and 4 + int.from_bytes(out[1:4], "big") > MAX_HELLO:
            raise NotTLS("ClientHello too large")
        if _complete(out):
            return bytes(out)


def _complete(handshake: bytearray | bytes) -> bool:
    return len(handshake) >= 4 and len(handshake) >= 4 + int.from_bytes(handshake[1:4], "big")


def parse_client_hello(data: bytes) -> ClientHello | None:
    """The SNI and ALPN of the ClientHello that starts ``data``; None while it is incomplete.

    Raises ``NotTLS`` for anything that is not a well-formed ClientHello.
    """
    if len(data) > MAX_HELLO:
        raise NotTLS("ClientHello too large")
    hs = _handshake_bytes(data)
    if hs is None:
        if data[:1] and data[0] != HANDSHAKE:
            raise NotTLS("not a TLS handshake record",
                         http=any(m.startswith(data[: len(m)]) or data.startswith(m)
                                  for m in _HTTP_METHODS))
        return None
    if hs[0] != CLIENT_HELLO:
        raise NotTLS("first handshake message is not a ClientHello")
    body = memoryview(hs)[4 : 4 + int.from_bytes(hs[1:4], "big")]
    try:
        return _read_hello(body)
    except IndexError:
        raise NotTLS("truncated ClientHello") from None


def _read_hello(body: memoryview) -> ClientHello:
    pos = 2 + 32  # legacy_version, random
    pos += 1 + body[pos]  # session id
    pos += 2 + int.from_bytes(body[pos : pos + 2], "big")  # cipher suites
    pos += 1 + body[pos]  # compression methods
    if pos == len(body):
        return ClientHello(None, ())  # no extensions at all
    end = pos + 2 + int.from_bytes(body[pos : pos + 2], "big")
    if end != len(body):
        raise NotTLS("extensions do not fill the ClientHello")
    pos += 2
    name: str | None = None
    alpn: tuple[bytes, ...] = ()
    while pos < end:
        if end - pos < 4:
            raise NotTLS("extension header is truncated")
        kind = int.from_bytes(body[pos : pos + 2], "big")
        size = int.from_bytes(body[pos + 2 : pos + 4], "big")
        if end - pos - 4 < size:
            raise NotTLS("extension overruns the ClientHello")
        ext = body[pos + 4 : pos + 4 + size]
        if kind == EXT_SERVER_NAME:
            name = _server_name(ext)
        elif kind == EXT_ALPN:
            alpn = _alpn(ext)
        pos += 4 + size
    return ClientHello(name, alpn)


def _vector(ext: memoryview, length_size: int) -> memoryview:
    """The body of a length-prefixed vector that must fill ``ext`` exactly."""
    if len(ext) < length_size or int.from_bytes(ext[:length_size], "big") != len(ext) - length_size:
        raise NotTLS("extension length does not match its contents")
    return ext[length_size:]


def _server_name(ext: memoryview) -> str | None:
    # The whole list is checked, as OpenSSL will: a name we read differently from it
    # would pick one host's context for a handshake that names another.
    names = _vector(ext, 2)
    found: str | None = None
    pos = 0
    while pos < len(names):
        if len(names) - pos < 3:
            raise NotTLS("server name entry is truncated")
        kind = names[pos]
        size = int.from_bytes(names[pos + 1 : pos + 3], "big")
        if len(names) - pos - 3 < size:
            raise NotTLS("server name overruns its extension")
        if kind == 0 and found is None:  # host_name
            found = _host_name(bytes(names[pos + 3 : pos + 3 + size]))
        pos += 3 + size
    return found


def _host_name(value: bytes) -> str:
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        raise NotTLS("server name is not ASCII") from None
    if not text or not text.isprintable() or " " in text:
        raise NotTLS("server name is malformed")
    return text.lower().rstrip(".")


def _alpn(ext: memoryview) -> tuple[bytes, ...]:
    names = _vector(ext, 2)
    protocols = []
    pos = 0
    while pos < len(names):
        size = names[pos]
        if size == 0 or len(names) - pos - 1 < size:
            raise NotTLS("ALPN protocol name is empty or overruns its extension")
        protocols.append(bytes(names[pos + 1 : pos + 1 + size]))
        pos += 1 + size
    return tuple(protocols)
