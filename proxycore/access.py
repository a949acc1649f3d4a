"""Access lists, compiled once per config load: address rules, HTTP Basic users, trust.

An ``AccessList`` (``proxycore.config``) is ordered allow/deny rules over IPv4/IPv6
networks, a default, and optional Basic users. ``compile_access`` turns it into an
``AccessPolicy`` when a snapshot is loaded: the rules become one sorted table of
disjoint address ranges (``AddressTable``), each already carrying the verdict of the
first rule that covers it, so a look-up is one ``bisect`` whatever the number of
rules (1,000 CIDRs: about 11 comparisons). IPv4 addresses live in the IPv4-mapped
part of the IPv6 space (``::ffff:a.b.c.d``), so one table serves both families.

Basic credentials are checked against Django's ``pbkdf2_sha256$iterations$salt$hash``
format with ``hashlib.pbkdf2_hmac`` (no Django here). A slow hash is the point, so
it runs as little as possible: ``proxycore.credentials`` remembers verified
headers per connection and per node, and runs misses in a bounded thread pool.
Everything here is pure: no I/O, no clock.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import hashlib
import hmac
import ipaddress
import re
import socket
from typing import Final

from proxycore.config import AccessAction, AccessList, ListenerTrust, Satisfy, Snapshot

# Where IPv4 addresses sit in the 128-bit space: ::ffff:0:0/96 (RFC 4291 §2.5.5.2).
_V4_MAPPED: Final = 0xFFFF00000000
_ALL: Final = 1 << 128

# Bounds (the control plane enforces the same ones on input).
MAX_AUTHORIZATION: Final = 4096  # bytes of an Authorization value the proxy looks at
MAX_USERNAME: Final = 150
MAX_PASSWORD: Final = 1024
MAX_ITERATIONS: Final = 10_000_000  # a hash asking for more is refused, not run

# What the Authorization header of a request says (``credential_state``).
CRED_NONE: Final = 0  # no Authorization header
CRED_MALFORMED: Final = 1  # not one well-formed Basic credential
CRED_PRESENT: Final = 2  # a well-formed Basic credential, not yet verified
CRED_VERIFIED: Final = 3  # verified on this connection or recently on this node

_AUTHORIZATION: Final = re.compile(rb"\r\nauthorization[ \t]*:[ \t]*([^\r]*)", re.IGNORECASE)
_AUTHORIZATION_LINE: Final = re.compile(rb"\r\nauthorization[ \t]*:[^\r]*", re.IGNORECASE)


# ---- addresses ---------------------------------------------------------------------------


def address_key(ip: str) -> int:
    """The 128-bit integer of an address string (IPv4 as IPv4-mapped IPv6); -1 if not an IP."""
    try:
        if ":" in ip:
            value = int.from_bytes(socket.inet_pton(socket.AF_INET6, ip.split("%", 1)[0]), "big")
            return value
        return _V4_MAPPED | int.from_bytes(socket.inet_pton(socket.AF_INET, ip), "big")
    except (OSError, ValueError):
        return -1


def network_range(source: str) -> tuple[int, int]:
    """``[first, last]`` of a network (or one address) in the 128-bit space; ValueError if bad."""
    network = ipaddress.ip_network(source.strip(), strict=False)
    first, last = int(network.network_address), int(network.broadcast_address)
    if network.version == 4:
        return _V4_MAPPED | first, _V4_MAPPED | last
    return first, last


class AddressTable:
    """Ordered allow/deny rules as disjoint ranges: ``starts[i]`` begins a range whose
    verdict is ``allowed[i]``; the first range starts at 0, so every address has one."""

    __slots__ = ("allowed", "default", "starts")

    def __init__(self, rules: list[tuple[bool, str]], default: bool) -> None:
        ranges = [(*network_range(source), allow) for allow, source in rules]
        # The elementary intervals every rule boundary cuts the space into.
        ends = (last + 1 for _, last, _ in ranges if last + 1 < _ALL)
        cuts = sorted({0, *(first for first, _, _ in ranges), *ends})
        verdict: list[bool | None] = [None] * len(cuts)
        # Rules in order: the first that covers an interval gives its verdict. ``skip``
        # jumps over intervals already decided (path-halving), so this is near-linear.
        skip = list(range(len(cuts) + 1))

        def next_open(i: int) -> int:
            while skip[i] != i:
                skip[i] = skip[skip[i]]
                i = skip[i]
            return i

        for first, last, allow in ranges:
            i = next_open(bisect.bisect_left(cuts, first))
            end = bisect.bisect_right(cuts, last)
            while i < end:
                verdict[i] = allow
                skip[i] = i + 1
                i = next_open(i + 1)
        starts: list[int] = []
        allowed: list[bool] = []
        for start, v in zip(cuts, verdict, strict=True):
            value = default if v is None else v
            if not allowed or allowed[-1] != value:
                starts.append(start)
                allowed.append(value)
        self.starts = starts
        self.allowed = allowed
        self.default = default

    def allows(self, key: int) -> bool:
        """Does the first matching rule (or the default) allow the address ``key``?"""
        if key < 0:
            return self.default  # not an IP peer (a Unix socket): no rule can name it
        return self.allowed[bisect.bisect_right(self.starts, key) - 1]


# ---- Basic credentials ---------------------------------------------------------------------


class PasswordHash:
    """A parsed ``pbkdf2_sha256$iterations$salt$hash`` (Django's format)."""

    __slots__ = ("digest", "iterations", "salt")

    def __init__(self, encoded: str) -> None:
        algorithm, iterations, salt, digest = encoded.split("$", 3)
        if algorithm != "pbkdf2_sha256":
            raise ValueError(f"unsupported password hash algorithm {algorithm!r}")
        self.iterations = int(iterations)
        if not 1 <= self.iterations <= MAX_ITERATIONS:
            raise ValueError(f"password hash iterations out of range: {self.iterations}")
        self.salt = salt.encode("utf-8")
        self.digest = base64.b64decode(digest.encode("ascii"), validate=True)

    def verify(self, password: bytes) -> bool:
        """The slow part: run PBKDF2 (OpenSSL releases the GIL while it does)."""
        computed = hashlib.pbkdf2_hmac("sha256", password, self.salt, self.iterations, len(self.digest))
        return hmac.compare_digest(computed, self.digest)


def authorization(raw_head: bytes) -> bytes | None:
    """The Authorization value of a request head; None when absent, b"" when there are several."""
    found = _AUTHORIZATION.findall(raw_head)
    if not found:
        return None
    if len(found) > 1:
        return b""  # ambiguous: refused as malformed
    return found[0].rstrip(b" \t")


def basic_credentials(value: bytes) -> tuple[str, bytes] | None:
    """(username, password) of a ``Basic`` value; None if it is not a well-formed one."""
    if len(value) > MAX_AUTHORIZATION:
        return None
    scheme, _, token = value.partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, colon, password = decoded.partition(b":")
    if not colon or not user or len(user) > MAX_USERNAME or len(password) > MAX_PASSWORD:
        return None
    try:
        return user.decode("utf-8"), password
    except UnicodeDecodeError:
        return None


def strip_authorization(head: bytes) -> bytes:
    """``head`` (an upstream request head) without its Authorization field lines."""
    return _AUTHORIZATION_LINE.sub(b"", head)


# ---- the compiled list -----------------------------------------------------------------------


class AccessPolicy:
    """An ``AccessList`` ready for the hot path (built once per config load)."""

    __slots__ = (
        "challenge", "identity", "name", "pass_authorization", "refuse_early", "satisfy_all",
        "table", "users",
    )

    def __init__(self, acl: AccessList) -> None:
        self.name = acl.name
        self.table = AddressTable(
            [(rule.action is AccessAction.ALLOW, rule.source) for rule in acl.rules],
            acl.default is AccessAction.ALLOW,
        )
        self.users: dict[str, PasswordHash] = {}
        for user in acl.users:
            try:
                self.users[user.username] = PasswordHash(user.password_hash)
            except ValueError as exc:
                raise ValueError(f"access list '{acl.name}', user '{user.username}': {exc}") from None
        self.satisfy_all = acl.satisfy is Satisfy.ALL
        self.pass_authorization = acl.pass_authorization
        # Without users an address the rules deny can never get in: refused before TLS.
        self.refuse_early = not self.users
        realm = (acl.realm or acl.name).replace("\\", "\\\\").replace('"', '\\"')
        self.challenge = b'Basic realm="%s", charset="UTF-8"' % realm.encode("utf-8")
        # What a remembered credential is tied to: this list with these users and hashes. A
        # changed password makes a new identity, so nothing verified before still counts.
        material = "\x00".join([acl.name, *(f"{u.username}\x00{u.password_hash}" for u in acl.users)])
        self.identity = hashlib.blake2b(material.encode("utf-8"), digest_size=16).digest()

    @property
    def has_users(self) -> bool:
        return bool(self.users)

    @property
    def strips_authorization(self) -> bool:
        return bool(self.users) and not self.pass_authorization


def compile_access(acl: AccessList | None) -> AccessPolicy | None:
    return AccessPolicy(acl) if acl is not None else None


def compile_policies(snapshot: Snapshot) -> dict[str, AccessPolicy]:
    """Each host's compiled access list (a list shared by hosts is compiled once)."""
    compiled: dict[AccessList, AccessPolicy] = {}
    policies: dict[str, AccessPolicy] = {}
    for route in snapshot.hosts:
        acl = route.access
        if acl is not None:
            policy = compiled.get(acl)
            if policy is None:
                policy = compiled[acl] = AccessPolicy(acl)
            policies[route.name] = policy
    return policies


def credential_state(policy: AccessPolicy, value: bytes | None, verified: bytes | None) -> int:
    """What the Authorization ``value`` of a request is worth for ``policy``, given the value
    this connection (or the node's cache) already verified for it (``verified``)."""
    if value is None:
        return CRED_NONE
    if verified is not None and value == verified:
        return CRED_VERIFIED
    credentials = basic_credentials(value)
    if credentials is None:
        return CRED_MALFORMED
    return CRED_PRESENT


# ---- trusted proxies ------------------------------------------------------------------------


class TrustPolicy:
    """A listener's trusted proxies, compiled: peers whose forwarding headers count."""

    __slots__ = ("proxy_protocol", "table")

    def __init__(self, trust: ListenerTrust) -> None:
        self.table = AddressTable([(True, source) for source in trust.trusted_proxies], False)
        self.proxy_protocol = trust.proxy_protocol

    def trusts(self, ip: str) -> bool:
        return self.table.allows(address_key(ip))


def forwarded_client(noted: dict[bytes, list[bytes]], trust: TrustPolicy) -> str | None:
    """The client address a trusted peer's X-Forwarded-For (or, failing that, Forwarded)
    gives: the right-most address that is not itself a trusted proxy. None if there is none."""
    values = noted.get(b"x-forwarded-for")
    chain: list[str] = []
    if values:
        for value in values:
            chain += [part.strip().decode("ascii", "replace") for part in value.split(b",")]
    else:
        for value in noted.get(b"forwarded") or ():
            for element in value.split(b","):
                for pair in element.split(b";"):
                    name, _, val = pair.strip().partition(b"=")
                    if name.strip() == b"for":
                        chain.append(_forwarded_node(val.strip().decode("ascii", "replace")))
    found: str | None = None
    for ip in reversed(chain[-32:]):  # bounded: a long chain is someone's invention
        key = address_key(ip)
        if key < 0:
            break
        found = ip
        if not trust.table.allows(key):
            break
    return found


def _forwarded_node(value: str) -> str:
    """An RFC 7239 node (``"[2001:db8::1]:80"``, ``192.0.2.1:80``) without quotes and port."""
    value = value.strip('"')
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else ""
    return value.partition(":")[0] if value.count(":") == 1 else value
