"""Upstream target health reaches the dashboard's ticks and the upstream's admin page."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from proxyadmin import traffic
from proxyadmin.models import ProxyNode, Upstream, UpstreamTarget
from proxycore import agentproto
from proxycore.stats import Stats
from tests.conftest import run
from tests.test_dashboard_socket import TIMEOUT, dashboard_and_node, next_tick_with, staff_cookie
from tests.test_traffic_rollup import tick_of

pytestmark = pytest.mark.usefixtures("empty_channel_layer")


def target(address: str, *, healthy: bool = True, error: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"address": address, "healthy": healthy, "cooling_down": False, "active": 0, "weight": 1,
            "draining": False, "enabled": True, "last_error": error, **extra}


def app_state(*targets: dict[str, Any]) -> dict[str, dict[str, Any]]:
    healthy = sum(1 for t in targets if t["healthy"])
    return {"app": {"targets": list(targets), "healthy": healthy, "available": healthy, "total": len(targets)}}


def node_stats(states: dict[str, dict[str, Any]]) -> Stats:
    stats = Stats()
    stats.started_at = 1_700_000_000.0
    stats.upstream_states = lambda: states
    stats.host_upstreams = lambda: {"shop": "app"}
    return stats


def test_node_reports_which_upstream_each_host_uses() -> None:
    totals = node_stats(app_state(target("10.0.0.1:80"))).as_dict()
    assert totals["host_upstreams"] == {"shop": "app"}
    assert agentproto.validate_totals(totals)["upstreams"]["app"]["total"] == 1


def test_malformed_upstream_entries_are_dropped_not_the_report() -> None:
    totals = node_stats(app_state(target("10.0.0.1:80"))).as_dict()
    totals["upstreams"]["bad"] = {"targets": [{"address": "x", "healthy": "yes"}]}
    totals["upstreams"]["worse"] = ["not", "an", "object"]
    totals["host_upstreams"] = {"shop": "app", "other": 7}
    checked = agentproto.validate_totals(totals)
    assert set(checked["upstreams"]) == {"app"}
    assert checked["host_upstreams"] == {"shop": "app"}


def test_tick_carries_current_targets_and_retries_since_the_previous_report() -> None:
    states = app_state(target("10.0.0.1:80"), target("10.0.0.2:80"))
    stats = node_stats(states)
    stats.host("shop").requests = 1
    first = traffic.StatsSample(stats.started_at + 1, agentproto.validate_totals(stats.as_dict()))
    stats.host("shop").requests = 2
    stats.upstream("app").retries = 3
    states.update(app_state(target("10.0.0.1:80"), target("10.0.0.2:80", healthy=False, error="refused")))
    second = traffic.StatsSample(stats.started_at + 2, agentproto.validate_totals(stats.as_dict()))
    tick = tick_of(traffic.stats_delta(first, second))
    assert tick["upstreams"]["app"]["retries"] == 3
    assert tick["upstreams"]["app"]["healthy"] == 1
    assert tick["upstreams"]["app"]["targets"][1]["last_error"] == "refused"
    assert tick["upstreams"]["app"]["targets"][1]["node"] == "edge-1", "a process's tick says whose targets"
    shop = tick["hosts"]["shop"]
    assert (shop["upstream"], shop["targets_healthy"], shop["targets_total"]) == ("app", 1, 2)


@pytest.mark.django_db(transaction=True)
def test_target_health_reaches_the_dashboard_in_ticks() -> None:
    cookie = staff_cookie()
    states = app_state(target("10.0.0.1:80"), target("10.0.0.2:80"))
    stats = node_stats(states)
    shop = stats.host("shop")

    async def scenario() -> None:
        browser, node, _ = await dashboard_and_node(cookie)

        shop.requests = 5
        report = agentproto.StatsReport("edge-1", stats.started_at + 1.0, stats.as_dict())
        await node.send_json_to(report.to_message())
        first = await next_tick_with(browser, "edge-1")
        assert first["upstreams"]["app"]["healthy"] == 2
        assert first["hosts"]["shop"]["targets_total"] == 2

        shop.requests = 9
        stats.upstream("app").retries = 2
        states.update(app_state(target("10.0.0.1:80"),
                                target("10.0.0.2:80", healthy=False, error="connection refused")))
        report = agentproto.StatsReport("edge-1", stats.started_at + 2.0, stats.as_dict())
        await node.send_json_to(report.to_message())
        second = await next_tick_with(browser, "edge-1")
        app = second["upstreams"]["app"]
        assert (app["healthy"], app["available"], app["total"], app["retries"]) == (1, 1, 2, 2)
        assert [t["healthy"] for t in app["targets"]] == [True, False]
        assert app["targets"][1]["last_error"] == "connection refused"
        entry = second["hosts"]["shop"]
        assert (entry["upstream"], entry["targets_healthy"], entry["targets_total"]) == ("app", 1, 2)

        await node.disconnect(timeout=TIMEOUT)
        await browser.disconnect(timeout=TIMEOUT)

    run(scenario)


def reporting_node(name: str, states: dict[str, dict[str, Any]], seen_ago: float = 1.0) -> ProxyNode:
    totals = {"started_at": 1_700_000_000.0, "hosts": {}, "listeners": {}, "upstreams": states}
    return ProxyNode.objects.create(
        name=name, connected=True, last_seen=timezone.now() - dt.timedelta(seconds=seen_ago),
        last_stats={"time": 1_700_000_001.0, "totals": totals},
    )


@pytest.fixture
def app_upstream(db: None) -> Upstream:
    upstream = Upstream.objects.create(name="app")
    UpstreamTarget.objects.create(upstream=upstream, host="10.0.0.1", port=80)
    UpstreamTarget.objects.create(upstream=upstream, host="10.0.0.2", port=80)
    return upstream


def test_upstream_page_shows_a_down_target_and_its_last_error(
    admin_client_logged_in: Client, app_upstream: Upstream,
) -> None:
    reporting_node("edge-1", app_state(
        target("10.0.0.1:80", active=4),
        target("10.0.0.2:80", healthy=False, error="connect: <refused> & gone"),
    ))
    reporting_node("edge-old", app_state(target("10.0.0.9:80")), seen_ago=3600)  # offline: not shown
    page = admin_client_logged_in.get(f"/admin/proxyadmin/upstream/{app_upstream.pk}/change/")
    body = page.content.decode()
    assert page.status_code == 200
    assert "Target health" in body
    assert "edge-1 (online)" in body
    assert ">down<" in body and ">healthy<" in body
    assert "connect: &lt;refused&gt; &amp; gone" in body  # escaped, never markup
    assert "edge-old" not in body and "10.0.0.9" not in body


def test_upstream_page_says_when_no_node_reports_it(
    admin_client_logged_in: Client, app_upstream: Upstream,
) -> None:
    reporting_node("edge-1", {})
    body = admin_client_logged_in.get(f"/admin/proxyadmin/upstream/{app_upstream.pk}/change/").content.decode()
    assert "No node reports this upstream yet." in body


def test_upstream_list_shows_healthy_of_the_freshest_node(
    admin_client_logged_in: Client, app_upstream: Upstream,
) -> None:
    reporting_node("edge-1", app_state(target("10.0.0.1:80"), target("10.0.0.2:80", healthy=False)))
    reporting_node("edge-2", app_state(target("10.0.0.1:80"), target("10.0.0.2:80")), seen_ago=20)
    body = admin_client_logged_in.get("/admin/proxyadmin/upstream/").content.decode()
    assert "1 / 2" in body
    assert "as node edge-1 reports it" in body


@pytest.mark.django_db(transaction=True)
def test_a_flush_keeps_what_the_admin_shows_of_the_nodes_latest_report() -> None:
    """Through a real link: the row written at a flush holds the targets and access counters the admin reads."""
    from proxyadmin import hoststatus
    from proxyadmin.ingest import ingest

    cookie = staff_cookie()
    states = app_state(target("10.0.0.1:80"), target("10.0.0.2:80", healthy=False, error="refused"))
    stats = node_stats(states)
    totals = stats.as_dict()
    totals["hosts"]["shop"] = {"requests": 3, "denied": 2, "rate_limited": 1,
                               "limited_clients": {"192.0.2.7": 1}}

    async def scenario() -> None:
        browser, node, _ = await dashboard_and_node(cookie)
        await node.send_json_to(agentproto.StatsReport("edge-1", stats.started_at + 1, totals).to_message())
        await next_tick_with(browser, "edge-1")
        await ingest.flush()
        await node.disconnect(timeout=TIMEOUT)
        await browser.disconnect(timeout=TIMEOUT)

    run(scenario)
    row = ProxyNode.objects.get(name="edge-1")
    assert hoststatus.reported_upstream(row, "app")["healthy"] == 1  # type: ignore[index]
    access = hoststatus.reported_access("shop")
    assert (access["denied"], access["rate_limited"], access["limited_clients"]) == (2, 1, [("192.0.2.7", 1)])
