"""The client side of the HTTP reverse proxy: one ``asyncio.Protocol`` per connection.

The connection moves bytes and keeps time; it decides nothing itself. For a host with
an access list or a rate limit it gathers the facts ``decide`` rules on: the list's
verdict on the client's address (once per host and address, not per request), a token
from the client's bucket, what the Authorization header is worth; and it knows who the
client is: the peer, or whom a trusted proxy names (PROXY header, X-Forwarded-For).

Bytes from the client go through the strict parser (``http1``); each request head
becomes an ``Exchange`` (``proxycore.exchange``) that carries out what ``decide`` says
for it, and the exchange writes the response back through the connection. The connection
owns framing (one exchange at a time; pipelined requests wait their turn, paused),
back-pressure (``pause_reading`` reasons), the timeouts watched by the node's sweep
(``check_deadlines``), and the errors that have no request: a malformed or late head.

Every callback here is called by the event loop (``connection_made``,
``data_received``, ...) or by the connection's exchange (``write``,
``exchange_done``, ...).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING, Final, cast

from proxycore import access, http1, proxyproto, responses, routing
from proxycore.access import AccessPolicy, TrustPolicy
from proxycore.config import HostRoute, Mode, RateLimit
from proxycore.decide import decide
from proxycore.exchange import Exchange
from proxycore.http1 import BodyData, MessageEnd, ParseError, RequestHead, Upgraded
from proxycore.ratelimit import HostLimiter
from proxycore.stats import UNMATCHED, HostStats

if TYPE_CHECKING:
    from proxycore.server import Listener, NodeState, ProxyNode

# What a connection is doing, as the node's sweep sees it (see check_deadlines).
IDLE: Final = 0  # no request, no byte of one
HEAD: Final = 1  # part of a request head has arrived
BODY: Final = 2  # reading a request body from the client
UPSTREAM: Final = 3  # waiting for the upstream


# Pieces of a response written together are joined up to this size (one TLS record
# holds 16 KiB); past it each goes to the transport as it is, without a copy.
JOIN_LIMIT: Final = 16384


class ClientConnection(asyncio.Protocol):
    def __init__(
        self, node: ProxyNode, listener: Listener, *,
        state: NodeState | None = None, sni_route: HostRoute | None = None,
        source: tuple[str, int] | None = None,
    ) -> None:
        self.node = node
        self.state: NodeState = state or node.state  # in-flight connections keep their snapshot
        self.listener = listener
        self.https = listener.https
        self.transport: asyncio.Transport | None = None  # set once the node has admitted it
        self.client_ip = ""  # the client's address: the peer's, or what a trusted proxy said
        self.client_key = -1  # client_ip as access.address_key
        self.peer_ip = ""
        self.source = source  # the client's (address, port) from an inbound PROXY header
        self.trust: TrustPolicy | None = None  # the listener trusts this peer's forwarding fields
        self.proxy_header: bytearray | None = None  # reading an inbound PROXY header (plain HTTP)
        self.sni_route = sni_route  # the host chosen by SNI (None: the default certificate)
        self.client_cert_lines = b""  # RFC 9440 field lines (CRLF-ended), once verified
        self.conn_stats: HostStats = node.stats.host(UNMATCHED)
        self.parser = http1.RequestParser(node.limits.max_head_size, node.limits.max_request_line)
        # The last Host of this connection and what it led to: clients repeat it.
        self.last_host: bytes | None = None
        self.last_route: HostRoute | None = None
        self.last_stats: HostStats = self.conn_stats
        self.forwarding = b""  # the X-Forwarded-*/Forwarded lines for last_host
        self.route_label = b"-"  # last_route's name, for the access log
        # last_route's access list and rate limit, and what they say of this client
        self.last_policy: AccessPolicy | None = None
        self.last_allowed = True
        self.last_limit: RateLimit | None = None
        self.last_limiter: HostLimiter | None = None
        self.verified: tuple[bytes, bytes] | None = None  # (list identity, Authorization value)
        self.slot: HostLimiter | None = None  # holds a per-client connection slot of this host
        self.slot_key = -1  # ... for this client address
        self.log_prefix = b""  # client address and listener, for the access log
        self.exchange: Exchange | None = None  # the request being served
        self.events: deque[RequestHead | BodyData | MessageEnd | Upgraded | ParseError] = deque()
        self.read_paused: set[str] = set()
        self.closing = False  # close once the current response is done
        self.closed = False
        self.parse_error: ParseError | None = None  # the parser refused the input: read no more
        # After a TLS handshake, start_tls hands decrypted bytes over before the node calls
        # connection_made; they wait here.
        self.early: list[bytes] | None = []
        # timeouts: no timer and no clock read per request. The node's sweep looks at each
        # connection a few times a second, and a timeout runs from the first sweep that saw
        # it in the same phase with the same progress (check_deadlines).
        self.exchanges = 0  # requests finished on this connection
        self.watch: tuple[int, int, int] | None = None  # (phase, exchanges, progress) last sweep
        self.watch_since = 0.0

    # ---- connection lifecycle (event loop) --------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        if self.closed:  # lost while the handshake task was still resuming
            return
        if not self.node.accept(self):
            # Refused: never counted, so connection_lost has nothing to take back.
            self.closed = True
            transport.abort()
            return
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0] if peer else ""
        trust = self.state.trust.get(self.listener.name) if self.state.trust else None
        if trust is not None and trust.trusts(self.peer_ip):
            self.trust = trust
            if trust.proxy_protocol and not self.https:  # (the acceptor reads it on HTTPS)
                self.proxy_header = bytearray()
        self.set_client(self.source[0] if self.source is not None else self.peer_ip)
        transport.set_write_buffer_limits(high=256 * 1024)
        if self.sni_route is not None:  # (the acceptor has counted the handshake)
            self.conn_stats = self.node.stats.host(self.sni_route.name)
            if not self.take_slot(self.sni_route, self.conn_stats):
                self.conn_stats.limited(self.client_ip, time.time())  # over its connections: refused
                self.closed = True
                self.node.forget(self)
                transport.abort()
                return
            if self.sni_route.mode is Mode.TCP:
                first_bytes, self.early = b"".join(self.early or ()), None
                self.node.start_l4(self, transport, self.sni_route, first_bytes)
                return
        self.conn_stats.active_connections += 1
        self.conn_stats.total_connections += 1
        self.last_stats = self.conn_stats
        early, self.early = self.early, None
        for data in early or ():
            self.data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        if self.transport is None:  # a failed TLS handshake: connection_made never ran
            return
        self.conn_stats.active_connections -= 1
        self.node.forget(self)
        self.give_slot()
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.abandon()
        self.events.clear()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        exchange = self.exchange
        if exchange is not None:
            exchange.drop_upstream()
        if self.transport is not None:
            self.transport.abort()

    # ---- flow control ---------------------------------------------------------------

    def pause_reading(self, reason: str) -> None:
        if not self.read_paused and self.transport is not None:
            self.transport.pause_reading()
        self.read_paused.add(reason)

    def resume_reading(self, reason: str) -> None:
        if reason in self.read_paused:
            self.read_paused.discard(reason)
            if not self.read_paused and self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()

    def pause_writing(self) -> None:
        """The client reads slower than the upstream sends: stop reading the upstream."""
        exchange = self.exchange
        if exchange is not None and exchange.upstream is not None and exchange.upstream.transport is not None:
            exchange.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        exchange = self.exchange
        if exchange is not None and exchange.upstream is not None and exchange.upstream.transport is not None:
            exchange.upstream.transport.resume_reading()

    # ---- bytes from the client ------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.early is not None:
            self.early.append(data)
            return
        if self.parse_error is not None:
            return  # the parser is dead; the connection closes once the error is answered
        if self.proxy_header is not None:
            data = self.read_proxy_header(data)
            if not data:
                return
        exchange = self.exchange
        if exchange is not None:
            exchange.stats.bytes_in += len(data)
            if exchange.tunnel:
                if exchange.upstream is not None:
                    exchange.upstream.write(data)
                return
        else:
            self.last_stats.bytes_in += len(data)
        try:
            events = self.parser.feed(data)
        except ParseError as exc:
            # Pipelined requests ahead of the bad one are served first, in order; the
            # error takes the bad request's place in the queue.
            self.parse_error = exc
            self.events.extend(exc.events)  # type: ignore[arg-type]  # (requests' events)
            self.events.append(exc)
            self.process_events()
            return
        if (exchange is None and not self.events and len(events) == 2
                and isinstance(events[1], MessageEnd)):
            head = events[0]
            if isinstance(head, RequestHead):
                # The usual request: one body-less head, nothing queued before it.
                exchange = self.start_request(head)
                if not exchange.done and not self.closed:
                    exchange.request_end()
                return
        self.events.extend(events)
        self.process_events()

    def process_events(self) -> None:
        events = self.events
        while events and not self.closed:
            event = events[0]
            exchange = self.exchange
            if isinstance(event, RequestHead):
                if exchange is not None:  # pipelined: wait for the current response
                    self.pause_reading("pipeline")
                    return
                events.popleft()
                self.start_request(event)
            elif isinstance(event, BodyData):
                events.popleft()
                if exchange is not None:
                    exchange.request_body(event.data)
            elif isinstance(event, MessageEnd):
                events.popleft()
                if exchange is not None:
                    exchange.request_end()
            elif isinstance(event, Upgraded):
                events.popleft()
                if exchange is not None:
                    exchange.request_upgraded(event.rest)
            else:
                if exchange is not None and exchange.request_done:  # a later request went bad
                    self.pause_reading("pipeline")
                    return
                events.popleft()
                self.parse_failed(event)

    def parse_failed(self, exc: ParseError) -> None:
        exchange = self.exchange
        if exchange is None:  # a bad head: no exchange, answered from here
            self.last_stats.requests += 1
            self.send_error(exc.status, self.sni_route)
            return
        if exchange.response is not None:
            self.abort()  # the response started: never splice an error page into it
            return
        # The body of a request went bad, possibly after its head was forwarded: the
        # upstream connection holds an unfinished request and is closed, never pooled.
        exchange.drop_upstream()
        exchange.send_local(exc.status, exchange.route, close=True)

    # ---- one request ----------------------------------------------------------------

    def start_request(self, head: RequestHead) -> Exchange:
        if self.trust is not None:
            self.forwarded_client(head, self.trust)
        host = head.host
        if host == self.last_host:  # the usual case: the same host as the last request
            route = self.last_route
            stats = self.last_stats
        else:
            route = routing.lookup_route(self.state.routes, routing.host_name(host))
            stats = self.node.stats.host(route.name) if route is not None else self.conn_stats
            self.last_host, self.last_route, self.last_stats = host, route, stats
            self.forwarding = routing.forwarding_lines(self.client_ip, host, https=self.https)
            self.route_label = route.name.encode("utf-8", "replace") if route is not None else b"-"
            self.route_guards(route, stats)
        stats.requests += 1
        exchange = self.exchange = Exchange(self, head, route, stats)
        policy = self.last_policy
        limit = self.last_limit
        if policy is None and limit is None:
            exchange.start(decide(head, route, self.sni_route, https=self.https,
                                  https_port=self.node.https_port))
            return exchange
        retry_after = 0
        if limit is not None and self.last_limiter is not None:
            if self.slot is None and not self.https and not self.take_slot(route, stats, limit):
                self.closing = True
                retry_after = 1  # over the connection limit on plain HTTP: 429, then close
            else:
                retry_after = self.last_limiter.take(limit, self.client_key, exchange.started_at)
        credentials = 0
        if policy is not None and policy.users:
            value = access.authorization(head.raw)
            exchange.authorization = value
            verified = self.verified
            known = verified[1] if verified is not None and verified[0] == policy.identity else None
            credentials = access.credential_state(policy, value, known)
        exchange.start(decide(
            head, route, self.sni_route, https=self.https, https_port=self.node.https_port,
            policy=policy, address_allowed=self.last_allowed, credentials=credentials,
            retry_after=retry_after,
        ))
        return exchange

    # ---- the client's address, access lists and limits --------------------------------

    def set_client(self, ip: str) -> None:
        self.client_ip = ip
        self.client_key = access.address_key(ip)
        self.log_prefix = b"%s %s" % (ip.encode("ascii", "replace"), self.listener.name.encode("ascii"))
        self.last_host = None  # forwarding lines and access verdicts are the client's: made again

    def forwarded_client(self, head: RequestHead, trust: TrustPolicy) -> None:
        """A trusted proxy's request: its X-Forwarded-For / Forwarded name the client."""
        if self.source is not None:
            return  # a PROXY header said who the client is, once for the connection
        ip = access.forwarded_client(head.noted, trust) or self.peer_ip
        if ip != self.client_ip:
            self.set_client(ip)

    def route_guards(self, route: HostRoute | None, stats: HostStats) -> None:
        """The access list and rate limit of ``route``, and the client address's verdict."""
        policy = self.state.policies.get(route.name) if route is not None and self.state.policies else None
        self.last_policy = policy
        self.last_allowed = policy.table.allows(self.client_key) if policy is not None else True
        limit = route.rate_limit if route is not None else None
        self.last_limit = limit
        self.last_limiter = (
            self.node.limiters.host(route.name) if limit is not None and route is not None else None)

    def take_slot(self, route: HostRoute | None, stats: HostStats, limit: RateLimit | None = None) -> bool:
        """Count this connection against ``route``'s per-client connection limit; False: over it.
        A trusted proxy's connection without a PROXY header carries many clients' requests:
        it is the proxy's, counted against nobody."""
        if route is None or (self.trust is not None and self.source is None):
            return True
        limit = limit or route.rate_limit
        if limit is None or not limit.connections_per_client:
            return True
        limiter = self.node.limiters.host(route.name)
        if not limiter.connect(limit, self.client_key):
            return False
        self.slot, self.slot_key = limiter, self.client_key
        return True

    def give_slot(self) -> None:
        slot, self.slot = self.slot, None
        if slot is not None:
            slot.disconnect(self.slot_key)

    def client_source(self) -> tuple[str, int] | None:
        """The client's (address, port) for a PROXY header upstream; None: the peer's own."""
        if self.source is not None or self.client_ip == self.peer_ip or self.transport is None:
            return self.source
        peer = self.transport.get_extra_info("peername")
        return (self.client_ip, peer[1] if peer else 0)

    def authenticated(self, policy: AccessPolicy, value: bytes) -> None:
        """The exchange verified ``value`` for ``policy``: the rest of the connection skips it."""
        self.verified = (policy.identity, value)

    def read_proxy_header(self, data: bytes) -> bytes:
        """Bytes of a trusted peer's connection before its PROXY header is whole: b"" until
        then, after it the rest. A peer that sends anything else gets 400."""
        buffer = self.proxy_header
        assert buffer is not None
        buffer += data
        try:
            parsed = proxyproto.parse_header(bytes(buffer))
        except proxyproto.BadProxyHeader:
            self.proxy_header = None
            self.parse_error = http1.ParseError(400, "bad PROXY header")
            self.send_error(400, None)
            return b""
        if parsed is None:
            return b""
        source, length = parsed
        self.proxy_header = None
        if source is not None:
            self.source = source
            self.set_client(source[0])
        return bytes(buffer[length:])

    def exchange_done(self, exchange: Exchange) -> None:
        """The exchange is over (response sent, request read): serve the next one, or close."""
        if exchange is not self.exchange:
            return
        self.exchange = None
        self.exchanges += 1
        if exchange.close_after or self.closing or self.node.stopping:
            self.close()
            return
        if self.read_paused:
            self.resume_reading("pipeline")
        if self.events:
            self.process_events()

    def tunnel_started(self, exchange: Exchange) -> None:
        """After a 101: client bytes that came after the upgrade request go upstream as they are."""
        while self.events:
            event = self.events.popleft()
            if isinstance(event, Upgraded) and event.rest and exchange.upstream is not None:
                exchange.upstream.write(event.rest)
        self.resume_reading("upgrade")

    def log_access(self, exchange: Exchange, status: int, elapsed: float) -> None:
        log = self.node.access_log
        if log is not None:
            pool = exchange.pool
            log.request(self.log_prefix, self.route_label if exchange.route is not None else b"-",
                        exchange.request, status, exchange.response_bytes, elapsed,
                        pool.label if pool is not None else b"-")

    # ---- errors without a request ------------------------------------------------------

    def send_error(self, status: int, route: HostRoute | None) -> None:
        """Answer a head that never made a request (malformed, too late), then close."""
        hsts = route.hsts if route is not None else None
        data, _ = responses.render(status, hsts=hsts, https=self.https, close=True)
        self.write(data)
        self.last_stats.response(status)
        log = self.node.access_log
        if log is not None:
            log.no_request(self.log_prefix, status)
        self.close()

    # ---- timers and helpers ---------------------------------------------------------

    def check_deadlines(self, now: float) -> None:
        """Called by the node's sweep: act on a timeout that has run out.

        A connection is idle, reading a head, reading a request body, or waiting for
        its upstream. Each phase has its timeout, counted from the first sweep that saw
        the connection in that phase with the same progress (requests finished, body
        bytes read, upstream reads): so a timeout fires up to two sweep intervals late,
        and nothing on the hot path reads a clock for it. A body the proxy is not
        reading (paused for back-pressure) is the upstream's to wait for, not the client's.
        """
        if self.closed or self.transport is None:
            return
        exchange = self.exchange
        if exchange is None:
            reading = self.parser.in_head or self.proxy_header is not None
            watch = (HEAD if reading else IDLE, self.exchanges, 0)
        elif exchange.tunnel:
            self.watch = None
            return
        elif exchange.reading_body() and not self.read_paused:
            watch = (BODY, self.exchanges, exchange.body_received)
        elif exchange.awaiting_upstream:
            watch = (UPSTREAM, self.exchanges, exchange.upstream_reads)
        else:
            self.watch = None
            return
        if watch != self.watch:
            self.watch, self.watch_since = watch, now
            return
        waited = now - self.watch_since
        phase = watch[0]
        limits = self.node.limits
        if phase == IDLE:
            if waited >= limits.idle_timeout:
                self.close()
        elif phase == HEAD:
            if waited >= limits.head_timeout:
                self.send_error(408, self.sni_route)
        elif exchange is None:
            return
        elif phase == BODY:
            if waited >= limits.body_timeout:
                self.body_timed_out(exchange)
        elif exchange.route is not None and waited >= exchange.route.upstream.read_timeout:
            exchange.upstream_timed_out()

    def body_timed_out(self, exchange: Exchange) -> None:
        """The client stopped sending its request body: it is the client's timeout (408)."""
        if exchange.response is not None:
            if exchange.discard_body:
                self.close()  # answered already; only the unread body is left
            else:
                self.abort()
            return
        exchange.drop_upstream()
        exchange.send_local(408, exchange.route, close=True)

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            exchange = self.exchange
            (exchange.stats if exchange is not None else self.last_stats).bytes_out += len(data)
            transport.write(data)

    def write_out(self, pieces: list[bytes]) -> None:
        """``pieces`` in order, as one write: small ones joined (one TLS record), large ones
        handed over as they are (a copy of a 256 KiB body read costs more than a record)."""
        if len(pieces) == 1:
            self.write(pieces[0])
            return
        size = 0
        for piece in pieces:
            size += len(piece)
        if size <= JOIN_LIMIT:
            self.write(b"".join(pieces))
            return
        transport = self.transport
        if transport is not None and not transport.is_closing():
            exchange = self.exchange
            (exchange.stats if exchange is not None else self.last_stats).bytes_out += size
            transport.writelines(pieces)

    @property
    def busy(self) -> bool:
        """A request or a tunnel is in progress (what a graceful stop waits for)."""
        return not self.closed and self.exchange is not None

    def stop_gracefully(self) -> None:
        """The node is stopping: close now if idle, else after the current response."""
        self.closing = True
        if self.exchange is None:
            self.close()
