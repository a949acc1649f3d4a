"""A proxy node: the listeners, the current snapshot, reload and graceful stop.

``ProxyNode`` owns one ``NodeState`` per snapshot: the routing and SNI tables,
the TLS contexts and the balancers, all built at reload time. New connections
take the current state; in-flight ones keep theirs. A snapshot whose state fails
to build is rejected whole and the old one keeps serving.

TLS is started by the node itself (``loop.start_tls`` after accept) rather than
by ``create_server(ssl=...)``, so each failed handshake is seen and counted by
reason.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from proxycore import routing, tls
from proxycore.client import ClientConnection
from proxycore.clientcert import client_cert_headers
from proxycore.clienthello import (
    ALERT_DECODE_ERROR,
    ALERT_UNRECOGNIZED_NAME,
    ClientHello,
    NotTLS,
    parse_client_hello,
)
from proxycore.config import ClientAuthMode, HostRoute, Snapshot
from proxycore.healthcheck import HealthMonitor, describe_upstreams, plan_checks
from proxycore.l4 import L4Pipe
from proxycore.limits import Limits
from proxycore.stats import UNMATCHED, ListenerStats, Stats
from proxycore.upstream import Balancer, Pools, TargetPool

log = logging.getLogger("proxycore")

# How often connection deadlines are checked; timeouts are this much late at most.
SWEEP_INTERVAL = 0.25
# How long a closing TLS connection waits for the client's close_notify.
TLS_SHUTDOWN_TIMEOUT = 5.0


class Stoppable(Protocol):
    @property
    def busy(self) -> bool: ...
    def check_deadlines(self, now: float) -> None: ...
    def stop_gracefully(self) -> None: ...
    def abort(self) -> None: ...


@dataclass(frozen=True, slots=True)
class NodeState:
    """Everything derived from one snapshot, built once per load."""

    snapshot: Snapshot
    routes: routing.RouteTable
    sni: tls.SNITable
    balancers: dict[str, Balancer]
    acme: dict[str, str]
    pools: tuple[TargetPool, ...]


def build_state(snapshot: Snapshot, pools: Pools) -> NodeState:
    sni = tls.build_sni_table(snapshot)
    balancers: dict[str, Balancer] = {}
    used: list[TargetPool] = []
    for route in snapshot.hosts:
        upstream = route.upstream
        if upstream.name in balancers:
            continue
        context = (
            tls.upstream_context(upstream.tls, label=f"upstream '{upstream.name}'")
            if upstream.tls is not None else None
        )
        target_pools = [pools.pool(t, upstream, context) for t in upstream.targets]
        used += target_pools
        balancers[upstream.name] = Balancer(target_pools, upstream.balancing, upstream.targets)
    return NodeState(
        snapshot=snapshot,
        routes=routing.build_route_table(snapshot),
        sni=sni,
        balancers=balancers,
        acme=dict(snapshot.acme_challenges),
        pools=tuple(used),
    )


@dataclass
class Listener:
    name: str
    https: bool
    host: str
    port: int
    stats: ListenerStats
    server: asyncio.Server | None = None
    connections: set[Stoppable] = field(default_factory=set)


AccessLog = Callable[[bytes], None]  # called with each access-log line (no newline)


class ProxyNode:
    def __init__(
        self,
        snapshot: Snapshot,
        *,
        https_address: tuple[str, int] = ("127.0.0.1", 8443),
        http_address: tuple[str, int] | None = ("127.0.0.1", 8080),
        limits: Limits | None = None,
        stats: Stats | None = None,
        access_log: AccessLog | None = None,
    ) -> None:
        self.limits = limits or Limits()
        self.stats = stats or Stats()
        self.access_log = access_log
        self.pools = Pools()
        self.state = build_state(snapshot, self.pools)  # a bad first snapshot is fatal
        self.health = HealthMonitor(self.stats)
        self.stats.upstream_states = lambda: describe_upstreams(self.state.balancers, time.monotonic())
        self.stats.host_upstreams = lambda: {r.name: r.upstream.name for r in self.state.snapshot.hosts}
        self.stats.config_applied(snapshot.revision)
        self.listeners = [Listener("https", True, *https_address, self.stats.listener("https"))]
        if http_address is not None:
            self.listeners.append(Listener("http", False, *http_address, self.stats.listener("http")))
        self.stopping = False
        self.tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweeps = 0
        self._log_second = -1
        self._log_prefix = b""

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    @property
    def https_port(self) -> int:
        return self.listeners[0].port

    # ---- start, reload, stop ---------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for listener in self.listeners:
            factory = self._tls_acceptor(listener) if listener.https else self._plain(listener)
            listener.server = await self.loop.create_server(
                factory, listener.host, listener.port, reuse_address=True, backlog=1024
            )
            sock = listener.server.sockets[0]
            listener.port = sock.getsockname()[1]
            log.info("listening on %s://%s:%d", listener.name, listener.host, listener.port)
        self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self.sweep)
        self.adopt_upstreams()  # health checkers and draining for the first snapshot

    def sweep(self) -> None:
        """Act on passed connection deadlines (head, idle, upstream read): no timer per request."""
        now = self.loop.time()
        for conn in self._all_connections():
            conn.check_deadlines(now)
        self._sweeps += 1
        if self._sweeps % 4 == 0:
            self.pools.sweep()
        self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self.sweep)

    def reload(self, snapshot: Snapshot) -> bool:
        """Serve ``snapshot`` to new connections; keep the old one if it cannot be built."""
        try:
            state = build_state(snapshot, self.pools)
        except Exception as exc:  # any failure rejects the whole snapshot
            error = str(exc) or type(exc).__name__
            log.error("config revision %d rejected, still serving %d: %s",
                      snapshot.revision, self.state.snapshot.revision, error)
            self.stats.config_failed(snapshot.revision, error)
            return False
        self.state = state
        self.pools.retire_all_but(state.pools)
        if self._loop is not None and not self.stopping:
            self.adopt_upstreams()
        self.stats.config_applied(snapshot.revision)
        log.info("config revision %d applied (%d hosts)", snapshot.revision, len(snapshot.hosts))
        return True

    async def stop(self, deadline: float | None = None) -> None:
        """Stop accepting, let in-flight requests finish, abort what is left at the deadline."""
        self.stopping = True
        for listener in self.listeners:
            if listener.server is not None:
                listener.server.close()
        for conn in self._all_connections():
            conn.stop_gracefully()
        limit = self.limits.stop_deadline if deadline is None else deadline
        end = self.loop.time() + limit
        while any(c.busy for c in self._all_connections()) and self.loop.time() < end:
            await asyncio.sleep(0.05)
        for conn in self._all_connections():
            conn.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for task in list(self.tasks):
            task.cancel()
        self.health.stop()
        self.pools.close()
        log.info("stopped")

    def adopt_upstreams(self) -> None:
        """Drain the pools no upstream sends new requests to; run the current state's checks."""
        state = self.state
        taking = {id(p) for balancer in state.balancers.values() for p in balancer.pools}
        for pool in state.pools:
            pool.drain(id(pool) not in taking)
        self.health.replan(plan_checks(state.snapshot, state.balancers), state.pools)

    def _all_connections(self) -> list[Stoppable]:
        return [c for listener in self.listeners for c in listener.connections]

    # ---- accepting connections -------------------------------------------------------

    def _plain(self, listener: Listener) -> Callable[[], asyncio.BaseProtocol]:
        return lambda: ClientConnection(self, listener)

    def _tls_acceptor(self, listener: Listener) -> Callable[[], asyncio.Protocol]:
        return lambda: _TLSAcceptor(self, listener)

    def begin_tls(self, acceptor: _TLSAcceptor, hello: ClientHello) -> None:
        """The ClientHello is in: pick the host by SNI and start TLS with its own context."""
        state = self.state
        route, context = tls.lookup(state.sni, hello.server_name)
        if context is None:
            self.stats.host(UNMATCHED).handshakes_failed["unknown_sni"] += 1
            acceptor.refuse(ALERT_UNRECOGNIZED_NAME)
            return
        conn = ClientConnection(self, acceptor.listener, state=state, sni_route=route)
        self.track(self.loop.create_task(self.handshake(acceptor, conn, context)))
        # start_tls swaps the transport's protocol in the task's first step, which runs
        # before this callback (FIFO); the TLS protocol then reads the ClientHello we hold.
        self.loop.call_soon(acceptor.hand_over)

    async def handshake(
        self, acceptor: _TLSAcceptor, conn: ClientConnection, context: ssl.SSLContext
    ) -> None:
        transport = acceptor.transport
        timeout = max(0.1, acceptor.deadline - self.loop.time())
        try:
            tls_transport = await self.loop.start_tls(
                transport, conn, context, server_side=True, ssl_handshake_timeout=timeout,
                ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT,
            )
        except asyncio.CancelledError:
            transport.abort()
            raise
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            route = conn.sni_route
            reason = tls.handshake_failure_reason(exc)
            self.stats.host(route.name if route is not None else UNMATCHED).handshakes_failed[reason] += 1
            if not transport.is_closing():
                transport.abort()
            return
        if tls_transport is not None:
            conn.connection_made(tls_transport)

    def not_tls(self, acceptor: _TLSAcceptor, exc: NotTLS) -> None:
        self.stats.host(UNMATCHED).handshakes_failed["http_request" if exc.http else "not_tls"] += 1
        acceptor.refuse(PLAIN_HTTP_ON_HTTPS if exc.http else ALERT_DECODE_ERROR)

    def accept(self, conn: ClientConnection) -> bool:
        listener = conn.listener
        listener.stats.connections += 1
        if self.stopping or len(listener.connections) >= self.limits.max_connections:
            listener.stats.rejected_connections += 1
            return False
        listener.connections.add(conn)
        return True

    def forget(self, conn: Stoppable) -> None:
        for listener in self.listeners:
            listener.connections.discard(conn)

    def tls_accepted(self, conn: ClientConnection, transport: asyncio.Transport) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        stats = conn.listener.stats
        if ssl_object is not None:
            stats.tls_versions[ssl_object.version() or "?"] += 1
            cipher = ssl_object.cipher()
            stats.ciphers[cipher[0] if cipher else "?"] += 1
        route = conn.sni_route
        self.stats.host(route.name if route is not None else UNMATCHED).handshakes_ok += 1
        if route is not None and route.client_auth.mode is not ClientAuthMode.OFF and ssl_object:
            # The TLS layer verified it against this host's CA bundle: the only way in.
            der = ssl_object.getpeercert(binary_form=True)
            headers = client_cert_headers(der, route.client_auth)
            conn.client_cert_lines = b"".join(b"%s: %s\r\n" % field for field in headers)

    def start_l4(
        self, conn: ClientConnection, transport: asyncio.Transport, route: HostRoute, early: bytes,
    ) -> None:
        pipe = L4Pipe(self, conn.state, route, self.stats.host(route.name))
        conn.listener.connections.discard(conn)
        conn.listener.connections.add(pipe)
        conn.closed = True  # the pipe owns the transport from now on
        transport.set_protocol(pipe)
        transport.pause_reading()
        pipe.connection_made(transport)
        if early:
            pipe.data_received(early)

    def track(self, task: asyncio.Task[None]) -> None:
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # ---- logging ------------------------------------------------------------------

    def log_upstream_error(self, pool: TargetPool, exc: BaseException) -> None:
        host, port = pool.target.address
        log.warning("upstream %s:%d: %s", host, port, str(exc) or type(exc).__name__)

    def _log_time(self) -> bytes:
        """UTC timestamp with milliseconds; the formatted second is made once per second."""
        now = time.time()
        second = int(now)
        if second != self._log_second:
            self._log_second = second
            stamp = dt.datetime.fromtimestamp(second, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self._log_prefix = stamp.encode("ascii")
        return b"%s.%03dZ" % (self._log_prefix, int((now - second) * 1000))

    def access(self, conn: ClientConnection, status: int, elapsed: float) -> None:
        """One access-log line (format in the README); ``elapsed`` in seconds. Bytes, made
        with one formatting operation: the request's own bytes are never decoded."""
        if self.access_log is None:
            return
        request = conn.request
        if request is None:
            line = b'%s %s - "-" %d 0 0.0ms -' % (self._log_time(), conn.log_prefix, status)
        else:
            pool = conn.pool
            line = b'%s %s %s "%s %s HTTP/%s" %d %d %.1fms %s' % (
                self._log_time(), conn.log_prefix, conn.route_label if conn.route is not None else b"-",
                request.method, request.target, request.version, status, conn.response_bytes,
                elapsed * 1000, pool.label if pool is not None else b"-",
            )
        self.access_log(line)


PLAIN_HTTP_ON_HTTPS = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 54\r\nConnection: close\r\n\r\n"
    b"400 Bad Request: this port speaks HTTPS, not HTTP.\n\n\n"
)


class _TLSAcceptor(asyncio.Protocol):
    """A new connection on the HTTPS listener until its ClientHello has been read.

    Called by the event loop. It reads bytes until the ClientHello is whole, lets the
    node choose the host by SNI, and hands the bytes to the TLS protocol that takes over.
    """

    def __init__(self, node: ProxyNode, listener: Listener) -> None:
        self.node = node
        self.listener = listener
        self.transport: asyncio.Transport
        self.buffer = bytearray()
        self.started = False
        self.deadline = 0.0
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        loop = self.node.loop
        self.deadline = loop.time() + self.node.limits.handshake_timeout
        self.timer = loop.call_at(self.deadline, self.timed_out)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.started:
            return  # read before start_tls took the transport over: handed over below
        try:
            hello = parse_client_hello(bytes(self.buffer))
        except NotTLS as exc:
            self.stop_timer()
            self.node.not_tls(self, exc)
            return
        if hello is None:
            return
        self.started = True
        self.stop_timer()
        self.transport.pause_reading()
        self.node.begin_tls(self, hello)

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop_timer()
        if not self.started:
            self.started = True
            self.node.stats.host(UNMATCHED).handshakes_failed["eof"] += 1

    def timed_out(self) -> None:
        self.timer = None
        if not self.started:
            self.started = True
            self.node.stats.host(UNMATCHED).handshakes_failed["timeout"] += 1
            self.transport.abort()

    def stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def refuse(self, reply: bytes) -> None:
        self.started = True
        self.transport.write(reply)
        self.transport.close()

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
