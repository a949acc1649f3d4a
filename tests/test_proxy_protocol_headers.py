"""PROXY protocol v1/v2 headers: the spec's byte layouts, and round trips through the decoders."""

from __future__ import annotations

import struct

import pytest

from proxycore import proxyproto as pp
from tests import proxyproto_decode as ppd

# The v2 signature as haproxy's proxy-protocol.txt spells it, byte by byte.
SPEC_SIGNATURE = bytes([0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A])


# ---- version 1 ----------------------------------------------------------------------------


def test_v1_matches_the_spec_example() -> None:
    header = pp.encode_v1(("192.168.0.1", 56324), ("192.168.0.11", 443))
    assert header == b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"


def test_v1_worst_cases_have_the_spec_lengths() -> None:
    v4 = pp.encode_v1(("255.255.255.255", 65535), ("255.255.255.255", 65535))
    assert v4 == b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n" and len(v4) == 56
    full = "ffff:f...:ffff".replace("f...", ":".join(["ffff"] * 6))
    v6 = pp.encode_v1((full, 65535), (full, 65535))
    assert v6 == f"PROXY TCP6 {full} {full} 65535 65535\r\n".encode() and len(v6) == 104


def test_v1_ipv6_round_trip() -> None:
    header = pp.encode_v1(("2001:db8::1", 50000), ("2001:db8::11", 8443))
    assert header == b"PROXY TCP6 2001:db8::1 2001:db8::11 50000 8443\r\n"
    assert ppd.decode_v1(header + b"GET /") == (("2001:db8::1", 50000), ("2001:db8::11", 8443), b"GET /")


def test_v1_ipv4_round_trip_keeps_the_following_bytes() -> None:
    header = pp.encode_v1(("10.1.2.3", 1), ("127.0.0.1", 65535))
    assert ppd.decode_v1(header + b"\x16\x03\x01") == (("10.1.2.3", 1), ("127.0.0.1", 65535), b"\x16\x03\x01")


def test_v1_is_unknown_when_families_differ_or_are_not_ip() -> None:
    assert pp.encode_v1(("192.0.2.1", 1000), ("2001:db8::1", 443)) == b"PROXY UNKNOWN\r\n"
    assert pp.encode_v1(("/run/sock", 0), ("192.0.2.1", 443)) == b"PROXY UNKNOWN\r\n"
    assert ppd.decode_v1(b"PROXY UNKNOWN\r\nrest") == (None, None, b"rest")
    # The spec lets a sender put addresses after UNKNOWN; the receiver ignores them.
    assert ppd.decode_v1(b"PROXY UNKNOWN ffff:: ffff:: 1 2\r\n")[:2] == (None, None)


def test_v1_sends_ipv4_mapped_addresses_as_ipv4() -> None:
    header = pp.encode_v1(("::ffff:192.0.2.7", 40000), ("127.0.0.1", 8443))
    assert header == b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 8443\r\n"


def test_v1_decoder_waits_for_more_and_rejects_garbage() -> None:
    with pytest.raises(ppd.IncompleteHeader):
        ppd.decode_v1(b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r")
    with pytest.raises(ppd.IncompleteHeader):
        ppd.decode_v1(b"PRO")
    for bad in (b"GET / HTTP/1.1\r\n", b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n",
                b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n", b"PROXY TCP4 1.2.3.4 1.2.3.4 1 70000\r\n",
                b"PROXY " + b"x" * 120):
        with pytest.raises(ppd.ProxyHeaderError):
            ppd.decode_v1(bad)


# ---- version 2 ----------------------------------------------------------------------------


def test_v2_signature_is_the_spec_one() -> None:
    assert pp.V2_SIGNATURE == SPEC_SIGNATURE


def test_v2_ipv4_bytes_follow_the_spec_layout() -> None:
    header = pp.encode_v2(("192.168.0.1", 56324), ("192.168.0.11", 443))
    expected = (SPEC_SIGNATURE + bytes([0x21, 0x11, 0x00, 0x0C])
                + bytes([192, 168, 0, 1, 192, 168, 0, 11]) + bytes([0xDC, 0x04, 0x01, 0xBB]))
    assert header == expected
    assert ppd.decode_v2(header + b"tail") == (("192.168.0.1", 56324), ("192.168.0.11", 443), {}, b"tail")


def test_v2_ipv6_bytes_follow_the_spec_layout() -> None:
    header = pp.encode_v2(("2001:db8::1", 50000), ("::1", 8443))
    src = bytes.fromhex("20010db8000000000000000000000001")
    dst = bytes(15) + b"\x01"
    ports = struct.pack("!HH", 50000, 8443)
    assert header == SPEC_SIGNATURE + bytes([0x21, 0x21, 0x00, 36]) + src + dst + ports
    assert ppd.decode_v2(header) == (("2001:db8::1", 50000), ("::1", 8443), {}, b"")


def test_v2_unspec_when_families_differ() -> None:
    header = pp.encode_v2(("192.0.2.1", 1), ("2001:db8::1", 2))
    assert header == SPEC_SIGNATURE + bytes([0x21, 0x00, 0x00, 0x00])
    assert ppd.decode_v2(header + b"x") == (None, None, {}, b"x")


def test_v2_carries_alpn_authority_and_ssl_tlvs() -> None:
    info = pp.TLSInfo(version="TLSv1.3", cipher="TLS_AES_128_GCM_SHA256", client_cert=True, verified=True,
                      common_name="client.example")
    header = pp.encode_v2(("192.0.2.1", 40000), ("192.0.2.2", 443), alpn="http/1.1",
                          authority="shop.example", tls=info)
    src, dst, tlvs, rest = ppd.decode_v2(header + b"\x16")
    assert (src, dst, rest) == (("192.0.2.1", 40000), ("192.0.2.2", 443), b"\x16")
    assert tlvs[pp.PP2_TYPE_ALPN] == b"http/1.1"
    assert tlvs[pp.PP2_TYPE_AUTHORITY] == b"shop.example"
    client, verify, subs = ppd.decode_ssl_tlv(tlvs[pp.PP2_TYPE_SSL])
    assert client == pp.PP2_CLIENT_SSL | pp.PP2_CLIENT_CERT_CONN
    assert verify == 0
    assert subs == {pp.PP2_SUBTYPE_SSL_VERSION: b"TLSv1.3",
                    pp.PP2_SUBTYPE_SSL_CIPHER: b"TLS_AES_128_GCM_SHA256",
                    pp.PP2_SUBTYPE_SSL_CN: b"client.example"}
    # The announced length covers the addresses and every TLV.
    assert struct.unpack("!H", header[14:16])[0] == len(header) - 16


def test_v2_ssl_tlv_bytes_for_a_client_without_certificate() -> None:
    header = pp.encode_v2(("192.0.2.1", 1), ("192.0.2.2", 2), tls=pp.TLSInfo(version="TLSv1.2"))
    ssl_tlv = header[16 + 12:]
    assert ssl_tlv == bytes([0x20, 0x00, 5 + 3 + 7, 0x01, 0, 0, 0, 1, 0x21, 0x00, 7]) + b"TLSv1.2"


def test_v2_local_command_has_no_addresses() -> None:
    local = SPEC_SIGNATURE + bytes([0x20, 0x11, 0x00, 0x0C]) + bytes(12) + b"after"
    assert ppd.decode_v2(local) == (None, None, {}, b"after")


def test_v2_decoder_waits_for_more_and_rejects_garbage() -> None:
    header = pp.encode_v2(("192.0.2.1", 1), ("192.0.2.2", 2), authority="a.example")
    for cut in (5, 15, len(header) - 1):
        with pytest.raises(ppd.IncompleteHeader):
            ppd.decode_v2(header[:cut])
    with pytest.raises(ppd.ProxyHeaderError):
        ppd.decode_v2(b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\r\n")
    with pytest.raises(ppd.ProxyHeaderError):
        ppd.decode_v2(SPEC_SIGNATURE + bytes([0x31, 0x11, 0x00, 0x00]))  # version 3
    broken_tlv = SPEC_SIGNATURE + bytes([0x21, 0x11, 0x00, 0x0F]) + bytes(12) + bytes([0x02, 0x00, 0x09])
    with pytest.raises(ppd.ProxyHeaderError):
        ppd.decode_v2(broken_tlv)


@pytest.mark.parametrize(("src", "dst"), [
    (("0.0.0.0", 0), ("255.255.255.255", 65535)),  # noqa: S104 - an address, not a bind
    (("::", 0), ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535)),
    (("fe80::1%eth0", 1234), ("fe80::2", 443)),
])
def test_round_trips_at_the_edges(src: tuple[str, int], dst: tuple[str, int]) -> None:
    plain = (src[0].split("%")[0], src[1])
    assert ppd.decode_v1(pp.encode_v1(src, dst))[:2] == (plain, dst)
    assert ppd.decode_v2(pp.encode_v2(src, dst))[:2] == (plain, dst)
