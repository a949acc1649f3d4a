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
import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

from proxycore import health, http1, proxyproto, responses, routing, tls
from proxycore.config import HostRoute, Mode, ProxyProtocol
from proxycore.http1 import BodyData, Framing, MessageEnd, ParseError, RequestHead, ResponseHead, Upgraded
from proxycore.stats import UNMATCHED, HostStats
from proxycore.upstream import TargetPool, UpstreamConnection

if TYPE_CHECKING:
    from proxycore.server import Listener, NodeState, ProxyNode

ACME_PREFIX = b"/.well-known/acme-challenge/"
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


class ClientConnection(asyncio.BufferedProtocol):
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
        self.client_cert_headers: tuple[tuple[bytes, bytes], ...] = ()  # RFC 9440, once verified
        self.conn_stats: HostStats = node.stats.host(UNMATCHED)
        self.parser = http1.RequestParser(node.limits.max_head_size, node.limits.max_request_line)
        self.events: deque[object] = deque()
        self.read_paused: set[str] = set()
        self.closing = False  # close once the current response is done
        self.closed = False
        self.parse_error: ParseError | None = None  # the parser refused the input: read no more
        # After a TLS handshake, start_tls hands decrypted bytes over before the node calls
        # connection_made; they wait here.
        self.early: list[bytes] | None = []
        self.out: list[bytes] | None = None  # writes held back while one batch is processed

        # per-request
        self.request: RequestHead | None = None
        self.route: HostRoute | None = None
        self.stats: HostStats = self.conn_stats
        self.upstream: UpstreamConnection | None = None
        self.pool: TargetPool | None = None
        self.upstream_head = b""
        self.pending_body: list[bytes] = []
        self.pending_size = 0
        self.body_received = 0
        self.request_done = False
        self.response: ResponseHead | None = None
        self.response_parser: http1.ResponseParser | None = None
        self.response_chunked = False
        self.response_close = False
        self.response_bytes = 0
        self.status = 0
        self.started_at = 0.0
        self.reused_upstream = False
        self.retried = False
        self.tunnel = False
        self.discard_request = False
        # timers
        # Deadlines, checked by the node's sweep a few times a second: no timer per request.
        self.idle_deadline = 0.0  # while no request is in progress (0: none)
        self.head_deadline = 0.0  # from the first byte of a request head to its end
        self.upstream_deadline = 0.0  # while waiting on the upstream (0: none)
        self.head_started = False

    # ---- connection lifecycle (event loop) --------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        if self.closed:  # lost while the handshake task was still resuming
            return
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0] if peer else ""
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
        self.stats = self.conn_stats
        self.idle_deadline = self.node.loop.time() + self.node.limits.idle_timeout
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
        self.cancel_timers()
        if self.upstream is not None:
            self.release_upstream(reusable=False)

    def cancel_timers(self) -> None:
        self.idle_deadline = self.head_deadline = self.upstream_deadline = 0.0

    def close(self) -> None:
        self.flush()
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

    def get_buffer(self, sizehint: int) -> memoryview:
        """Called by the event loop: where to read into. A buffered protocol lets uvloop's
        TLS layer decrypt into this buffer instead of allocating 256 KiB per read."""
        return self.node.read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        """Called by the event loop: ``nbytes`` were read into the buffer."""
        self.data_received(self.node.read_buffer[:nbytes].tobytes())

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
        if self.request is None and not self.head_started:
            self.head_started = True
            self.idle_deadline = 0.0
            self.head_deadline = self.node.loop.time() + self.node.limits.head_timeout
        try:
            self.events.extend(self.parser.feed(data))
        except ParseError as exc:
            # Pipelined requests ahead of the bad one are served first, in order; the
            # error takes the bad request's place in the queue.
            self.parse_error = exc
            self.events.extend(exc.events)
            self.events.append(exc)
        self.process_events()

    def process_events(self) -> None:
        events = self.events
        while events and not self.closed:
            event = events[0]
            if isinstance(event, RequestHead):
                if self.request is not None:  # pipelined: wait for the current response
                    self.pause_reading("pipeline")
                    return
                events.popleft()
                self.start_request(event)
            elif isinstance(event, BodyData):
                events.popleft()
                self.request_body(event.data)
            elif isinstance(event, MessageEnd):
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
        self.head_deadline = 0.0
        self.head_started = False
        self.request = head
        self.started_at = time.monotonic()
        self.request_done = False
        state = self.state
        route = routing.lookup_route(state.routes, routing.host_name(head.host))
        self.route = route
        self.stats = self.node.stats.host(route.name) if route is not None else self.conn_stats
        self.stats.requests += 1
        if self.https:
            if route is None or routing.is_misdirected(self.sni_route, route) or route.mode is Mode.TCP:
                self.local_response(421, self.sni_route)
                return
        else:
            if head.target.startswith(ACME_PREFIX):
                self.acme_response(head.target[len(ACME_PREFIX):])
                return
            if route is None or route.mode is Mode.TCP:
                self.local_response(421, None)
                return
            if route.redirect.enabled:
                location = routing.redirect_location(head.host, head.target, self.node.https_port)
                self.local_response(route.redirect.status, None, extra=[(b"location", location)])
                return
        limit = route.max_body_size
        if limit and head.framing is Framing.LENGTH and head.content_length > limit:
            self.local_response(413, route)
            return
        balancer = state.balancers[route.upstream.name]
        pool = balancer.pick()
        if pool is None:
            self.local_response(503, route)
            return
        self.upstream_head = self.build_upstream_head(head, route)
        self.pool = pool
        self.connect_upstream(pool)

    def build_upstream_head(self, head: RequestHead, route: HostRoute) -> bytes:
        headers = routing.upstream_request_headers(
            head.headers, host=head.host, client_ip=self.client_ip, https=self.https,
            extra=self.client_cert_headers if route is self.sni_route else (),
        )
        if head.framing is Framing.LENGTH:
            headers.append((b"content-length", b"%d" % head.content_length))
        elif head.framing is Framing.CHUNKED:
            headers.append((b"transfer-encoding", b"chunked"))
        if head.upgrade is not None:
            headers += [(b"connection", b"upgrade"), (b"upgrade", head.upgrade)]
        return http1.serialize_request_head(head.method, head.target, headers)

    def connect_upstream(self, pool: TargetPool) -> None:
        # A connection that starts with a PROXY header speaks for one client only: never shared.
        private = self.route is not None and self.route.proxy_protocol is not ProxyProtocol.OFF
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
        self.response_parser = http1.ResponseParser()
        self.response_parser.expect(self.request.method)
        data = self.upstream_head
        if not reused and self.route is not None and self.route.proxy_protocol is not ProxyProtocol.OFF:
            data = self.proxy_header() + data
        if self.pending_body:
            data += b"".join(self.pending_body)
            self.pending_body.clear()
            self.pending_size = 0
        conn.write(data)
        self.resume_reading("connect")
        self.arm_upstream_timer()

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
        if self.request.framing is Framing.CHUNKED:
            data = http1.encode_chunk(data)
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
        if self.request.framing is Framing.CHUNKED:
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
        self.arm_upstream_timer()
        parser = self.response_parser
        if parser is None:
            return
        try:
            events = parser.feed(data)
        except ParseError:
            self.upstream_failed("bad_response", 502)
            return
        # A head and its body in one read go out as one write: one TLS record, one syscall.
        self.out = []
        try:
            self.response_events(events)
        finally:
            self.flush()

    def response_events(self, events: Sequence[object]) -> None:
        for event in events:
            if self.closed:
                return
            if isinstance(event, ResponseHead):
                self.response_head(event)
            elif isinstance(event, BodyData):
                self.response_bytes += len(event.data)
                self.write(http1.encode_chunk(event.data) if self.response_chunked else event.data)
            elif isinstance(event, MessageEnd):
                if self.response_chunked:
                    self.write(http1.LAST_CHUNK)
                self.response_end()
            elif isinstance(event, Upgraded):
                self.start_tunnel(event.rest)

    def response_head(self, head: ResponseHead) -> None:
        request = self.request
        assert request is not None
        route = self.route
        hsts = route.hsts if route is not None else None
        headers = routing.client_response_headers(head.headers, hsts=hsts, https=self.https)
        if head.status < 200:
            if head.status == 101 and request.upgrade is not None:
                headers += [(b"connection", b"upgrade"), (b"upgrade", request.upgrade)]
                self.status = 101
                self.write(http1.serialize_response_head(101, head.reason, headers))
            elif head.status != 100 or request.expect_continue:
                self.write(http1.serialize_response_head(head.status, head.reason, headers))
            return
        self.response = head
        self.status = head.status
        if self.pool is not None:
            if head.status >= 500:
                self.target_failed(f"status {head.status}")
            else:
                health.record_passive_success(self.pool.health)
        self.response_close = (
            not head.keep_alive or not request.keep_alive or self.closing or self.node.stopping
            or request.upgrade is not None  # a declined upgrade: the parser gave the rest away
        )
        self.response_chunked = False
        if head.framing is Framing.CHUNKED or head.framing is Framing.UNTIL_CLOSE:
            if request.version == b"1.1":
                self.response_chunked = True
                headers.append((b"transfer-encoding", b"chunked"))
            else:
                self.response_close = True
        if self.response_close:
            headers.append((b"connection", b"close"))
        self.write(http1.serialize_response_head(head.status, head.reason, headers))

    def response_end(self) -> None:
        self.response_parser = None
        self.upstream_deadline = 0.0
        reusable = (
            self.response is not None and self.response.keep_alive and self.request_done
            and self.route is not None and self.route.proxy_protocol is ProxyProtocol.OFF
        )
        self.release_upstream(reusable=reusable)
        if not self.request_done:
            self.response_close = True  # the client is still sending a body nobody reads
        self.finish_exchange()

    def start_tunnel(self, rest: bytes) -> None:
        """After a 101: bytes flow both ways untouched until either side closes."""
        self.tunnel = True
        self.response_parser = None
        self.upstream_deadline = 0.0
        self.stats.response(101)
        self.node.access(self, 101)
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

    def arm_upstream_timer(self) -> None:
        """Push the upstream read deadline back (the node's sweep watches it)."""
        timeout = self.route.upstream.read_timeout if self.route is not None else 60.0
        self.upstream_deadline = self.node.loop.time() + timeout

    def upstream_timed_out(self) -> None:
        self.upstream_deadline = 0.0
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
        self.upstream_deadline = 0.0

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
        if request is not None and not self.request_done and request.framing is not Framing.NONE:
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
        self.response = ResponseHead(status, responses.reason(status), b"1.1", (), Framing.LENGTH,
                                     len(body), not close)
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
            self.stats.response(status)
            if self.response is not None and self.pool is not None:
                self.stats.latency(time.monotonic() - self.started_at)
            self.node.access(self, status)
        close = self.response_close or self.closing or self.node.stopping
        self.reset_request()
        if close:
            self.close()
            return
        self.idle_deadline = self.node.loop.time() + self.node.limits.idle_timeout
        self.resume_reading("pipeline")
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
        """Called by the node's sweep: act on whichever deadline has passed."""
        if self.closed:
            return
        if self.head_deadline and now >= self.head_deadline and self.request is None:
            self.head_deadline = 0.0
            self.send_local(408, self.sni_route, close=True)
        elif self.idle_deadline and now >= self.idle_deadline and self.request is None:
            self.idle_deadline = 0.0
            self.close()
        elif self.upstream_deadline and now >= self.upstream_deadline:
            self.upstream_timed_out()

    def write(self, data: bytes) -> None:
        if self.out is not None:  # inside one batch of upstream bytes: one TLS record later
            self.out.append(data)
            return
        if self.transport is not None and not self.transport.is_closing():
            self.stats.bytes_out += len(data)
            self.transport.write(data)

    def flush(self) -> None:
        out, self.out = self.out, None
        if out:
            self.write(out[0] if len(out) == 1 else b"".join(out))

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
