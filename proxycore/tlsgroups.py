"""Key-exchange groups of an ``ssl.SSLContext``: X25519, P-256 and P-384, no others.

Mozilla's "intermediate" profile lists those three; OpenSSL 3 also offers X448, P-521
and, in TLS 1.3, the finite-field groups, and sslyze's Mozilla check fails on them.
Python 3.11's ``ssl`` can name one group only (``set_ecdh_curve``), never a list. So
``offer_intermediate_groups`` calls OpenSSL's ``SSL_CTX_set1_groups_list`` itself,
through ctypes, on the context's ``SSL_CTX``:

- the ``SSL_CTX *`` is the first field of CPython's ``PySSLContext``, right after the
  object header (``object.__basicsize__`` bytes in);
- the function is looked up through ``_ssl``'s own shared object (``dlsym`` searches its
  dependencies), so it is the libssl that made the context;
- before writing, the pointer is checked: OpenSSL must report the context's options and
  verify mode, and see an option flipped through ``ssl`` and flipped back. Anything else
  (another Python, a static OpenSSL, a layout change) and the context gets P-256 alone
  through ``set_ecdh_curve`` (what every client supports) with one warning: never a
  crash, never a write through a pointer that was not proven.

The alternatives were worse: ``OPENSSL_CONF`` sets groups for the whole process and only
if set before ``ssl`` loads, and ``set_ecdh_curve`` alone makes X25519 clients retry
with P-256 (a HelloRetryRequest on most TLS 1.3 handshakes).
"""

from __future__ import annotations

import _ssl
import ctypes
import functools
import logging
import ssl
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("proxycore.tls")

GROUPS = "X25519:P-256:P-384"
FALLBACK_GROUP = "prime256v1"
_SSL_CTRL_SET_GROUPS_LIST = 92  # SSL_CTX_set1_groups_list is a macro over SSL_CTX_ctrl
# ssl's verify modes as OpenSSL stores them: SSL_VERIFY_PEER (1), | FAIL_IF_NO_PEER_CERT (2).
_VERIFY_BITS = {ssl.CERT_NONE: 0, ssl.CERT_OPTIONAL: 1, ssl.CERT_REQUIRED: 3}
_warned = False


@dataclass(frozen=True, slots=True)
class _LibSSL:
    ctrl: Any
    get_options: Any
    get_verify_mode: Any


@functools.cache
def _libssl() -> _LibSSL | None:
    try:
        lib = ctypes.CDLL(_ssl.__file__)
        ctrl, get_options, get_verify_mode = (
            lib.SSL_CTX_ctrl, lib.SSL_CTX_get_options, lib.SSL_CTX_get_verify_mode)
    except (AttributeError, OSError):  # no _ssl file (a static build), or symbols not exported
        return None
    ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_char_p]
    ctrl.restype = ctypes.c_long
    get_options.argtypes = [ctypes.c_void_p]
    get_options.restype = ctypes.c_uint64
    get_verify_mode.argtypes = [ctypes.c_void_p]
    get_verify_mode.restype = ctypes.c_int
    return _LibSSL(ctrl, get_options, get_verify_mode)


def _ssl_ctx_address(ctx: ssl.SSLContext) -> int | None:
    """The ``SSL_CTX *`` stored in ``ctx``, if this CPython keeps it where 3.11 does."""
    offset = object.__basicsize__
    if ctypes.sizeof(ctypes.c_void_p) != 8 or _ssl._SSLContext.__basicsize__ < offset + 8:
        return None
    return ctypes.c_void_p.from_address(id(ctx) + offset).value


def _proven(lib: _LibSSL, address: int, ctx: ssl.SSLContext) -> bool:
    """OpenSSL, asked about ``address``, describes ``ctx`` and follows a change made to it."""
    def same() -> bool:
        return (lib.get_options(address) == int(ctx.options)
                and lib.get_verify_mode(address) & 3 == _VERIFY_BITS[ctx.verify_mode])

    if not same():
        return False
    # Two contexts built alike agree on both; only ctx's own SSL_CTX sees ctx change.
    before = ctx.options
    ctx.options = before ^ ssl.OP_NO_TICKET
    try:
        return same()
    finally:
        ctx.options = before


def offer_intermediate_groups(ctx: ssl.SSLContext) -> None:
    """Key exchange on ``ctx`` limited to ``GROUPS``, or P-256 alone if that cannot be done."""
    lib = _libssl()
    address = _ssl_ctx_address(ctx) if lib is not None else None
    if (lib is not None and address and _proven(lib, address, ctx)
            and lib.ctrl(address, _SSL_CTRL_SET_GROUPS_LIST, 0, GROUPS.encode("ascii")) == 1):
        return
    global _warned
    if not _warned:
        _warned = True
        log.warning("cannot set the key-exchange groups %s through OpenSSL; falling back to "
                    "P-256 alone", GROUPS)
    ctx.set_ecdh_curve(FALLBACK_GROUP)
