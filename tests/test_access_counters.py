"""401/403/429 counts and the limited clients: as_dict, the agent link's bounds, Prometheus."""

from __future__ import annotations

import time

import pytest
from django.test import Client
from django.utils import timezone

from proxyadmin import models as m
from proxyadmin.coalesce import TickCoalescer
from proxyadmin.traffic import StatsSample, stats_delta
from proxycore.agentproto import ProtocolError, validate_totals
from proxycore.stats import Stats
from tests.conftest import page_text
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


@pytest.mark.django_db
@pytest.mark.usefixtures("fast_password_hashing")
def test_the_hosts_page_sums_the_nodes_refusals_and_most_limited_clients(
    admin_client_logged_in: Client,
) -> None:
    upstream = m.Upstream.objects.create(name="app")
    host = m.Host.objects.create(name="a", upstream=upstream)
    for name, clients in (("n1", {"192.0.2.1": 4, "192.0.2.2": 1}), ("n2", {"192.0.2.1": 2})):
        totals = {"started_at": 1.0, "hosts": {"a": {
            "denied": 3, "unauthorized": 2, "rate_limited": sum(clients.values()), "limited_clients": clients}}}
        m.ProxyNode.objects.create(name=name, connected=True, last_seen=timezone.now(),
                                   last_stats={"time": 2.0, "totals": totals})
    text = page_text(admin_client_logged_in.get(f"/admin/proxyadmin/host/{host.pk}/change/"))
    assert "403 denied: 6 · 401 unauthorized: 4 · 429 rate limited: 7" in text
    assert text.index("<code>192.0.2.1</code>: 6") < text.index("<code>192.0.2.2</code>: 1")


def test_dashboard_ticks_carry_the_refusals_per_host() -> None:
    before = StatsSample(1.0, {"started_at": 0.0, "hosts": {"a": {"denied": 1}}})
    after = StatsSample(2.0, {"started_at": 0.0, "hosts": {"a": {"denied": 4, "unauthorized": 1, "rate_limited": 2}}})
    coalescer = TickCoalescer()
    coalescer.add("edge-1", after.time, after.totals, stats_delta(before, after), after.time)
    tick = coalescer.take(after.time)
    assert tick is not None
    entry = tick["hosts"]["a"]
    assert (entry["denied"], entry["unauthorized"], entry["rate_limited"]) == (3, 1, 2)


def test_worker_totals_rebuilt_for_metrics_keep_the_limited_clients() -> None:
    from proxycore import statsmerge

    merged = statsmerge.add(refusing_stats().as_dict(), refusing_stats().as_dict())
    rebuilt = statsmerge.rebuild(merged, Stats())
    host = rebuilt.as_dict()["hosts"]["a"]
    assert host["limited_clients"] == {"192.0.2.1": 8, "2001:db8::1": 2}
    assert (host["denied"], host["rate_limited"]) == (6, 10)


def test_summed_workers_keep_the_top_clients_and_none_of_a_dead_workers() -> None:
    from proxycore import statsmerge
    from proxycore.stats import RECENT_TOP

    def worker(first: int) -> dict[str, object]:
        stats = Stats()
        for i in range(RECENT_TOP):
            for _ in range(first + i):
                stats.host("a").limited(f"192.0.2.{first + i}", time.time())
        return stats.as_dict()

    merged = statsmerge.add(statsmerge.add({}, worker(1)), worker(100))
    top = merged["hosts"]["a"]["limited_clients"]
    assert len(top) == RECENT_TOP and min(top.values()) >= 100
    dead = statsmerge.without_gauges(worker(1))
    assert dead["hosts"]["a"]["limited_clients"] == {}
    assert dead["hosts"]["a"]["rate_limited"] == sum(range(1, RECENT_TOP + 1))
