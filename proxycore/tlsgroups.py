"""Key-exchange groups of an ``ssl.SSLContext``: X25519, P-256 and P-384, no others.

Mozilla's "intermediate" profile lists those three; OpenSSL 3 also offers X448, P-521
and, in TLS 1.3, the finite-field groups, and sslyze's Mozilla check fails on them.
Python 3.11's ``ssl`` can name one group only (``set_ecdh_curve``), never a list. So
``offer_intermediate_groups`` calls OpenSSL's ``SSL_CTX_set1_groups_list`` itself, on
the context's proven ``SSL_CTX`` (``proxycore.sslctx`` says how). Where that cannot be
done (another Python, a static OpenSSL, a layout change) the context gets P-256 alone
through ``set_ecdh_curve`` (what every client supports) with one warning.

The alternatives were worse: ``OPENSSL_CONF`` sets groups for the whole process and only
if set before ``ssl`` loads, and ``set_ecdh_curve`` alone makes X25519 clients retry
with P-256 (a HelloRetryRequest on most TLS 1.3 handshakes).
"""

from __future__ import annotations

import logging
import ssl

from proxycore import sslctx

log = logging.getLogger("proxycore.tls")

GROUPS = "X25519:P-256:P-384"
FALLBACK_GROUP = "prime256v1"
_SSL_CTRL_SET_GROUPS_LIST = 92  # SSL_CTX_set1_groups_list is a macro over SSL_CTX_ctrl
_warned = False


def offer_intermediate_groups(ctx: ssl.SSLContext) -> None:
    """Key exchange on ``ctx`` limited to ``GROUPS``, or P-256 alone if that cannot be done."""
    if sslctx.ctrl(ctx, _SSL_CTRL_SET_GROUPS_LIST, 0, GROUPS.encode("ascii")) == 1:
        return
    global _warned
    if not _warned:
        _warned = True
        log.warning("cannot set the key-exchange groups %s through OpenSSL; falling back to "
                    "P-256 alone", GROUPS)
    ctx.set_ecdh_curve(FALLBACK_GROUP)
