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
from typing import Protocol, cast

from proxycore import routing, tls
from proxycore.client import ClientConnection
from proxycore.config import HostRoute, Snapshot
from proxycore.l4 import L4Pipe
from proxycore.limits import Limits
from proxycore.stats import UNMATCHED, ListenerStats, Stats
from proxycore.upstream import Balancer, Pools, TargetPool

log = logging.getLogger("proxycore")


class Stoppable(Protocol):
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
        context = tls.upstream_context(upstream.tls) if upstream.tls is not None else None
        target_pools = [pools.pool(t, upstream, context) for t in upstream.targets]
        used += target_pools
        balancers[upstream.name] = Balancer(target_pools)
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


AccessLog = Callable[[str], None]


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
        self.stats.config_applied(snapshot.revision)
        self.listeners = [Listener("https", True, *https_address, self.stats.listener("https"))]
        if http_address is not None:
            self.listeners.append(Listener("http", False, *http_address, self.stats.listener("http")))
        self.stopping = False
        self.tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener_context = tls.listener_context(lambda: self.state.sni)

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
        while self._all_connections() and self.loop.time() < end:
            await asyncio.sleep(0.05)
        for conn in self._all_connections():
            conn.abort()
        for task in list(self.tasks):
            task.cancel()
        self.pools.close()
        log.info("stopped")

    def _all_connections(self) -> list[Stoppable]:
        return [c for listener in self.listeners for c in listener.connections]

    # ---- accepting connections -------------------------------------------------------

    def _plain(self, listener: Listener) -> Callable[[], asyncio.Protocol]:
        return lambda: ClientConnection(self, listener)

    def _tls_acceptor(self, listener: Listener) -> Callable[[], asyncio.Protocol]:
        return lambda: _TLSAcceptor(self, listener)

    async def handshake(self, acceptor: _TLSAcceptor) -> None:
        listener, transport = acceptor.listener, acceptor.transport
        conn = ClientConnection(self, listener)
        starting = asyncio.ensure_future(self.loop.start_tls(
            transport, conn, self._listener_context, server_side=True,
            ssl_handshake_timeout=self.limits.handshake_timeout,
        ))
        # uvloop starts reading right after connection_made even when the protocol paused,
        # so the ClientHello may already sit in the acceptor. start_tls swaps the protocol
        # in its first step and schedules the TLS protocol's connection_made and
        # resume_reading; two hops on the FIFO ready queue land after both of them.
        self.loop.call_soon(self.loop.call_soon, acceptor.hand_over)
        try:
            tls_transport = await starting
        except asyncio.CancelledError:
            transport.abort()
            raise
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            self.handshake_failed(transport, exc)
            return
        if tls_transport is None:
            return
        conn.connection_made(tls_transport)

    def handshake_failed(self, transport: asyncio.Transport, exc: BaseException) -> None:
        reason = tls.handshake_failure_reason(exc)
        route = tls.chosen_route(transport)
        self.stats.host(route.name if route is not None else UNMATCHED).handshakes_failed[reason] += 1
        if not transport.is_closing():
            transport.abort()

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

    def tls_accepted(self, conn: ClientConnection, transport: asyncio.Transport) -> HostRoute | None:
        ssl_object = transport.get_extra_info("ssl_object")
        stats = conn.listener.stats
        if ssl_object is not None:
            stats.tls_versions[ssl_object.version() or "?"] += 1
            cipher = ssl_object.cipher()
            stats.ciphers[cipher[0] if cipher else "?"] += 1
        route = tls.chosen_route(transport)
        self.stats.host(route.name if route is not None else UNMATCHED).handshakes_ok += 1
        return route

    def start_l4(
        self, conn: ClientConnection, transport: asyncio.Transport, route: HostRoute, early: bytes,
    ) -> None:
        pipe = L4Pipe(self, route, self.stats.host(route.name))
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
        log.warning("upstream %s:%d: %s", host, port, exc)

    def access(self, conn: ClientConnection, status: int) -> None:
        if self.access_log is None:
            return
        request = conn.request
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        if request is None:
            line = f'{now} {conn.client_ip} {conn.listener.name} - "-" {status} 0 0.0ms -'
        else:
            pool = conn.pool
            upstream = f"{pool.target.host}:{pool.target.port}" if pool is not None else "-"
            elapsed = (time.monotonic() - conn.started_at) * 1000 if conn.started_at else 0.0
            line = (
                f"{now} {conn.client_ip} {conn.listener.name} "
                f"{conn.route.name if conn.route is not None else '-'} "
                f'"{request.method.decode("latin-1")} {request.target.decode("latin-1")} '
                f'HTTP/{request.version.decode()}" {status} {conn.response_bytes} '
                f"{elapsed:.1f}ms {upstream}"
            )
        self.access_log(line)


class _TLSAcceptor(asyncio.Protocol):
    """Accepts a TCP connection on the HTTPS listener and starts its TLS handshake."""

    def __init__(self, node: ProxyNode, listener: Listener) -> None:
        self.node = node
        self.listener = listener
        self.transport: asyncio.Transport
        self.early = bytearray()  # bytes read before the TLS protocol took over

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.pause_reading()  # honoured by asyncio; uvloop may read anyway
        self.node.track(self.node.loop.create_task(self.node.handshake(self)))

    def data_received(self, data: bytes) -> None:
        self.early += data

    def hand_over(self) -> None:
        """Give the bytes read too early to the TLS protocol that now owns the transport."""
        if not self.early or self.transport.is_closing():
            return
        protocol = self.transport.get_protocol()
        data = memoryview(bytes(self.early))
        self.early.clear()
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
