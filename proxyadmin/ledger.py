"""What each linked node has counted since the rollup was last written: kept in memory, flushed in batches.

A node reports totals since it started (``proxycore.stats``), so what it did between
two moments is the difference of two reports, whatever came in between. Nothing is
written per report. Each link keeps a ``NodeLedger``: the rollup counters of the
node as the database last took them (``flushed``, the node's baseline, stored in
``ProxyNode.last_stats``) and, per minute of the reports' own clock, the node's
counters at its latest report of that minute (``segments``). Every
``ROLLUP_FLUSH_SECONDS`` one transaction (``proxyadmin.traffic.flush_ledgers``) turns
the segments of every node into per-(minute, host) sums (``fold``), adds them into
the rollup with one batched upsert, and moves each node's baseline on to the
counters it covered.

Why nothing is lost or counted twice:

- a flush writes the rollup and the baselines it covered in one transaction: a
  failure writes neither, and the segments are kept for the next flush;
- a crash of the control plane between flushes loses the segments, but the node
  still has its totals: the next link starts from the stored baseline, and its first
  report's difference covers the lost seconds (booked in that report's minute);
- a ``hello`` takes the node (``ProxyNode.link_epoch`` + 1, under the row's lock)
  and reads the baseline in the same transaction; a flush writes only the nodes whose
  epoch it still holds. So an older link's segments are either in the baseline the
  new link starts from, or dropped and covered again by the new link -- never both;
- a node restart (a new ``started_at``) counts the new totals from zero.

The only loss: a node that restarts while its counters since the last flush exist
nowhere else (the control plane crashed too, or it could not be reached) loses at
most that node's last ``ROLLUP_FLUSH_SECONDS`` plus the time it was away.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

# The rollup's counter columns, in the order a host's counters are kept here.
COLUMNS = (
    "requests", "responses_2xx", "responses_3xx", "responses_4xx", "responses_5xx",
    "bytes_in", "bytes_out", "handshake_failures", "upstream_errors",
)
# With the database away, a ledger keeps one segment per minute; past this many, the
# oldest two are merged (the counts stay exact, the older minute's go into the next one).
MAX_SEGMENTS = 180


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _map_sum(value: object) -> int:
    return sum(_int(n) for n in value.values()) if isinstance(value, Mapping) else 0


def host_counters(host: Mapping[str, Any]) -> tuple[int, ...]:
    """One host's cumulative rollup counters, in ``COLUMNS`` order (extra counters are ignored)."""
    responses = host.get("responses")
    responses = responses if isinstance(responses, Mapping) else {}
    return (
        _int(host.get("requests")),
        _int(responses.get("2xx")), _int(responses.get("3xx")),
        _int(responses.get("4xx")), _int(responses.get("5xx")),
        _int(host.get("bytes_in")), _int(host.get("bytes_out")),
        _map_sum(host.get("handshakes_failed")), _map_sum(host.get("upstream_errors")),
    )


@dataclass(frozen=True, slots=True)
class Counts:
    """A node's cumulative rollup counters at one report: its clock, its start, per host."""

    started_at: float
    time: float
    hosts: dict[str, tuple[int, ...]]

    @classmethod
    def of_totals(cls, time: float, totals: Mapping[str, Any]) -> Counts:
        hosts = totals.get("hosts")
        return cls(
            started_at=float(totals.get("started_at", 0.0)),
            time=time,
            hosts={name: host_counters(h) for name, h in (hosts.items() if isinstance(hosts, Mapping) else ())
                   if isinstance(h, Mapping)},
        )

    def to_json(self) -> dict[str, Any]:
        return {"started_at": self.started_at, "time": self.time,
                "columns": list(COLUMNS), "hosts": {h: list(v) for h, v in self.hosts.items()}}

    @classmethod
    def from_json(cls, stored: object) -> Counts | None:
        """A stored baseline, or None; takes the full reports older versions stored too."""
        if not isinstance(stored, dict):
            return None
        time = stored.get("time")
        if isinstance(time, bool) or not isinstance(time, int | float):
            return None
        totals = stored.get("totals")
        if "columns" not in stored and isinstance(totals, dict):
            return cls.of_totals(float(time), totals)  # before baselines: the node's whole report
        started_at, hosts, columns = stored.get("started_at"), stored.get("hosts"), stored.get("columns")
        if (isinstance(started_at, bool) or not isinstance(started_at, int | float)
                or not isinstance(hosts, dict) or not isinstance(columns, list)):
            return None
        index = {name: at for at, name in enumerate(columns) if isinstance(name, str)}

        def row(values: object) -> tuple[int, ...]:
            values = values if isinstance(values, list) else []
            return tuple(_int(values[index[c]]) if index.get(c, len(values)) < len(values) else 0
                         for c in COLUMNS)

        rows = {h: row(v) for h, v in hosts.items() if isinstance(h, str)}
        return cls(float(started_at), float(time), rows)


def counts_minus(now: Counts, before: Counts | None) -> dict[str, tuple[int, ...]]:
    """What the node counted between two reports (everything since its start after a restart)."""
    if before is None or before.started_at != now.started_at:
        return {h: v for h, v in now.hosts.items() if any(v)}
    found = {}
    zero = (0,) * len(COLUMNS)
    for host, values in now.hosts.items():
        old = before.hosts.get(host, zero)
        # Counters only grow while started_at stays; a node's mistake never makes a negative.
        diff = tuple(n - o if n > o else 0 for n, o in zip(values, old, strict=True))
        if any(diff):
            found[host] = diff
    return found


def minute_of(epoch: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch - epoch % 60, tz=dt.UTC)


@dataclass(slots=True)
class NodeLedger:
    """One link's node: its baseline and its counters per minute since (event-loop only)."""

    name: str
    pk: int
    epoch: int  # ProxyNode.link_epoch this link holds
    flushed: Counts | None  # the baseline in the database
    segments: list[tuple[dt.datetime, Counts]] = field(default_factory=list)
    seen: float = 0.0  # epoch time of the latest report, by the control plane's clock
    in_flight: list[tuple[dt.datetime, Counts]] | None = None  # segments a flush is writing
    closed: bool = False  # its link is gone: dropped once nothing is left to write
    workers: tuple[int, int] = (1, 0)  # worker processes and their restarts, from the latest report
    totals: dict[str, Any] | None = None  # the latest report's (validated) totals

    @property
    def latest(self) -> Counts | None:
        if self.segments:
            return self.segments[-1][1]
        if self.in_flight:
            return self.in_flight[-1][1]
        return self.flushed

    def add(self, counts: Counts, minute: dt.datetime, seen: float) -> None:
        """A report: the node's counters now, booked in the minute of the report's own time."""
        self.seen = seen
        if self.segments and self.segments[-1][0] == minute:
            self.segments[-1] = (minute, counts)
            return
        self.segments.append((minute, counts))
        if len(self.segments) > MAX_SEGMENTS:
            del self.segments[0]  # its counts are in the next segment's difference now

    def take(self) -> list[tuple[dt.datetime, Counts]] | None:
        """The segments for a flush, or None when there is nothing new (a flush at a time)."""
        if not self.segments or self.in_flight is not None:
            return None
        self.in_flight, self.segments = self.segments, []
        return self.in_flight

    def written(self) -> None:
        assert self.in_flight is not None
        self.flushed = self.in_flight[-1][1]
        self.in_flight = None

    def not_written(self) -> None:
        """The flush failed: its segments go back in front of the newer ones."""
        assert self.in_flight is not None
        self.segments = self.in_flight + self.segments
        self.in_flight = None
        del self.segments[:-MAX_SEGMENTS]

    @property
    def idle(self) -> bool:
        return not self.segments and self.in_flight is None


@dataclass(frozen=True, slots=True)
class FlushItem:
    """One node's part of a flush: the baseline it starts from and its segments."""

    pk: int
    epoch: int
    flushed: Counts | None
    segments: list[tuple[dt.datetime, Counts]]
    seen: float
    workers: tuple[int, int] = (1, 0)
    shown: dict[str, Any] | None = None  # shown_state() of the node's latest report


# Per host, what the admin shows of a node's latest report (proxyadmin.hoststatus).
SHOWN_HOST_KEYS = ("denied", "unauthorized", "rate_limited", "limited_clients")


def shown_state(totals: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """What the admin pages read from a node's row, stored with its baseline at each flush.

    Current state (upstream targets, which upstream each host uses) and the per-host
    access counters: the admin shows a node's latest report as of the last flush.
    """
    if totals is None:
        return None
    hosts = totals.get("hosts")
    return {
        "upstreams": totals.get("upstreams", {}),
        "host_upstreams": totals.get("host_upstreams", {}),
        "hosts": {name: shown for name, host in (hosts.items() if isinstance(hosts, Mapping) else ())
                  if (shown := {k: host[k] for k in SHOWN_HOST_KEYS if host.get(k)})},
    }


def fold(
    items: Iterable[FlushItem], kept: set[str] | None = None,
) -> dict[tuple[dt.datetime, str], list[int]]:
    """Per (minute, host): the sum of every node's counters over its segments (pure).

    ``kept`` bounds the stored host names (None keeps all).
    """
    table: dict[tuple[dt.datetime, str], list[int]] = {}
    for item in items:
        previous = item.flushed
        for minute, counts in item.segments:
            for host, diff in counts_minus(counts, previous).items():
                if kept is not None and host not in kept:
                    continue
                row = table.get((minute, host))
                if row is None:
                    table[(minute, host)] = list(diff)
                else:
                    for i, n in enumerate(diff):
                        row[i] += n
            previous = counts
    return table
