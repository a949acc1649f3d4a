"""PROXY protocol headers (HAProxy's proxy-protocol.txt, versions 1 and 2), sans-I/O.

A host set to send one prefixes each upstream connection with a header carrying the
client's address, so the upstream sees who connected rather than the proxy
(``header_for``: the L4 pipe and HTTP hosts alike). A v2 header also tells the
upstream about the client's TLS connection, as HAProxy's ``send-proxy-v2-ssl-cn``
does: the ALPN protocol, and a PP2_TYPE_SSL block with the TLS version, the cipher
and, when the client presented a certificate the handshake verified, its common
name. The receiving side lives with the tests (tests/proxyproto_decode.py).

Addresses are ``(host, port)`` pairs; an IPv4-mapped IPv6 address
(``::ffff:192.0.2.1``, what a dual-stack listener reports for IPv4 clients) is sent as
the IPv4 address it stands for. When the two ends are not the same family, or not IP
at all, v1 sends ``PROXY UNKNOWN`` and v2 the UNSPEC family with no addresses: the
receiver then uses the connection's own addresses, as the spec asks.
"""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
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


def header_for(
    version: ProxyProtocol, transport: asyncio.BaseTransport | None, source: Address | None = None,
) -> bytes:
    """The PROXY header (``version``) that tells an upstream who is at the other end of
    ``transport``, a client connection; b"" when the host sends none. The one builder both
    the HTTP and the L4 paths use. ``source``: the client's address when a trusted proxy
    in front told it (inbound PROXY header, X-Forwarded-For), else the peer's."""
    if version is ProxyProtocol.OFF or transport is None:
        return b""
    src = source or transport.get_extra_info("peername")
    dst = transport.get_extra_info("sockname")
    if version is ProxyProtocol.V1:
        return encode_v1(src[:2], dst[:2])
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return encode_v2(src[:2], dst[:2])
    return encode_v2(src[:2], dst[:2], alpn=ssl_object.selected_alpn_protocol(), tls=tls_info(ssl_object))


def tls_info(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> TLSInfo:
    """What a v2 header says of a finished server-side handshake."""
    cipher = ssl_object.cipher()
    # A certificate is only there once the handshake verified it against the host's CA bundle.
    peer = ssl_object.getpeercert()
    common_name = ""
    for rdn in (peer or {}).get("subject", ()):
        for key, value in rdn:  # type: ignore[str-unpack]  # (typeshed: the RDNs are pairs)
            if key == "commonName":
                common_name = str(value)
    return TLSInfo(version=ssl_object.version() or "", cipher=cipher[0] if cipher else "",
                   client_cert=bool(peer), verified=bool(peer), common_name=common_name)


# --- inbound: a trusted proxy in front of this one ----------------------------------------

# The most a v2 header may take here (16 fixed bytes, addresses, TLVs): a bound on what a
# peer can make the proxy buffer before the first real byte.
V2_MAX_LENGTH = 16 + 1024


class BadProxyHeader(ValueError):
    """Bytes that were to be a PROXY header are not one."""


def parse_header(data: bytes) -> tuple[Address | None, int] | None:
    """Read the PROXY header (v1 or v2) at the start of ``data``: (the client address it
    gives, or None for LOCAL/UNKNOWN/UNSPEC; the header's length), or None while it is
    incomplete. ``BadProxyHeader`` when it is not one or is longer than the bounds."""
    if data[:1] == b"\r":
        return _parse_v2(data)
    if not data.startswith(b"PROXY "[: len(data)]):
        raise BadProxyHeader("no PROXY header")
    end = data.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end == -1:
        if len(data) >= V1_MAX_LENGTH:
            raise BadProxyHeader("PROXY v1 header too long")
        return None
    parts = data[:end].split(b" ")
    if parts[1:2] == [b"UNKNOWN"]:
        return None, end + 2
    if len(parts) != 6 or parts[1] not in (b"TCP4", b"TCP6"):
        raise BadProxyHeader("malformed PROXY v1 header")
    try:
        ip = ipaddress.ip_address(parts[2].decode("ascii"))
        port = int(parts[4])
    except ValueError:
        raise BadProxyHeader("malformed PROXY v1 address") from None
    if (ip.version == 4) != (parts[1] == b"TCP4") or not 0 <= port <= 65535:
        raise BadProxyHeader("malformed PROXY v1 address")
    return (str(ip), port), end + 2


def _parse_v2(data: bytes) -> tuple[Address | None, int] | None:
    if not V2_SIGNATURE.startswith(data[:12]):
        raise BadProxyHeader("no PROXY header")
    if len(data) < 16:
        return None
    version_command, family, length = struct.unpack("!BBH", data[12:16])
    if version_command >> 4 != 2 or version_command & 0x0F not in (CMD_LOCAL, CMD_PROXY):
        raise BadProxyHeader("unsupported PROXY v2 version or command")
    total = 16 + length
    if total > V2_MAX_LENGTH:
        raise BadProxyHeader("PROXY v2 header too long")
    if len(data) < total:
        return None
    body = data[16:total]
    if version_command & 0x0F == CMD_LOCAL:
        return None, total
    if family == TCP_OVER_IPV4 and length >= 12:
        return (str(ipaddress.IPv4Address(body[:4])), struct.unpack("!H", body[8:10])[0]), total
    if family == TCP_OVER_IPV6 and length >= 36:
        return (str(ipaddress.IPv6Address(body[:16])), struct.unpack("!H", body[32:34])[0]), total
    if family == FAMILY_UNSPEC:
        return None, total
    raise BadProxyHeader("unsupported PROXY v2 address family")
