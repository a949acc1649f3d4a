"""Host routing and head rewriting, as pure functions over the snapshot and parsed heads.

Which host a request is for (``lookup_route``), where a redirect goes, and the
heads that go to the upstream and back to the client, rewritten as bytes. What
to do with a request is ``proxycore.decide``'s. Tables are built once per
snapshot load (``RouteTable``); the functions here do no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from proxycore import http1_checks
from proxycore.config import HSTS, HostRoute, Snapshot
from proxycore.http1 import RequestHead, ResponseHead

Headers = list[tuple[bytes, bytes]]

# Headers a client may send but the proxy alone decides: never passed on.
UNTRUSTED_REQUEST_HEADERS: Final = http1_checks.PROXY_SET
HOP_BY_HOP: Final = http1_checks.HOP_BY_HOP
STS: Final = b"strict-transport-security"


@dataclass(frozen=True, slots=True)
class RouteTable:
    """Host-header routing: exact names, then one-label wildcards keyed by parent domain."""

    exact: Mapping[str, HostRoute]
    wildcard: Mapping[str, HostRoute]


def build_route_table(snapshot: Snapshot) -> RouteTable:
    exact: dict[str, HostRoute] = {}
    wildcard: dict[str, HostRoute] = {}
    for route in snapshot.hosts:
        for name in route.names:
            if name.startswith("*."):
                wildcard.setdefault(name[2:], route)
            else:
                exact.setdefault(name, route)
    return RouteTable(MappingProxyType(exact), MappingProxyType(wildcard))


def host_name(host_header: bytes) -> str:
    """The name part of a Host header value (no port), lower-case, no trailing dot."""
    if host_header.startswith(b"["):
        name = host_header[: host_header.find(b"]") + 1]
    else:
        name = host_header.partition(b":")[0]
    return name.rstrip(b".").lower().decode("ascii", "replace")


def lookup_route(table: RouteTable, name: str) -> HostRoute | None:
    route = table.exact.get(name)
    if route is not None:
        return route
    _, dot, parent = name.partition(".")
    return table.wildcard.get(parent) if dot else None


def redirect_location(host_header: bytes, target: bytes, https_port: int) -> bytes:
    """``https://`` + same host + path and query, with the HTTPS port when not 443."""
    name = host_name(host_header).encode("ascii")
    port = b"" if https_port == 443 else b":%d" % https_port
    path = target if target.startswith(b"/") else b"/"
    return b"https://" + name + port + path


def _forwarded_for(client_ip: str) -> str:
    return f'"[{client_ip}]"' if ":" in client_ip else client_ip


# --- heads as bytes: the hot path --------------------------------------------------
#
# A head llhttp accepted is forwarded as the bytes it came as, less the field lines
# the proxy must drop (cut out by pattern: after llhttp every field line is CRLF name
# ":" value), plus the lines the proxy adds. Nothing is re-serialised field by field.

# Request fields that may pass as they came: everything else noted is dropped.
# Transfer-Encoding is hop-by-hop, but the only one accepted is a single "chunked" and
# the body goes upstream chunked again, so its line stays.
_REQUEST_KEPT: Final = frozenset({b"host", b"content-length", b"transfer-encoding", b"expect"})
_REQUEST_DROP: Final = http1_checks.noted_pattern(
    HOP_BY_HOP - {b"transfer-encoding"}, UNTRUSTED_REQUEST_HEADERS, any_case=True)
# Response fields that may pass as they came (and Strict-Transport-Security, when kept).
_RESPONSE_KEPT: Final = frozenset({b"content-length"})
_RESPONSE_KEPT_STS: Final = _RESPONSE_KEPT | {STS}
_STS_LINE: Final = http1_checks.noted_pattern({STS}, any_case=True)
_RESPONSE_DROP: Final = http1_checks.noted_pattern(HOP_BY_HOP, any_case=True)
_RESPONSE_DROP_STS: Final = http1_checks.noted_pattern(HOP_BY_HOP | {STS}, any_case=True)
# Listing these in Connection must not make a proxy drop them (hop-by-hop abuse).
_NEVER_LISTED: Final = frozenset({b"host", b"content-length", b"transfer-encoding"})
_HOP_OR_CLOSE: Final = HOP_BY_HOP | {b"close"}


def forwarding_lines(client_ip: str, host: bytes, *, https: bool) -> bytes:
    """The X-Forwarded-* and Forwarded field lines (CRLF-ended) the proxy sets on a request."""
    proto = b"https" if https else b"http"
    ip = client_ip.encode("ascii")
    return (
        b"x-forwarded-for: %s\r\nx-forwarded-proto: %s\r\nx-forwarded-host: %s\r\n"
        b'forwarded: for=%s;proto=%s;host="%s"\r\n'
    ) % (ip, proto, host, _forwarded_for(client_ip).encode("ascii"), proto, host)


def _listed_pattern(options: frozenset[bytes]) -> re.Pattern[bytes] | None:
    """A pattern for the fields a Connection header names beyond the fixed hop-by-hop set."""
    if options <= _HOP_OR_CLOSE:
        return None
    listed = options - _HOP_OR_CLOSE - _NEVER_LISTED
    return http1_checks.noted_pattern(listed, any_case=True) if listed else None


def _fields(raw: bytes, line_end: int, drop: re.Pattern[bytes] | None, options: frozenset[bytes]) -> bytes:
    """The field lines of ``raw`` (each CRLF-led, no final CRLF) less those ``drop`` matches
    and those its Connection header lists."""
    block = raw[line_end:-4]
    if drop is not None:
        block = drop.sub(b"", block)
    listed = _listed_pattern(options)
    if listed is not None:
        block = listed.sub(b"", block)
    return block


def upstream_request_head(head: RequestHead, added: bytes) -> bytes:
    """The head to send upstream: ``head`` as it came, less hop-by-hop and client-sent
    forwarding fields, plus ``added`` (field lines, CRLF-ended: forwarding, Client-Cert)."""
    raw = head.raw
    method = head.method
    # origin-form HTTP/1.1 whose target was not rewritten (absolute-form is reduced to a path)
    line_as_is = head.version == b"1.1" and raw[len(method) + 1 : len(method) + 2 + len(head.target)] == (
        head.target + b" ")
    if line_as_is and head.upgrade is None and head.noted.keys() <= _REQUEST_KEPT:
        return raw[:-2] + added + b"\r\n"  # the usual request: nothing to take out
    line_end = raw.find(b"\r\n")
    line = raw[:line_end] if line_as_is else b"%s %s HTTP/1.1" % (method, head.target)
    block = _fields(raw, line_end, _REQUEST_DROP, head.options)
    if b"host" not in head.noted and head.host:  # HTTP/1.0, absolute-form: 1.1 needs a Host
        block += b"\r\nhost: %s" % head.host
    if head.upgrade is not None:
        added += b"connection: upgrade\r\nupgrade: %s\r\n" % head.upgrade
    return line + block + b"\r\n" + added + b"\r\n"


def client_response_head(head: ResponseHead, hsts: HSTS | None, *, https: bool, added: bytes = b"") -> bytes:
    """The head to send the client: ``head`` as it came (as HTTP/1.1), less hop-by-hop fields,
    with HSTS applied exactly once (only over HTTPS), plus ``added`` (CRLF-ended lines)."""
    raw = head.raw
    noted = head.noted
    line_end = raw.find(b"\r\n")
    line = raw[:line_end] if head.version == b"1.1" else b"HTTP/1.1 %d %s" % (head.status, head.reason)
    upstream_sts = noted.get(STS)
    if (upstream_sts and https and hsts is not None and not hsts.override_upstream
            and STS not in head.options):  # (a Connection that names it makes it hop-by-hop)
        # The policy keeps the upstream's own, where it stands; exactly one: the first.
        drop, kept = _RESPONSE_DROP, _RESPONSE_KEPT_STS
        if len(upstream_sts) > 1:
            block = _fields(raw, line_end, drop, head.options)
            first = _STS_LINE.search(block)
            assert first is not None
            block = block[: first.end()] + _STS_LINE.sub(b"", block[first.end() :])
            return line + block + b"\r\n" + added + b"\r\n"
    else:
        drop, kept = _RESPONSE_DROP_STS, _RESPONSE_KEPT
        if https and hsts is not None:
            added = hsts.line + added
    if noted.keys() <= kept:
        block = raw[line_end:-4]
    elif noted.keys() <= kept | _CONNECTION and len(noted[b"connection"]) == 1:
        block = _without_connection(raw, line_end) or _fields(raw, line_end, drop, head.options)
    else:
        block = _fields(raw, line_end, drop, head.options)
    return line + block + b"\r\n" + added + b"\r\n"


# How servers spell the Connection field of a keep-alive or closing response.
_CONNECTION: Final = frozenset({b"connection"})
_CONNECTION_LINES: Final = tuple(
    b"\r\n%s: %s\r\n" % (name, value)
    for value in (b"keep-alive", b"close", b"Keep-Alive", b"Close")
    for name in (b"Connection", b"connection")
)


def _without_connection(raw: bytes, line_end: int) -> bytes:
    """The field lines of a head whose only field to drop is one Connection field, cut out
    where it is spelt the usual way (a search, no pattern); b"" if it is spelt otherwise."""
    for spelling in _CONNECTION_LINES:
        at = raw.find(spelling, line_end)
        if at != -1:
            return raw[line_end:at] + raw[at + len(spelling) - 2 : -4]
    return b""


def client_response_headers(
    headers: Iterable[tuple[bytes, bytes]], *, hsts: HSTS | None, https: bool
) -> Headers:
    """The response headers for the client: hop-by-hop stripped, HSTS applied exactly once."""
    headers = tuple(headers)
    drop = HOP_BY_HOP | http1_checks.connection_tokens(headers)
    keep_upstream_sts = https and hsts is not None and not hsts.override_upstream
    if not keep_upstream_sts:
        drop = drop | {STS}
    out: Headers = []
    upstream_sts = False
    for name, value in headers:
        if name in drop:
            continue
        if name == STS:
            if upstream_sts:
                continue  # exactly one
            upstream_sts = True
        out.append((name, value))
    if https and hsts is not None and not upstream_sts:
        out.append((STS, hsts.header))
    return out
