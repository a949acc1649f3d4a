"""401/403/429 counts and the limited clients: as_dict, the agent link's bounds, Prometheus."""

from __future__ import annotations

import time

import pytest

from proxycore.agentproto import ProtocolError, validate_totals
from proxycore.stats import Stats
from tests.test_prometheus_metrics import parse, scrape_stats, value


def refusing_stats() -> Stats:
    stats = Stats()
    host = stats.host("a")
    host.denied, host.unauthorized = 3, 2
    for _ in range(4):
        host.limited("192.0.2.1", time.time())
    host.limited("2001:db8::1", time.time())
    return stats


def test_counts_reach_prometheus_by_reason() -> None:
    samples = parse(scrape_stats(refusing_stats()))
    assert value(samples, "proxyadmin_access_refused_total", host="a", reason="denied") == 3
    assert value(samples, "proxyadmin_access_refused_total", host="a", reason="unauthorized") == 2
    assert value(samples, "proxyadmin_access_refused_total", host="a", reason="rate_limited") == 5


def test_the_agent_link_accepts_the_counts_and_the_limited_clients() -> None:
    checked = validate_totals(refusing_stats().as_dict())
    host = checked["hosts"]["a"]
    assert (host["denied"], host["unauthorized"], host["rate_limited"]) == (3, 2, 5)
    assert host["limited_clients"] == {"192.0.2.1": 4, "2001:db8::1": 1}


def test_the_agent_link_refuses_unbounded_limited_clients() -> None:
    totals = refusing_stats().as_dict()
    totals["hosts"]["a"]["limited_clients"] = {f"192.0.2.{i % 250}-{i}": 1 for i in range(300)}
    with pytest.raises(ProtocolError):
        validate_totals(totals)
    totals["hosts"]["a"]["limited_clients"] = {"192.0.2.1": -1}
    with pytest.raises(ProtocolError):
        validate_totals(totals)


def test_workers_reports_sum_key_by_key() -> None:
    one, two = refusing_stats().as_dict()["hosts"]["a"], refusing_stats().as_dict()["hosts"]["a"]
    summed = {k: one["limited_clients"].get(k, 0) + two["limited_clients"].get(k, 0)
              for k in {*one["limited_clients"], *two["limited_clients"]}}
    assert summed == {"192.0.2.1": 8, "2001:db8::1": 2}
    assert all(isinstance(one[k], int) for k in ("denied", "unauthorized", "rate_limited"))
