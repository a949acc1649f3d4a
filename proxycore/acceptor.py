"""TLS acceptance on the HTTPS listener: from the first byte to a connection with a host.

A new connection is a ``TLSAcceptor`` until its ClientHello has been read. The
acceptor refuses it at once when the listener is full (before any handshake work),
reads the ClientHello itself (``proxycore.clienthello``), picks the host by SNI
(``tls.lookup``) and starts TLS with that host's own ``SSLContext``
(``loop.start_tls``), so that verify mode and session resumption stay per host.
A ClientHello naming no known host gets ``unrecognized_name`` (strict SNI, or no
default certificate), and plain HTTP on this port a plain 400. A ClientHello that
offers only ALPN ``acme-tls/1`` is an ACME tls-alpn-01 validation: it gets the
challenge certificate for its name (``proxycore.acmealpn``), never a host's. A trusted
proxy's PROXY header, when its listener wants one, is read before the ClientHello; an
address the host's access list denies outright (a list without users), or a client
already holding all its connections, is refused once the host is known, before any
handshake work (``refused_early``). Every failed
handshake is counted by reason, and a handshake OpenSSL refuses ends with the alert
OpenSSL wrote (``proxycore.tlsalert``).

After the handshake the connection is a ``ClientConnection`` (HTTP) or, for a TCP
host, an ``L4Pipe``.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

from proxycore import access, acmealpn, proxyproto, responses, tls
from proxycore.client import ClientConnection
from proxycore.clientcert import client_cert_headers
from proxycore.clienthello import (
    ALERT_DECODE_ERROR,
    ALERT_UNRECOGNIZED_NAME,
    ClientHello,
    NotTLS,
    parse_client_hello,
)
from proxycore.config import ClientAuthMode, HostRoute
from proxycore.stats import UNMATCHED
from proxycore.tlsalert import Handshake

if TYPE_CHECKING:
    from proxycore.server import Listener, ProxyNode

log = logging.getLogger("proxycore")

# How long a closing TLS connection waits for the client's close_notify.
TLS_SHUTDOWN_TIMEOUT = 5.0

# A fatal access_denied alert (RFC 8446 §6.2): what an address the host's list refuses gets.
ALERT_ACCESS_DENIED = b"\x15\x03\x03\x00\x02\x02\x31"

PLAIN_HTTP_ON_HTTPS, _ = responses.render(
    400, hsts=None, https=False, close=True, body=b"400 Bad Request: this port speaks HTTPS, not HTTP.\n",
)


class TLSAcceptor(asyncio.Protocol):
    """A new connection on the HTTPS listener until its ClientHello has been read.

    Called by the event loop. It reads bytes until the ClientHello is whole, picks
    the host by SNI, and hands the bytes to the TLS protocol that takes over. While
    it lasts, and through the handshake, it holds one of the listener's connection
    slots (``Listener.handshaking``).
    """

    def __init__(self, node: ProxyNode, listener: Listener) -> None:
        self.node = node
        self.listener = listener
        self.transport: asyncio.Transport
        self.buffer = bytearray()
        self.started = False  # past the ClientHello (or refused): read no more here
        self.holds_slot = False
        self.deadline = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.client_ip = ""  # the peer, or the client a trusted proxy's PROXY header named
        self.source: tuple[str, int] | None = None  # that PROXY header's client address
        self.proxied = False  # the peer is a trusted proxy: its clients are known later
        self.proxy_pending = False  # a PROXY header is due before the ClientHello

    # ---- event loop callbacks ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if not self.node.admit(self.listener):
            # Full: refuse before spending a handshake (or a byte of buffer) on it.
            self.started = True
            self.transport.close()
            return
        self.holds_slot = True
        self.listener.handshaking += 1
        peer = self.transport.get_extra_info("peername")
        self.client_ip = peer[0] if peer else ""
        trust = self.node.state.trust.get(self.listener.name) if self.node.state.trust else None
        if trust is not None and trust.trusts(self.client_ip):
            self.proxied = True
            self.proxy_pending = trust.proxy_protocol
        loop = self.node.loop
        self.deadline = loop.time() + self.node.limits.handshake_timeout
        self.timer = loop.call_at(self.deadline, self.timed_out)

    def data_received(self, data: bytes) -> None:
        if self.started:
            if self.holds_slot:
                self.buffer += data  # read before start_tls took the transport over: handed over
            return
        self.buffer += data
        if self.proxy_pending and not self.read_proxy_header():
            return
        try:
            hello = parse_client_hello(bytes(self.buffer))
        except NotTLS as exc:
            self.node.stats.host(UNMATCHED).handshakes_failed["http_request" if exc.http else "not_tls"] += 1
            self.refuse(PLAIN_HTTP_ON_HTTPS if exc.http else ALERT_DECODE_ERROR)
            return
        if hello is None:
            return
        self.started = True
        self.stop_timer()
        self.transport.pause_reading()
        self.begin(hello)

    def read_proxy_header(self) -> bool:
        """A trusted proxy's PROXY header ahead of the ClientHello: True once it has been
        read (and taken out of the buffer), False while incomplete or when refused."""
        try:
            parsed = proxyproto.parse_header(bytes(self.buffer))
        except proxyproto.BadProxyHeader:
            self.node.stats.host(UNMATCHED).handshakes_failed["bad_proxy_header"] += 1
            self.refuse(b"")
            return False
        if parsed is None:
            return False
        source, length = parsed
        del self.buffer[:length]
        self.proxy_pending = False
        if source is not None:
            self.source = source
            self.client_ip = source[0]
            self.proxied = False  # the client is known now: its address rules apply here
        return bool(self.buffer)

    def refused_early(self, route: HostRoute) -> bool:
        """The host's access list denies this address outright (no users to ask for a
        password), or the client holds all its connections: refuse before the handshake."""
        if self.proxied:
            return False  # a trusted proxy's clients are named in their requests
        state = self.node.state
        policy = state.policies.get(route.name) if state.policies else None
        key = access.address_key(self.client_ip)
        if policy is not None and policy.refuse_early and not policy.table.allows(key):
            self.node.stats.host(route.name).denied += 1
            self.refuse(ALERT_ACCESS_DENIED)
            return True
        limit = route.rate_limit
        if limit is not None and limit.connections_per_client and (
                self.node.limiters.host(route.name).at_limit(limit, key)):
            self.node.stats.host(route.name).limited(self.client_ip, time.time())
            self.refuse(b"")
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.started:
            self.started = True
            self.node.stats.host(UNMATCHED).handshakes_failed["eof"] += 1
        self.done()

    def timed_out(self) -> None:
        self.timer = None
        if not self.started:
            self.node.stats.host(UNMATCHED).handshakes_failed["timeout"] += 1
            self.started = True
            self.transport.abort()
            self.done()

    # ---- the handshake ---------------------------------------------------------------

    def begin(self, hello: ClientHello) -> None:
        """The ClientHello is in: pick the host by SNI and start TLS with its own context."""
        node = self.node
        state = node.state
        if acmealpn.wants_challenge(hello.alpn):
            self.answer_challenge(hello.server_name, state.acme_alpn)
            return
        route, context = tls.lookup(state.sni, hello.server_name)
        if context is None:
            if route is None:
                node.stats.host(UNMATCHED).handshakes_failed["unknown_sni"] += 1
            else:  # a known host with no certificate yet: never another host's certificate
                node.stats.host(route.name).handshakes_failed["no_certificate"] += 1
            self.refuse(ALERT_UNRECOGNIZED_NAME)
            return
        if route is not None and self.refused_early(route):
            return
        conn = ClientConnection(node, self.listener, state=state, sni_route=route, source=self.source)
        node.track(node.loop.create_task(self.handshake(conn, context)))
        # start_tls swaps the transport's protocol in the task's first step, which runs
        # before this callback (FIFO); the TLS protocol then reads the ClientHello we hold.
        node.loop.call_soon(self.hand_over)

    async def handshake(self, conn: ClientConnection, context: ssl.SSLContext) -> None:
        tls_transport = await self.start_tls(conn, context, lambda exc: self.count_failure(conn, exc))
        if tls_transport is not None:
            record_handshake(self.node, conn, tls_transport)
            conn.connection_made(tls_transport)

    async def start_tls(
        self, protocol: asyncio.Protocol, context: ssl.SSLContext, failed: Callable[[BaseException], None],
    ) -> asyncio.Transport | None:
        """The handshake with ``context``; the TLS transport, or None when it failed (counted
        by ``failed``, the connection closed). Either way the listener slot is given back:
        a connection that comes out of it counts among the listener's connections."""
        node = self.node
        transport = self.transport
        timeout = max(0.1, self.deadline - node.loop.time())
        # The SSLObject start_tls creates next for this context sends OpenSSL's alert if
        # the handshake fails, counted here first (proxycore.tlsalert).
        pending = Handshake.expect(context, transport, node.loop, failed)
        try:
            tls_transport = await node.loop.start_tls(
                transport, protocol, context, server_side=True, ssl_handshake_timeout=timeout,
                ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT,
            )
        except asyncio.CancelledError:
            self.done()
            transport.abort()
            raise
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            if pending.error is None:  # else counted when its alert was written
                failed(exc)
            self.failed()
            return None
        finally:
            pending.forget()
        if pending.error is not None:  # refused, the alert sent, the connection closed
            self.failed()
            return None
        self.done()
        return tls_transport

    def answer_challenge(self, server_name: str | None, challenges: Mapping[str, ssl.SSLContext]) -> None:
        """An ACME tls-alpn-01 validation: the challenge certificate, then close (acmealpn)."""
        context = challenges.get(server_name or "")  # (clienthello normalised it)
        if context is None:
            self.node.stats.host(UNMATCHED).handshakes_failed["no_acme_challenge"] += 1
            self.refuse(acmealpn.ALERT_NO_APPLICATION_PROTOCOL)
            return
        node = self.node
        node.track(node.loop.create_task(self.validation_handshake(server_name or "", context)))
        node.loop.call_soon(self.hand_over)

    async def validation_handshake(self, name: str, context: ssl.SSLContext) -> None:
        def failed(exc: BaseException) -> None:
            self.node.stats.host(UNMATCHED).handshakes_failed[tls.handshake_failure_reason(exc)] += 1

        tls_transport = await self.start_tls(asyncio.Protocol(), context, failed)
        if tls_transport is not None:
            log.info("answered the ACME tls-alpn-01 challenge for %s", name)
            tls_transport.close()  # RFC 8737 §3: the handshake is the whole answer

    def hand_over(self) -> None:
        """Give the bytes read so far to the TLS protocol that now owns the transport."""
        if not self.buffer or self.transport.is_closing():
            return
        protocol: Any = self.transport.get_protocol()
        data = memoryview(bytes(self.buffer))
        self.buffer.clear()
        while data:
            if hasattr(protocol, "get_buffer"):  # both loops' SSLProtocol are buffered
                buffer = protocol.get_buffer(len(data))
                n = min(len(buffer), len(data))
                buffer[:n] = data[:n]
                protocol.buffer_updated(n)
            else:
                n = len(data)
                protocol.data_received(bytes(data))
            data = data[n:]

    def count_failure(self, conn: ClientConnection, exc: BaseException) -> None:
        route = conn.sni_route
        reason = tls.handshake_failure_reason(exc)
        self.node.stats.host(route.name if route is not None else UNMATCHED).handshakes_failed[reason] += 1

    def failed(self) -> None:
        """The handshake failed (and was counted): free the slot, make sure the connection is gone."""
        self.done()
        if not self.transport.is_closing():
            self.transport.abort()

    # ---- helpers --------------------------------------------------------------------

    def refuse(self, reply: bytes) -> None:
        self.started = True
        self.stop_timer()
        if reply:
            self.transport.write(reply)
        self.transport.close()
        self.done()

    def done(self) -> None:
        """Give the listener slot back (once)."""
        self.stop_timer()
        if self.holds_slot:
            self.holds_slot = False
            self.listener.handshaking -= 1

    def stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


def record_handshake(node: ProxyNode, conn: ClientConnection, transport: asyncio.BaseTransport) -> None:
    """Count a finished handshake, and note the client certificate it verified."""
    ssl_object = transport.get_extra_info("ssl_object")
    stats = conn.listener.stats
    if ssl_object is not None:
        stats.tls_versions[ssl_object.version() or "?"] += 1
        if ssl_object.session_reused:
            stats.resumed_sessions += 1
        cipher = ssl_object.cipher()
        stats.ciphers[cipher[0] if cipher else "?"] += 1
    route = conn.sni_route
    node.stats.host(route.name if route is not None else UNMATCHED).handshakes_ok += 1
    if route is not None and route.client_auth.mode is not ClientAuthMode.OFF and ssl_object:
        # The TLS layer verified it against this host's CA bundle: the only way in.
        der = ssl_object.getpeercert(binary_form=True)
        headers = client_cert_headers(der, route.client_auth)
        conn.client_cert_lines = b"".join(b"%s: %s\r\n" % field for field in headers)
