"""Rate limits per host and client address: a token bucket and a concurrent-connection count.

Limits are per proxy node (per worker process when a node runs several): nothing is
shared between nodes, so a client spread evenly over N nodes can get N times a
host's rate. Buckets are kept for at most ``MAX_CLIENTS`` addresses per host; the
least recently seen (to within ``SEEN_GRANULARITY``) is dropped first: it then starts
again with a full bucket, which only ever errs on the side of letting a client through.
Connection counts exist only while a client holds connections, so they are bounded by
the listener's connection limit.
"""

from __future__ import annotations

import math
from typing import Final

from proxycore.config import RateLimit

MAX_CLIENTS: Final = 50_000  # tracked addresses per host
# How stale "least recently seen" may be: a bucket moves to the young end of the order at
# most once a second, not on every request (two dict operations saved per request).
SEEN_GRANULARITY: Final = 1.0


class Bucket:
    __slots__ = ("at", "seen", "tokens")

    def __init__(self, tokens: float, at: float) -> None:
        self.tokens = tokens
        self.at = at  # last refill
        self.seen = at  # last move to the young end of the order


class HostLimiter:
    """One host's buckets and connection counts; lives as long as the node (across reloads,
    the host's current ``RateLimit`` is read on each use)."""

    __slots__ = ("buckets", "capacity", "connections", "limit", "max_clients", "rate")

    def __init__(self, max_clients: int = MAX_CLIENTS) -> None:
        self.buckets: dict[int, Bucket] = {}
        self.connections: dict[int, int] = {}
        self.max_clients = max_clients
        self.limit: RateLimit | None = None  # the figures below are this one's
        self.rate = 0.0
        self.capacity = 1.0

    def configure(self, limit: RateLimit) -> None:
        self.limit = limit
        self.rate = limit.requests_per_second
        self.capacity = float(limit.burst or max(1, math.ceil(self.rate)))

    def take(self, limit: RateLimit, client: int, now: float) -> int:
        """Take a token for a request of ``client`` at ``now``: 0 if there was one, else the
        seconds to wait for the next (what ``Retry-After`` says)."""
        if limit is not self.limit:
            self.configure(limit)
        rate = self.rate
        if rate <= 0.0:
            return 0
        buckets = self.buckets
        bucket = buckets.get(client)
        if bucket is None:
            while len(buckets) >= self.max_clients:
                del buckets[next(iter(buckets))]  # the least recently seen
            bucket = buckets[client] = Bucket(self.capacity, now)
        else:
            tokens = bucket.tokens + (now - bucket.at) * rate
            bucket.tokens = tokens if tokens < self.capacity else self.capacity
            bucket.at = now
            if now - bucket.seen >= SEEN_GRANULARITY:
                bucket.seen = now
                del buckets[client]
                buckets[client] = bucket  # (last: most recently seen)
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0
        return max(1, math.ceil((1.0 - bucket.tokens) / rate))

    def connect(self, limit: RateLimit | None, client: int) -> bool:
        """A new connection of ``client``: False (not counted) when it already has its limit."""
        cap = limit.connections_per_client if limit is not None else 0
        count = self.connections.get(client, 0)
        if cap and count >= cap:
            return False
        self.connections[client] = count + 1
        return True

    def disconnect(self, client: int) -> None:
        count = self.connections.get(client, 0) - 1
        if count > 0:
            self.connections[client] = count
        else:
            self.connections.pop(client, None)

    def at_limit(self, limit: RateLimit | None, client: int) -> bool:
        cap = limit.connections_per_client if limit is not None else 0
        return bool(cap) and self.connections.get(client, 0) >= cap


class Limiters:
    """The node's ``HostLimiter`` per host name."""

    def __init__(self, max_clients: int = MAX_CLIENTS) -> None:
        self.hosts: dict[str, HostLimiter] = {}
        self.max_clients = max_clients

    def retain(self, names: set[str]) -> None:
        """Forget the buckets of hosts no longer configured (a connection that still holds a
        slot keeps its own reference to give it back)."""
        for name in [n for n in self.hosts if n not in names]:
            del self.hosts[name]

    def host(self, name: str) -> HostLimiter:
        limiter = self.hosts.get(name)
        if limiter is None:
            limiter = self.hosts[name] = HostLimiter(self.max_clients)
        return limiter
