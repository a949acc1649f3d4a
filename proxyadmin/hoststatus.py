"""Each host's state at a glance, from what the control plane already stores.

The host list shows, per host, the worst of: disabled, no valid certificate (or one
pending from ACME), certificate expiring, upstream down, not applied on some proxy
node, or serving. The certificate is the one ``proxyadmin.coverage`` says a node
serves; upstream health and applied revisions are what online and stale nodes last
reported over the agent link (``ProxyNode.last_stats``, ``applied_revision``).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.utils import timezone

from proxyadmin import coverage
from proxyadmin import models as m

REPORTING = (m.ProxyNode.Status.ONLINE.value, m.ProxyNode.Status.STALE.value)


def reporting_nodes(now: dt.datetime | None = None) -> list[tuple[m.ProxyNode, str]]:
    """Online and stale nodes with their status, freshest first: whose reports are worth showing."""
    now = now or timezone.now()
    nodes = m.ProxyNode.objects.filter(
        last_seen__gte=now - dt.timedelta(seconds=m.ProxyNode.STALE_SECONDS),
    ).order_by("-last_seen")
    return [(node, status) for node in nodes if (status := node.status_at(now)) in REPORTING]


def reported_upstream(node: m.ProxyNode, name: str) -> dict[str, Any] | None:
    """The upstream's state in the node's latest stats (validated by the agent link), if any."""
    stored = node.last_stats if isinstance(node.last_stats, dict) else {}
    totals = stored.get("totals")
    upstreams = totals.get("upstreams") if isinstance(totals, dict) else None
    state = upstreams.get(name) if isinstance(upstreams, dict) else None
    return state if isinstance(state, dict) else None


@dataclass(frozen=True)
class UpstreamHealth:
    healthy: int
    total: int
    node: str  # the freshest node that reports it


@dataclass(frozen=True)
class Status:
    """One line of a host's status: ``level`` is ok, warn, bad or off (a CSS class suffix)."""

    level: str
    text: str


@dataclass
class Overview:
    """What the statuses of a page of hosts are computed from, read once per page."""

    now: dt.datetime = field(default_factory=timezone.now)
    certificates: list[m.Certificate] = field(default_factory=list)
    nodes: list[tuple[m.ProxyNode, str]] = field(default_factory=list)
    current_revision: int = 0

    @classmethod
    def load(cls) -> Overview:
        now = timezone.now()
        return cls(now=now, certificates=list(m.Certificate.objects.all()),
                   nodes=reporting_nodes(now), current_revision=m.ConfigRevision.current())

    def served_certificate(self, host: m.Host) -> m.Certificate | None:
        return coverage.served_certificate(host, host.hostnames(), self.certificates, self.now)

    def upstream_health(self, upstream: m.Upstream) -> UpstreamHealth | None:
        for node, _status in self.nodes:
            state = reported_upstream(node, upstream.name)
            if state is not None:
                return UpstreamHealth(int(state.get("healthy", 0)), int(state.get("total", 0)), node.name)
        return None

    def lagging_nodes(self) -> list[str]:
        """Nodes that do not serve the current revision, each with why when it rejected it."""
        lagging = []
        for node, _status in self.nodes:
            applied = node.applied_revision or 0
            if applied >= self.current_revision:
                continue
            text = f"{node.name} (serves revision {applied or '—'} of {self.current_revision})"
            if node.last_error and (node.last_error_revision or 0) > applied:
                text += f": rejected revision {node.last_error_revision}: {node.last_error[:120]}"
            lagging.append(text)
        return lagging

    def status(self, host: m.Host) -> list[Status]:
        """The host's problems, worst first; a single ``serving`` line when there are none."""
        if not host.enabled:
            return [Status("off", "disabled (answers 503)")]
        found = self._certificate_status(host)
        health = self.upstream_health(host.upstream)
        if health is not None and health.total and health.healthy == 0:
            found.append(Status("bad", f"upstream down (0 of {health.total} targets healthy)"))
        lagging = self.lagging_nodes()
        if lagging:
            found.append(Status("warn", "not applied on " + "; ".join(lagging)))
        if not found:
            if not self.nodes:
                return [Status("warn", "ready, but no proxy node is online")]
            return [Status("ok", "serving")]
        return found

    def _certificate_status(self, host: m.Host) -> list[Status]:
        cert = self.served_certificate(host)
        if cert is None:
            if host.acme:
                return [Status("warn", "certificate pending (ACME)")]
            return [Status("bad", "no valid certificate")]
        days = cert.days_to_expiry(self.now)
        if cert.not_after < self.now:
            return [Status("bad", "no valid certificate (expired)")]
        if days < settings.CERT_EXPIRY_WARNING_DAYS:
            return [Status("warn", f"certificate expires in {days} days")]
        return []


ACCESS_COUNTERS = ("denied", "unauthorized", "rate_limited")


def reported_access(host: str, now: dt.datetime | None = None) -> dict[str, Any]:
    """What the reporting nodes' access lists and rate limits refused for ``host``: the 403/401/429
    counts since each node started, and the most limited client addresses of the last 15
    minutes (each node reports its top 20), summed over the nodes, most limited first."""
    counts = dict.fromkeys(ACCESS_COUNTERS, 0)
    clients: dict[str, int] = {}
    for node, _ in reporting_nodes(now):
        stored = node.last_stats if isinstance(node.last_stats, dict) else {}
        totals = stored.get("totals")
        hosts = totals.get("hosts") if isinstance(totals, dict) else None
        stats = hosts.get(host) if isinstance(hosts, dict) else None
        if not isinstance(stats, dict):
            continue
        for key in ACCESS_COUNTERS:
            value = stats.get(key)
            counts[key] += value if isinstance(value, int) else 0
        limited = stats.get("limited_clients")
        for address, n in (limited.items() if isinstance(limited, dict) else ()):
            if isinstance(n, int):
                clients[address] = clients.get(address, 0) + n
    top = sorted(clients.items(), key=lambda item: (-item[1], item[0]))[:20]
    return {**counts, "limited_clients": top}
