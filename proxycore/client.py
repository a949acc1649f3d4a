"""The client side of the HTTP reverse proxy: one ``asyncio.Protocol`` per connection.

Bytes from the client go through the strict parser (``http1``); each request is
routed (``routing``), forwarded to an upstream connection taken from the pool
(``upstream``), and the response is streamed back with its headers rewritten.
Bodies are streamed both ways with back-pressure, never buffered whole. One
request is served at a time; pipelined requests wait their turn.

Every callback here is called by the event loop (``connection_made``,
``data_received``, ...) or by the upstream connection this request owns
(``upstream_data``, ``upstream_lost``, ...).
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

from proxycore import health, http1, proxyproto, responses, routing, tls
from proxycore.config import HostRoute, Mode, ProxyProtocol
from proxycore.http1 import BodyData, Framing, MessageEnd, ParseError, RequestHead, ResponseHead, Upgraded
from proxycore.stats import LATENCY_BUCKETS, UNMATCHED, HostStats
from proxycore.upstream import TargetPool, UpstreamConnection

if TYPE_CHECKING:
    from proxycore.server import Listener, NodeState, ProxyNode

ACME_PREFIX = b"/.well-known/acme-challenge/"
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

# Enum members and module functions bound once: the hot path runs per request.
_TCP = Mode.TCP
_PP_OFF = ProxyProtocol.OFF
_F_NONE, _F_LENGTH, _F_CHUNKED = Framing.NONE, Framing.LENGTH, Framing.CHUNKED
_F_UNTIL_CLOSE = Framing.UNTIL_CLOSE
_monotonic = time.monotonic
_encode_chunk = http1.encode_chunk
_bisect = bisect.bisect_left
_LAST_CHUNK = http1.LAST_CHUNK
_CHUNKED_LINE = b"transfer-encoding: chunked\r\n"
_CLOSE_LINE = b"connection: close\r\n"

# What a connection is doing, as the node's sweep sees it (see check_deadlines).
_IDLE, _HEAD, _UPSTREAM = range(3)


class ClientConnection(asyncio.Protocol):
    def __init__(
        self, node: ProxyNode, listener: Listener, *,
        state: NodeState | None = None, sni_route: HostRoute | None = None,
    ) -> None:
        # per-connection
        self.node = node
        self.state: NodeState = state or node.state  # in-flight connections keep their snapshot
        self.listener = listener
        self.https = listener.https
        self.transport: asyncio.Transport | None = None
        self.client_ip = ""
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
        self.log_prefix = b""  # client address and listener, for the access log
        self.events: deque[object] = deque()
        self.read_paused: set[str] = set()
        self.closing = False  # close once the current response is done
        self.closed = False
        self.parse_error: ParseError | None = None  # the parser refused the input: read no more
        # After a TLS handshake, start_tls hands decrypted bytes over before the node calls
        # connection_made; they wait here.
        self.early: list[bytes] | None = []

        # per-request
        self.request: RequestHead | None = None
        self.route: HostRoute | None = None
        self.stats: HostStats = self.conn_stats
        self.upstream: UpstreamConnection | None = None
        self.pool: TargetPool | None = None
        self.upstream_head = b""
        self.awaiting_upstream = False  # a request went upstream and its response is not over
        self.pending_body: list[bytes] = []
        self.pending_size = 0
        self.body_received = 0
        self.request_done = False
        self.response: ResponseHead | None = None
        self.response_parser: http1.ResponseParser | None = None  # the upstream connection's
        self.response_chunked = False
        self.response_close = False
        self.response_bytes = 0
        self.status = 0
        self.started_at = 0.0
        self.reused_upstream = False
        self.retried = False
        self.tunnel = False
        self.discard_request = False
        # timeouts
        # No timer and no clock read per request: the node's sweep looks at each connection
        # a few times a second, and a timeout runs from the first sweep that saw the
        # connection in the same phase with the same progress count (check_deadlines).
        self.exchanges = 0  # requests finished on this connection
        self.upstream_reads = 0  # reads from the upstream (and attaches) for this connection
        self.watch: tuple[int, int] | None = None  # (phase, progress) at the last sweep
        self.watch_since = 0.0

    # ---- connection lifecycle (event loop) --------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        if self.closed:  # lost while the handshake task was still resuming
            return
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0] if peer else ""
        self.log_prefix = b"%s %s" % (self.client_ip.encode("ascii"), self.listener.name.encode("ascii"))
        if not self.node.accept(self):
            transport.abort()
            return
        transport.set_write_buffer_limits(high=256 * 1024)
        if self.https:
            self.node.tls_accepted(self, transport)
            if self.sni_route is not None:
                self.conn_stats = self.node.stats.host(self.sni_route.name)
                if self.sni_route.mode is Mode.TCP:
                    first_bytes, self.early = b"".join(self.early or ()), None
                    self.node.start_l4(self, transport, self.sni_route, first_bytes)
                    return
        self.conn_stats.active_connections += 1
        self.conn_stats.total_connections += 1
        self.stats = self.last_stats = self.conn_stats
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
        self.awaiting_upstream = False
        if self.upstream is not None:
            self.release_upstream(reusable=False)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

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
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.resume_reading()

    def upstream_pause_writing(self) -> None:
        self.pause_reading("upstream")

    def upstream_resume_writing(self) -> None:
        self.resume_reading("upstream")

    # ---- bytes from the client ------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.early is not None:
            self.early.append(data)
            return
        if self.parse_error is not None:
            return  # the parser is dead; the connection closes once the error is answered
        self.stats.bytes_in += len(data)
        if self.tunnel:
            if self.upstream is not None:
                self.upstream.write(data)
            return
        try:
            events = self.parser.feed(data)
        except ParseError as exc:
            # Pipelined requests ahead of the bad one are served first, in order; the
            # error takes the bad request's place in the queue.
            self.parse_error = exc
            self.events.extend(exc.events)
            self.events.append(exc)
            self.process_events()
            return
        if (not self.events and self.request is None and len(events) == 2
                and type(events[0]) is RequestHead and type(events[1]) is MessageEnd):
            # The usual request: one body-less head, nothing queued before it.
            self.start_request(events[0])
            if not self.closed:
                self.request_end()
            return
        self.events.extend(events)
        self.process_events()

    def process_events(self) -> None:
        events = self.events
        while events and not self.closed:
            event = events[0]
            kind = type(event)  # not isinstance: the hot path, and events are final classes
            if kind is RequestHead:
                if self.request is not None:  # pipelined: wait for the current response
                    self.pause_reading("pipeline")
                    return
                events.popleft()
                self.start_request(event)  # type: ignore[arg-type]
            elif kind is BodyData:
                events.popleft()
                self.request_body(event.data)  # type: ignore[attr-defined]
            elif kind is MessageEnd:
                events.popleft()
                self.request_end()
            elif isinstance(event, Upgraded):
                events.popleft()
                self.client_upgraded(event.rest)
            elif isinstance(event, ParseError):
                if self.request is not None and self.request_done:  # a later request went bad
                    self.pause_reading("pipeline")
                    return
                events.popleft()
                self.parse_failed(event)
            else:
                events.popleft()

    def parse_failed(self, exc: ParseError) -> None:
        route = self.route or self.sni_route
        if self.request is None:  # a bad head; a bad body's request was counted at its head
            self.stats.requests += 1
        if self.response is not None:
            self.abort()  # the response started: never splice an error page into it
            return
        # The body of a request went bad, possibly after its head was forwarded: the
        # upstream connection holds an unfinished request and is closed, never pooled.
        self.drop_upstream()
        self.send_local(exc.status, route, close=True)

    # ---- one request ----------------------------------------------------------------

    def start_request(self, head: RequestHead) -> None:
        self.request = head
        self.started_at = _monotonic()
        self.request_done = False
        host = head.host
        if host == self.last_host:  # the usual case: the same host as the last request
            route = self.last_route
            self.stats = stats = self.last_stats
        else:
            route = routing.lookup_route(self.state.routes, routing.host_name(host))
            stats = self.node.stats.host(route.name) if route is not None else self.conn_stats
            self.last_host, self.last_route, self.last_stats, self.stats = host, route, stats, stats
            self.forwarding = routing.forwarding_lines(self.client_ip, host, https=self.https)
            self.route_label = route.name.encode("utf-8", "replace") if route is not None else b"-"
        self.route = route
        stats.requests += 1
        if self.https:
            sni_route = self.sni_route
            if route is None or (sni_route is not None and route is not sni_route) or route.mode is _TCP:
                self.local_response(421, sni_route)
                return
        else:
            if head.target.startswith(ACME_PREFIX):
                self.acme_response(head.target[len(ACME_PREFIX):])
                return
            if route is None or route.mode is _TCP:
                self.local_response(421, None)
                return
            if route.redirect.enabled:
                location = routing.redirect_location(head.host, head.target, self.node.https_port)
                self.local_response(route.redirect.status, None, extra=[(b"location", location)])
                return
        limit = route.max_body_size
        if limit and head.framing is _F_LENGTH and head.content_length > limit:
            self.local_response(413, route)
            return
        pool = self.state.balancers[route.upstream.name].pick()
        if pool is None:
            self.local_response(503, route)
            return
        added = self.forwarding + self.client_cert_lines if route is self.sni_route else self.forwarding
        self.upstream_head = routing.upstream_request_head(head, added)
        self.pool = pool
        self.connect_upstream(pool)

    def connect_upstream(self, pool: TargetPool) -> None:
        # A connection that starts with a PROXY header speaks for one client only: never shared.
        private = self.route is not None and self.route.proxy_protocol is not _PP_OFF
        conn = None if private else pool.take_idle()
        if conn is not None:
            self.attach(conn, reused=True)
            return
        task = self.node.loop.create_task(self.open_upstream(pool, self.request))
        self.node.track(task)

    async def open_upstream(self, pool: TargetPool, request: RequestHead | None) -> None:
        assert self.route is not None
        try:
            conn = await pool.connect(self.route.upstream.connect_timeout)
        except TimeoutError:
            if self.request is request and not self.closed:
                self.connect_failed(pool, "connect_timeout", 504, "connect timed out")
            return
        except OSError as exc:
            if self.request is request and not self.closed:
                self.node.log_upstream_error(pool, exc)
                kind = tls.upstream_connect_failure(exc)
                self.connect_failed(pool, kind, 502, health.describe_error(exc))
            return
        if self.request is not request or self.closed:
            pool.give_back(conn, reusable=not self.closed)
            return
        self.attach(conn, reused=False)

    def connect_failed(self, pool: TargetPool, kind: str, status: int, error: str) -> None:
        """No connection to ``pool``: tell its health, then try another target or answer ``status``."""
        assert self.route is not None
        self.node.health.request_failed(pool, self.route.upstream, error)
        other = self.retry_target(pool)
        if other is None:
            self.upstream_failed(kind, status, passive=False)
            return
        self.stats.upstream_errors[kind] += 1
        self.node.stats.upstream(self.route.upstream.name).retries += 1
        self.retried = True
        self.pool = other
        self.connect_upstream(other)

    def retry_target(self, failed: TargetPool) -> TargetPool | None:
        """Nothing reached the upstream: an idempotent request without a body may go elsewhere, once."""
        request = self.request
        if (self.retried or request is None or self.route is None
                or request.method not in IDEMPOTENT or request.framing is not Framing.NONE):
            return None
        return self.state.balancers[self.route.upstream.name].pick(exclude=failed)

    def attach(self, conn: UpstreamConnection, reused: bool) -> None:
        assert self.request is not None
        self.upstream = conn
        self.reused_upstream = reused
        conn.owner = self
        parser = self.response_parser = conn.parser
        parser.expect(self.request.method)
        data = self.upstream_head
        if not reused and self.route is not None and self.route.proxy_protocol is not _PP_OFF:
            data = self.proxy_header() + data
        if self.pending_body:
            data += b"".join(self.pending_body)
            self.pending_body.clear()
            self.pending_size = 0
        conn.write(data)
        if self.read_paused:
            self.resume_reading("connect")
        self.awaiting_upstream = True
        self.upstream_reads += 1

    def proxy_header(self) -> bytes:
        assert self.transport is not None and self.route is not None
        src = self.transport.get_extra_info("peername")
        dst = self.transport.get_extra_info("sockname")
        if self.route.proxy_protocol is ProxyProtocol.V1:
            return proxyproto.encode_v1(src[:2], dst[:2])
        return proxyproto.encode_v2(src[:2], dst[:2])

    def request_body(self, data: bytes) -> None:
        if self.discard_request or self.request is None:
            return
        self.body_received += len(data)
        limit = self.route.max_body_size if self.route is not None else 0
        if limit and self.body_received > limit:
            if self.response is None:
                self.drop_upstream()
                self.local_response(413, self.route)
            else:
                self.abort()
            return
        if self.request.framing is _F_CHUNKED:
            data = _encode_chunk(data)
        if self.upstream is not None:
            self.upstream.write(data)
        else:
            self.pending_body.append(data)
            self.pending_size += len(data)
            if self.pending_size > self.node.limits.max_buffered_body:
                self.pause_reading("connect")

    def request_end(self) -> None:
        if self.request is None:
            return
        if self.discard_request:
            self.discard_request = False
            self.finish_exchange()
            return
        self.request_done = True
        if self.request.framing is _F_CHUNKED:
            if self.upstream is not None:
                self.upstream.write(http1.LAST_CHUNK)
            else:
                self.pending_body.append(http1.LAST_CHUNK)
        if self.response is not None and self.response_parser is None:
            self.finish_exchange()  # the response ended before the request body did

    def client_upgraded(self, rest: bytes) -> None:
        """The client asked for an upgrade; bytes after the head wait for the 101."""
        self.request_done = True
        if rest:
            if self.upstream is not None:
                self.upstream.write(rest)
            else:
                self.pending_body.append(rest)
        self.pause_reading("upgrade")

    # ---- bytes from the upstream (called by UpstreamConnection) -------------------------

    def upstream_data(self, data: bytes) -> None:
        if self.tunnel:
            self.write(data)
            return
        self.upstream_reads += 1
        parser = self.response_parser
        if parser is None:
            return
        try:
            events = parser.feed(data)
        except ParseError:
            self.upstream_failed("bad_response", 502)
            return
        self.response_events(events)

    def response_events(self, events: Sequence[object]) -> None:
        # A head and its body in one read go out as one write: one TLS record, one syscall.
        out: list[bytes] = []
        for event in events:
            kind = type(event)
            if kind is BodyData:
                data = event.data  # type: ignore[attr-defined]
                self.response_bytes += len(data)
                out.append(_encode_chunk(data) if self.response_chunked else data)
            elif kind is ResponseHead:
                head = self.response_head(event)  # type: ignore[arg-type]
                if head:
                    out.append(head)
            elif kind is MessageEnd:
                if self.response_chunked:
                    out.append(_LAST_CHUNK)
                if out:
                    self.write(out[0] if len(out) == 1 else b"".join(out))
                    out = []
                self.response_end()
                if self.closed:
                    return
            elif isinstance(event, Upgraded):
                if out:
                    self.write(b"".join(out))
                    out = []
                self.start_tunnel(event.rest)
        if out:
            self.write(out[0] if len(out) == 1 else b"".join(out))

    def response_head(self, head: ResponseHead) -> bytes:
        """The head to send the client for ``head`` (b"": none, for a 100 nobody expects)."""
        request = self.request
        assert request is not None
        route = self.route
        hsts = route.hsts if route is not None else None
        status = head.status
        if status < 200:
            if status == 101 and request.upgrade is not None:
                self.status = 101
                added = b"connection: upgrade\r\nupgrade: %s\r\n" % request.upgrade
                return routing.client_response_head(head, hsts, https=self.https, added=added)
            if status != 100 or request.expect_continue:
                return routing.client_response_head(head, hsts, https=self.https)
            return b""
        self.response = head
        self.status = status
        pool = self.pool
        if pool is not None:
            if status >= 500:
                self.target_failed(f"status {status}")
            else:
                pool.health.passive_failures = 0  # health.record_passive_success, inlined
        close = (
            not head.keep_alive or not request.keep_alive or self.closing or self.node.stopping
            or request.upgrade is not None  # a declined upgrade: the parser gave the rest away
        )
        added = b""
        self.response_chunked = False
        framing = head.framing
        if framing is _F_CHUNKED or framing is _F_UNTIL_CLOSE:
            if request.version == b"1.1":
                self.response_chunked = True
                added = _CHUNKED_LINE
            else:
                close = True
        self.response_close = close
        if close:
            added += _CLOSE_LINE
        return routing.client_response_head(head, hsts, https=self.https, added=added)

    def response_end(self) -> None:
        self.response_parser = None
        self.awaiting_upstream = False
        conn, self.upstream = self.upstream, None
        if conn is not None and self.pool is not None:
            conn.owner = None
            self.pool.give_back(conn, (
                self.response is not None and self.response.keep_alive and self.request_done
                and self.route is not None and self.route.proxy_protocol is _PP_OFF
            ))
        if not self.request_done:
            self.response_close = True  # the client is still sending a body nobody reads
        self.finish_exchange()

    def start_tunnel(self, rest: bytes) -> None:
        """After a 101: bytes flow both ways untouched until either side closes."""
        self.tunnel = True
        self.response_parser = None
        self.awaiting_upstream = False
        self.stats.response(101)
        if self.node.access_log is not None:
            self.node.access(self, 101, _monotonic() - self.started_at)
        if rest:
            self.write(rest)
        while self.events:  # client bytes that came after its upgrade request
            event = self.events.popleft()
            if isinstance(event, Upgraded) and event.rest and self.upstream is not None:
                self.upstream.write(event.rest)
        self.resume_reading("upgrade")

    def upstream_eof(self) -> None:
        if self.tunnel:
            self.close()
            return
        parser = self.response_parser
        if parser is None:
            return
        try:
            events = parser.feed_eof()
        except ParseError:
            return  # upstream_lost reports it
        self.response_events(events)

    def upstream_lost(self, exc: Exception | None) -> None:
        self.upstream = None
        if self.pool is not None:
            self.pool.active -= 1
        if self.tunnel:
            self.close()
            return
        if self.request is None or self.response_parser is None:
            return
        if self.response is None:
            if self.may_retry():
                self.retried = True
                self.response_parser = None
                assert self.pool is not None
                self.connect_upstream_fresh(self.pool)
                return
            self.upstream_failed("reset" if exc else "closed", 502)
        else:
            self.abort()  # the response started: never splice an error page into it

    def may_retry(self) -> bool:
        """A pooled keep-alive connection the upstream had closed: retry once, fresh."""
        request = self.request
        return (
            self.reused_upstream and not self.retried and request is not None
            and request.method in IDEMPOTENT and request.framing is Framing.NONE
        )

    def connect_upstream_fresh(self, pool: TargetPool) -> None:
        task = self.node.loop.create_task(self.open_upstream(pool, self.request))
        self.node.track(task)

    def upstream_timed_out(self) -> None:
        self.awaiting_upstream = False
        if self.response is None:
            self.upstream_failed("read_timeout", 504)
        else:
            self.stats.upstream_errors["read_timeout"] += 1
            self.abort()

    def upstream_failed(self, kind: str, status: int, *, passive: bool = True) -> None:
        self.stats.upstream_errors[kind] += 1
        if passive:
            self.target_failed(kind.replace("_", " "))
        self.drop_upstream()
        if self.response is not None:
            self.abort()
            return
        self.local_response(status, self.route)

    def target_failed(self, error: str) -> None:
        """The current request's target failed it: a passive health failure."""
        if self.pool is not None and self.route is not None:
            self.node.health.request_failed(self.pool, self.route.upstream, error)

    def drop_upstream(self) -> None:
        if self.upstream is not None:
            self.release_upstream(reusable=False)
        self.response_parser = None
        self.awaiting_upstream = False

    def release_upstream(self, reusable: bool) -> None:
        conn, self.upstream = self.upstream, None
        if conn is not None and self.pool is not None:
            conn.owner = None
            self.pool.give_back(conn, reusable)

    # ---- responses the proxy makes ---------------------------------------------------

    def local_response(
        self, status: int, route: HostRoute | None, extra: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        """Answer the current request ourselves; its body, if any, is read and dropped."""
        request = self.request
        close = request is None or not request.keep_alive or self.closing or self.node.stopping
        if request is not None and not self.request_done and request.framing is not _F_NONE:
            close = True  # do not read a body we will not use
        if request is not None and request.upgrade is not None:
            close = True
        self.discard_request = not close
        self.send_local(status, route, close=close, extra=extra)

    def send_local(
        self, status: int, route: HostRoute | None, *, close: bool,
        extra: list[tuple[bytes, bytes]] | None = None, body: bytes | None = None,
    ) -> None:
        headers, default_body = responses.error_headers(status, close=close)
        if body is not None:
            headers[1] = (b"content-length", b"%d" % len(body))
        body = default_body if body is None else body
        if extra:
            headers = extra + headers
        hsts = route.hsts if route is not None else None
        headers = routing.client_response_headers(headers, hsts=hsts, https=self.https)
        if close:
            headers.append((b"connection", b"close"))
        self.status = status
        self.response_close = close
        is_head = self.request is not None and self.request.method == b"HEAD"
        self.write(http1.serialize_response_head(status, responses.reason(status), headers)
                   + (b"" if is_head else body))
        self.response = ResponseHead(status, responses.reason(status), b"1.1", b"", Framing.LENGTH,
                                     len(body), not close, {})
        if close:
            self.finish_exchange()
        elif not self.discard_request or self.request_done:
            self.discard_request = False
            self.finish_exchange()

    def acme_response(self, token: bytes) -> None:
        answer = self.state.acme.get(token.decode("ascii", "replace"))
        if answer is None:
            self.local_response(404, None)
            return
        body = answer.encode("ascii")
        request = self.request
        close = request is None or not request.keep_alive
        self.discard_request = False
        self.send_local(200, None, close=close, body=body,
                        extra=[(b"content-type", b"application/octet-stream")])

    # ---- end of an exchange -----------------------------------------------------------

    def finish_exchange(self) -> None:
        status = self.status
        if self.response is not None or status:
            stats = self.stats
            stats.responses[status // 100 if status < 600 else 5] += 1
            elapsed = _monotonic() - self.started_at if self.started_at else 0.0
            if self.response is not None and self.pool is not None:
                stats.latency_buckets[_bisect(LATENCY_BUCKETS, elapsed)] += 1  # stats.latency, inlined
                stats.latency_sum += elapsed
            if self.node.access_log is not None:
                self.node.access(self, status, elapsed)
        close = self.response_close or self.closing or self.node.stopping
        self.reset_request()
        self.exchanges += 1
        if close:
            self.close()
            return
        if self.read_paused:
            self.resume_reading("pipeline")
        if self.events:
            self.process_events()

    def reset_request(self) -> None:
        self.request = None
        self.route = None
        self.stats = self.conn_stats
        self.pool = None
        self.pending_body.clear()
        self.pending_size = 0
        self.body_received = 0
        self.request_done = False
        self.response = None
        self.response_parser = None
        self.response_chunked = False
        self.response_close = False
        self.response_bytes = 0
        self.status = 0
        self.reused_upstream = False
        self.retried = False
        self.discard_request = False

    # ---- timers and helpers ---------------------------------------------------------

    def check_deadlines(self, now: float) -> None:
        """Called by the node's sweep: act on a timeout that has run out.

        A connection is idle (no request, no byte of one), reading a head, or waiting
        for its upstream. Each phase has its timeout, counted from the first sweep that
        saw the connection in that phase with the same progress (requests finished, or
        upstream reads): so a timeout fires up to two sweep intervals late, and nothing
        on the hot path reads a clock for it.
        """
        if self.closed or self.transport is None:
            return
        if self.request is None:
            watch = (_HEAD if self.parser.in_head else _IDLE, self.exchanges)
        elif self.awaiting_upstream:
            watch = (_UPSTREAM, self.upstream_reads)
        else:
            self.watch = None
            return
        if watch != self.watch:
            self.watch, self.watch_since = watch, now
            return
        waited = now - self.watch_since
        phase = watch[0]
        limits = self.node.limits
        if phase == _IDLE:
            if waited >= limits.idle_timeout:
                self.close()
        elif phase == _HEAD:
            if waited >= limits.head_timeout:
                self.send_local(408, self.sni_route, close=True)
        elif self.route is not None and waited >= self.route.upstream.read_timeout:
            self.upstream_timed_out()

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            self.stats.bytes_out += len(data)
            transport.write(data)

    def abort(self) -> None:
        self.drop_upstream()
        if self.transport is not None:
            self.transport.abort()

    @property
    def busy(self) -> bool:
        """A request or a tunnel is in progress (what a graceful stop waits for)."""
        return not self.closed and (self.request is not None or self.tunnel)

    def stop_gracefully(self) -> None:
        """The node is stopping: close now if idle, else after the current response."""
        self.closing = True
        if self.request is None and not self.tunnel:
            self.close()
