"""TLS session resumption: ticket keys that outlive a reload, or resumption turned off.

``TicketKeys`` (below) gives every host context a session-ticket key derived from
the node's secret, so sessions resume across reloads (and across processes that
share the secret).

``no_session_resumption`` is for operators who need every handshake in full: some
must not let a client skip the certificate exchange (a client certificate checked
on every connection, or audits that want it), and a benchmark of full handshakes is
honest only without resumption. ``ssl`` can stop TLS 1.3 tickets (``num_tickets =
0``) and TLS 1.2 tickets (``OP_NO_TICKET``), but TLS 1.2 clients can still resume by
session ID from OpenSSL's server-side cache, which Python leaves on and cannot turn
off. This turns that cache off too, through ``proxycore.sslctx``; where that is not
possible it logs once that TLS 1.2 session IDs may still resume.
"""

from __future__ import annotations

import hashlib
import logging
import os
import ssl

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from proxycore import sslctx

log = logging.getLogger("proxycore.tls")

_SSL_CTRL_SET_SESS_CACHE_MODE = 44  # SSL_CTX_set_session_cache_mode is a macro over SSL_CTX_ctrl
_SSL_SESS_CACHE_OFF = 0
_warned = False


def no_session_resumption(ctx: ssl.SSLContext) -> None:
    """No tickets (TLS 1.3 and 1.2) and no session-ID cache on ``ctx``: every handshake is full."""
    ctx.num_tickets = 0
    ctx.options |= ssl.OP_NO_TICKET
    if sslctx.ctrl(ctx, _SSL_CTRL_SET_SESS_CACHE_MODE, _SSL_SESS_CACHE_OFF, None) is not None:
        return
    global _warned
    if not _warned:
        _warned = True
        log.warning("cannot turn OpenSSL's session cache off: TLS 1.2 clients may still resume "
                    "sessions by ID (TLS 1.3 and ticket resumption are off)")


# ---- session-ticket keys ---------------------------------------------------------------

_SSL_CTRL_SET_TLSEXT_TICKET_KEYS = 59  # SSL_CTX_set_tlsext_ticket_keys, a macro over SSL_CTX_ctrl
TICKET_KEY_SIZE = 80  # OpenSSL's layout: 16-byte key name, 32-byte HMAC key, 32-byte AES key
TICKET_KEY_PERIOD = 3600.0  # seconds a ticket key is used before the next one takes over


class TicketKeys:
    """Session-ticket keys for every host context, derived from one secret.

    OpenSSL gives each new SSL_CTX random ticket keys, so every reload (new contexts)
    used to make every returning client do a full handshake, and two processes could
    never resume each other's sessions. Here the key of a context is derived (HKDF-SHA256)
    from the node's secret, the context's identity (its certificate, ALPN and
    client-certificate rules: two hosts that differ in any of them never share a key, so
    a session from one cannot skip the other's checks) and the current period: the same
    context gets the same key across reloads, and processes that share the secret (a
    node's workers) accept each other's tickets. The key changes every ``period``
    seconds; tickets from the period before are then no longer accepted (one full
    handshake per client per period).
    """

    def __init__(self, secret: bytes | None = None, period: float = TICKET_KEY_PERIOD) -> None:
        self.secret = secret if secret is not None else os.urandom(32)
        self.period = period

    def epoch(self, now: float) -> int:
        return int(now // self.period)

    def key(self, identity: bytes, epoch: int) -> bytes:
        info = b"proxyadmin session tickets\x00" + epoch.to_bytes(8, "big") + identity
        return HKDF(algorithm=hashes.SHA256(), length=TICKET_KEY_SIZE, salt=None, info=info).derive(
            self.secret)

    def apply(self, ctx: ssl.SSLContext, identity: bytes, epoch: int) -> bool:
        """Give ``ctx`` its key for ``epoch``; False (OpenSSL's random keys stay) if it cannot."""
        key = self.key(identity, epoch)
        done = sslctx.ctrl(ctx, _SSL_CTRL_SET_TLSEXT_TICKET_KEYS, len(key), key)
        if done is None:
            global _keys_warned
            if not _keys_warned:
                _keys_warned = True
                log.warning("cannot set TLS session-ticket keys through OpenSSL: sessions will not "
                            "resume after a reload")
            return False
        return done == 1


_keys_warned = False


def context_identity(*parts: bytes | str | None) -> bytes:
    """What makes two host contexts the same for resumption, as 32 bytes."""
    digest = hashlib.sha256()
    for part in parts:
        data = b"" if part is None else part.encode() if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "big") + data)
    return digest.digest()
