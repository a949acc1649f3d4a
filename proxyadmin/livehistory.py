"""The last 15 minutes of live traffic, kept in memory so that a dashboard opened now shows them.

Nodes report once a second and the dashboards get each report as a ``tick``
(``proxyadmin.announce.tick_message``). ``LiveHistory`` folds the same ticks into
points the way the browser's model does (``dashboard-model.js``): a tick's counts are
spread over the wall-clock seconds its interval covers, summed over nodes. A new
dashboard gets ``snapshot()`` in its ``state`` message and starts where the history
ends: no tick is counted twice, since the browser, like this module, ignores a tick
of a node no newer than that node's last one.

What it holds is bounded, and does not grow with the number of nodes:

- one point per second over ``WINDOW`` seconds, summed over hosts and nodes: the
  charts and totals (``COUNTERS`` and active connections);
- one point per ``HOST_STEP`` seconds per host (the hosts table's counts), for at
  most ``MAX_HOSTS`` hosts; traffic of a host past that bound counts in the totals
  only;
- TLS versions and ciphers per ``HOST_STEP`` seconds (at most 256 of each per
  report, ``agentproto.MAX_MAP_ENTRIES``);
- the time and active connections of each node heard from in the window.

At the bounds that is about 900 + 1,000 x 91 points of 8 numbers: some 15 MB at
most, a few kilobytes for a small site. Per-host points are 10 s apart, not 1 s,
because per-second points per host would make that bound ten times larger while
the hosts table only ever shows their sum over the window.

Each daphne process keeps its own. It records the ticks of its own nodes and,
while one of its dashboards is open, those every other process relays through
the channel layer (the same tick from two consumers is counted once). So a process
with no dashboard open keeps only its own nodes' traffic: a dashboard opened there
starts with that, and the others' ticks fill in from then on. The 24-hour view
comes from the database and covers every node.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

WINDOW = 900  # seconds: the dashboard's live window (dashboard-model.js LIVE_WINDOW)
HOST_STEP = 10  # seconds per host point
MAX_HOSTS = 1000
MAX_INTERVAL = 5.0  # longest interval one tick is taken to cover, as in dashboard-model.js
STALE_AFTER = 5.0  # a node not heard from for this long adds no active connections
FUTURE_SLACK = 60.0  # a tick from further ahead of this process's clock is not kept
COUNTERS = ("requests", "2xx", "3xx", "4xx", "5xx", "bytes_in", "bytes_out", "handshake_failures",
            "unauthorized", "denied", "rate_limited")


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return 0.0
    return float(value)


def _add(into: list[float], counts: list[float], share: float = 1.0) -> None:
    for i, n in enumerate(counts):
        into[i] += n * share


def _tally(into: dict[str, int], found: object) -> None:
    if isinstance(found, Mapping):
        for key, n in found.items():
            if isinstance(key, str) and isinstance(n, int) and not isinstance(n, bool):
                into[key] = into.get(key, 0) + n


@dataclass(slots=True)
class NodeMark:
    time: float  # the node's latest tick
    active: int  # its active connections then


class LiveHistory:
    """Ticks in, the points of the last ``WINDOW`` seconds out (one event loop: no locking)."""

    def __init__(self, window: int = WINDOW, host_step: int = HOST_STEP, max_hosts: int = MAX_HOSTS) -> None:
        self.window = window
        self.host_step = host_step
        self.max_hosts = max_hosts
        self.seconds: dict[int, list[float]] = {}
        self.active: dict[int, int] = {}
        self.hosts: dict[str, dict[int, list[float]]] = {}
        self.tls: dict[int, tuple[dict[str, int], dict[str, int]]] = {}
        self.nodes: dict[str, NodeMark] = {}

    def add_tick(self, tick: Mapping[str, Any], now: float) -> bool:
        """Fold one ``tick`` in; False for a repeat, or one outside the window around ``now``."""
        node, time = tick.get("node"), tick.get("time")
        if not isinstance(node, str) or isinstance(time, bool) or not isinstance(time, int | float):
            return False
        if not now - self.window < time <= now + FUTURE_SLACK:
            return False
        previous = self.nodes.get(node)
        if previous is not None and time <= previous.time:
            return False
        start = previous.time if previous is not None and time - previous.time <= MAX_INTERVAL else time - 1
        totals = [0.0] * len(COUNTERS)
        active = 0
        hosts = tick.get("hosts")
        step = int(time) // self.host_step * self.host_step
        for host, figures in (hosts.items() if isinstance(hosts, Mapping) else ()):
            if not isinstance(figures, Mapping):
                continue
            counts = [_number(figures.get(name)) for name in COUNTERS]
            _add(totals, counts)
            active += int(_number(figures.get("active")))
            self._add_host(host, step, counts)
        self._spread(start, time, totals)
        self.nodes[node] = NodeMark(time, active)
        current = sum(mark.active for mark in self.nodes.values() if mark.time > time - STALE_AFTER)
        for second in range(math.floor(start) + 1, math.floor(time) + 1):
            self.active[second] = current
        versions, ciphers = self.tls.setdefault(step, ({}, {}))
        _tally(versions, tick.get("tls_versions"))
        _tally(ciphers, tick.get("ciphers"))
        self.prune(now)
        return True

    def _add_host(self, host: object, step: int, counts: list[float]) -> None:
        if not isinstance(host, str) or not any(counts):  # an idle host costs nothing
            return
        steps = self.hosts.get(host)
        if steps is None:
            if len(self.hosts) >= self.max_hosts:
                return
            steps = self.hosts[host] = {}
        _add(steps.setdefault(step, [0.0] * len(COUNTERS)), counts)

    def _spread(self, start: float, end: float, counts: list[float]) -> None:
        """Add ``counts`` to the seconds (start, end] overlaps, each its share of the interval."""
        length = end - start
        second = math.floor(start)
        while second < end:
            overlap = min(end, second + 1) - max(start, second)
            if overlap > 0:
                _add(self.seconds.setdefault(second, [0.0] * len(COUNTERS)), counts, overlap / length)
            second += 1

    def prune(self, now: float) -> None:
        oldest = math.floor(now) - self.window - int(MAX_INTERVAL)
        for table in (self.seconds, self.active, self.tls):
            for second in [s for s in table if s < oldest]:
                del table[second]
        for host, steps in list(self.hosts.items()):
            for step in [s for s in steps if s < oldest]:
                del steps[step]
            if not steps:
                del self.hosts[host]
        for node in [n for n, mark in self.nodes.items() if mark.time < oldest]:
            del self.nodes[node]

    def snapshot(self, now: float) -> dict[str, Any]:
        """The window up to ``now`` as the dashboard's ``state`` carries it (``live``)."""
        self.prune(now)

        def row(counts: list[float]) -> list[float]:
            return [round(n, 3) for n in counts]

        return {
            "time": now,
            "window": self.window,
            "host_step": self.host_step,
            "counters": list(COUNTERS),
            "seconds": [[second, *row(counts), self.active.get(second)]
                        for second, counts in sorted(self.seconds.items())],
            "hosts": {host: [[step, *row(counts)] for step, counts in sorted(steps.items())]
                      for host, steps in self.hosts.items()},
            "tls": [[step, versions, ciphers] for step, (versions, ciphers) in sorted(self.tls.items())],
            "nodes": {node: mark.time for node, mark in self.nodes.items()},
        }


history = LiveHistory()
