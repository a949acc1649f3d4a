"""One node's counters from several worker processes: summed totals, merged histograms.

Each worker sends its ``Stats.as_dict()`` to the supervisor once a second. The node's
totals are the sum of every live worker's last report plus what workers that died
had reported (``retire``): totals stay monotonic across worker restarts, so the control
plane's deltas never go backwards. What a dead worker counted after its last report
(under a second of traffic) is lost with it.

``add`` is generic on purpose: numbers are summed, dicts merged key by key, lists of
numbers summed element by element, so a counter added to ``HostStats`` is summed
without a change here. Two kinds of entry are not counters and are handled by name:
the latency histogram's bucket bounds (``buckets``: the same in every worker, kept
once) and ``active_connections`` (a gauge: a dead worker's connections are gone, so a
retired report counts none). ``upstreams`` is state, merged by ``merge_upstreams``.

``rebuild`` turns merged totals back into a ``Stats``, which ``/metrics`` reads.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from proxycore.stats import LATENCY_BUCKETS, RECENT_TOP, HostStats, ListenerStats, Stats, UpstreamStats

_KEPT_ONCE = frozenset({"buckets"})  # bounds of a histogram, not counts
_GAUGES = frozenset({"active_connections", "active"})  # connections open now
# Recent, not since start: merged key by key but kept to the top few, and not kept from a
# dead worker (a worker restarting every minute must not grow the node's report).
_RECENT = frozenset({"limited_clients"})
UPSTREAM_COUNTERS = ("went_down", "came_up", "retries")
_STATE = frozenset({"upstreams", "host_upstreams", "started_at", "config_revision", "config_rejected",
                    "workers"})


def add(into: dict[str, Any], report: Mapping[str, Any]) -> dict[str, Any]:
    """Add ``report``'s counters to ``into`` (in place) and return it."""
    for key, value in report.items():
        if key in _STATE:
            continue
        mine = into.get(key)
        if mine is None:
            into[key] = _copy(value)
        elif key in _KEPT_ONCE:
            continue
        elif isinstance(value, bool) or isinstance(mine, bool):
            continue  # a flag is state, not a count
        elif isinstance(value, int | float) and isinstance(mine, int | float):
            into[key] = mine + value
        elif isinstance(value, Mapping) and isinstance(mine, dict):
            add(mine, value)
            if key in _RECENT and len(mine) > RECENT_TOP:
                into[key] = dict(sorted(mine.items(), key=lambda item: (-item[1], item[0]))[:RECENT_TOP])
        elif isinstance(value, list) and isinstance(mine, list) and len(value) == len(mine):
            into[key] = [a + b if _number(a) and _number(b) else a for a, b in zip(mine, value, strict=True)]
    return into


def without_gauges(report: Mapping[str, Any]) -> dict[str, Any]:
    """``report`` as a dead worker leaves it: its counters stand, its open connections are gone."""
    copied: dict[str, Any] = {}
    for key, value in report.items():
        if key in _GAUGES:
            copied[key] = 0
        elif key in _RECENT:
            copied[key] = {}
        elif isinstance(value, Mapping):
            copied[key] = without_gauges(value)
        else:
            copied[key] = _copy(value)
    return copied


def merge_upstreams(
    checked: Mapping[str, Any], reports: Iterable[Mapping[str, Any]],
) -> dict[str, dict[str, Any]]:
    """Upstream state of the node: health from the supervisor's checks (``checked``, whose
    pools carry no traffic), open connections summed over the workers, a target cooling
    down if any worker cools it, and the workers' upstream counters added to the
    supervisor's (its checks count the state changes they make)."""
    merged: dict[str, dict[str, Any]] = {name: _copy(state) for name, state in checked.items()}
    for report in reports:
        for name, state in report.get("upstreams", {}).items():
            mine = merged.get(name)
            if mine is None:
                mine = merged[name] = _copy(state) | {"went_down": 0, "came_up": 0, "retries": 0}
                for target in mine.get("targets", []):
                    target["active"] = 0
            for counter in UPSTREAM_COUNTERS:
                mine[counter] = mine.get(counter, 0) + state.get(counter, 0)
            by_address = {t["address"]: t for t in mine.get("targets", [])}
            for target in state.get("targets", []):
                own = by_address.get(target.get("address"))
                if own is None:
                    continue
                own["active"] = own.get("active", 0) + target.get("active", 0)
                if target.get("cooling_down"):
                    own["cooling_down"] = True
                    own["healthy"] = False
                    own["last_error"] = target.get("last_error") or own.get("last_error", "")
    for state in merged.values():
        targets = state.get("targets", [])
        state["healthy"] = sum(1 for t in targets if t.get("healthy"))
        state["total"] = len(targets)
        state["available"] = min(state.get("available", 0), state["healthy"])
    return merged


def rebuild(totals: Mapping[str, Any], into: Stats) -> Stats:
    """Put merged ``totals`` into the ``Stats`` ``into`` (replacing its hosts, listeners and
    upstream counters), for readers of ``Stats`` such as ``/metrics``."""
    into.hosts = {name: _host_stats(h) for name, h in totals.get("hosts", {}).items()}
    into.listeners = {name: _listener_stats(li) for name, li in totals.get("listeners", {}).items()}
    upstreams = totals.get("upstreams", {})
    into.upstreams = {name: UpstreamStats(u.get("went_down", 0), u.get("came_up", 0), u.get("retries", 0))
                      for name, u in upstreams.items()}
    states = {name: {k: v for k, v in u.items() if k not in UPSTREAM_COUNTERS}
              for name, u in upstreams.items()}
    into.upstream_states = lambda: states
    return into


def _host_stats(totals: Mapping[str, Any]) -> HostStats:
    stats = HostStats()
    for key, value in totals.items():
        if key == "responses":
            stats.responses = [0] + [int(value.get(f"{i}xx", 0)) for i in range(1, 6)]
        elif key == "latency":
            counts = list(value.get("counts", []))
            if len(counts) == len(LATENCY_BUCKETS) + 1:
                stats.latency_buckets = counts
            stats.latency_sum = float(value.get("sum", 0.0))
        elif key == "limited_clients":  # not a Counter: recent counts, restored as this minute's
            stats.limited_clients.restore(value, time.time())
        elif isinstance(value, Mapping):
            if hasattr(stats, key):
                setattr(stats, key, Counter(value))
        elif isinstance(value, int) and hasattr(stats, key):
            setattr(stats, key, value)
    return stats


def _listener_stats(totals: Mapping[str, Any]) -> ListenerStats:
    stats = ListenerStats()
    for key, value in totals.items():
        if isinstance(value, Mapping) and hasattr(stats, key):
            setattr(stats, key, Counter(value))
        elif isinstance(value, int) and hasattr(stats, key):
            setattr(stats, key, value)
    return stats


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value
