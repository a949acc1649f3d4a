"""Traffic counters, kept cheaply on the hot path: plain integers, no locks.

One event loop owns a ``Stats``; every connection of a host increments that
host's ``HostStats`` directly. ``Stats.as_dict()`` is the plain snapshot the
dashboard, the agent link and ``/metrics`` read (totals since start).

Upstream target states are not counters: the node gives ``Stats`` a provider
(``upstream_states``, and ``host_upstreams``: which upstream each host uses) that
reads them from its current state when ``as_dict()`` runs, so the hot path never
maintains them.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

# Upper bounds (seconds) of the upstream latency histogram buckets; the last is +Inf.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)


# Rate-limited client addresses: per-minute counts for the last RECENT_MINUTES minutes,
# at most RECENT_PER_MINUTE addresses a minute, the top RECENT_TOP of them reported.
RECENT_MINUTES: Final = 15
RECENT_PER_MINUTE: Final = 256
RECENT_TOP: Final = 20


class RecentClients:
    """Client addresses a host limited lately: bounded whatever the traffic."""

    __slots__ = ("minutes",)

    def __init__(self) -> None:
        self.minutes: dict[int, dict[str, int]] = {}

    def add(self, client: str, now: float) -> None:
        minute = int(now // 60)
        counts = self.minutes.get(minute)
        if counts is None:
            for old in [m for m in self.minutes if m <= minute - RECENT_MINUTES]:
                del self.minutes[old]
            counts = self.minutes[minute] = {}
        if client in counts:
            counts[client] += 1
        elif len(counts) < RECENT_PER_MINUTE:
            counts[client] = 1

    def restore(self, counts: Mapping[str, int], now: float) -> None:
        """Counts summed elsewhere (several workers' reports), as this minute's."""
        kept = list(counts.items())[:RECENT_PER_MINUTE]
        self.minutes = {int(now // 60): {client: int(n) for client, n in kept}}

    def top(self, now: float) -> dict[str, int]:
        since = int(now // 60) - RECENT_MINUTES
        total: dict[str, int] = {}
        for minute, counts in self.minutes.items():
            if minute > since:
                for client, n in counts.items():
                    total[client] = total.get(client, 0) + n
        best = sorted(total.items(), key=lambda item: (-item[1], item[0]))[:RECENT_TOP]
        return dict(best)


@dataclass(slots=True)
class HostStats:
    active_connections: int = 0
    total_connections: int = 0
    handshakes_ok: int = 0
    handshakes_failed: Counter[str] = field(default_factory=Counter)
    requests: int = 0
    responses: list[int] = field(default_factory=lambda: [0, 0, 0, 0, 0, 0])  # index = status // 100
    bytes_in: int = 0
    bytes_out: int = 0
    upstream_errors: Counter[str] = field(default_factory=Counter)
    latency_buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0
    # Refused by the host's access list (403, or before the handshake) / without valid
    # credentials (401) / over its rate or connection limit (429, or connection refused).
    denied: int = 0
    unauthorized: int = 0
    rate_limited: int = 0
    limited_clients: RecentClients = field(default_factory=RecentClients)

    def limited(self, client: str, now: float) -> None:
        self.rate_limited += 1
        self.limited_clients.add(client, now)

    def response(self, status: int) -> None:
        self.responses[min(status // 100, 5)] += 1

    def latency(self, seconds: float) -> None:
        self.latency_buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds

    def as_dict(self) -> dict[str, Any]:
        return {
            "active_connections": self.active_connections,
            "total_connections": self.total_connections,
            "handshakes_ok": self.handshakes_ok,
            "handshakes_failed": dict(self.handshakes_failed),
            "requests": self.requests,
            "responses": {f"{i}xx": n for i, n in enumerate(self.responses) if i},
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "upstream_errors": dict(self.upstream_errors),
            "latency": {
                "buckets": list(LATENCY_BUCKETS),
                "counts": list(self.latency_buckets),
                "sum": self.latency_sum,
            },
            "denied": self.denied,
            "unauthorized": self.unauthorized,
            "rate_limited": self.rate_limited,
            # {address: count}: summed key by key across workers, like the other maps
            "limited_clients": self.limited_clients.top(time.time()),
        }


@dataclass(slots=True)
class ListenerStats:
    tls_versions: Counter[str] = field(default_factory=Counter)
    ciphers: Counter[str] = field(default_factory=Counter)
    connections: int = 0
    rejected_connections: int = 0  # over the connection limit
    resumed_sessions: int = 0  # handshakes that resumed a TLS session (no certificate sent)

    def as_dict(self) -> dict[str, Any]:
        return {
            "connections": self.connections,
            "rejected_connections": self.rejected_connections,
            "resumed_sessions": self.resumed_sessions,
            "tls_versions": dict(self.tls_versions),
            "ciphers": dict(self.ciphers),
        }


@dataclass(slots=True)
class UpstreamStats:
    """Counters of one upstream (by name): target state changes and retried requests."""

    went_down: int = 0  # a target left the rotation (failed checks or passive cool-down)
    came_up: int = 0  # a target came back
    retries: int = 0  # requests retried on another target after a connect failure

    def as_dict(self) -> dict[str, Any]:
        return {"went_down": self.went_down, "came_up": self.came_up, "retries": self.retries}


# Traffic that matched no host (unknown SNI, unknown Host header) is counted here.
UNMATCHED: Final = "-"


class Stats:
    """All counters of one proxy node."""

    def __init__(self) -> None:
        self.started_at = time.time()
        self.hosts: dict[str, HostStats] = {}
        self.listeners: dict[str, ListenerStats] = {}
        self.config_revision = 0
        self.config_rejected: tuple[int, str] | None = None  # (revision, error)
        self.upstreams: dict[str, UpstreamStats] = {}
        # name -> {"targets": [...], "healthy": n, "available": n, "total": m}, read at as_dict()
        self.upstream_states: Callable[[], dict[str, dict[str, Any]]] | None = None
        # host name -> its upstream's name, set by the node next to upstream_states
        self.host_upstreams: Callable[[], dict[str, str]] | None = None
        # {"count": n, "restarts": r} on a node of worker processes (proxycore.workers)
        self.workers: dict[str, int] | None = None

    def host(self, name: str) -> HostStats:
        stats = self.hosts.get(name)
        if stats is None:
            stats = self.hosts[name] = HostStats()
        return stats

    def listener(self, name: str) -> ListenerStats:
        stats = self.listeners.get(name)
        if stats is None:
            stats = self.listeners[name] = ListenerStats()
        return stats

    def upstream(self, name: str) -> UpstreamStats:
        stats = self.upstreams.get(name)
        if stats is None:
            stats = self.upstreams[name] = UpstreamStats()
        return stats

    def upstreams_as_dict(self) -> dict[str, dict[str, Any]]:
        states = self.upstream_states() if self.upstream_states is not None else {}
        empty = {"targets": [], "healthy": 0, "available": 0, "total": 0}
        return {
            name: {**states.get(name, empty), **self.upstreams.get(name, UpstreamStats()).as_dict()}
            for name in (*states, *(n for n in self.upstreams if n not in states))
        }

    def config_applied(self, revision: int) -> None:
        self.config_revision = revision

    def config_failed(self, revision: int, error: str) -> None:
        self.config_rejected = (revision, error)

    def as_dict(self) -> dict[str, Any]:
        totals: dict[str, Any] = {
            "started_at": self.started_at,
            "config_revision": self.config_revision,
            "config_rejected": (
                {"revision": self.config_rejected[0], "error": self.config_rejected[1]}
                if self.config_rejected else None
            ),
            "hosts": {name: s.as_dict() for name, s in self.hosts.items()},
            "listeners": {name: s.as_dict() for name, s in self.listeners.items()},
            "upstreams": self.upstreams_as_dict(),
            "host_upstreams": self.host_upstreams() if self.host_upstreams is not None else {},
        }
        if self.workers is not None:
            totals["workers"] = dict(self.workers)
        return totals
