"""L4 mode: after the TLS handshake, raw bytes both ways to the upstream.

The stream may start with a PROXY protocol v1/v2 header carrying the client's
address (rama's ``tls_rustls_termination`` example). Back-pressure both ways:
a side that cannot keep up pauses reading on the other.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from proxycore import health, proxyproto, tls
from proxycore.config import HostRoute
from proxycore.stats import HostStats
from proxycore.upstream import TargetPool, UpstreamConnection

if TYPE_CHECKING:
    from proxycore.server import NodeState, ProxyNode

MAX_EARLY_BYTES = 256 * 1024


class L4Pipe(asyncio.Protocol):
    """The client side of a TCP-mode connection; also the owner of its upstream connection."""

    def __init__(self, node: ProxyNode, state: NodeState, route: HostRoute, stats: HostStats) -> None:
        self.node = node
        self.state = state
        self.route = route
        self.stats = stats
        self.transport: asyncio.Transport | None = None
        self.upstream: UpstreamConnection | None = None
        self.pool: TargetPool | None = None
        self.early: list[bytes] = []  # client bytes that arrived before the upstream connected
        self.early_size = 0
        self.closed = False
        self.source: tuple[str, int] | None = None  # the client's address from a PROXY header
        self.on_close: Callable[[], None] | None = None  # gives back a per-client connection slot

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.transport = transport
        self.stats.active_connections += 1
        self.stats.total_connections += 1
        balancer = self.state.balancers[self.route.upstream.name]
        pool = balancer.pick()
        if pool is None:
            self.stats.upstream_errors["no_target"] += 1
            transport.close()
            return
        self.pool = pool
        self.node.track(self.node.loop.create_task(self.connect(pool)))

    async def connect(self, pool: TargetPool) -> None:
        try:
            conn = await pool.connect(self.route.upstream.connect_timeout)
        except TimeoutError:
            self.stats.upstream_errors["connect_timeout"] += 1
            self.node.health.request_failed(pool, self.route.upstream, "connect timed out")
            self.abort()
            return
        except OSError as exc:  # refused, reset, or a TLS handshake that failed
            self.stats.upstream_errors[tls.upstream_connect_failure(exc)] += 1
            self.node.log_upstream_error(pool, exc)
            # Passive health sees stream hosts' failures too (the README: always on).
            self.node.health.request_failed(pool, self.route.upstream, health.describe_error(exc))
            self.abort()
            return
        if self.closed or self.transport is None:
            pool.give_back(conn, reusable=False)
            return
        self.upstream = conn
        conn.owner = self
        header = proxyproto.header_for(self.route.proxy_protocol, self.transport, self.source)
        conn.write(header + b"".join(self.early))
        self.early.clear()
        self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self.stats.bytes_in += len(data)
        if self.upstream is not None:
            self.upstream.write(data)
            return
        self.early.append(data)
        self.early_size += len(data)
        if self.early_size > MAX_EARLY_BYTES and self.transport is not None:
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        # TLS has no half-close in asyncio: pass the EOF on, then the pipe closes.
        upstream = self.upstream.transport if self.upstream is not None else None
        if upstream is not None and upstream.can_write_eof():
            upstream.write_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.stats.active_connections -= 1
        if self.on_close is not None:
            self.on_close()
        if self.upstream is not None and self.pool is not None:
            conn, self.upstream = self.upstream, None
            self.pool.give_back(conn, reusable=False)

    def pause_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.resume_reading()

    # ---- called by the upstream connection ------------------------------------------

    def upstream_data(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.stats.bytes_out += len(data)
            self.transport.write(data)

    def upstream_eof(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()  # TLS has no half-close: end the client stream

    def upstream_lost(self, exc: Exception | None) -> None:
        self.upstream = None
        if self.pool is not None:
            self.pool.active -= 1
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def upstream_pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def upstream_resume_writing(self) -> None:
        if self.transport is not None and self.upstream is not None:
            self.transport.resume_reading()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    @property
    def busy(self) -> bool:
        return not self.closed

    def check_deadlines(self, now: float) -> None:
        """Streams have no request deadlines; the upstream's own timeouts apply."""

    def stop_gracefully(self) -> None:
        """Streams have no request boundary: they get the stop deadline, then close."""
