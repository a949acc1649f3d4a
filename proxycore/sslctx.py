"""OpenSSL's ``SSL_CTX_ctrl`` on an ``ssl.SSLContext``, for what Python 3.11's ``ssl`` cannot set.

Used for the key-exchange groups (``proxycore.tlsgroups``), the server session cache and
the session-ticket keys (``proxycore.tlssessions``). How, and why it is safe:

- the ``SSL_CTX *`` is the first field of CPython's ``PySSLContext``, right after the
  object header (``object.__basicsize__`` bytes in);
- the function is looked up through ``_ssl``'s own shared object (``dlsym`` searches its
  dependencies), so it is the libssl that made the context;
- before any call, the pointer is checked: OpenSSL must report the context's options and
  verify mode, and see an option flipped through ``ssl`` and flipped back. Anything else
  (another Python, a static OpenSSL, a layout change) and ``ctrl`` returns None: never a
  crash, never a write through a pointer that was not proven.
"""

from __future__ import annotations

import _ssl
import ctypes
import functools
import ssl
from dataclasses import dataclass
from typing import Any

# ssl's verify modes as OpenSSL stores them: SSL_VERIFY_PEER (1), | FAIL_IF_NO_PEER_CERT (2).
_VERIFY_BITS = {ssl.CERT_NONE: 0, ssl.CERT_OPTIONAL: 1, ssl.CERT_REQUIRED: 3}


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


def ssl_ctx_address(ctx: ssl.SSLContext) -> int | None:
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


def ctrl(ctx: ssl.SSLContext, command: int, larg: int, parg: bytes | None) -> int | None:
    """``SSL_CTX_ctrl(ctx, command, larg, parg)``'s result, or None if ``ctx``'s ``SSL_CTX``
    cannot be reached and proven."""
    lib = _libssl()
    address = ssl_ctx_address(ctx) if lib is not None else None
    if lib is None or not address or not _proven(lib, address, ctx):
        return None
    return int(lib.ctrl(address, command, larg, parg))
