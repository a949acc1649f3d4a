"""One dashboard tick per control-plane process per second, summing the process's nodes.

Every node's report gives a ``traffic.StatsDelta``; ``TickCoalescer`` adds them up
per host until ``take()``, which the process calls once a second
(``proxyadmin.ingest``). So a dashboard gets one ``tick`` per process per second,
however many nodes are linked, instead of one per node. The tick is the dashboard's
format of one node's tick (``node`` is the process's key, ``PROCESS_KEY``), plus:

- ``interval``: the seconds it covers (since the process's previous tick);
- ``nodes``: a small summary per node heard from in the last ``STALE_AFTER``
  seconds: the time of its latest report, its requests in the interval, its active
  connections, its worker processes and their restarts;
- ``reports``: reports this process took since its previous tick; ``shed``: those
  it dropped unprocessed (a newer report of the same node replaced them: no count
  is lost).

Latency histograms of the same bucket layout are summed before p50/p95 are read;
active connections are each node's latest level; an upstream's targets are those of
the node that finds the fewest healthy, each naming that node.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Any

from proxyadmin import traffic
from proxycore.agentproto import latency_quantile

PROCESS_KEY = f"control plane {socket.gethostname()}:{os.getpid()}"
STALE_AFTER = 5.0  # a node not heard from for this long adds no active connections
RESPONSE_KINDS = ("2xx", "3xx", "4xx", "5xx")


@dataclass(slots=True)
class HostSum:
    requests: int = 0
    responses: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RESPONSE_KINDS, 0))
    bytes_in: int = 0
    bytes_out: int = 0
    handshake_failures: int = 0
    upstream_errors: int = 0
    denied: int = 0
    unauthorized: int = 0
    rate_limited: int = 0
    latency_buckets: tuple[float, ...] = ()
    latency_counts: list[int] | None = None
    upstream: str | None = None
    targets_healthy: int | None = None
    targets_total: int | None = None

    def add(self, delta: traffic.HostDelta, targets: dict[str, Any]) -> None:
        self.requests += delta.requests
        for kind in RESPONSE_KINDS:
            self.responses[kind] += delta.responses.get(kind, 0)
        self.bytes_in += delta.bytes_in
        self.bytes_out += delta.bytes_out
        self.handshake_failures += delta.handshake_failures
        self.upstream_errors += delta.upstream_errors
        self.denied += delta.denied
        self.unauthorized += delta.unauthorized
        self.rate_limited += delta.rate_limited
        if self.latency_counts is None or self.latency_buckets != delta.latency_buckets:
            if self.latency_counts is None or sum(delta.latency_counts) > sum(self.latency_counts):
                # Layouts differ only across node versions: the busier one is kept.
                self.latency_buckets, self.latency_counts = delta.latency_buckets, list(delta.latency_counts)
        else:
            for i, n in enumerate(delta.latency_counts):
                self.latency_counts[i] += n
        if targets.get("upstream") is not None:
            self.upstream = targets["upstream"]
            healthy, total = targets.get("targets_healthy"), targets.get("targets_total")
            if healthy is not None and (self.targets_healthy is None or healthy < self.targets_healthy):
                self.targets_healthy = healthy
            if total is not None and (self.targets_total is None or total > self.targets_total):
                self.targets_total = total

    def entry(self, interval: float, active: int) -> dict[str, Any]:
        counts = self.latency_counts or [0]

        def ms(q: float) -> float | None:
            seconds = latency_quantile(self.latency_buckets, counts, q) if self.latency_counts else None
            return None if seconds is None else round(seconds * 1000, 3)

        return {
            "requests": self.requests,
            "rps": round(self.requests / interval, 3),
            "active": active,
            **self.responses,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "handshake_failures": self.handshake_failures,
            "upstream_errors": self.upstream_errors,
            "denied": self.denied,
            "unauthorized": self.unauthorized,
            "rate_limited": self.rate_limited,
            "p50_ms": ms(0.5),
            "p95_ms": ms(0.95),
            "upstream": self.upstream,
            "targets_healthy": self.targets_healthy,
            "targets_total": self.targets_total,
        }


@dataclass(slots=True)
class NodeMark:
    time: float  # the node's latest report (its clock)
    heard: float  # when this process took it (its clock)
    active: dict[str, int]  # host -> open connections then
    workers: int = 1
    worker_restarts: int = 0
    requests: int = 0  # since the previous tick


class TickCoalescer:
    """Deltas of this process's nodes in, one tick a second out (one event loop: no locking)."""

    def __init__(self) -> None:
        self.nodes: dict[str, NodeMark] = {}
        self.last_take: float | None = None
        self._reset()

    def _reset(self) -> None:
        self.hosts: dict[str, HostSum] = {}
        self.tls_versions: dict[str, int] = {}
        self.ciphers: dict[str, int] = {}
        self.upstreams: dict[str, dict[str, Any]] = {}
        self.shed = 0
        self.reports = 0
        for mark in self.nodes.values():
            mark.requests = 0

    def add(self, node: str, report_time: float, totals: dict[str, Any], delta: traffic.StatsDelta | None,
            now: float) -> None:
        """A node's report: its levels always, its counts when ``delta`` is known."""
        self.reports += 1
        workers = totals.get("workers") or {}
        mark = self.nodes.get(node)
        if mark is None:
            mark = self.nodes[node] = NodeMark(report_time, now, {})
        mark.time, mark.heard = report_time, now
        mark.workers, mark.worker_restarts = workers.get("count", 1), workers.get("restarts", 0)
        mark.active = {name: h.get("active_connections", 0) for name, h in totals.get("hosts", {}).items()
                       if h.get("active_connections")}
        if delta is None:
            return
        hosts = self.hosts
        for name, host in delta.hosts.items():
            if host.worth_showing():
                summed = hosts.get(name)
                if summed is None:
                    summed = hosts[name] = HostSum()
                summed.add(host, delta.host_targets(name))
                mark.requests += host.requests
        for into, found in ((self.tls_versions, delta.tls_versions), (self.ciphers, delta.ciphers)):
            for key, n in found.items():
                into[key] = into.get(key, 0) + n
        for name, state in delta.upstreams.items():
            self._add_upstream(node, name, state)

    def _add_upstream(self, node: str, name: str, state: dict[str, Any]) -> None:
        kept = self.upstreams.get(name)
        retries = state.get("retries", 0)
        if kept is None or state.get("healthy", 0) < kept["healthy"]:
            targets = [{**t, "node": node} for t in state.get("targets", [])]
            self.upstreams[name] = {**state, "targets": targets,
                                    "retries": retries + (kept["retries"] if kept else 0)}
        else:
            kept["retries"] += retries

    def forget(self, node: str) -> None:
        """Its link closed: its connections stop counting now, not when it goes stale."""
        self.nodes.pop(node, None)

    def take(self, now: float) -> dict[str, Any] | None:
        """The tick since the previous one; None when this process has no node to speak of."""
        interval = now - self.last_take if self.last_take is not None else 1.0
        self.last_take = now
        for name in [n for n, mark in self.nodes.items() if now - mark.heard > STALE_AFTER]:
            del self.nodes[name]
        if not self.nodes and not self.hosts:
            self._reset()
            return None
        active: dict[str, int] = {}
        for mark in self.nodes.values():
            for host, n in mark.active.items():
                active[host] = active.get(host, 0) + n
        hosts = {name: s.entry(interval if interval > 0 else 1.0, active.get(name, 0))
                 for name, s in self.hosts.items()}
        for name, n in active.items():
            if name not in hosts:  # open connections, no request in the interval
                hosts[name] = HostSum().entry(1.0, n)
        tick = {
            "type": "tick",
            "node": PROCESS_KEY,
            "time": now,
            "interval": round(interval, 3),
            "hosts": hosts,
            "tls_versions": self.tls_versions,
            "ciphers": self.ciphers,
            "upstreams": self.upstreams,
            "nodes": {name: {"time": mark.time, "requests": mark.requests,
                             "active": sum(mark.active.values()),
                             "workers": mark.workers, "worker_restarts": mark.worker_restarts}
                      for name, mark in self.nodes.items()},
            "reports": self.reports,
            "shed": self.shed,
        }
        self._reset()
        return tick
