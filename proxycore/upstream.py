"""Connections to upstream servers: keep-alive pools per target and target choice.

A ``TargetPool`` holds the idle keep-alive connections to one target and its
health (``proxycore.health``). Pools outlive snapshots: a reload keeps the pools
of targets that stay, with their health, and retires the others (their idle
connections close, busy ones are not reused). A pool no upstream sends new
requests to (draining or disabled everywhere) drains the same way. An
``UpstreamConnection`` belongs to at most one request at a time, its *owner*,
which gets every byte and event through the ``UpstreamOwner`` methods.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Sequence
from typing import Final, Protocol, cast

from proxycore import http1, tls
from proxycore.config import Balancing, Target, Upstream
from proxycore.health import TargetHealth, takes_requests

IDLE_UPSTREAM_TIMEOUT: Final = 30.0  # seconds an unused keep-alive connection is kept
# How many idle connections a target's pool keeps: as many as were lent out at once in
# the last 30 to 60 s (PEAK_WINDOW), at least MIN_IDLE_KEPT, never more than
# MAX_IDLE_PER_TARGET. A fixed cap below the load's concurrency (nginx's ``keepalive
# 32``) closes connections that the next wave of requests opens again: measured with 100
# keep-alive clients on one worker and a cap of 64, a new upstream connection every 3
# requests and 20% more CPU per request. Connections beyond the need of the moment age
# out (LIFO, IDLE_UPSTREAM_TIMEOUT), or the upstream closes them at its own idle timeout.
MIN_IDLE_KEPT: Final = 64
MAX_IDLE_PER_TARGET: Final = 1024
PEAK_WINDOW: Final = 30.0


class UpstreamOwner(Protocol):
    def upstream_data(self, data: bytes) -> None: ...
    def upstream_eof(self) -> None: ...
    def upstream_lost(self, exc: Exception | None) -> None: ...
    def upstream_pause_writing(self) -> None: ...
    def upstream_resume_writing(self) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    """One connection to a target; called by the event loop."""

    def __init__(self, pool: TargetPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.owner: UpstreamOwner | None = None
        self.closed = False
        self.requests = 0  # served so far: a reused connection may be stale
        self.idle_since = 0.0  # time.monotonic() when it went back to the pool
        self.parser = http1.ResponseParser()  # responses come in order, one parser for all

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.transport = transport
        transport.set_write_buffer_limits(high=256 * 1024)

    def data_received(self, data: bytes) -> None:
        if self.owner is not None:
            self.owner.upstream_data(data)
        else:  # an idle connection must not talk: drop it
            self.close()

    def eof_received(self) -> bool:
        if self.owner is not None:
            self.owner.upstream_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        owner, self.owner = self.owner, None
        if owner is not None:
            owner.upstream_lost(exc)

    def pause_writing(self) -> None:
        if self.owner is not None:
            self.owner.upstream_pause_writing()

    def resume_writing(self) -> None:
        if self.owner is not None:
            self.owner.upstream_resume_writing()

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def close(self) -> None:
        self.closed = True
        self.owner = None
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        self.owner = None
        if self.transport is not None:
            self.transport.abort()


class TargetPool:
    """The connections to one target (host, port, TLS settings)."""

    def __init__(self, target: Target, ssl_context: ssl.SSLContext | None, server_name: str) -> None:
        self.target = target
        self.ssl_context = ssl_context
        self.server_name = server_name
        self.idle: list[UpstreamConnection] = []
        self.active = 0  # connections lent out to requests (least-connections counts these)
        self.peak = 0  # the most lent out at once in this PEAK_WINDOW ...
        self.last_peak = 0  # ... and in the one before
        self.window_start = time.monotonic()
        self.retired = False
        self.draining = False  # no upstream sends it new requests: keep no idle connection
        self.health = TargetHealth()
        self.label = b"%s:%d" % (target.host.encode("ascii", "replace"), target.port)  # access log

    def take_idle(self) -> UpstreamConnection | None:
        while self.idle:
            conn = self.idle.pop()
            if time.monotonic() - conn.idle_since > IDLE_UPSTREAM_TIMEOUT:
                conn.close()  # the upstream may be about to close it: do not race that
                continue
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                self.active += 1
                if self.active > self.peak:
                    self.peak = self.active
                return conn
        return None

    async def connect(self, timeout: float) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        host, port = self.target.address
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: UpstreamConnection(self), host, port,
                    ssl=self.ssl_context,
                    server_hostname=(self.server_name or host) if self.ssl_context else None,
                ),
                timeout,
            )
        except ConnectionResetError as exc:
            # Both event loops report an upstream that hangs up mid-handshake (say, one that
            # wants a client certificate we lack) as a bare ConnectionResetError, which
            # would log as an empty reason and count as a refused connection.
            if self.ssl_context is None or exc.args:
                raise
            raise tls.closed_during_handshake() from exc
        self.active += 1
        if self.active > self.peak:
            self.peak = self.active
        return conn

    def idle_limit(self) -> int:
        """How many idle connections this pool keeps now (see MIN_IDLE_KEPT)."""
        want = self.peak if self.peak > self.last_peak else self.last_peak
        if want < MIN_IDLE_KEPT:
            return MIN_IDLE_KEPT
        return want if want < MAX_IDLE_PER_TARGET else MAX_IDLE_PER_TARGET

    def give_back(self, conn: UpstreamConnection, reusable: bool) -> None:
        """A request is done with ``conn``; keep it for the next one if it can serve it."""
        self.active -= 1
        conn.owner = None
        if (not reusable or self.retired or self.draining or conn.closed
                or len(self.idle) >= self.idle_limit()):
            conn.close()
            return
        conn.requests += 1
        conn.idle_since = time.monotonic()  # no timer per request: Pools.sweep closes stale ones
        self.idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        if conn in self.idle:
            self.idle.remove(conn)

    def retire(self) -> None:
        self.retired = True
        self.close_idle()

    def drain(self, draining: bool) -> None:
        """Take new requests (False) or let the busy connections finish and keep none (True)."""
        self.draining = draining
        if draining:
            self.close_idle()

    def close_idle(self) -> None:
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.close()

    def close_stale(self, now: float) -> None:
        """Close the idle connections kept longer than IDLE_UPSTREAM_TIMEOUT; start a new
        PEAK_WINDOW when one is over."""
        if now - self.window_start >= PEAK_WINDOW:
            self.last_peak, self.peak = self.peak, self.active
            self.window_start = now
        if self.idle and now - self.idle[0].idle_since > IDLE_UPSTREAM_TIMEOUT:
            keep = [c for c in self.idle if now - c.idle_since <= IDLE_UPSTREAM_TIMEOUT]
            for conn in self.idle:
                if conn not in keep:
                    conn.close()
            self.idle = keep


PoolKey = tuple[str, int, object]


class Pools:
    """Every target pool of a node, kept across reloads by (host, port, TLS settings)."""

    def __init__(self) -> None:
        self.pools: dict[PoolKey, TargetPool] = {}

    def pool(self, target: Target, upstream: Upstream, ssl_context: ssl.SSLContext | None) -> TargetPool:
        key: PoolKey = (target.host, target.port, upstream.tls)
        pool = self.pools.get(key)
        if pool is None or pool.retired:
            server_name = upstream.tls.server_name if upstream.tls else ""
            pool = self.pools[key] = TargetPool(target, ssl_context, server_name)
        else:
            pool.target = target  # weight or state may have changed
            pool.ssl_context = ssl_context
        return pool

    def retire_all_but(self, keep: Sequence[TargetPool]) -> None:
        kept = {id(p) for p in keep}
        for key, pool in list(self.pools.items()):
            if id(pool) not in kept:
                pool.retire()
                del self.pools[key]

    def sweep(self) -> None:
        now = time.monotonic()
        for pool in self.pools.values():
            pool.close_stale(now)

    def close(self) -> None:
        for pool in self.pools.values():
            pool.retire()
        self.pools.clear()


class Balancer:
    """Target choice for one upstream of one snapshot, among the targets that take new requests.

    A target takes new requests when it is enabled, not draining, and its health
    allows it (``health.takes_requests``); the health part is read at each pick.

    Round robin is smooth weighted round robin (nginx's): each pick adds every
    candidate's weight to its score, takes the highest and lowers it by the sum of
    the candidates' weights: weights 1/1/2 for a/b/c give c, a, b, c, ... Least connections
    takes the lowest ``active / weight`` (this node's requests in flight on the
    target), ties going round robin.
    """

    def __init__(
        self, pools: Sequence[TargetPool], balancing: Balancing = Balancing.ROUND_ROBIN,
        targets: Sequence[Target] | None = None,
    ) -> None:
        # A pool shared by two upstreams carries one of their targets; each balancer
        # keeps its own upstream's weights and flags.
        self.members = list(zip(pools, targets if targets is not None else [p.target for p in pools],
                                strict=True))
        chosen = [(p, t) for p, t in self.members if t.enabled and not t.draining and t.weight > 0]
        self.pools = [p for p, _ in chosen]
        self.weights = [t.weight for _, t in chosen]
        self.current = [0] * len(self.pools)
        self.least = balancing is Balancing.LEAST_CONNECTIONS
        self.next = 0  # where least-connections starts looking: ties go round robin
        self.single = self.pools[0] if len(self.pools) == 1 else None  # no choice to make

    def pick(self, exclude: TargetPool | None = None) -> TargetPool | None:
        single = self.single
        if single is not None:
            health = single.health
            if single is exclude or not health.healthy:
                return None
            return single if not health.down_until or health.down_until <= time.monotonic() else None
        now = time.monotonic()
        if self.least:
            return self._least_connections(exclude, now)
        return self._round_robin(exclude, now)

    def _round_robin(self, exclude: TargetPool | None, now: float) -> TargetPool | None:
        best = -1
        total = 0
        current, weights = self.current, self.weights
        for i, pool in enumerate(self.pools):
            if pool is exclude or not takes_requests(pool.health, now):
                continue
            current[i] += weights[i]
            total += weights[i]
            if best < 0 or current[i] > current[best]:
                best = i
        if best < 0:
            return None
        current[best] -= total
        return self.pools[best]

    def _least_connections(self, exclude: TargetPool | None, now: float) -> TargetPool | None:
        best = -1
        n = len(self.pools)
        for k in range(n):
            i = (self.next + k) % n
            pool = self.pools[i]
            if pool is exclude or not takes_requests(pool.health, now):
                continue
            # active/weight < best.active/best.weight, without division
            if best < 0 or pool.active * self.weights[best] < self.pools[best].active * self.weights[i]:
                best = i
        if best < 0:
            return None
        self.next = (best + 1) % n
        return self.pools[best]
