"""A node's totals from its workers' (proxycore.statsmerge): counters summed, histograms
merged bucket by bucket, a dead worker's counts kept and its open connections dropped."""

from __future__ import annotations

from typing import Any

from proxycore import statsmerge
from proxycore.stats import LATENCY_BUCKETS, Stats


def worker_totals(requests: int, active: int, slow: int, failed: dict[str, int]) -> dict[str, Any]:
    stats = Stats()
    host = stats.host("a")
    host.requests = requests
    host.active_connections = active
    host.response(200)
    for _ in range(slow):
        host.latency(0.3)
    host.latency(0.002)
    host.handshakes_failed.update(failed)
    stats.listener("https").connections = requests
    stats.listener("https").tls_versions["TLSv1.3"] = requests
    return stats.as_dict()


def test_counters_are_summed_and_histograms_merged_bucket_by_bucket() -> None:
    one, two = worker_totals(5, 1, 2, {"eof": 1}), worker_totals(7, 2, 0, {"eof": 2, "timeout": 1})
    merged = statsmerge.add(statsmerge.add({}, one), two)
    host = merged["hosts"]["a"]
    assert host["requests"] == 12
    assert host["active_connections"] == 3
    assert host["responses"]["2xx"] == 2
    assert host["handshakes_failed"] == {"eof": 3, "timeout": 1}
    assert host["latency"]["buckets"] == list(LATENCY_BUCKETS)  # bounds kept once, not summed
    assert sum(host["latency"]["counts"]) == 4
    assert host["latency"]["counts"][LATENCY_BUCKETS.index(0.5)] == 2
    assert merged["listeners"]["https"]["tls_versions"] == {"TLSv1.3": 12}


def test_a_dead_worker_keeps_its_counts_but_not_its_open_connections() -> None:
    retired = statsmerge.without_gauges(worker_totals(5, 4, 0, {}))
    merged = statsmerge.add(statsmerge.add({}, retired), worker_totals(1, 1, 0, {}))
    assert merged["hosts"]["a"]["requests"] == 6
    assert merged["hosts"]["a"]["active_connections"] == 1


def test_upstream_state_comes_from_the_checks_with_connections_summed() -> None:
    target = {"address": "127.0.0.1:1", "healthy": True, "cooling_down": False, "active": 0,
              "weight": 1, "draining": False, "enabled": True, "last_error": ""}
    checked = {"app": {"targets": [dict(target)], "healthy": 1, "available": 1, "total": 1,
                       "went_down": 0, "came_up": 0, "retries": 0}}
    busy = {"upstreams": {"app": {"targets": [dict(target, active=3)], "went_down": 0, "came_up": 0,
                                  "retries": 2}}}
    cooling = {"upstreams": {"app": {"targets": [dict(target, active=1, cooling_down=True, healthy=False,
                                                      last_error="status 503")],
                                     "went_down": 1, "came_up": 0, "retries": 0}}}
    merged = statsmerge.merge_upstreams(checked, [busy, cooling])["app"]
    assert merged["targets"][0]["active"] == 4
    assert merged["targets"][0]["cooling_down"] and not merged["targets"][0]["healthy"]
    assert merged["targets"][0]["last_error"] == "status 503"
    assert (merged["healthy"], merged["available"], merged["retries"], merged["went_down"]) == (0, 0, 2, 1)


def test_merged_totals_rebuild_the_stats_metrics_read() -> None:
    merged = statsmerge.add(statsmerge.add({}, worker_totals(5, 1, 2, {"eof": 1})),
                            worker_totals(7, 0, 1, {}))
    merged["upstreams"] = {}
    stats = statsmerge.rebuild(merged, Stats())
    host = stats.hosts["a"]
    assert (host.requests, host.active_connections, host.responses[2]) == (12, 1, 2)
    assert sum(host.latency_buckets) == 5 and host.handshakes_failed["eof"] == 1
    assert stats.as_dict()["hosts"]["a"] == merged["hosts"]["a"]
