"""A proxy node: the listeners, the current snapshot, reload and graceful stop.

``ProxyNode`` owns one ``NodeState`` per snapshot: the routing and SNI tables,
the TLS contexts and the balancers, all built at reload time. New connections
take the current state; in-flight ones keep theirs. A snapshot whose state fails
to build is rejected whole and the old one keeps serving.

New connections on the HTTPS listener go through ``proxycore.acceptor`` (ClientHello,
SNI, the host's own TLS context); on the HTTP listener they are
``ClientConnection``s from the start. Connection deadlines are watched by one
sweep a few times a second rather than by timers per request.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from proxycore import access, acmealpn, routing, tls
from proxycore.acceptor import TLSAcceptor
from proxycore.accesslog import AccessLog, Sink
from proxycore.client import ClientConnection
from proxycore.config import HostRoute, Snapshot
from proxycore.credentials import Verifier
from proxycore.healthcheck import HealthMonitor, describe_upstreams, plan_checks
from proxycore.heaptrim import HeapTrim, glibc_malloc_trim
from proxycore.l4 import L4Pipe
from proxycore.limits import Limits
from proxycore.ratelimit import Limiters
from proxycore.stats import ListenerStats, Stats
from proxycore.tlssessions import TicketKeys
from proxycore.upstream import Balancer, PoolKey, Pools, TargetPool

log = logging.getLogger("proxycore")

# How often connection deadlines are checked; timeouts are this much late at most.
SWEEP_INTERVAL = 0.25


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
    acme_alpn: Mapping[str, ssl.SSLContext]  # tls-alpn-01 challenges by name (acmealpn)
    policies: Mapping[str, access.AccessPolicy]  # compiled access lists by host name
    trust: Mapping[str, access.TrustPolicy]  # trusted proxies by listener name


def build_state(
    snapshot: Snapshot, pools: Pools, *, resumption: bool = True, tickets: TicketKeys | None = None,
) -> NodeState:
    sni = tls.build_sni_table(snapshot, resumption=resumption, tickets=tickets, now=time.time())
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
        acme_alpn=acmealpn.challenge_contexts(snapshot.acme_tls_alpn),
        policies=access.compile_policies(snapshot),
        trust={t.listener: access.TrustPolicy(t) for t in snapshot.listener_trust if t.trusted_proxies},
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
    handshaking: int = 0  # TLS connections not yet connections: they hold a slot too


class ProxyNode:
    def __init__(
        self,
        snapshot: Snapshot,
        *,
        https_address: tuple[str, int] = ("127.0.0.1", 8443),
        http_address: tuple[str, int] | None = ("127.0.0.1", 8080),
        limits: Limits | None = None,
        stats: Stats | None = None,
        access_log: Sink | None = None,
        session_resumption: bool = True,
        ticket_keys: TicketKeys | None = None,
        listen_sockets: Mapping[str, socket.socket] | None = None,
        active_checks: bool = True,
    ) -> None:
        self.limits = limits or Limits()
        self.stats = stats or Stats()
        self.access_log = AccessLog(access_log) if access_log is not None else None
        self.pools = Pools()
        self.limiters = Limiters()  # rate limits: per node, they survive reloads
        self.verifier = Verifier()  # Basic credentials: caches and a bounded hashing pool
        self.session_resumption = session_resumption  # off: every TLS handshake is a full one
        self.tickets = ticket_keys or TicketKeys()  # one secret for the node's life: survives reloads
        self.ticket_epoch = self.tickets.epoch(time.time())
        self.state = self.build(snapshot)  # a bad first snapshot is fatal
        # A worker process runs no checks of its own: its supervisor sends the verdicts.
        self.active_checks = active_checks
        self.listen_sockets = dict(listen_sockets or {})  # listener name -> socket handed over
        self.health = HealthMonitor(self.stats)
        self.stats.upstream_states = lambda: describe_upstreams(self.state.balancers, time.monotonic())
        self.stats.host_upstreams = lambda: {r.name: r.upstream.name for r in self.state.snapshot.hosts}
        self.stats.config_applied(snapshot.revision)
        self.listeners = [Listener("https", True, *https_address, self.stats.listener("https"))]
        if http_address is not None:
            self.listeners.append(Listener("http", False, *http_address, self.stats.listener("http")))
        self.https_port = https_address[1]  # the bound port once started (redirects name it)
        self.stopping = False
        self.tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweeps = 0
        self.heap = HeapTrim(glibc_malloc_trim())  # hands back what closed connections freed

    @property
    def revision(self) -> int:
        return self.state.snapshot.revision

    def worker_pids(self) -> list[int]:
        return []

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    # ---- start, reload, stop ---------------------------------------------------------

    async def start(self, *, listen: bool = True) -> None:
        """Listen and run; ``listen=False``: only health checks and timers (a supervisor's)."""
        self._loop = asyncio.get_running_loop()
        for listener in self.listeners if listen else ():
            factory = self._tls_acceptor(listener) if listener.https else self._plain(listener)
            given = self.listen_sockets.get(listener.name)
            if given is not None:
                listener.server = await self.loop.create_server(factory, sock=given, backlog=1024)
            else:
                listener.server = await self.loop.create_server(
                    factory, listener.host, listener.port, reuse_address=True, backlog=1024
                )
            sock = listener.server.sockets[0]
            listener.port = sock.getsockname()[1]
            log.info("listening on %s://%s:%d", listener.name, listener.host, listener.port)
        if listen:
            self.https_port = self.listeners[0].port
        self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self.sweep)
        self.adopt_upstreams()  # health checkers and draining for the first snapshot

    def build(self, snapshot: Snapshot) -> NodeState:
        return build_state(snapshot, self.pools, resumption=self.session_resumption, tickets=self.tickets)

    def rotate_ticket_keys(self, now: float) -> None:
        """A new ticket-key period: every current context takes its next key."""
        epoch = self.tickets.epoch(now)
        if epoch != self.ticket_epoch:
            self.ticket_epoch = epoch
            for ctx, identity in self.state.sni.keyed:
                self.tickets.apply(ctx, identity, epoch)

    def sweep(self) -> None:
        """Act on passed connection deadlines (head, idle, upstream read): no timer per request."""
        now = self.loop.time()
        for conn in self._all_connections():
            conn.check_deadlines(now)
        self._sweeps += 1
        if self._sweeps % 4 == 0:
            self.pools.sweep()
            self.rotate_ticket_keys(time.time())
            self.heap.check(self._closed_connections())
        self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self.sweep)

    def reload(self, snapshot: Snapshot) -> bool:
        """Serve ``snapshot`` to new connections; keep the old one if it cannot be built."""
        try:
            state = self.build(snapshot)
        except Exception as exc:  # any failure rejects the whole snapshot
            error = str(exc) or type(exc).__name__
            log.error("config revision %d rejected, still serving %d: %s",
                      snapshot.revision, self.state.snapshot.revision, error)
            self.stats.config_failed(snapshot.revision, error)
            return False
        self.state = state
        self.pools.retire_all_but(state.pools)
        self.limiters.retain({route.name for route in snapshot.hosts if route.rate_limit is not None})
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
        self.verifier.close()
        log.info("stopped")

    def adopt_upstreams(self) -> None:
        """Drain the pools no upstream sends new requests to; run the current state's checks."""
        state = self.state
        taking = {id(p) for balancer in state.balancers.values() for p in balancer.pools}
        for pool in state.pools:
            pool.drain(id(pool) not in taking)
        plans = plan_checks(state.snapshot, state.balancers) if self.active_checks else {}
        self.health.replan(plans, state.pools)

    def health_verdicts(self) -> dict[PoolKey, tuple[bool, str]]:
        """The active checks' verdict on every pool: what a supervisor sends its workers."""
        return {key: (pool.health.healthy, pool.health.last_error) for key, pool in self.pools.pools.items()}

    def follow_health(self, verdicts: Mapping[PoolKey, tuple[bool, str]]) -> None:
        """Take the supervisor's verdicts (a worker runs no active checks of its own)."""
        for key, pool in self.pools.pools.items():
            verdict = verdicts.get(key)
            if verdict is not None:
                pool.health.healthy = verdict[0]
                if not verdict[0]:
                    pool.health.last_error = verdict[1]

    def _all_connections(self) -> list[Stoppable]:
        return [c for listener in self.listeners for c in listener.connections]

    def _closed_connections(self) -> int:
        """Connections accepted (or refused) since the start that are gone."""
        return sum(li.stats.connections - len(li.connections) - li.handshaking for li in self.listeners)

    # ---- accepting connections -------------------------------------------------------

    def _plain(self, listener: Listener) -> Callable[[], asyncio.BaseProtocol]:
        return lambda: ClientConnection(self, listener)

    def _tls_acceptor(self, listener: Listener) -> Callable[[], asyncio.Protocol]:
        return lambda: TLSAcceptor(self, listener)

    def admit(self, listener: Listener) -> bool:
        """A new TCP connection on ``listener``: is there room for it?"""
        listener.stats.connections += 1
        if self.stopping or len(listener.connections) + listener.handshaking >= self.limits.max_connections:
            listener.stats.rejected_connections += 1
            return False
        return True

    def accept(self, conn: ClientConnection) -> bool:
        """Count ``conn`` among its listener's connections, if there is room (TLS connections
        were admitted at their first byte: their slot is theirs)."""
        listener = conn.listener
        if conn.https:
            if self.stopping:
                return False
        elif not self.admit(listener):
            return False
        listener.connections.add(conn)
        return True

    def forget(self, conn: Stoppable) -> None:
        for listener in self.listeners:
            listener.connections.discard(conn)

    def start_l4(
        self, conn: ClientConnection, transport: asyncio.Transport, route: HostRoute, early: bytes,
    ) -> None:
        pipe = L4Pipe(self, conn.state, route, self.stats.host(route.name))
        pipe.source, pipe.on_close = conn.source, conn.give_slot
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
