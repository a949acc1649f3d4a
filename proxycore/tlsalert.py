"""A failed TLS handshake sends its alert: the client sees ``certificate_required``, not a reset.

When OpenSSL fails a handshake it writes a fatal alert (``protocol_version``,
``handshake_failure``, ``certificate_required``, ``unknown_ca``,
``certificate_expired``, ``certificate_revoked``...) into the SSLObject's outgoing
BIO. Both asyncio's and uvloop's ``SSLProtocol`` then close the transport without
sending what is in that BIO (CPython gh-98078; uvloop has the same code), so a
refused client sees a bare EOF and an operator debugging mTLS gets "connection reset".

The fix stays outside the event loops: every server context the node builds creates
its SSLObjects as ``AlertingSSLObject`` (``SSLContext.sslobject_class``; both loops
call ``context.wrap_bio``). When the real handshake raises, that object keeps the
error and tells the protocol "want read" instead; the protocol's want-read path
writes the outgoing BIO, the alert, to the socket. The ``Handshake`` record the
acceptor registered for the connection has the failure counted by the real error
right away, then closes the raw transport gracefully, after the write. Nothing
changes once a handshake is done: only ``do_handshake`` is overridden, never
``read`` or ``write``, and a successful handshake drops its record.

The record reaches the SSLObject in the order handshakes started. ``start_tls``
schedules the protocol's ``connection_made`` (which calls ``wrap_bio`` at once) with
``call_soon`` in the step that calls it, and the ready queue runs in order, so the
SSLObjects of one context are created in the order the acceptor called ``start_tls``.
A context variable set in the handshake task would not do: uvloop runs that
``connection_made`` in the listener's context, shared by all its connections, not in
a copy of the task's (measured: ``_create`` saw the task's value on asyncio, nothing
on uvloop).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any

# Handshakes whose SSLObject is not created yet, per server context, oldest first.
_waiting: dict[ssl.SSLContext, deque[Handshake]] = {}


class Handshake:
    """One server-side handshake the acceptor started with ``start_tls``.

    When it fails with an alert to send, ``refused`` is called with the real error at
    once (before the alert leaves, so a client that got it finds it counted), ``error``
    keeps it, and the connection is closed after the write: ``start_tls`` then returns
    or raises whatever the event loop makes of that close.
    """

    __slots__ = ("claimed", "context", "error", "loop", "outgoing", "refused", "transport")

    def __init__(self, context: ssl.SSLContext, transport: asyncio.Transport,
                 loop: asyncio.AbstractEventLoop, refused: Callable[[ssl.SSLError], None]) -> None:
        self.context = context
        self.transport: asyncio.Transport | None = transport  # the raw TCP transport
        self.loop = loop
        self.refused: Callable[[ssl.SSLError], None] | None = refused
        self.claimed = False  # its SSLObject exists
        self.outgoing: ssl.MemoryBIO | None = None
        self.error: ssl.SSLError | None = None

    @classmethod
    def expect(cls, context: ssl.SSLContext, transport: asyncio.Transport,
               loop: asyncio.AbstractEventLoop, refused: Callable[[ssl.SSLError], None]) -> Handshake:
        """Call right before ``start_tls(transport, ..., context)``, in the same step."""
        handshake = cls(context, transport, loop, refused)
        _waiting.setdefault(context, deque()).append(handshake)
        return handshake

    def forget(self) -> None:
        """The handshake is over (or never started): leave the queue, drop references."""
        if not self.claimed:  # start_tls was cancelled before its SSLObject was made
            queue = _waiting.get(self.context)
            if queue is not None and self in queue:
                queue.remove(self)
                if not queue:
                    del _waiting[self.context]
            self.claimed = True
        self.transport = self.refused = self.outgoing = None

    def failed(self, exc: ssl.SSLError, outgoing: ssl.MemoryBIO) -> None:
        """OpenSSL failed the handshake and wrote an alert: end the connection once it is sent."""
        self.error = exc.with_traceback(None)  # no frames kept alive by the record
        self.outgoing = outgoing
        if self.refused is not None:
            self.refused(self.error)
        self.loop.call_soon(self.alert_sent)

    def alert_sent(self) -> None:
        """Called soon after the protocol wrote the outgoing BIO: close after the write."""
        transport, outgoing = self.transport, self.outgoing
        self.outgoing = None
        if transport is None or transport.is_closing():
            return
        rest = outgoing.read() if outgoing is not None else b""
        if rest:  # the protocol's writing was paused: send it ourselves
            transport.write(rest)
        transport.close()


def _claim(context: ssl.SSLContext | None) -> Handshake | None:
    if context is None:
        return None
    queue = _waiting.get(context)
    if not queue:
        return None
    handshake = queue.popleft()
    if not queue:
        del _waiting[context]
    handshake.claimed = True
    return handshake


class AlertingSSLObject(ssl.SSLObject):
    """An SSLObject whose failed server handshake leaves its alert to be sent.

    Without a ``Handshake`` (a client side, a handshake the acceptor did not start) it
    behaves exactly as ``ssl.SSLObject``.
    """

    _handshake: Handshake | None = None
    _outgoing: ssl.MemoryBIO | None = None

    @classmethod
    def _create(cls, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, *args: Any,
                **kwargs: Any) -> AlertingSSLObject:
        obj: AlertingSSLObject = super()._create(incoming, outgoing, *args, **kwargs)  # type: ignore[misc]
        if kwargs.get("server_side"):
            handshake = _claim(kwargs.get("context"))
            if handshake is not None:
                obj._handshake = handshake
                obj._outgoing = outgoing
        return obj

    def do_handshake(self) -> None:
        handshake = self._handshake
        if handshake is None:
            super().do_handshake()
            return
        if handshake.error is not None:  # the client wrote again before the close
            raise handshake.error
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as exc:
            outgoing = self._outgoing
            if outgoing is None or not outgoing.pending:
                raise  # nothing to tell the client (it hung up): fail as usual
            self._outgoing = None
            handshake.failed(exc, outgoing)
            raise ssl.SSLWantReadError(ssl.SSL_ERROR_WANT_READ, "alert pending") from None
        self._handshake = self._outgoing = None  # done: the connection keeps nothing of it
