"""Live traffic: per-node deltas and the per-minute rollup behind the dashboard's history.

Nodes report counters since they started (``proxycore.stats``). The control plane
subtracts each node's previous report (``stats_delta``, pure) for the dashboards'
ticks (``proxyadmin.coalesce``), and keeps what each node counted in memory
(``proxyadmin.ledger``) until ``flush_ledgers`` adds it into one ``TrafficRollup``
row per host and minute with one batched upsert (``add_to_rollup``), which several
daphne processes may do at once.
``history_series`` turns the rollup into the dashboard's per-minute chart.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.db import DatabaseError, connection, transaction
from django.db.models import Sum
from django.utils import timezone

from proxyadmin import ledger
from proxyadmin.models import Host, ProxyNode, TrafficRollup
from proxycore.agentproto import MAX_COUNTER
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
    # Each host's rollup counters (``ledger.host_counters``), when the caller has them already.
    counts: ledger.Counts | None = None

    @property
    def started_at(self) -> float:
        return float(self.totals.get("started_at", 0.0))

    def host_counts(self) -> Mapping[str, tuple[int, ...]]:
        return (self.counts or ledger.Counts.of_totals(self.time, self.totals)).hosts


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
        return bool(self.requests or self.responses or self.bytes_in or self.bytes_out
                    or self.handshake_failures or self.upstream_errors or self.active or self.active_before
                    or self.denied or self.unauthorized or self.rate_limited)


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


ZERO_COUNTS = (0,) * len(ledger.COLUMNS)
RESPONSE_CLASSES = ("2xx", "3xx", "4xx", "5xx")


def _host_delta(now: Mapping[str, Any], before: Mapping[str, Any],
                counts_now: tuple[int, ...], counts_before: tuple[int, ...]) -> HostDelta:
    # Both sides passed agentproto.validate_totals: buckets are floats, counts whole numbers.
    # The counters come as ledger.COLUMNS: requests, 2xx-5xx, bytes in and out, handshake
    # failures and upstream errors summed over their reasons.
    diff = [n - b if n > b else 0 for n, b in zip(counts_now, counts_before, strict=True)]
    latency_now = now.get("latency") or {}
    latency_before = before.get("latency") or {}
    buckets_now = latency_now.get("buckets", [])
    histogram_now = latency_now.get("counts", [0])
    # A different bucket layout (a node upgrade) cannot be subtracted: start it from zero.
    same_layout = latency_before.get("buckets", []) == buckets_now
    histogram_before = latency_before.get("counts", []) if same_layout else []
    if len(histogram_before) == len(histogram_now):
        latency_counts = tuple([n - b if n > b else 0
                                for n, b in zip(histogram_now, histogram_before, strict=True)])
    else:
        latency_counts = tuple(histogram_now)
    return HostDelta(
        requests=diff[0],
        responses={kind: n for kind, n in zip(RESPONSE_CLASSES, diff[1:5], strict=True) if n},
        bytes_in=diff[5],
        bytes_out=diff[6],
        handshake_failures=diff[7],
        upstream_errors=diff[8],
        active=now.get("active_connections", 0),
        active_before=before.get("active_connections", 0),
        latency_buckets=tuple(buckets_now),
        latency_counts=latency_counts,
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
    counts_now = current.host_counts()
    counts_before = {} if restarted or previous is None else previous.host_counts()
    hosts = {
        name: _host_delta(stats, before_hosts.get(name, {}), counts_now[name],
                          counts_before.get(name, ZERO_COUNTS))
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


def _upsert_sql(rows: int) -> str:
    """One ``INSERT ... ON CONFLICT DO UPDATE`` adding ``rows`` rows' counters (SQLite and PostgreSQL)."""
    q = connection.ops.quote_name
    table = q(TrafficRollup._meta.db_table)
    columns = ("minute", "host", *ledger.COLUMNS)
    values = ", ".join(["(" + ", ".join(["%s"] * len(columns)) + ")"] * rows)
    # Saturating at MAX_COUNTER: a sum past PostgreSQL's bigint must not fail the whole flush.
    updates = ", ".join(
        f"{q(c)} = CASE WHEN {table}.{q(c)} > {MAX_COUNTER} - excluded.{q(c)} THEN {MAX_COUNTER} "
        f"ELSE {table}.{q(c)} + excluded.{q(c)} END"
        for c in ledger.COLUMNS
    )
    # Only quoted names of the model's own columns go into the text; values are parameters.
    return (f"INSERT INTO {table} ({', '.join(q(c) for c in columns)}) VALUES {values} "  # noqa: S608
            f"ON CONFLICT ({q('minute')}, {q('host')}) DO UPDATE SET {updates}")


UPSERT_ROWS = 500  # rows per statement: 5,500 parameters, far under either database's limit


def add_to_rollup(table: Mapping[tuple[dt.datetime, str], Sequence[int]]) -> int:
    """Add per-(minute, host) counters (``ledger.COLUMNS`` order) into the rollup; the rows written.

    The addition happens in the database (``n = n + EXCLUDED.n``), so several processes
    may add to the same rows at once without losing counts.
    """
    rows = [(minute, host, [min(n, MAX_COUNTER) for n in values])
            for (minute, host), values in sorted(table.items()) if any(values)]
    adapt = connection.ops.adapt_datetimefield_value
    with connection.cursor() as cursor:
        for at in range(0, len(rows), UPSERT_ROWS):
            chunk = rows[at:at + UPSERT_ROWS]
            params: list[Any] = []
            for minute, host, values in chunk:
                params += [adapt(minute), host, *values]
            cursor.execute(_upsert_sql(len(chunk)), params)
    return len(rows)


# ProxyNode columns a flush writes, with their PostgreSQL types (VALUES rows come untyped).
NODE_FLUSH_COLUMNS = (("last_stats", "jsonb"), ("started_at", "timestamptz"), ("last_seen", "timestamptz"),
                      ("workers", "integer"), ("worker_restarts", "bigint"))


def update_nodes(items: Sequence[ledger.FlushItem]) -> None:
    """Each node's new baseline, last seen and workers: one ``UPDATE … FROM (VALUES …)`` per 500 nodes.

    Django's ``bulk_update`` builds a CASE per row and column in Python, some 0.4 s for
    250 nodes; this is the same statement shape on both databases (SQLite 3.33+).
    """
    q = connection.ops.quote_name
    table = q(ProxyNode._meta.db_table)
    postgres = connection.vendor == "postgresql"

    def typed(expression: str, sql_type: str) -> str:
        return f"CAST({expression} AS {sql_type})" if postgres else expression

    sets = ", ".join(f"{q(column)} = {typed(f'v.column{at}', sql_type)}"
                     for at, (column, sql_type) in enumerate(NODE_FLUSH_COLUMNS, start=2))
    adapt = connection.ops.adapt_datetimefield_value
    with connection.cursor() as cursor:
        for at in range(0, len(items), UPSERT_ROWS):
            chunk = items[at:at + UPSERT_ROWS]
            params: list[Any] = []
            for item in chunk:
                last = item.segments[-1][1]
                stored = last.to_json() if item.shown is None else {**last.to_json(), "totals": item.shown}
                params += [item.pk, json.dumps(stored),
                           adapt(dt.datetime.fromtimestamp(last.started_at, tz=dt.UTC)),
                           adapt(dt.datetime.fromtimestamp(item.seen, tz=dt.UTC)), *item.workers]
            values = ", ".join(["(" + ", ".join(["%s"] * (1 + len(NODE_FLUSH_COLUMNS))) + ")"] * len(chunk))
            cursor.execute(
                f"UPDATE {table} SET {sets} FROM (VALUES {values}) AS v "  # noqa: S608 (names only)
                f"WHERE {table}.{q('id')} = {typed('v.column1', 'bigint')}", params)


@dataclass(frozen=True, slots=True)
class FlushResult:
    rows: int  # rollup rows added to
    nodes: int  # node baselines moved on
    fenced: frozenset[int]  # nodes another link has taken since: their segments were dropped


def flush_ledgers(items: Sequence[ledger.FlushItem], now: dt.datetime | None = None) -> FlushResult:
    """Write a batch of ledgers in one transaction: the rollup, and each node's baseline and last seen.

    Only the nodes whose ``link_epoch`` is still the ledger's are written (see ``proxyadmin.ledger``).
    """
    now = now or timezone.now()
    kept = rolled_up_hosts()
    with transaction.atomic():
        # Locked in one order everywhere: a hello takes its node's row the same way.
        epochs = dict(ProxyNode.objects.select_for_update().filter(pk__in=[i.pk for i in items])
                      .order_by("pk").values_list("pk", "link_epoch"))
        current = [i for i in items if epochs.get(i.pk) == i.epoch]
        rows = add_to_rollup(ledger.fold(current, kept))
        update_nodes(current)
    try:
        pruner.prune_if_due(now)
    except DatabaseError:  # the flush is stored; pruning waits for the next minute
        log.warning("could not prune the traffic rollup", exc_info=True)
    return FlushResult(rows, len(current), frozenset(i.pk for i in items) - {i.pk for i in current})


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
