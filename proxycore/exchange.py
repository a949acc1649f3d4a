"""One request and its response: the ``Exchange``.

A client connection (``proxycore.client``) parses requests and owns framing,
back-pressure and timeouts; for each request head it makes an ``Exchange`` and
hands it the decision (``proxycore.decide``). The exchange carries it out: it
answers locally, or takes an upstream connection from the target pool, sends the
rewritten head and streams the body, then relays the response with its head
rewritten once. It owns the upstream connection while it lasts (it is the
connection's ``UpstreamOwner``) and gives it back through ``release_upstream``,
the one path by which an upstream connection returns to its pool or is closed.

When the response is over (and the request with it), the exchange calls
``ClientConnection.exchange_done`` and is dropped; nothing is reset by hand. After
a 101 an exchange becomes a tunnel and lasts until either side closes.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Final

from proxycore import access, credentials, decide, health, http1, proxyproto, responses, routing, tls
from proxycore.access import AccessPolicy
from proxycore.config import HostRoute, ProxyProtocol
from proxycore.http1 import BodyData, Framing, MessageEnd, ParseError, RequestHead, ResponseHead, Upgraded
from proxycore.stats import HostStats
from proxycore.upstream import TargetPool, UpstreamConnection

if TYPE_CHECKING:
    from proxycore.client import ClientConnection

# Requests that can be sent again when nothing of them reached the upstream (RFC 9110 §9.2.2).
IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

# Enum members as Final constants: compiled, a C static rather than a class attribute look-up
# (measured with bench/hotpath.py under callgrind: 1.6% of the instructions per request).
_PP_OFF: Final = ProxyProtocol.OFF
_F_NONE: Final = Framing.NONE
_F_CHUNKED: Final = Framing.CHUNKED
_F_UNTIL_CLOSE: Final = Framing.UNTIL_CLOSE
_F_LENGTH: Final = Framing.LENGTH

_CHUNKED_LINE: Final = b"transfer-encoding: chunked\r\n"
_CLOSE_LINE: Final = b"connection: close\r\n"
_KEEP_ALIVE_LINE: Final = b"connection: keep-alive\r\n"  # HTTP/1.0 clients need to be told


class Exchange:
    """One request on a client connection, from its head to the end of its response."""

    def __init__(self, conn: ClientConnection, request: RequestHead, route: HostRoute | None,
                 stats: HostStats) -> None:
        self.conn = conn
        self.request = request
        self.route = route
        self.stats = stats
        self.started_at = time.monotonic()
        # the request
        self.request_done = False  # its body (if any) has been read whole
        self.continued = False  # a 100 (Continue) went to the client
        self.discard_body = False  # answered locally on a kept connection: read the body, drop it
        self.body_received = 0
        self.pending_body: list[bytes] = []  # body read before an upstream connection was attached
        self.pending_size = 0
        # the upstream
        self.pool: TargetPool | None = None
        self.upstream: UpstreamConnection | None = None
        self.upstream_head = b""
        self.awaiting_upstream = False  # the request went upstream; its response is not over
        self.upstream_reads = 0  # progress, for the upstream read timeout
        self.reused_upstream = False
        self.retried = False
        # the response
        self.response: ResponseHead | None = None
        self.response_parser: http1.ResponseParser | None = None  # the upstream connection's
        self.response_chunked = False
        self.close_after = False  # the client connection closes after this response
        self.response_bytes = 0
        self.status = 0
        self.tunnel = False
        self.done = False
        self.authorization: bytes | None = None  # the Authorization value, when a list has users

    # ---- carrying out the decision -----------------------------------------------------

    def start(self, decision: decide.Decision) -> None:
        action = decision.action
        if action == decide.FORWARD:
            self.forward()
        elif action == decide.LOCAL:
            status = decision.status
            if status == 401 or status == 403 or status == 429:
                self.count_refusal(status)
            self.local_response(status, decision.route, extra=decision.headers, body=decision.body)
        elif action == decide.AUTHENTICATE:
            assert decision.policy is not None
            self.authenticate(decision.policy)
        elif action == decide.REDIRECT:
            self.local_response(decision.status, decision.route, extra=[(b"location", decision.location)])
        else:
            self.acme_response(decision.token)

    def count_refusal(self, status: int) -> None:
        """A 401/403/429 of the host's access list or rate limit (not the upstream's)."""
        if status == 403:
            self.stats.denied += 1
        elif status == 401:
            self.stats.unauthorized += 1
        else:
            self.stats.limited(self.conn.client_ip, time.time())

    def authenticate(self, policy: AccessPolicy) -> None:
        """A Basic credential this connection has not verified: the node's verifier checks it."""
        value = self.authorization
        assert value is not None

        def verified(outcome: int) -> None:
            if self.done or self.conn.closed:
                return
            route = self.route
            if outcome == credentials.OK:
                self.conn.authenticated(policy, value)
                self.forward()
            elif outcome == credentials.THROTTLED:
                self.count_refusal(429)
                wait = b"%d" % int(credentials.FAILURE_WINDOW)
                self.local_response(429, route, extra=[(b"retry-after", wait)])
            elif outcome == credentials.BUSY:
                self.local_response(503, route, extra=[(b"retry-after", b"1")])
            else:
                self.count_refusal(401)
                self.local_response(401, route, extra=[(b"www-authenticate", policy.challenge)])

        self.conn.node.verifier.verify(policy, value, self.conn.client_ip, verified)

    def forward(self) -> None:
        route = self.route
        assert route is not None
        conn = self.conn
        pool = conn.state.balancers[route.upstream.name].pick()
        if pool is None:
            self.local_response(503, route)
            return
        added = conn.forwarding + conn.client_cert_lines if route is conn.sni_route else conn.forwarding
        self.upstream_head = routing.upstream_request_head(self.request, added)
        policy = conn.last_policy
        if policy is not None and policy.strips_authorization:
            self.upstream_head = access.strip_authorization(self.upstream_head)
        self.pool = pool
        self.connect_upstream(pool)

    def connect_upstream(self, pool: TargetPool) -> None:
        route = self.route
        assert route is not None
        # A connection that starts with a PROXY header speaks for one client only: never shared.
        upstream = pool.take_idle() if route.proxy_protocol is _PP_OFF else None
        if upstream is not None:
            self.attach(upstream, reused=True)
            return
        self.connect_fresh(pool)

    def connect_fresh(self, pool: TargetPool) -> None:
        """Open a new connection to ``pool`` (a task: the exchange goes on when it is up)."""
        node = self.conn.node
        node.track(node.loop.create_task(self.open_upstream(pool)))

    async def open_upstream(self, pool: TargetPool) -> None:
        route = self.route
        assert route is not None
        try:
            upstream = await pool.connect(route.upstream.connect_timeout)
        except TimeoutError:
            if not self.done:
                self.connect_failed(pool, "connect_timeout", 504, "connect timed out")
            return
        except OSError as exc:
            if not self.done:
                self.conn.node.log_upstream_error(pool, exc)
                self.connect_failed(pool, tls.upstream_connect_failure(exc), 502, health.describe_error(exc))
            return
        if self.done:  # the client went away, or the request was answered, meanwhile
            pool.give_back(upstream, reusable=not self.conn.closed)
            return
        self.attach(upstream, reused=False)

    def connect_failed(self, pool: TargetPool, kind: str, status: int, error: str) -> None:
        """No connection to ``pool``: tell its health, then try another target or answer ``status``."""
        route = self.route
        assert route is not None
        node = self.conn.node
        node.health.request_failed(pool, route.upstream, error)
        other = self.retry_target(pool)
        if other is None:
            self.upstream_failed(kind, status, passive=False)
            return
        self.stats.upstream_errors[kind] += 1
        node.stats.upstream(route.upstream.name).retries += 1
        self.retried = True
        self.pool = other
        self.connect_upstream(other)

    def retry_target(self, failed: TargetPool) -> TargetPool | None:
        """Nothing reached the upstream: an idempotent request without a body may go elsewhere, once."""
        if self.retried or self.route is None or not self.may_resend():
            return None
        return self.conn.state.balancers[self.route.upstream.name].pick(exclude=failed)

    def reading_body(self) -> bool:
        """The client owes the rest of the request body (one that waits for a 100 owes nothing yet)."""
        return not self.request_done and (self.continued or not self.request.expect_continue)

    def may_resend(self) -> bool:
        return self.request.method in IDEMPOTENT and self.request.framing is _F_NONE

    def attach(self, upstream: UpstreamConnection, reused: bool) -> None:
        self.upstream = upstream
        self.reused_upstream = reused
        upstream.owner = self
        parser = self.response_parser = upstream.parser
        parser.expect(self.request.method)
        data = self.upstream_head
        route = self.route
        if not reused and route is not None and route.proxy_protocol is not _PP_OFF:
            conn = self.conn
            data = proxyproto.header_for(route.proxy_protocol, conn.transport, conn.client_source()) + data
        if self.pending_body:
            data += b"".join(self.pending_body)
            self.pending_body.clear()
            self.pending_size = 0
        upstream.write(data)
        self.conn.resume_reading("connect")
        self.awaiting_upstream = True
        self.upstream_reads += 1

    # ---- the request body (called by the client connection) -----------------------------

    def request_body(self, data: bytes) -> None:
        self.body_received += len(data)
        if self.discard_body:
            return
        route = self.route
        limit = route.max_body_size if route is not None else 0
        if limit and self.body_received > limit:
            if self.response is None:
                self.drop_upstream()
                self.local_response(413, route)
            else:
                self.conn.abort()
            return
        if self.request.framing is _F_CHUNKED:
            data = http1.encode_chunk(data)
        if self.upstream is not None:
            self.upstream.write(data)
        else:
            self.pending_body.append(data)
            self.pending_size += len(data)
            if self.pending_size > self.conn.node.limits.max_buffered_body:
                self.conn.pause_reading("connect")

    def request_end(self) -> None:
        self.request_done = True
        if self.discard_body:
            self.finish()
            return
        if self.request.framing is _F_CHUNKED:
            if self.upstream is not None:
                self.upstream.write(http1.LAST_CHUNK)
            else:
                self.pending_body.append(http1.LAST_CHUNK)
        if self.response is not None and self.response_parser is None:
            self.finish()  # the response ended before the request body did

    def request_upgraded(self, rest: bytes) -> None:
        """The client asked for an upgrade; bytes after the head wait for the 101."""
        self.request_done = True
        if rest:
            if self.upstream is not None:
                self.upstream.write(rest)
            else:
                self.pending_body.append(rest)
        self.conn.pause_reading("upgrade")

    # ---- bytes from the upstream (UpstreamOwner: called by UpstreamConnection) -------------

    def upstream_data(self, data: bytes) -> None:
        if self.tunnel:
            self.conn.write(data)
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

    def response_events(self, events: list[ResponseHead | BodyData | MessageEnd | Upgraded]) -> None:
        # A head and its body in one read go out as one write: one TLS record, one syscall.
        out: list[bytes] = []
        for event in events:
            if isinstance(event, BodyData):
                data = event.data
                self.response_bytes += len(data)
                out.append(http1.encode_chunk(data) if self.response_chunked else data)
            elif isinstance(event, ResponseHead):
                head = self.response_head(event)
                if head:
                    out.append(head)
            elif isinstance(event, MessageEnd):
                if self.response_chunked:
                    out.append(http1.LAST_CHUNK)
                if out:
                    self.conn.write_out(out)
                    out = []
                self.response_end()
                if self.done:
                    return
            else:
                if out:
                    self.conn.write_out(out)
                    out = []
                self.start_tunnel(event.rest)
        if out:
            self.conn.write_out(out)

    def response_head(self, head: ResponseHead) -> bytes:
        """The head to send the client for ``head`` (b"": none, for a 100 nobody expects)."""
        request = self.request
        route = self.route
        hsts = route.hsts if route is not None else None
        https = self.conn.https
        status = head.status
        if status < 200:
            if status == 101 and request.upgrade is not None:
                self.status = 101
                added = b"connection: upgrade\r\nupgrade: %s\r\n" % request.upgrade
                return routing.client_response_head(head, hsts, https=https, added=added)
            if status != 100 or request.expect_continue:
                self.continued = True
                return routing.client_response_head(head, hsts, https=https)
            return b""
        self.response = head
        self.status = status
        pool = self.pool
        if pool is not None:
            if status >= 500:
                self.target_failed(f"status {status}")
            else:
                pool.health.passive_failures = 0  # health.record_passive_success, inlined
        conn = self.conn
        close = (
            not head.keep_alive or not request.keep_alive or conn.closing or conn.node.stopping
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
        self.close_after = close
        if close:
            added += _CLOSE_LINE
        elif request.version == b"1.0":
            added += _KEEP_ALIVE_LINE
        return routing.client_response_head(head, hsts, https=https, added=added)

    def response_end(self) -> None:
        self.response_parser = None
        self.awaiting_upstream = False
        route = self.route
        response = self.response
        self.release_upstream(
            response is not None and response.keep_alive and self.request_done
            and route is not None and route.proxy_protocol is _PP_OFF
        )
        if not self.request_done:
            self.close_after = True  # the client is still sending a body nobody reads
        self.finish()

    def start_tunnel(self, rest: bytes) -> None:
        """After a 101: bytes flow both ways untouched until either side closes."""
        self.tunnel = True
        self.response_parser = None
        self.awaiting_upstream = False
        self.stats.response(101)
        self.conn.log_access(self, 101, time.monotonic() - self.started_at)
        if rest:
            self.conn.write(rest)
        self.conn.tunnel_started(self)

    def upstream_eof(self) -> None:
        if self.tunnel:
            self.conn.close()
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
        # The connection took itself off this exchange; it only has to leave its pool's count.
        self.upstream = None
        if self.pool is not None:
            self.pool.active -= 1
        if self.tunnel:
            self.conn.close()
            return
        if self.done or self.response_parser is None:
            return
        if self.response is None:
            if self.reused_upstream and not self.retried and self.may_resend():
                # A pooled keep-alive connection the upstream had closed: retry once, fresh.
                self.retried = True
                self.response_parser = None
                assert self.pool is not None
                self.connect_fresh(self.pool)
                return
            self.upstream_failed("reset" if exc else "closed", 502)
        else:
            self.conn.abort()  # the response started: never splice an error page into it

    def upstream_pause_writing(self) -> None:
        self.conn.pause_reading("upstream")

    def upstream_resume_writing(self) -> None:
        self.conn.resume_reading("upstream")

    # ---- failures ---------------------------------------------------------------------

    def upstream_timed_out(self) -> None:
        self.awaiting_upstream = False
        if self.response is None:
            self.upstream_failed("read_timeout", 504)
        else:
            self.stats.upstream_errors["read_timeout"] += 1
            self.conn.abort()

    def upstream_failed(self, kind: str, status: int, *, passive: bool = True) -> None:
        self.stats.upstream_errors[kind] += 1
        if passive:
            self.target_failed(kind.replace("_", " "))
        self.drop_upstream()
        if self.response is not None:
            self.conn.abort()
            return
        self.local_response(status, self.route)

    def target_failed(self, error: str) -> None:
        """This request's target failed it: a passive health failure."""
        if self.pool is not None and self.route is not None:
            self.conn.node.health.request_failed(self.pool, self.route.upstream, error)

    def drop_upstream(self) -> None:
        """The upstream connection holds an unfinished exchange: close it, never pool it."""
        self.release_upstream(False)
        self.response_parser = None
        self.awaiting_upstream = False

    def release_upstream(self, reusable: bool) -> None:
        """The one way an upstream connection leaves an exchange: back to its pool, or closed."""
        upstream, self.upstream = self.upstream, None
        if upstream is not None and self.pool is not None:
            self.pool.give_back(upstream, reusable)

    # ---- responses the proxy makes ------------------------------------------------------

    def local_response(
        self, status: int, route: HostRoute | None, extra: list[tuple[bytes, bytes]] | None = None,
        body: bytes | None = None,
    ) -> None:
        """Answer the request ourselves; its body, if any, is read and dropped."""
        request = self.request
        conn = self.conn
        close = not request.keep_alive or conn.closing or conn.node.stopping or request.upgrade is not None
        if not self.request_done and request.framing is not _F_NONE:
            close = True  # do not read a body we will not use
        self.send_local(status, route, close=close, extra=extra, body=body)

    def acme_response(self, token: str) -> None:
        answer = self.conn.state.acme.get(token)
        if answer is None:
            self.local_response(404, None)
            return
        self.send_local(200, None, close=self.wants_close(), body=answer.encode("ascii"),
                        extra=[(b"content-type", b"application/octet-stream")])

    def wants_close(self) -> bool:
        conn = self.conn
        return not self.request.keep_alive or conn.closing or conn.node.stopping

    def send_local(
        self, status: int, route: HostRoute | None, *, close: bool,
        extra: list[tuple[bytes, bytes]] | None = None, body: bytes | None = None,
    ) -> None:
        request = self.request
        hsts = route.hsts if route is not None else None
        data, length = responses.render(
            status, hsts=hsts, https=self.conn.https, close=close, extra=extra, body=body,
            head_only=request.method == b"HEAD", keep_alive_line=not close and request.version == b"1.0",
        )
        self.status = status
        self.close_after = close
        self.conn.write(data)
        self.response = ResponseHead(status, responses.reason(status), b"1.1", b"", _F_LENGTH,
                                     length, not close, {})
        if close or self.request_done:
            self.finish()
        else:
            self.discard_body = True  # the rest of the body is read and dropped, then done

    # ---- the end ------------------------------------------------------------------------

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        status = self.status
        if status:
            self.stats.response(status)
            elapsed = time.monotonic() - self.started_at
            if self.pool is not None:
                self.stats.latency(elapsed)
            self.conn.log_access(self, status, elapsed)
        self.conn.exchange_done(self)

    def abandon(self) -> None:
        """The client connection is gone: let go of the upstream connection."""
        self.done = True
        self.awaiting_upstream = False
        self.release_upstream(False)
