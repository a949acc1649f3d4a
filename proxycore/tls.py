"""TLS for the data plane: SSLContexts built once per snapshot, and the SNI choice.

Shape. ``build_sni_table(snapshot)`` turns a snapshot into an ``SNITable``: one
``ssl.SSLContext`` per distinct (certificate, client-auth settings, ALPN), shared by
every host that uses that combination, so a reload with 1000 hosts on one wildcard
certificate builds one context. Anything that cannot be built (a key that does not
match, a CA bundle that is not PEM) raises ``TLSConfigError`` and the caller keeps the
old table. ``lookup`` is the pure decision (exact name, then a one-label wildcard, then
the default certificate, or nothing in strict mode). ``listener_context`` is the one
context handed to ``loop.create_server``: its ``sni_callback`` looks the name up in
the *current* table and switches the connection to the host's context.

What the switch does and does not carry. ``ssl_object.context = ctx`` is OpenSSL's
``SSL_set_SSL_CTX``, which swaps the certificate/key, the ALPN choice and the trust
store used to verify a client certificate, but NOT the verify mode, the options, the
protocol versions or the cipher list: those stay as the listener context set them when
the connection was created. Measured with real handshakes (OpenSSL 3.0, CPython 3.11,
both TLS 1.2 and 1.3): a host context with ``CERT_REQUIRED`` behind a ``CERT_NONE``
listener sent no CertificateRequest and completed the handshake for a client with no
certificate, with a good one, and with one from an unrelated CA; the server saw no
peer certificate in every case. Hence:

* the listener is built with exactly the same versions, ciphers and options as every
  host context, so nothing depends on which of them OpenSSL reads;
* for hosts with client auth the callback then copies the host context's verify mode,
  callback and depth onto the connection (``SSL_set_verify``), as nginx does in its
  own servername callback. CPython exposes no such call, so ``_OpenSSLCalls`` reaches
  it through ctypes on the libssl the ``ssl`` module itself is linked with, after
  checking the ``_ssl`` object layout (the pointer it reads must lead back to the
  connection's own context). With it, the same handshakes give: required + no cert:
  ``PEER_DID_NOT_RETURN_A_CERTIFICATE``; required + foreign CA:
  ``CERTIFICATE_VERIFY_FAILED``; required + good cert: the server sees it; optional
  with or without a cert: both succeed. Hosts without client auth keep the listener's
  ``CERT_NONE`` and never request a certificate. Where the layout check fails, hosts
  with client auth make ``build_sni_table`` raise rather than run unenforced.
* session resumption happens in the listener context, before the callback, so a
  session from host A could be resumed under host B's name and skip B's client-cert
  check (measured: it does, in TLS 1.3; nginx's CVE-2025-23419). For hosts with
  client auth the callback refuses (``access_denied``) a resumed session whose
  original server name differs. In TLS 1.2 OpenSSL already hands the callback the
  session's original name, so the route chosen is the session's host.

The route the callback chose is kept per connection (``chosen_route``); the protocol
must use it rather than re-deriving a host from SNI or ``Host``. The listener context
holds no certificate of its own: OpenSSL only needs one after the callback has
switched contexts, and every path that does not switch fails the handshake first.

Keys never touch a disk: ``load_cert_chain`` only takes paths, so the PEM goes into an
anonymous ``memfd`` opened through ``/proc/self/fd``; without memfd, an unlinked 0600
file on a tmpfs; with neither, the build fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import os
import ssl
import sys
import tempfile
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from proxycore.config import (
    CertificateBundle,
    ClientAuth,
    ClientAuthMode,
    HostRoute,
    Mode,
    Snapshot,
    UpstreamTLS,
)

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
    """Versions, ciphers and options shared by the listener and every host context."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(INTERMEDIATE_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    with _in_memory_file(FFDHE2048_PEM) as dh:
        ctx.load_dh_params(dh)
    return ctx


def server_context(
    bundle: CertificateBundle,
    *,
    alpn: tuple[str, ...],
    client_auth: ClientAuth | None,
    label: str = "client auth",
) -> ssl.SSLContext:
    """The context a host's handshakes switch to; ``label`` names the owner in CA errors."""
    ctx = _base_server_context()
    _load_chain(ctx, bundle)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    mode = client_auth.mode if client_auth else ClientAuthMode.OFF
    if client_auth is not None and mode is not ClientAuthMode.OFF:
        if not client_auth.ca_pem.strip():
            raise TLSConfigError(f"{label}: client certificates are {mode} but no CA bundle is set")
        _load_ca(ctx, client_auth.ca_pem, label)
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
    return ctx


def upstream_server_name(tls: UpstreamTLS, target_host: str) -> str:
    """The name sent as SNI and checked against the upstream's certificate."""
    return tls.server_name or target_host


# --- the SNI table ----------------------------------------------------------------

Choice = tuple[HostRoute, ssl.SSLContext]


@dataclass(frozen=True, slots=True)
class SNITable:
    """Names to (host, context) for one snapshot; wildcards keyed by their parent domain."""

    exact: Mapping[str, Choice]
    wildcard: Mapping[str, Choice]
    default: ssl.SSLContext | None
    strict: bool
    revision: int = 0


def _normal(name: str) -> str:
    return name.lower().rstrip(".")


def lookup(
    table: SNITable, server_name: str | None
) -> tuple[HostRoute | None, ssl.SSLContext | None]:
    """The host and context for an SNI name: exact, then ``*.parent``, then the default."""
    if server_name is not None:
        name = _normal(server_name)
        hit = table.exact.get(name)
        if hit is None:
            head, dot, parent = name.partition(".")
            if head and dot:
                hit = table.wildcard.get(parent)
        if hit is not None:
            return hit
    return (None, None) if table.strict else (None, table.default)


def build_sni_table(snapshot: Snapshot) -> SNITable:
    """Every context a snapshot needs, each built once; raises ``TLSConfigError``.

    A host with no certificate of its own uses the default one; with neither it is left
    out (it can still answer ACME challenges on plain HTTP while it waits for one).
    """
    built: dict[tuple[object, ...], ssl.SSLContext] = {}

    def context_for(
        bundle: CertificateBundle, alpn: tuple[str, ...], auth: ClientAuth | None, label: str
    ) -> ssl.SSLContext:
        key = (bundle.fingerprint_sha256, bundle.chain_pem, bundle.key_pem, alpn,
               auth.mode if auth else None, auth.ca_pem if auth else None)
        if key not in built:
            built[key] = server_context(bundle, alpn=alpn, client_auth=auth, label=label)
        return built[key]

    default = snapshot.default_certificate
    default_ctx = context_for(default, HTTP_ALPN, None, "default") if default else None
    exact: dict[str, Choice] = {}
    wildcard: dict[str, Choice] = {}
    for route in snapshot.hosts:
        bundle = route.certificate or default
        if bundle is None:
            continue
        auth = route.client_auth if route.client_auth.mode is not ClientAuthMode.OFF else None
        label = f"host '{route.name}'"
        if auth is not None and _native() is None:
            raise TLSConfigError(
                f"{label}: client certificates cannot be enforced on this Python build"
            )
        alpn = HTTP_ALPN if route.mode is Mode.HTTP else ()
        choice = (route, context_for(bundle, alpn, auth, label))
        for raw in route.names:
            name = _normal(raw)
            table, key = (wildcard, name[2:]) if name.startswith("*.") else (exact, name)
            if key in table:
                raise TLSConfigError(
                    f"{label}: name '{name}' is already served by host '{table[key][0].name}'"
                )
            table[key] = choice
    return SNITable(MappingProxyType(exact), MappingProxyType(wildcard), default_ctx,
                    snapshot.strict_sni, snapshot.revision)


# --- what SSL_set_SSL_CTX leaves out ------------------------------------------------

_PTR = ctypes.sizeof(ctypes.c_void_p)
_HEAD = object.__basicsize__  # PyObject_HEAD


def _read_pointer(address: int) -> int:
    return ctypes.c_void_p.from_address(address).value or 0


class _LayoutMismatch(Exception):
    pass


class _OpenSSLCalls:
    """The OpenSSL calls CPython's ``ssl`` module does not expose, through ctypes.

    ``_ssl._SSLSocket`` starts ``PyObject_HEAD; PyObject *Socket; SSL *ssl;
    PySSLContext *ctx`` and ``_ssl._SSLContext`` starts ``PyObject_HEAD; SSL_CTX *ctx``
    (read in CPython 3.11's ``_ssl.c``). Every use checks that the ``ctx`` slot holds the object's
    own context and that ``SSL_get_SSL_CTX`` of the pointer read is that context's
    ``SSL_CTX``, so a different layout is refused, never misread.
    """

    def __init__(self) -> None:
        import _ssl

        lib = ctypes.CDLL(_ssl.__file__)  # resolves to the libssl _ssl is linked with
        vp, c_int = ctypes.c_void_p, ctypes.c_int
        self._get_ssl_ctx = _bind(lib.SSL_get_SSL_CTX, vp, vp)
        self._ctx_verify_mode = _bind(lib.SSL_CTX_get_verify_mode, c_int, vp)
        self._ctx_verify_callback = _bind(lib.SSL_CTX_get_verify_callback, vp, vp)
        self._ctx_verify_depth = _bind(lib.SSL_CTX_get_verify_depth, c_int, vp)
        self._set_verify = _bind(lib.SSL_set_verify, None, vp, c_int, vp)
        self._set_verify_depth = _bind(lib.SSL_set_verify_depth, None, vp, c_int)
        self._get_session = _bind(lib.SSL_get_session, vp, vp)
        self._session_hostname = _bind(lib.SSL_SESSION_get0_hostname, ctypes.c_char_p, vp)
        probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._ssl_pointer(probe.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True))

    def _ssl_pointer(self, ssl_object: ssl.SSLObject) -> int:
        raw = getattr(ssl_object, "_sslobj", None)
        context = getattr(raw, "context", None)
        if raw is None or not isinstance(context, ssl.SSLContext):
            raise _LayoutMismatch
        if _read_pointer(id(raw) + _HEAD + 2 * _PTR) != id(context):
            raise _LayoutMismatch
        ssl_ptr = _read_pointer(id(raw) + _HEAD + _PTR)
        if not ssl_ptr or self._get_ssl_ctx(ssl_ptr) != _read_pointer(id(context) + _HEAD):
            raise _LayoutMismatch
        return ssl_ptr

    def adopt_verify_settings(self, ssl_object: ssl.SSLObject) -> None:
        """Give the connection the verify mode of the context it was switched to."""
        ssl_ptr = self._ssl_pointer(ssl_object)
        ctx_ptr = self._get_ssl_ctx(ssl_ptr)
        mode = self._ctx_verify_mode(ctx_ptr)
        self._set_verify(ssl_ptr, mode, self._ctx_verify_callback(ctx_ptr))
        self._set_verify_depth(ssl_ptr, self._ctx_verify_depth(ctx_ptr))

    def session_server_name(self, ssl_object: ssl.SSLObject) -> str | None:
        """The SNI name of the handshake that created the session being resumed."""
        session = self._get_session(self._ssl_pointer(ssl_object))
        name = self._session_hostname(session) if session else None
        return _normal(name.decode("ascii", "replace")) if name else None


def _bind(fn: ctypes._NamedFuncPointer, restype: object, *argtypes: object) -> Callable[..., Any]:
    fn.restype = restype  # type: ignore[assignment]
    fn.argtypes = argtypes  # type: ignore[assignment]
    return fn


@functools.cache
def _native() -> _OpenSSLCalls | None:
    if sys.implementation.name != "cpython":
        return None
    try:
        return _OpenSSLCalls()
    except (OSError, AttributeError, _LayoutMismatch):
        return None


# --- the listener -----------------------------------------------------------------

_ROUTES: weakref.WeakKeyDictionary[ssl.SSLObject, HostRoute] = weakref.WeakKeyDictionary()
_REFUSALS: weakref.WeakKeyDictionary[ssl.SSLObject, str] = weakref.WeakKeyDictionary()


Connection = ssl.SSLObject | asyncio.BaseTransport | None


def _ssl_object_of(conn: Connection) -> ssl.SSLObject | None:
    """The SSLObject of a connection, given it or its TLS transport.

    A raw transport whose ``start_tls`` failed no longer leads to it (measured on
    asyncio and uvloop): failures are then known by their exception alone.
    """
    if conn is None or isinstance(conn, ssl.SSLObject):
        return conn
    found = conn.get_extra_info("ssl_object")
    return found if isinstance(found, ssl.SSLObject) else None


def chosen_route(conn: Connection) -> HostRoute | None:
    """The host the SNI callback chose for this connection (None: default certificate).

    Takes the ``ssl.SSLObject`` or the transport. Under both asyncio and uvloop the
    callback receives the very object ``get_extra_info("ssl_object")`` returns later.
    """
    ssl_object = _ssl_object_of(conn)
    return _ROUTES.get(ssl_object) if ssl_object is not None else None


def _refuse(ssl_object: ssl.SSLObject, reason: str, alert: int) -> int:
    _REFUSALS[ssl_object] = reason
    return alert


def _switch(ssl_object: ssl.SSLObject, server_name: str | None, table: SNITable) -> int | None:
    route, ctx = lookup(table, server_name)
    if ctx is None:
        return _refuse(ssl_object, "unknown_sni", ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME)
    if ctx.verify_mode != ssl.CERT_NONE:
        native = _native()
        if native is None:
            return _refuse(ssl_object, "client_auth_unavailable",
                           ssl.ALERT_DESCRIPTION_HANDSHAKE_FAILURE)
        if ssl_object.session_reused and native.session_server_name(ssl_object) != _normal(
            server_name or ""
        ):
            return _refuse(ssl_object, "resumption_rejected", ssl.ALERT_DESCRIPTION_ACCESS_DENIED)
        ssl_object.context = ctx
        native.adopt_verify_settings(ssl_object)
    else:
        ssl_object.context = ctx
    if route is not None:
        _ROUTES[ssl_object] = route
    return None


def listener_context(table_getter: Callable[[], SNITable]) -> ssl.SSLContext:
    """The context for ``loop.create_server``; each handshake uses ``table_getter()``."""
    listener = _base_server_context()

    def sni_callback(
        ssl_object: ssl.SSLObject, server_name: str | None, _listener: ssl.SSLContext
    ) -> int | None:
        try:
            return _switch(ssl_object, server_name, table_getter())
        except Exception:
            # An exception here would be printed and turned into internal_error anyway.
            return _refuse(ssl_object, "internal_error", ssl.ALERT_DESCRIPTION_INTERNAL_ERROR)

    listener.sni_callback = sni_callback
    return listener


# --- why handshakes fail ------------------------------------------------------------

HANDSHAKE_FAILURE_REASONS = (
    "unknown_sni", "resumption_rejected", "client_auth_unavailable", "internal_error",
    "no_client_cert", "bad_client_cert", "cert_rejected_by_client", "protocol_version",
    "no_shared_cipher", "http_request", "not_tls", "timeout", "eof", "other",
)

_SSL_REASONS = {
    "CALLBACK_FAILED": "unknown_sni",  # our callback refused; the usual cause
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


def handshake_failure_reason(
    exc: BaseException | type[BaseException], conn: Connection = None
) -> str:
    """A short stable key (one of ``HANDSHAKE_FAILURE_REASONS``) for the stats.

    Pass the connection (``ssl_object`` or transport) when at hand: the SNI callback's
    own refusals are then told apart exactly, where the object can be found. uvloop
    reports some EOFs as the class ``ConnectionResetError`` rather than an instance;
    both are accepted.
    """
    ssl_object = _ssl_object_of(conn)
    if ssl_object is not None and ssl_object in _REFUSALS:
        return _REFUSALS[ssl_object]
    kind = exc if isinstance(exc, type) else type(exc)
    reason = getattr(exc, "reason", None)  # set by OpenSSL, absent when built by hand
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
