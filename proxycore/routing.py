"""Per-request decisions, as pure functions over the snapshot and the parsed request.

Which host a request is for, whether it is misdirected, where a redirect goes,
and which headers go to the upstream and back to the client. Tables are built
once per snapshot load (``RouteTable``); the functions here do no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from proxycore.config import HSTS, HostRoute, Snapshot

Headers = list[tuple[bytes, bytes]]

# Headers a client may send but the proxy alone decides: never passed on.
UNTRUSTED_REQUEST_HEADERS = frozenset({
    b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-port",
    b"forwarded", b"x-real-ip", b"client-cert", b"client-cert-chain",
})
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
    b"upgrade", b"proxy-authenticate", b"proxy-authorization",
})
STS = b"strict-transport-security"


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


def is_misdirected(sni_route: HostRoute | None, request_route: HostRoute | None) -> bool:
    """SNI named one host and the Host header another (or none): answer 421."""
    return sni_route is not None and request_route is not sni_route


def redirect_location(host_header: bytes, target: bytes, https_port: int) -> bytes:
    """``https://`` + same host + path and query, with the HTTPS port when not 443."""
    name = host_name(host_header).encode("ascii")
    port = b"" if https_port == 443 else b":%d" % https_port
    path = target if target.startswith(b"/") else b"/"
    return b"https://" + name + port + path


def _forwarded_for(client_ip: str) -> str:
    return f'"[{client_ip}]"' if ":" in client_ip else client_ip


def connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(tokens)


def upstream_request_headers(
    headers: Iterable[tuple[bytes, bytes]],
    *,
    host: bytes,
    client_ip: str,
    https: bool,
    extra: Iterable[tuple[bytes, bytes]] = (),
) -> Headers:
    """The request headers for the upstream: hop-by-hop and untrusted ones replaced."""
    headers = tuple(headers)
    drop = HOP_BY_HOP | UNTRUSTED_REQUEST_HEADERS | connection_tokens(headers)
    # CGI-style backends read Client_Cert as HTTP_CLIENT_CERT: underscores are no way around.
    out: Headers = [
        (n, v) for n, v in headers
        if n not in drop and (b"_" not in n or n.replace(b"_", b"-") not in UNTRUSTED_REQUEST_HEADERS)
    ]
    proto = b"https" if https else b"http"
    ip = client_ip.encode("ascii")
    out += [
        (b"x-forwarded-for", ip),
        (b"x-forwarded-proto", proto),
        (b"x-forwarded-host", host),
        (b"forwarded", b"for=%s;proto=%s;host=\"%s\"" % (_forwarded_for(client_ip).encode(), proto, host)),
    ]
    out += extra
    return out


def client_response_headers(
    headers: Iterable[tuple[bytes, bytes]], *, hsts: HSTS | None, https: bool
) -> Headers:
    """The response headers for the client: hop-by-hop stripped, HSTS applied exactly once."""
    headers = tuple(headers)
    drop = HOP_BY_HOP | connection_tokens(headers)
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
