"""The control plane's memory of the last 15 minutes (``proxyadmin.livehistory``): what a
dashboard opened now starts from, kept bounded whatever the nodes send."""

from __future__ import annotations

from typing import Any

import pytest

from proxyadmin.livehistory import COUNTERS, LiveHistory

NOW = 1_800_000_000.0


def tick(node: str, time: float, hosts: dict[str, dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"type": "tick", "node": node, "time": time, "hosts": hosts, "tls_versions": {}, "ciphers": {},
            **extra}


def figures(**fields: float) -> dict[str, float]:
    return {name: 0 for name in (*COUNTERS, "active")} | fields


def column(snapshot: dict[str, Any], name: str) -> dict[int, float]:
    index = 1 + snapshot["counters"].index(name)
    return {row[0]: row[index] for row in snapshot["seconds"]}


def test_ticks_of_two_nodes_add_up_per_second_and_spread_over_their_interval() -> None:
    history = LiveHistory()
    history.add_tick(tick("a", NOW - 10.5, {"web": figures()}), NOW)
    history.add_tick(tick("a", NOW - 9.5, {"web": figures(requests=10, active=2, **{"2xx": 10})}), NOW)
    history.add_tick(tick("b", NOW - 9.2, {"web": figures(requests=4, active=3, **{"5xx": 4})}), NOW)
    snapshot = history.snapshot(NOW)
    requests = column(snapshot, "requests")
    second = int(NOW) - 11
    # Half of a's 10 in each second of its interval; b's first tick covers its last second.
    assert requests[second] == pytest.approx(5 + 0.2 * 4)
    assert requests[second + 1] == pytest.approx(5 + 0.8 * 4)
    assert second + 2 not in requests
    assert snapshot["seconds"][-1][-1] == 5  # active connections, summed over the nodes
    step = (int(NOW) - 10) // 10 * 10
    assert {row[0]: row[1:3] for row in snapshot["hosts"]["web"]} == {step: [14, 10]}
    assert snapshot["nodes"] == {"a": NOW - 9.5, "b": NOW - 9.2}


def test_a_tick_seen_twice_counts_once() -> None:
    history = LiveHistory()
    event = tick("a", NOW - 1, {"web": figures(requests=3)})
    assert history.add_tick(event, NOW)
    assert not history.add_tick(dict(event), NOW)  # the same tick relayed to a second dashboard
    assert sum(column(history.snapshot(NOW), "requests").values()) == pytest.approx(3)


def test_ticks_outside_the_window_are_not_kept() -> None:
    history = LiveHistory()
    assert not history.add_tick(tick("a", NOW - 901, {"web": figures(requests=1)}), NOW)
    assert not history.add_tick(tick("a", NOW + 3600, {"web": figures(requests=1)}), NOW)
    assert not history.add_tick({"node": "a", "time": True}, NOW)
    assert history.snapshot(NOW)["seconds"] == []


def test_points_older_than_the_window_are_dropped() -> None:
    history = LiveHistory()
    for t in range(0, 1800, 3):
        history.add_tick(tick("a", NOW + t, {"web": figures(requests=1)}), NOW + t)
    snapshot = history.snapshot(NOW + 1800)
    assert len(snapshot["seconds"]) <= 900 + 6
    assert min(row[0] for row in snapshot["seconds"]) >= NOW + 1800 - 906
    assert len(snapshot["hosts"]["web"]) <= 92


def test_memory_stays_flat_with_many_nodes_and_is_capped_in_hosts() -> None:
    history = LiveHistory(max_hosts=50)
    for second in range(60):
        for node in range(100):
            hosts = {f"h{(node * 7 + i) % 200}": figures(requests=1, active=1) for i in range(5)}
            history.add_tick(tick(f"n{node}", NOW + second + node / 1000, hosts), NOW + second + 1)
    snapshot = history.snapshot(NOW + 61)
    assert len(history.hosts) == 50  # past the cap a host counts in the totals only
    assert len(snapshot["seconds"]) <= 62  # one point per second, however many nodes
    assert all(len(steps) <= 7 for steps in history.hosts.values())  # one per 10 s per host
    total = sum(column(snapshot, "requests").values())
    assert total == pytest.approx(60 * 100 * 5, rel=0.01)  # every tick in the totals, capped host or not
    assert snapshot["seconds"][-2][-1] == 500  # 100 nodes x 5 hosts x 1 connection
