"""PROXY protocol decoders: the receiving side, for the tests' upstreams and round trips.

The proxy only sends PROXY headers (``proxycore.proxyproto`` encodes them); what
receives them here is test code, so it lives with the tests.
"""

from __future__ import annotations

import ipaddress
import struct

from proxycore.proxyproto import (
    _VERSION_2,
    CMD_LOCAL,
    CMD_PROXY,
    TCP_OVER_IPV4,
    TCP_OVER_IPV6,
    V1_MAX_LENGTH,
    V2_SIGNATURE,
    Address,
)


class ProxyHeaderError(ValueError):
    """Bytes that are not a valid PROXY protocol header."""


class IncompleteHeader(ProxyHeaderError):
    """Not enough bytes yet for a whole header; read more and try again."""



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
