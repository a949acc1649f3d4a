"""PROXY protocol headers (HAProxy's proxy-protocol.txt, versions 1 and 2), sans-I/O.

The L4 pipe prefixes the upstream connection with one header carrying the client's
address, so the upstream sees who connected rather than the proxy. Encoders build
what the proxy sends; decoders are the receiving side, used by tests and test
backends. Addresses are ``(host, port)`` pairs; an IPv4-mapped IPv6 address
(``::ffff:192.0.2.1``, what a dual-stack listener reports for IPv4 clients) is sent as
the IPv4 address it stands for. When the two ends are not the same family, or not IP
at all, v1 sends ``PROXY UNKNOWN`` and v2 the UNSPEC family with no addresses: the
receiver then uses the connection's own addresses, as the spec asks.
"""

from __future__ import annotations

import asyncio
import ipaddress
import struct
from dataclasses import dataclass

from proxycore.config import ProxyProtocol

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX_LENGTH = 107  # "PROXY TCP6" with two full IPv6 addresses, ports and CRLF

# v2 header fields
_VERSION_2 = 0x20
CMD_LOCAL, CMD_PROXY = 0x00, 0x01
FAMILY_UNSPEC, TCP_OVER_IPV4, TCP_OVER_IPV6 = 0x00, 0x11, 0x21

# v2 TLV types
PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_SUBTYPE_SSL_CIPHER = 0x23
PP2_CLIENT_SSL = 0x01
PP2_CLIENT_CERT_CONN = 0x02
PP2_CLIENT_CERT_SESS = 0x04

Address = tuple[str, int]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class ProxyHeaderError(ValueError):
    """Bytes that are not a valid PROXY protocol header."""


class IncompleteHeader(ProxyHeaderError):
    """Not enough bytes yet for a whole header; read more and try again."""


@dataclass(frozen=True, slots=True)
class TLSInfo:
    """What PP2_TYPE_SSL tells the upstream about the client's TLS connection."""

    version: str  # "TLSv1.3"
    cipher: str = ""
    client_cert: bool = False  # the client presented a certificate on this connection
    verified: bool = False  # ... and it was verified
    common_name: str = ""


def _ip(host: str) -> IPAddress | None:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])  # drop an IPv6 zone id
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _same_family(src: Address, dst: Address) -> tuple[IPAddress, IPAddress] | None:
    s, d = _ip(src[0]), _ip(dst[0])
    if s is None or d is None or s.version != d.version:
        return None
    return s, d


# --- version 1 ------------------------------------------------------------------------


def encode_v1(src: Address, dst: Address) -> bytes:
    """``PROXY TCP4|TCP6 <src> <dst> <sport> <dport>\\r\\n``, or ``PROXY UNKNOWN\\r\\n``."""
    pair = _same_family(src, dst)
    if pair is None:
        return b"PROXY UNKNOWN\r\n"
    s, d = pair
    family = "TCP4" if s.version == 4 else "TCP6"
    return f"PROXY {family} {s} {d} {src[1]} {dst[1]}\r\n".encode("ascii")


def decode_v1(data: bytes) -> tuple[Address | None, Address | None, bytes]:
    """(source, destination, the bytes after the header); addresses None for UNKNOWN."""
    if not data.startswith(b"PROXY "[: len(data)]):
        raise ProxyHeaderError("not a PROXY v1 header")
    end = data.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end < 0:
        if len(data) < V1_MAX_LENGTH and b"\n" not in data:
            raise IncompleteHeader("no CRLF yet")
        raise ProxyHeaderError(f"no CRLF in the first {V1_MAX_LENGTH} bytes")
    line, rest = data[:end].decode("ascii", "replace"), data[end + 2:]
    parts = line.split(" ")
    if parts[0] != "PROXY" or len(parts) < 2:
        raise ProxyHeaderError(f"not a PROXY v1 line: {line!r}")
    if parts[1] == "UNKNOWN":
        return None, None, rest
    if parts[1] not in ("TCP4", "TCP6") or len(parts) != 6:
        raise ProxyHeaderError(f"bad PROXY v1 line: {line!r}")
    version = 4 if parts[1] == "TCP4" else 6
    try:
        hosts = [ipaddress.ip_address(p) for p in parts[2:4]]
        ports = [int(p) for p in parts[4:6]]
    except ValueError:
        raise ProxyHeaderError(f"bad address in PROXY v1 line: {line!r}") from None
    if any(h.version != version for h in hosts) or not all(0 <= p <= 65535 for p in ports):
        raise ProxyHeaderError(f"bad address in PROXY v1 line: {line!r}")
    return (str(hosts[0]), ports[0]), (str(hosts[1]), ports[1]), rest


# --- version 2 ------------------------------------------------------------------------


def _tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


def _ssl_tlv(info: TLSInfo) -> bytes:
    client = PP2_CLIENT_SSL | (PP2_CLIENT_CERT_CONN if info.client_cert else 0)
    verify = 0 if info.client_cert and info.verified else 1  # 0 means "verified"
    body = _tlv(PP2_SUBTYPE_SSL_VERSION, info.version.encode("ascii"))
    if info.cipher:
        body += _tlv(PP2_SUBTYPE_SSL_CIPHER, info.cipher.encode("ascii"))
    if info.common_name:
        body += _tlv(PP2_SUBTYPE_SSL_CN, info.common_name.encode("utf-8"))
    return _tlv(PP2_TYPE_SSL, struct.pack("!BI", client, verify) + body)


def encode_v2(
    src: Address,
    dst: Address,
    *,
    alpn: str | None = None,
    authority: str | None = None,
    tls: TLSInfo | None = None,
) -> bytes:
    """The binary header (command PROXY), with the optional ALPN, SNI and SSL TLVs."""
    pair = _same_family(src, dst)
    if pair is None:
        family, addresses = FAMILY_UNSPEC, b""
    else:
        s, d = pair
        family = TCP_OVER_IPV4 if s.version == 4 else TCP_OVER_IPV6
        addresses = s.packed + d.packed + struct.pack("!HH", src[1], dst[1])
    tlvs = b""
    if alpn:
        tlvs += _tlv(PP2_TYPE_ALPN, alpn.encode("ascii"))
    if authority:
        tlvs += _tlv(PP2_TYPE_AUTHORITY, authority.encode("ascii"))
    if tls is not None:
        tlvs += _ssl_tlv(tls)
    body = addresses + tlvs
    return V2_SIGNATURE + struct.pack("!BBH", _VERSION_2 | CMD_PROXY, family, len(body)) + body


# address block sizes by family byte: TCP/UDP over IPv4, IPv6, and UNIX stream/datagram
_ADDRESS_BLOCK = {0x11: 12, 0x12: 12, 0x21: 36, 0x22: 36, 0x31: 216, 0x32: 216}


def _parse_tlvs(data: bytes) -> dict[int, bytes]:
    tlvs: dict[int, bytes] = {}
    at = 0
    while at < len(data):
        if at + 3 > len(data):
            raise ProxyHeaderError("truncated TLV")
        kind, length = struct.unpack_from("!BH", data, at)
        if at + 3 + length > len(data):
            raise ProxyHeaderError(f"TLV 0x{kind:02x} runs past the header")
        tlvs[kind] = data[at + 3:at + 3 + length]
        at += 3 + length
    return tlvs


def decode_v2(
    data: bytes,
) -> tuple[Address | None, Address | None, dict[int, bytes], bytes]:
    """(source, destination, TLVs by type, bytes after the header).

    Addresses are None for LOCAL and UNSPEC. TLV values are raw; ``decode_ssl_tlv``
    splits a PP2_TYPE_SSL value.
    """
    if len(data) < 16:
        if V2_SIGNATURE.startswith(data[:12]):
            raise IncompleteHeader("fewer than 16 bytes")
        raise ProxyHeaderError("no PROXY v2 signature")
    if data[:12] != V2_SIGNATURE:
        raise ProxyHeaderError("no PROXY v2 signature")
    ver_cmd, family, length = struct.unpack_from("!BBH", data, 12)
    if ver_cmd & 0xF0 != _VERSION_2 or ver_cmd & 0x0F not in (CMD_LOCAL, CMD_PROXY):
        raise ProxyHeaderError(f"bad version/command byte 0x{ver_cmd:02x}")
    if len(data) < 16 + length:
        raise IncompleteHeader(f"header announces {length} bytes")
    body, rest = data[16:16 + length], data[16 + length:]
    size = {TCP_OVER_IPV4: 4, TCP_OVER_IPV6: 16}.get(family)
    if ver_cmd & 0x0F == CMD_LOCAL or size is None:
        # LOCAL, UNSPEC or a family not read here: skip its address block, keep the TLVs.
        skip = _ADDRESS_BLOCK.get(family, 0)
        return None, None, _parse_tlvs(body[skip:]) if skip <= len(body) else {}, rest
    if len(body) < 2 * size + 4:
        raise ProxyHeaderError("address block shorter than its family needs")
    src_ip = ipaddress.ip_address(body[:size])
    dst_ip = ipaddress.ip_address(body[size:2 * size])
    src_port, dst_port = struct.unpack_from("!HH", body, 2 * size)
    tlvs = _parse_tlvs(body[2 * size + 4:])
    return (str(src_ip), src_port), (str(dst_ip), dst_port), tlvs, rest


def decode_ssl_tlv(value: bytes) -> tuple[int, int, dict[int, bytes]]:
    """A PP2_TYPE_SSL value: (client flags, verify result, sub-TLVs by type)."""
    if len(value) < 5:
        raise ProxyHeaderError("PP2_TYPE_SSL shorter than 5 bytes")
    client, verify = struct.unpack_from("!BI", value)
    return client, verify, _parse_tlvs(value[5:])


def header_for(version: ProxyProtocol, transport: asyncio.BaseTransport | None) -> bytes:
    """The PROXY header (``version``) that tells an upstream who is at the other end of
    ``transport``, a client connection; b"" when the host sends none. The one builder both
    the HTTP and the L4 paths use."""
    if version is ProxyProtocol.OFF or transport is None:
        return b""
    src = transport.get_extra_info("peername")
    dst = transport.get_extra_info("sockname")
    if version is ProxyProtocol.V1:
        return encode_v1(src[:2], dst[:2])
    return encode_v2(src[:2], dst[:2])
