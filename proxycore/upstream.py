"""Connections to upstream servers: keep-alive pools per target and target choice.

A ``TargetPool`` holds the idle keep-alive connections to one target. Pools
outlive snapshots: a reload keeps the pools of targets that stay and retires
the others (their idle connections close, busy ones are not reused). An
``UpstreamConnection`` belongs to at most one request at a time, its *owner*,
which gets every byte and event through the ``UpstreamOwner`` methods.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence
from typing import Protocol, cast

from proxycore.config import Target, Upstream

IDLE_UPSTREAM_TIMEOUT = 30.0  # seconds an unused keep-alive connection is kept
MAX_IDLE_PER_TARGET = 64


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
        self.idle_timer: asyncio.TimerHandle | None = None

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
        self.retired = False

    def take_idle(self) -> UpstreamConnection | None:
        while self.idle:
            conn = self.idle.pop()
            if conn.idle_timer is not None:
                conn.idle_timer.cancel()
                conn.idle_timer = None
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                self.active += 1
                return conn
        return None

    async def connect(self, timeout: float) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        host, port = self.target.address
        _, conn = await asyncio.wait_for(
            loop.create_connection(
                lambda: UpstreamConnection(self), host, port,
                ssl=self.ssl_context,
                server_hostname=(self.server_name or host) if self.ssl_context else None,
            ),
            timeout,
        )
        self.active += 1
        return conn

    def give_back(self, conn: UpstreamConnection, reusable: bool) -> None:
        """A request is done with ``conn``; keep it for the next one if it can serve it."""
        self.active -= 1
        conn.owner = None
        if not reusable or self.retired or conn.closed or len(self.idle) >= MAX_IDLE_PER_TARGET:
            conn.close()
            return
        conn.requests += 1
        conn.idle_timer = asyncio.get_running_loop().call_later(IDLE_UPSTREAM_TIMEOUT, conn.close)
        self.idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        if conn in self.idle:
            self.idle.remove(conn)

    def retire(self) -> None:
        self.retired = True
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.close()


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

    def close(self) -> None:
        for pool in self.pools.values():
            pool.retire()
        self.pools.clear()


class Balancer:
    """Smooth weighted round robin over the targets that take new requests.

    Each pick adds every target's weight to its current score and takes the
    highest, then lowers it by the total: weights 1/1/2 give a, c, b, c, ...
    """

    def __init__(self, pools: Sequence[TargetPool]) -> None:
        self.pools = [p for p in pools if p.target.enabled and not p.target.draining]
        self.current = [0] * len(self.pools)
        self.total = sum(p.target.weight for p in self.pools)

    def pick(self, exclude: TargetPool | None = None) -> TargetPool | None:
        best = -1
        for i, pool in enumerate(self.pools):
            if pool is exclude:
                continue
            self.current[i] += pool.target.weight
            if best < 0 or self.current[i] > self.current[best]:
                best = i
        if best < 0:
            return None
        self.current[best] -= self.total
        return self.pools[best]
