"""TLS for the data plane: SSLContexts built once per snapshot, and the SNI choice.

``build_sni_table(snapshot)`` turns a snapshot into an ``SNITable``: one
``ssl.SSLContext`` per distinct (certificate, client-auth settings, ALPN), shared by
every host that uses that combination, so a reload with 1000 hosts on one wildcard
certificate builds one context. Anything that cannot be built (a key that does not
match, a CA bundle that is not PEM) raises ``TLSConfigError`` and the caller keeps the
old table. ``lookup`` is the pure decision: exact name, then a one-label wildcard, then
the default certificate, or nothing in strict mode. A host without a certificate of
its own is in the table with no context: its names are refused (``unrecognized_name``),
never answered with the default certificate, which is for clients that send no known
name, not a stand-in for a named host (browsers would refuse it, and it is another
host's).

The node reads the SNI from the ClientHello itself (``proxycore.clienthello``) and
starts TLS directly with the chosen host's context. It does not switch contexts in an
``sni_callback``: OpenSSL's ``SSL_set_SSL_CTX`` swaps the certificate but keeps the
first context's verify mode, so a host's client-certificate setting would not apply
(measured: a ``CERT_REQUIRED`` host behind a ``CERT_NONE`` listener accepted clients
with no certificate). With one context per handshake from the start, each host's verify
mode, CA list, ALPN and session-ticket keys are its own, so a session from one host
cannot be resumed on another to skip its client-certificate check.

Keys never touch a disk: ``load_cert_chain`` only takes paths, so the PEM goes into an
anonymous ``memfd`` opened through ``/proc/self/fd``; without memfd, an unlinked 0600
file on a tmpfs; with neither, the build fails.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from proxycore.config import (
    CertificateBundle,
    ClientAuth,
    ClientAuthMode,
    HostRoute,
    Mode,
    Snapshot,
    UpstreamTLS,
)
from proxycore.tlsalert import AlertingSSLObject
from proxycore.tlsgroups import offer_intermediate_groups
from proxycore.tlssessions import TicketKeys, context_identity, no_session_resumption

# Mozilla server-side TLS guidelines 5.7, "intermediate": TLS 1.2 suites (TLS 1.3 uses
# OpenSSL's defaults, which are the same three Mozilla lists), client's choice.
INTERMEDIATE_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384", "DHE-RSA-CHACHA20-POLY1305",
))

# RFC 7919 ffdhe2048, the group Mozilla prescribes for the DHE suites above.
FFDHE2048_PEM = b"""-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""

HTTP_ALPN = ("http/1.1",)


class TLSConfigError(Exception):
    """A certificate, key or CA bundle that cannot be served; the message names it."""


# --- keys in memory -------------------------------------------------------------


def _tmpfs_directory() -> str | None:
    try:
        with open("/proc/mounts", encoding="ascii", errors="replace") as mounts:
            tmpfs = {line.split()[1] for line in mounts if line.split()[2:3] == ["tmpfs"]}
    except OSError:
        return None
    # Only memory-backed mounts qualify: the point is that the key never reaches a disk.
    for candidate in ("/dev/shm", f"/run/user/{os.getuid()}"):  # noqa: S108
        if candidate in tmpfs and os.access(candidate, os.W_OK):
            return candidate
    return None


def _anonymous_fd() -> int:
    with contextlib.suppress(AttributeError, OSError):
        return os.memfd_create("proxycore-tls", os.MFD_CLOEXEC)
    directory = _tmpfs_directory()
    if directory is None:
        raise TLSConfigError(
            "no memfd and no tmpfs to load a private key from; refusing to write it to disk"
        )
    fd, path = tempfile.mkstemp(dir=directory)  # mode 0600
    os.unlink(path)  # the name lives for microseconds; the open fd keeps the data
    return fd


@contextlib.contextmanager
def _in_memory_file(data: bytes) -> Iterator[str]:
    """A path OpenSSL can open whose bytes live only in memory, closed on exit."""
    fd = _anonymous_fd()
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


class _EncryptedKey(Exception):
    pass


def _refuse_password() -> bytes:
    raise _EncryptedKey  # never let OpenSSL prompt on a terminal


_LOAD_ERRORS = {
    "KEY_VALUES_MISMATCH": "key does not match the certificate",
    "EE_KEY_TOO_SMALL": "key is too small",
    "CA_MD_TOO_WEAK": "certificate is signed with a weak digest",
}


def _load_chain(ctx: ssl.SSLContext, bundle: CertificateBundle) -> None:
    label = f"certificate '{bundle.name}'"
    try:
        with _in_memory_file(bundle.chain_pem) as chain, _in_memory_file(bundle.key_pem) as key:
            ctx.load_cert_chain(chain, key, password=_refuse_password)
    except _EncryptedKey:
        raise TLSConfigError(f"{label}: key is encrypted") from None
    except ssl.SSLError as exc:
        why = _LOAD_ERRORS.get(exc.reason or "", "chain or key is not valid PEM")
        raise TLSConfigError(f"{label}: {why}") from None


def _load_ca(ctx: ssl.SSLContext, ca_pem: bytes, label: str) -> None:
    try:
        ctx.load_verify_locations(cadata=ca_pem.decode("ascii"))
    except (UnicodeDecodeError, ssl.SSLError, ValueError):
        raise TLSConfigError(f"{label}: client CA bundle is not valid PEM") from None


# --- contexts -------------------------------------------------------------------


def _base_server_context() -> ssl.SSLContext:
    """Versions, ciphers and options shared by every host context."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(INTERMEDIATE_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.sslobject_class = AlertingSSLObject  # a failed handshake sends its alert (tlsalert)
    with _in_memory_file(FFDHE2048_PEM) as dh:
        ctx.load_dh_params(dh)
    offer_intermediate_groups(ctx)  # X25519, P-256, P-384 (tlsgroups says how, and why)
    return ctx


def server_context(
    bundle: CertificateBundle,
    *,
    alpn: tuple[str, ...],
    client_auth: ClientAuth | None,
    label: str = "client auth",
) -> ssl.SSLContext:
    """The context a host's handshakes start with; ``label`` names the owner in CA errors."""
    ctx = _base_server_context()
    _load_chain(ctx, bundle)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    mode = client_auth.mode if client_auth else ClientAuthMode.OFF
    if client_auth is not None and mode is not ClientAuthMode.OFF:
        if not client_auth.ca_pem.strip():
            raise TLSConfigError(f"{label}: client certificates are {mode} but no CA bundle is set")
        _load_ca(ctx, client_auth.ca_pem, label)
        if client_auth.crl_pem.strip():
            try:  # cadata takes certificates only; a file path takes CRLs too
                with _in_memory_file(client_auth.crl_pem) as crl:
                    ctx.load_verify_locations(cafile=crl)
            except (ssl.SSLError, ValueError):
                raise TLSConfigError(f"{label}: certificate revocation list is not valid PEM") from None
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        ctx.verify_mode = ssl.CERT_REQUIRED if mode is ClientAuthMode.REQUIRED else ssl.CERT_OPTIONAL
    return ctx


def upstream_context(
    tls: UpstreamTLS, *, alpn: tuple[str, ...] = (), label: str = "upstream"
) -> ssl.SSLContext:
    """A client context for re-encrypting to an upstream; wrap with ``upstream_server_name``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    if tls.verify:
        if tls.ca_pem.strip():
            try:
                ctx.load_verify_locations(cadata=tls.ca_pem.decode("ascii"))
            except (UnicodeDecodeError, ssl.SSLError, ValueError):
                raise TLSConfigError(f"{label}: CA bundle is not valid PEM") from None
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if tls.client_certificate is not None:
        _load_chain(ctx, tls.client_certificate)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    offer_intermediate_groups(ctx)  # the same three groups towards upstreams
    return ctx


def upstream_server_name(tls: UpstreamTLS, target_host: str) -> str:
    """The name sent as SNI and checked against the upstream's certificate."""
    return tls.server_name or target_host


# --- the SNI table ----------------------------------------------------------------

Choice = tuple[HostRoute, ssl.SSLContext | None]  # None: the host has no certificate


@dataclass(frozen=True, slots=True)
class SNITable:
    """Names to (host, context) for one snapshot; wildcards keyed by their parent domain."""

    exact: Mapping[str, Choice]
    wildcard: Mapping[str, Choice]
    default: ssl.SSLContext | None
    strict: bool
    revision: int = 0
    keyed: tuple[tuple[ssl.SSLContext, bytes], ...] = ()  # contexts with ticket keys, and their identity


def normal_name(name: str) -> str:
    """A host name as tables key it: lower case, no trailing dot."""
    return name.lower().rstrip(".")


def lookup(
    table: SNITable, server_name: str | None
) -> tuple[HostRoute | None, ssl.SSLContext | None]:
    """The host and context for an SNI name: exact, then ``*.parent``, then the default."""
    if server_name is not None:
        name = normal_name(server_name)
        hit = table.exact.get(name)
        if hit is None:
            head, dot, parent = name.partition(".")
            if head and dot:
                hit = table.wildcard.get(parent)
        if hit is not None:
            return hit
    return (None, None) if table.strict else (None, table.default)


def build_sni_table(
    snapshot: Snapshot, *, resumption: bool = True, tickets: TicketKeys | None = None, now: float = 0.0,
) -> SNITable:
    """Every context a snapshot needs, each built once; raises ``TLSConfigError``.

    ``resumption=False``: no session is ever resumed, every handshake is full. Otherwise,
    with ``tickets``, each context gets its ticket key for the period of ``now`` (tlssessions).

    A host with no certificate has no context: its names are refused at the handshake
    (it still answers ACME challenges, http-01 and tls-alpn-01, while it waits for one).
    """
    built: dict[tuple[object, ...], ssl.SSLContext] = {}
    keyed: list[tuple[ssl.SSLContext, bytes]] = []

    def context_for(
        bundle: CertificateBundle, alpn: tuple[str, ...], auth: ClientAuth | None, label: str
    ) -> ssl.SSLContext:
        key = (bundle.fingerprint_sha256, bundle.chain_pem, bundle.key_pem, alpn,
               auth.mode if auth else None, auth.ca_pem if auth else None,
               auth.crl_pem if auth else None)
        if key not in built:
            built[key] = ctx = server_context(bundle, alpn=alpn, client_auth=auth, label=label)
            if not resumption:
                no_session_resumption(ctx)
            elif tickets is not None:
                identity = context_identity(bundle.fingerprint_sha256, ",".join(alpn),
                                            auth.mode.value if auth else None,
                                            auth.ca_pem if auth else None, auth.crl_pem if auth else None)
                keyed.append((ctx, identity))
                tickets.apply(ctx, identity, tickets.epoch(now))
        return built[key]

    default = snapshot.default_certificate
    default_ctx = context_for(default, HTTP_ALPN, None, "default") if default else None
    exact: dict[str, Choice] = {}
    wildcard: dict[str, Choice] = {}
    for route in snapshot.hosts:
        bundle = route.certificate
        auth = route.client_auth if route.client_auth.mode is not ClientAuthMode.OFF else None
        label = f"host '{route.name}'"
        alpn = HTTP_ALPN if route.mode is Mode.HTTP else ()
        context = context_for(bundle, alpn, auth, label) if bundle is not None else None
        choice: Choice = (route, context)
        for raw in route.names:
            name = normal_name(raw)
            table, key = (wildcard, name[2:]) if name.startswith("*.") else (exact, name)
            if key in table:
                raise TLSConfigError(
                    f"{label}: name '{name}' is already served by host '{table[key][0].name}'"
                )
            table[key] = choice
    return SNITable(MappingProxyType(exact), MappingProxyType(wildcard), default_ctx,
                    snapshot.strict_sni, snapshot.revision, tuple(keyed))


# --- why handshakes fail ------------------------------------------------------------

HANDSHAKE_FAILURE_REASONS = (
    "unknown_sni", "no_certificate", "no_client_cert", "bad_client_cert", "expired_client_cert",
    "revoked_client_cert", "cert_rejected_by_client",
    "protocol_version", "no_shared_cipher", "http_request", "not_tls", "timeout", "eof", "other",
)

# OpenSSL's X509_V_ERR_CERT_NOT_YET_VALID and X509_V_ERR_CERT_HAS_EXPIRED: a client
# certificate outside its validity period is told apart from one nobody trusts, because
# the operator's fix differs (renew it vs. add its CA).
_OUTSIDE_VALIDITY = frozenset({9, 10})

_SSL_REASONS = {
    "TLSV1_ALERT_UNRECOGNIZED_NAME": "unknown_sni",
    "TLSV1_UNRECOGNIZED_NAME": "unknown_sni",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no_client_cert",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "no_client_cert",
    "CERTIFICATE_VERIFY_FAILED": "bad_client_cert",
    "SSLV3_ALERT_BAD_CERTIFICATE": "cert_rejected_by_client",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "cert_rejected_by_client",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "cert_rejected_by_client",
    "TLSV1_ALERT_UNKNOWN_CA": "cert_rejected_by_client",
    "UNSUPPORTED_PROTOCOL": "protocol_version",
    "TLSV1_ALERT_PROTOCOL_VERSION": "protocol_version",
    "INAPPROPRIATE_FALLBACK": "protocol_version",
    "NO_SHARED_CIPHER": "no_shared_cipher",
    "NO_SHARED_GROUPS": "no_shared_cipher",
    "NO_SUITABLE_SIGNATURE_ALGORITHM": "no_shared_cipher",
    "HTTP_REQUEST": "http_request",
    "WRONG_VERSION_NUMBER": "not_tls",
    "UNEXPECTED_EOF_WHILE_READING": "eof",
}


def upstream_connect_failure(exc: BaseException) -> str:
    """The ``upstream_errors`` key for a connect to an upstream that failed with ``exc``.

    A certificate the proxy refused and a handshake that broke off are told apart from a
    refused TCP connection: the operator looks at the CA bundle or TLS settings, not at
    whether the upstream is up.
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "tls_verify_failed"
    if isinstance(exc, ssl.SSLError):
        return "tls_handshake_failed"
    return "connect_refused"


def closed_during_handshake() -> ssl.SSLEOFError:
    """What a TLS peer that hung up mid-handshake raises, in words; the event loops raise a
    bare ``ConnectionResetError`` that would log as an empty reason."""
    exc = ssl.SSLEOFError(ssl.SSL_ERROR_EOF, "the upstream closed the connection during the TLS handshake")
    exc.library, exc.reason = "SSL", "UNEXPECTED_EOF_WHILE_READING"  # as OpenSSL's own EOF has
    return exc


X509_V_ERR_CERT_REVOKED = 23


def handshake_failure_reason(exc: BaseException | type[BaseException]) -> str:
    """A short stable key (one of ``HANDSHAKE_FAILURE_REASONS``) for the stats.

    uvloop reports some EOFs as the class ``ConnectionResetError`` rather than an
    instance; both are accepted.
    """
    kind = exc if isinstance(exc, type) else type(exc)
    reason = getattr(exc, "reason", None)  # set by OpenSSL, absent when built by hand
    if getattr(exc, "verify_code", None) in _OUTSIDE_VALIDITY:
        return "expired_client_cert"
    if getattr(exc, "verify_code", None) == X509_V_ERR_CERT_REVOKED:
        return "revoked_client_cert"
    if isinstance(exc, ssl.SSLError) and reason in _SSL_REASONS:
        return _SSL_REASONS[reason]
    if issubclass(kind, ssl.SSLCertVerificationError):
        return "bad_client_cert"
    if issubclass(kind, TimeoutError) or (
        issubclass(kind, ConnectionAbortedError) and "taking longer" in str(exc)
    ):
        return "timeout"
    if issubclass(kind, ssl.SSLEOFError | ssl.SSLZeroReturnError | ConnectionError | EOFError):
        return "eof"
    return "other"
