"""Live traffic: per-node deltas and the per-minute rollup behind the dashboard's history.

Nodes report counters since they started (``proxycore.stats``). The control plane
subtracts each node's previous report (``stats_delta``, pure), sends the difference
to dashboards as a ``tick`` (``proxyadmin.announce.tick_message``), and adds it into
one ``TrafficRollup`` row per host and minute (``add_to_rollup``), which several
daphne processes may do at once.
``history_series`` turns the rollup into the dashboard's per-minute chart.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.db import DatabaseError, IntegrityError, transaction
from django.db.models import F, PositiveBigIntegerField, Sum, Value
from django.db.models.functions import Least
from django.utils import timezone

from proxyadmin.models import Host, ProxyNode, TrafficRollup
from proxycore.agentproto import MAX_COUNTER, StatsReport, latency_quantile
from proxycore.stats import UNMATCHED

log = logging.getLogger("proxyadmin.traffic")

HISTORY_MINUTES = 24 * 60
PRUNE_INTERVAL = dt.timedelta(minutes=1)
# Nodes report once a second; used when the node's clock gives no usable interval.
NOMINAL_INTERVAL = 1.0
# Chart series of the dashboard's history -> the rollup column summed into each.
HISTORY_SERIES = {
    "requests": "requests",
    "bytes_in": "bytes_in",
    "bytes_out": "bytes_out",
    "errors_5xx": "responses_5xx",
    "handshake_failures": "handshake_failures",
}


# -- deltas (pure) ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StatsSample:
    """One ``stats`` report: the node's clock and its totals since ``started_at``."""

    time: float
    totals: dict[str, Any]

    @property
    def started_at(self) -> float:
        return float(self.totals.get("started_at", 0.0))

    def to_json(self) -> dict[str, Any]:
        return {"time": self.time, "totals": self.totals}

    @classmethod
    def from_json(cls, stored: object) -> StatsSample | None:
        if not isinstance(stored, dict) or not isinstance(stored.get("totals"), dict):
            return None
        time = stored.get("time")
        return cls(float(time), stored["totals"]) if isinstance(time, int | float) else None


@dataclass(frozen=True, slots=True)
class HostDelta:
    """What one host did between two reports of one node."""

    requests: int = 0
    responses: dict[str, int] = field(default_factory=dict)  # "2xx" -> count
    bytes_in: int = 0
    bytes_out: int = 0
    handshake_failures: int = 0
    upstream_errors: int = 0
    active: int = 0  # open connections now: a level, not a difference
    active_before: int = 0
    latency_buckets: tuple[float, ...] = ()
    latency_counts: tuple[int, ...] = (0,)
    denied: int = 0  # the host's access list: 403s and connections refused before TLS
    unauthorized: int = 0  # 401s
    rate_limited: int = 0  # 429s and connections over the per-client limit

    def rollup_increments(self) -> dict[str, int]:
        """The non-zero ``TrafficRollup`` columns this delta adds to (each at most ``MAX_COUNTER``)."""
        values = {
            "requests": self.requests,
            "responses_2xx": self.responses.get("2xx", 0),
            "responses_3xx": self.responses.get("3xx", 0),
            "responses_4xx": self.responses.get("4xx", 0),
            "responses_5xx": self.responses.get("5xx", 0),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "handshake_failures": self.handshake_failures,
            "upstream_errors": self.upstream_errors,
        }
        # Sums of several counters (failure reasons, error kinds) may pass the column's top.
        return {name: min(n, MAX_COUNTER) for name, n in values.items() if n}

    def worth_showing(self) -> bool:
        """Idle hosts stay out of ticks; a host whose last connection just closed does not."""
        return bool(self.rollup_increments() or any(self.responses.values())
                    or self.active or self.active_before or self.denied or self.rate_limited)

    def tick_entry(self, elapsed: float) -> dict[str, Any]:
        def ms(q: float) -> float | None:
            seconds = latency_quantile(self.latency_buckets, self.latency_counts, q)
            return None if seconds is None else round(seconds * 1000, 3)

        return {
            "requests": self.requests,
            "rps": round(self.requests / elapsed, 3),
            "active": self.active,
            **{kind: self.responses.get(kind, 0) for kind in ("2xx", "3xx", "4xx", "5xx")},
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "handshake_failures": self.handshake_failures,
            "upstream_errors": self.upstream_errors,
            "denied": self.denied,
            "unauthorized": self.unauthorized,
            "rate_limited": self.rate_limited,
            "p50_ms": ms(0.5),
            "p95_ms": ms(0.95),
        }


@dataclass(frozen=True, slots=True)
class StatsDelta:
    time: float
    elapsed: float  # seconds the delta covers, > 0
    restarted: bool  # no usable previous report: the node's totals are the delta
    hosts: dict[str, HostDelta]
    tls_versions: dict[str, int]
    ciphers: dict[str, int]
    # Current state from the latest report (not differences), but for ``retries``.
    upstreams: dict[str, dict[str, Any]] = field(default_factory=dict)
    host_upstreams: dict[str, str] = field(default_factory=dict)

    def host_targets(self, host: str) -> dict[str, Any]:
        """The upstream a host uses on this node and how many of its targets are healthy."""
        name = self.host_upstreams.get(host)
        state = self.upstreams.get(name) if name is not None else None
        return {
            "upstream": name,
            "targets_healthy": state["healthy"] if state is not None else None,
            "targets_total": state["total"] if state is not None else None,
        }


def _retries(state: object) -> object:
    return state.get("retries") if isinstance(state, dict) else 0


def upstream_states(now: Mapping[str, Any], before: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Each upstream's current targets, and the requests it retried since ``before``."""
    # A report stored before upstreams were validated may hold anything here.
    before_upstreams = before.get("upstreams")
    before_upstreams = before_upstreams if isinstance(before_upstreams, dict) else {}
    return {
        name: {
            "healthy": state.get("healthy", 0),
            "available": state.get("available", 0),
            "total": state.get("total", 0),
            "targets": state.get("targets", []),
            "retries": _minus(state.get("retries"), _retries(before_upstreams.get(name))),
        }
        for name, state in now.get("upstreams", {}).items()
    }


def _minus(now: object, before: object) -> int:
    # Counters only grow while started_at stays; never report a negative.
    now_n = now if isinstance(now, int) else 0
    before_n = before if isinstance(before, int) else 0
    return max(now_n - before_n, 0)


def _map_minus(now: Mapping[str, int], before: Mapping[str, int]) -> dict[str, int]:
    found = {key: _minus(value, before.get(key, 0)) for key, value in now.items()}
    return {key: n for key, n in found.items() if n}


def _host_delta(now: Mapping[str, Any], before: Mapping[str, Any]) -> HostDelta:
    latency_now = now.get("latency") or {}
    latency_before = before.get("latency") or {}
    buckets = tuple(float(b) for b in latency_now.get("buckets", ()))
    counts_now = latency_now.get("counts", [0])
    # A different bucket layout (a node upgrade) cannot be subtracted: start it from zero.
    same_layout = tuple(float(b) for b in latency_before.get("buckets", ())) == buckets
    counts_before = latency_before.get("counts", []) if same_layout else []
    counts_before = counts_before if len(counts_before) == len(counts_now) else [0] * len(counts_now)
    return HostDelta(
        requests=_minus(now.get("requests"), before.get("requests")),
        responses=_map_minus(now.get("responses", {}), before.get("responses", {})),
        bytes_in=_minus(now.get("bytes_in"), before.get("bytes_in")),
        bytes_out=_minus(now.get("bytes_out"), before.get("bytes_out")),
        handshake_failures=sum(_map_minus(now.get("handshakes_failed", {}),
                                          before.get("handshakes_failed", {})).values()),
        upstream_errors=sum(_map_minus(now.get("upstream_errors", {}),
                                       before.get("upstream_errors", {})).values()),
        active=now.get("active_connections", 0),
        active_before=before.get("active_connections", 0),
        latency_buckets=buckets,
        latency_counts=tuple(_minus(n, b) for n, b in zip(counts_now, counts_before, strict=True)),
        denied=_minus(now.get("denied"), before.get("denied")),
        unauthorized=_minus(now.get("unauthorized"), before.get("unauthorized")),
        rate_limited=_minus(now.get("rate_limited"), before.get("rate_limited")),
    )


def _listener_sums(totals: Mapping[str, Any], key: str) -> dict[str, int]:
    summed: dict[str, int] = {}
    for listener in totals.get("listeners", {}).values():
        for name, n in listener.get(key, {}).items():
            summed[name] = summed.get(name, 0) + n
    return summed


def stats_delta(previous: StatsSample | None, current: StatsSample) -> StatsDelta:
    """What a node did since its previous report; everything since it started after a restart.

    Both samples must have passed ``proxycore.agentproto.validate_totals``.
    """
    restarted = previous is None or previous.started_at != current.started_at
    before: Mapping[str, Any] = {} if restarted or previous is None else previous.totals
    since = current.started_at if restarted or previous is None else previous.time
    elapsed = current.time - since
    before_hosts = before.get("hosts", {})
    hosts = {
        name: _host_delta(stats, before_hosts.get(name, {}))
        for name, stats in current.totals.get("hosts", {}).items()
    }
    return StatsDelta(
        time=current.time,
        elapsed=elapsed if elapsed > 0 else NOMINAL_INTERVAL,
        restarted=restarted,
        hosts=hosts,
        tls_versions=_map_minus(_listener_sums(current.totals, "tls_versions"),
                                _listener_sums(before, "tls_versions")),
        ciphers=_map_minus(_listener_sums(current.totals, "ciphers"), _listener_sums(before, "ciphers")),
        upstreams=upstream_states(current.totals, before),
        host_upstreams=dict(current.totals.get("host_upstreams", {})),
    )


def minute_of(moment: dt.datetime) -> dt.datetime:
    return moment.replace(second=0, microsecond=0)


def history_series(
    rows: Iterable[Mapping[str, Any]], first_minute: dt.datetime, minutes: int = HISTORY_MINUTES
) -> dict[str, list[int]]:
    """Per-minute series from rollup sums keyed by ``minute``; minutes without a row are 0."""
    by_minute = {row["minute"]: row for row in rows}
    series: dict[str, list[int]] = {"minutes": [], **{name: [] for name in HISTORY_SERIES}}
    for offset in range(minutes):
        minute = first_minute + dt.timedelta(minutes=offset)
        series["minutes"].append(int(minute.timestamp()))
        row = by_minute.get(minute)
        for name, column in HISTORY_SERIES.items():
            series[name].append(int(row[column] or 0) if row else 0)
    return series


# -- the rollup (database) --------------------------------------------------


def _saturating_add(column: str, n: int) -> Any:
    """``column + n`` in the database, stopping at ``MAX_COUNTER`` instead of overflowing bigint."""
    return Least(F(column), Value(MAX_COUNTER - n), output_field=PositiveBigIntegerField()) + n


def _add_row(minute: dt.datetime, host: str, increments: Mapping[str, int]) -> None:
    rows = TrafficRollup.objects.filter(minute=minute, host=host)
    add = {column: _saturating_add(column, n) for column, n in increments.items()}
    # An UPDATE with F() adds in the database: concurrent writers cannot lose each other's counts.
    if rows.update(**add):
        return
    try:
        with transaction.atomic():  # a savepoint: losing the race must not abort the caller
            TrafficRollup.objects.create(minute=minute, host=host, **increments)
    except IntegrityError:
        # Another process made the row between our UPDATE and INSERT: add to it.
        rows.update(**add)


def add_to_rollup(hosts: Mapping[str, HostDelta], minute: dt.datetime) -> None:
    """Add the hosts' traffic into their rows of ``minute``, creating rows as needed."""
    for host in sorted(hosts):  # one order everywhere: concurrent writers do not deadlock
        increments = hosts[host].rollup_increments()
        if increments:
            _add_row(minute, host, increments)


def rolled_up_hosts() -> set[str]:
    """The host names the rollup keeps: the config's hosts, and ``-`` for traffic that matched none.

    Nodes name hosts in their reports; bounding the stored names by the config means
    a node cannot add rows for hosts that do not exist.
    """
    return {*Host.objects.values_list("name", flat=True), UNMATCHED}


def prune_rollup(now: dt.datetime) -> int:
    """Delete rollup rows older than ``TRAFFIC_HISTORY_DAYS``; returns how many."""
    cutoff = minute_of(now) - dt.timedelta(days=settings.TRAFFIC_HISTORY_DAYS)
    deleted, _ = TrafficRollup.objects.filter(minute__lt=cutoff).delete()
    return deleted


class RollupPruner:
    """Prunes old rollup rows, and nodes not seen for a day, at most once per ``PRUNE_INTERVAL`` here."""

    def __init__(self) -> None:
        self.last: dt.datetime | None = None

    def prune_if_due(self, now: dt.datetime) -> int | None:
        if self.last is not None and now - self.last < PRUNE_INTERVAL:
            return None
        self.last = now
        ProxyNode.forget_unseen(now)
        return prune_rollup(now)


pruner = RollupPruner()


def record_stats(report: StatsReport, now: dt.datetime | None = None) -> StatsDelta | None:
    """Take one ``stats`` report: delta against the node's previous one, rollup, node seen.

    Returns None for a node that never said hello. The node row is locked for the
    whole step, so two links that claim the same node cannot count a delta twice.
    Only ``rolled_up_hosts()`` are stored; the delta (and so the live tick) keeps every
    host the node reported, such as one just removed that still drains connections.
    """
    now = now or timezone.now()
    current = StatsSample(report.time, report.totals)
    kept = rolled_up_hosts()
    with transaction.atomic():
        node = ProxyNode.objects.select_for_update().filter(name=report.node).first()
        if node is None:
            return None
        delta = stats_delta(StatsSample.from_json(node.last_stats), current)
        add_to_rollup({name: host for name, host in delta.hosts.items() if name in kept}, minute_of(now))
        node.last_stats = current.to_json()
        node.started_at = dt.datetime.fromtimestamp(current.started_at, tz=dt.UTC)
        node.last_seen = now
        node.save(update_fields=["last_stats", "started_at", "last_seen"])
    try:
        pruner.prune_if_due(now)
    except DatabaseError:  # the report is stored; pruning waits for the next minute
        log.warning("could not prune the traffic rollup", exc_info=True)
    return delta


def history(now: dt.datetime | None = None, minutes: int = HISTORY_MINUTES) -> dict[str, list[int]]:
    """The dashboard's history: the last ``minutes`` minutes, summed over hosts."""
    first = minute_of(now or timezone.now()) - dt.timedelta(minutes=minutes - 1)
    rows = (
        TrafficRollup.objects.filter(minute__gte=first)
        .order_by()
        .values("minute")
        .annotate(**{column: Sum(column) for column in HISTORY_SERIES.values()})
    )
    return history_series(rows, first, minutes)
