"""What to do with a request, as one pure function over the snapshot: ``decide``.

Given a parsed request head, the host its ``Host`` names (``routing.lookup_route``)
and the host its connection's SNI chose, the proxy either forwards the request to
the host's upstream, answers it itself (421, 405, 413), redirects it to HTTPS, or
answers an ACME http-01 challenge. Nothing here does I/O or reads a clock, so each
rule is tested without sockets (tests/test_decisions.py); the connection and its
``Exchange`` carry the decision out.

A host's access list and rate limit come in as facts the connection gathered: whether
the client address is allowed (``address_allowed``, from the compiled list), what its
Authorization header is worth (``credentials``, ``proxycore.access.CRED_*``) and the
seconds until the client's next token (``retry_after``, 0: under the limit). A well-formed
credential not yet verified makes an ``AUTHENTICATE`` decision: the exchange verifies it
off the event loop (``proxycore.credentials``), then forwards or answers 401.

Which target of the upstream takes a forwarded request is not decided here: the
balancer's pick depends on live health, and an upstream with no target left is
answered 503 by the exchange.
"""

from __future__ import annotations

from typing import Final

from proxycore.access import CRED_PRESENT, CRED_VERIFIED, AccessPolicy
from proxycore.config import HostRoute, Mode
from proxycore.http1 import Framing, RequestHead
from proxycore.routing import redirect_location

ACME_PREFIX: Final = b"/.well-known/acme-challenge/"

# What a disabled host's requests get: the operator turned it off, nothing is broken.
DISABLED_BODY: Final = b"503 Service Unavailable: this host is disabled.\n"

# Decision.action
FORWARD: Final = 0
LOCAL: Final = 1  # answer ``status`` here (an error page), HSTS as ``route`` says
REDIRECT: Final = 2  # ``status`` with ``location``
ACME: Final = 3  # the key authorization of ``token``, from the snapshot's challenges
AUTHENTICATE: Final = 4  # verify the request's Basic credential for ``policy``, then forward or 401


class Decision:
    """One request's fate. ``route`` is the host whose HSTS policy a local answer carries."""

    __slots__ = ("action", "body", "headers", "location", "policy", "route", "status", "token")

    def __init__(
        self, action: int, status: int = 0, route: HostRoute | None = None,
        location: bytes = b"", token: str = "", body: bytes | None = None,
        headers: list[tuple[bytes, bytes]] | None = None, policy: AccessPolicy | None = None,
    ) -> None:
        self.action = action
        self.status = status
        self.route = route
        self.location = location
        self.token = token
        self.body = body  # a local answer's own body (None: the status's documented one)
        self.headers = headers  # a local answer's extra fields (WWW-Authenticate, Retry-After)
        self.policy = policy  # AUTHENTICATE: the access list to verify against

    def __repr__(self) -> str:
        names = ("FORWARD", "LOCAL", "REDIRECT", "ACME", "AUTHENTICATE")
        return (f"Decision({names[self.action]}, {self.status}, "
                f"location={self.location!r}, token={self.token!r})")


_FORWARD: Final = Decision(FORWARD)
# Enum members as Final constants: compiled, a C static rather than a class attribute look-up
# (measured with bench/hotpath.py under callgrind: 1.6% of the instructions per request).
_TCP: Final = Mode.TCP
_LENGTH: Final = Framing.LENGTH


def decide(
    head: RequestHead, route: HostRoute | None, sni_route: HostRoute | None, *,
    https: bool, https_port: int, policy: AccessPolicy | None = None, address_allowed: bool = True,
    credentials: int = 0, retry_after: int = 0,
) -> Decision:
    """The fate of ``head``, for ``route`` (its Host's host, or None) on a connection whose
    SNI chose ``sni_route`` (None on plain HTTP, or when the default certificate served);
    ``policy`` is ``route``'s compiled access list, the other keywords the facts above."""
    if https:
        # One connection, one host: a Host naming another host than the SNI is misdirected.
        if route is None or (sni_route is not None and route is not sni_route) or route.mode is _TCP:
            return Decision(LOCAL, 421, sni_route)
    else:
        if head.target.startswith(ACME_PREFIX):
            return Decision(ACME, token=head.target[len(ACME_PREFIX):].decode("ascii", "replace"))
        if route is None or route.mode is _TCP:
            return Decision(LOCAL, 421)
        if not route.enabled:
            return Decision(LOCAL, 503, route, body=DISABLED_BODY)
        if route.redirect.enabled:
            return Decision(REDIRECT, route.redirect.status, route,
                            location=redirect_location(head.host, head.target, https_port))
    if not route.enabled:  # (over HTTPS: checked here, once the host is known to be this one)
        return Decision(LOCAL, 503, route, body=DISABLED_BODY)
    if policy is not None or retry_after:
        refused = access_decision(route, policy, address_allowed, credentials, retry_after)
        if refused is not None:
            return refused
    if head.method == b"TRACE" and not route.allow_trace:
        # TRACE echoes the request, cookies and credentials included: off unless a host wants it.
        return Decision(LOCAL, 405, route)
    limit = route.max_body_size
    if limit and head.framing is _LENGTH and head.content_length > limit:
        return Decision(LOCAL, 413, route)
    return _FORWARD


def too_many(route: HostRoute | None, retry_after: int) -> Decision:
    return Decision(LOCAL, 429, route, headers=[(b"retry-after", b"%d" % retry_after)])


def unauthorized(route: HostRoute, policy: AccessPolicy) -> Decision:
    return Decision(LOCAL, 401, route, headers=[(b"www-authenticate", policy.challenge)])


def access_decision(
    route: HostRoute, policy: AccessPolicy | None, address_allowed: bool, credentials: int, retry_after: int,
) -> Decision | None:
    """403 (address refused), 429 (over the rate), 401 (credentials), AUTHENTICATE, or None:
    the access list and the rate limit let the request through. An address the list denies
    is refused before it spends a token; a client over its rate gets 429 before any hashing."""
    need_password = False
    if policy is not None:
        if policy.users:
            # satisfy any: an allowed address is enough, else a password; all: both
            need_password = policy.satisfy_all or not address_allowed
            if policy.satisfy_all and not address_allowed:
                return Decision(LOCAL, 403, route)
        elif not address_allowed:
            return Decision(LOCAL, 403, route)
    if retry_after:
        return too_many(route, retry_after)
    if need_password and credentials != CRED_VERIFIED:
        assert policy is not None
        if credentials == CRED_PRESENT:
            return Decision(AUTHENTICATE, 0, route, policy=policy)
        return unauthorized(route, policy)
    return None
