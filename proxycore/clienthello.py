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
        length = (data[pos + 3] << 8) | data[pos + 4]
        if length == 0 or length > 16384 + 2048:
            raise NotTLS("bad TLS record length")
        if len(data) - pos - 5 < length:
            return None
        if pos == 0 and length >= 4 and 4 + _u24(data, 6) <= length:
            return data[5 : 5 + length]  # the usual case: the whole ClientHello in one record
        out += data[pos + 5 : pos + 5 + length]
        pos += 5 + length
        # Refuse at once what could only ever be refused after 64 KiB were buffered.
        if len(out) >= 4 and 4 + _u24(out, 1) > MAX_HELLO:
            raise NotTLS("ClientHello too large")
        if _complete(out):
            return bytes(out)


def _u16(data: bytes | bytearray, pos: int) -> int:
    return (data[pos] << 8) | data[pos + 1]


def _u24(data: bytes | bytearray, pos: int) -> int:
    return (data[pos] << 16) | (data[pos + 1] << 8) | data[pos + 2]


def _complete(handshake: bytearray | bytes) -> bool:
    return len(handshake) >= 4 and len(handshake) >= 4 + _u24(handshake, 1)


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
    try:
        return _read_hello(hs, 4, 4 + _u24(hs, 1))
    except IndexError:
        raise NotTLS("truncated ClientHello") from None


def _read_hello(hs: bytes, start: int, stop: int) -> ClientHello:
    """The ClientHello body ``hs[start:stop]``. A length that points past ``stop`` (or past
    the end of ``hs``) raises IndexError: the caller's "truncated ClientHello"."""
    pos = start + 2 + 32  # legacy_version, random
    pos += 1 + hs[pos]  # session id
    pos += 2 + _u16(hs, pos)  # cipher suites
    pos += 1 + hs[pos]  # compression methods
    if pos > stop:
        raise IndexError  # the lengths point past the ClientHello: truncated
    if pos == stop:
        return ClientHello(None, ())  # no extensions at all
    end = pos + 2 + _u16(hs, pos)
    if end != stop or stop > len(hs):
        raise NotTLS("extensions do not fill the ClientHello")
    pos += 2
    name: str | None = None
    alpn: tuple[bytes, ...] = ()
    while pos < end:
        if end - pos < 4:
            raise NotTLS("extension header is truncated")
        kind = _u16(hs, pos)
        size = _u16(hs, pos + 2)
        if end - pos - 4 < size:
            raise NotTLS("extension overruns the ClientHello")
        if kind == EXT_SERVER_NAME:
            name = _server_name(hs, pos + 4, pos + 4 + size)
        elif kind == EXT_ALPN:
            alpn = _alpn(hs, pos + 4, pos + 4 + size)
        pos += 4 + size
    return ClientHello(name, alpn)


def _vector(hs: bytes, start: int, stop: int) -> int:
    """Where the body of the vector with a 2-byte length that must fill ``hs[start:stop]``
    begins."""
    if stop - start < 2 or _u16(hs, start) != stop - start - 2:
        raise NotTLS("extension length does not match its contents")
    return start + 2


def _server_name(hs: bytes, start: int, stop: int) -> str | None:
    # The whole list is checked, as OpenSSL will: a name we read differently from it
    # would pick one host's context for a handshake that names another.
    pos = _vector(hs, start, stop)
    found: str | None = None
    while pos < stop:
        if stop - pos < 3:
            raise NotTLS("server name entry is truncated")
        kind = hs[pos]
        size = _u16(hs, pos + 1)
        if stop - pos - 3 < size:
            raise NotTLS("server name overruns its extension")
        if kind == 0 and found is None:  # host_name
            found = _host_name(hs[pos + 3 : pos + 3 + size])
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


def _alpn(hs: bytes, start: int, stop: int) -> tuple[bytes, ...]:
    pos = _vector(hs, start, stop)
    protocols = []
    while pos < stop:
        size = hs[pos]
        if size == 0 or stop - pos - 1 < size:
            raise NotTLS("ALPN protocol name is empty or overruns its extension")
        protocols.append(hs[pos + 1 : pos + 1 + size])
        pos += 1 + size
    return tuple(protocols)
