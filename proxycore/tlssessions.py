"""TLS session resumption turned off, for operators who need every handshake in full.

Some operators must not let a client skip the certificate exchange (a client
certificate checked on every connection, or audits that want it), and a benchmark
of full handshakes is honest only without resumption. ``ssl`` can stop TLS 1.3
tickets (``num_tickets = 0``) and TLS 1.2 tickets (``OP_NO_TICKET``), but TLS 1.2
clients can still resume by session ID from OpenSSL's server-side cache, which
Python leaves on and cannot turn off. ``no_session_resumption`` turns that cache off
too, through the same proven-pointer ctypes path as ``proxycore.tlsgroups``; where
that path is not available it logs once that TLS 1.2 session IDs may still resume.
"""

from __future__ import annotations

import logging
import ssl

from proxycore.tlsgroups import _libssl, _proven, _ssl_ctx_address

log = logging.getLogger("proxycore.tls")

_SSL_CTRL_SET_SESS_CACHE_MODE = 44  # SSL_CTX_set_session_cache_mode is a macro over SSL_CTX_ctrl
_SSL_SESS_CACHE_OFF = 0
_warned = False


def no_session_resumption(ctx: ssl.SSLContext) -> None:
    """No tickets (TLS 1.3 and 1.2) and no session-ID cache on ``ctx``: every handshake is full."""
    ctx.num_tickets = 0
    ctx.options |= ssl.OP_NO_TICKET
    lib = _libssl()
    address = _ssl_ctx_address(ctx) if lib is not None else None
    if lib is not None and address and _proven(lib, address, ctx):
        lib.ctrl(address, _SSL_CTRL_SET_SESS_CACHE_MODE, _SSL_SESS_CACHE_OFF, None)
        return
    global _warned
    if not _warned:
        _warned = True
        log.warning("cannot turn OpenSSL's session cache off: TLS 1.2 clients may still resume "
                    "sessions by ID (TLS 1.3 and ticket resumption are off)")
