"""The contract between the planes: the immutable configuration a proxy node serves.

The control plane builds a ``Snapshot`` (``proxyadmin.snapshot``) and hands it to
the data plane, which never sees the ORM. Everything is a frozen dataclass with
slots and tuples, so a snapshot can be shared by every connection and swapped by
reference on reload. Keys are decrypted bytes here: snapshots live only in the
memory of a proxy node and are never written out.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from enum import StrEnum


class Mode(StrEnum):
    HTTP = "http"
    TCP = "tcp"


class ClientAuthMode(StrEnum):
    OFF = "off"
    OPTIONAL = "optional"
    REQUIRED = "required"


class ProxyProtocol(StrEnum):
    OFF = "off"
    V1 = "v1"
    V2 = "v2"


class AccessAction(StrEnum):
    ALLOW = "allow"
    DENY = "deny"


class Satisfy(StrEnum):
    ANY = "any"  # an allowed address OR a valid password lets a request through
    ALL = "all"  # both are needed


class Balancing(StrEnum):
    ROUND_ROBIN = "round_robin"
    LEAST_CONNECTIONS = "least_connections"


@dataclass(frozen=True, slots=True)
class CertificateBundle:
    """A certificate chain (leaf first) and its private key, both PEM."""

    name: str
    chain_pem: bytes
    key_pem: bytes = field(repr=False)
    fingerprint_sha256: str
    serial: str
    sans: tuple[str, ...]
    not_after: dt.datetime


@dataclass(frozen=True, slots=True)
class HSTS:
    max_age: int
    include_subdomains: bool
    preload: bool
    override_upstream: bool
    # The header value, made once per snapshot rather than once per response.
    header: bytes = field(init=False, repr=False, compare=False)
    line: bytes = field(init=False, repr=False, compare=False)  # the whole field line, CRLF-ended

    def __post_init__(self) -> None:
        object.__setattr__(self, "header", self.header_value.encode("ascii"))
        object.__setattr__(self, "line", b"strict-transport-security: %s\r\n" % self.header)

    @property
    def header_value(self) -> str:
        parts = [f"max-age={self.max_age}"]
        if self.include_subdomains:
            parts.append("includeSubDomains")
        if self.preload:
            parts.append("preload")
        return "; ".join(parts)


@dataclass(frozen=True, slots=True)
class Redirect:
    enabled: bool
    status: int = 308


@dataclass(frozen=True, slots=True)
class ClientAuth:
    mode: ClientAuthMode = ClientAuthMode.OFF
    ca_pem: bytes = b""
    forward_cert: bool = True
    forward_chain: bool = False
    crl_pem: bytes = b""  # when set, revoked client certificates are refused


@dataclass(frozen=True, slots=True)
class UpstreamTLS:
    verify: bool
    ca_pem: bytes  # empty: the system store
    server_name: str  # empty: the target's host
    client_certificate: CertificateBundle | None = None


@dataclass(frozen=True, slots=True)
class Target:
    host: str
    port: int
    weight: int = 1
    enabled: bool = True
    draining: bool = False

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)


@dataclass(frozen=True, slots=True)
class HealthCheck:
    enabled: bool = False
    path: str = "/"
    interval: float = 5.0
    timeout: float = 2.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3
    passive_failures: int = 3
    passive_cooldown: float = 10.0


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    targets: tuple[Target, ...]
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    tls: UpstreamTLS | None = None
    balancing: Balancing = Balancing.ROUND_ROBIN
    health: HealthCheck = HealthCheck()


@dataclass(frozen=True, slots=True)
class AccessRule:
    """One ordered rule of an access list: the first rule whose network holds the client wins."""

    action: AccessAction
    source: str  # an IPv4/IPv6 address or CIDR network, as ipaddress.ip_network reads it


@dataclass(frozen=True, slots=True)
class BasicUser:
    """An HTTP Basic user. ``password_hash`` is Django's ``pbkdf2_sha256$iterations$salt$hash``."""

    username: str
    password_hash: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class AccessList:
    """Who may use a host: address rules, then (optionally) HTTP Basic users."""

    name: str
    default: AccessAction = AccessAction.DENY  # when no rule matches the address
    rules: tuple[AccessRule, ...] = ()
    satisfy: Satisfy = Satisfy.ANY
    users: tuple[BasicUser, ...] = ()
    realm: str = ""  # the Basic realm; empty: the list's name
    pass_authorization: bool = False  # forward the Authorization header the proxy checked


@dataclass(frozen=True, slots=True)
class RateLimit:
    """Per client address and per node; 0 means no limit of that kind."""

    requests_per_second: float = 0.0
    burst: int = 0  # bucket size; 0 with a rate: the rate rounded up (at least 1)
    connections_per_client: int = 0


@dataclass(frozen=True, slots=True)
class ListenerTrust:
    """Which peers of a listener speak for the client: their X-Forwarded-For / Forwarded
    (or inbound PROXY header) give the client address. Everyone else's are ignored."""

    listener: str  # "https" or "http"
    trusted_proxies: tuple[str, ...] = ()  # CIDR networks
    proxy_protocol: bool = False  # trusted peers must open with a PROXY v1/v2 header


@dataclass(frozen=True, slots=True)
class HostRoute:
    """One host: the names it answers to and how its traffic is handled."""

    name: str
    names: tuple[str, ...]
    mode: Mode
    upstream: Upstream
    certificate: CertificateBundle | None = None
    hsts: HSTS | None = None
    redirect: Redirect = Redirect(enabled=True)
    client_auth: ClientAuth = ClientAuth()
    proxy_protocol: ProxyProtocol = ProxyProtocol.OFF
    max_body_size: int = 10 * 1024 * 1024  # 0: no limit
    allow_trace: bool = False  # TRACE is refused (405) unless the host allows it
    enabled: bool = True  # a disabled HTTP host is still known: its requests get a 503 page
    access: AccessList | None = None
    rate_limit: RateLimit | None = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything a proxy node serves, at one config revision."""

    revision: int
    hosts: tuple[HostRoute, ...] = ()
    default_certificate: CertificateBundle | None = None
    strict_sni: bool = False
    # ACME http-01 challenges: (token, key authorization) pairs, answered on the HTTP listener.
    acme_challenges: tuple[tuple[str, str], ...] = ()
    # ACME tls-alpn-01 challenges (RFC 8737): (name, SHA-256 of the key authorization) pairs.
    # A ClientHello for the name offering only ALPN "acme-tls/1" gets a self-signed
    # certificate for it carrying the digest (each node makes its own; no key is shipped).
    acme_tls_alpn: tuple[tuple[str, bytes], ...] = ()
    # Trusted proxies and inbound PROXY protocol, per listener (none: every peer is the client).
    listener_trust: tuple[ListenerTrust, ...] = ()
