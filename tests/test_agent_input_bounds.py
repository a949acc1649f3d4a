"""What a token holder can make the control plane store is bounded, and checked at each bound.

Numbers: every integer a node sends is a whole number from 0 to 2**63-1 (PostgreSQL's
bigint); a pid fits its column. Counts: hosts, upstreams, targets, listeners, map
entries and latency buckets per message. Rows: host names in the traffic rollup are
the config's hosts and ``-``; node rows are capped, and forgotten a day after last seen.
A message out of range is dropped, logged, and the link stays up.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
from typing import Any

import pytest
from django.conf import settings
from django.utils import timezone

from proxyadmin import ledger, traffic
from proxyadmin.coalesce import TickCoalescer
from proxyadmin.models import Host, ProxyNode, TrafficRollup, Upstream
from proxycore import agentproto
from proxycore.stats import Stats
from tests.conftest import run
from tests.test_agent_link import TIMEOUT, agent, eventually, hello, node_row

pytestmark = pytest.mark.usefixtures("empty_channel_layer")

TOP = 2**63 - 1
MINUTE = dt.datetime(2030, 5, 17, 12, 34, tzinfo=dt.UTC)


def totals() -> dict[str, Any]:
    stats = Stats()
    stats.started_at = 1_700_000_000.0
    stats.host("shop").requests = 1
    stats.host("shop").handshakes_failed["unknown_ca"] = 1
    stats.listener("https").ciphers["TLS_AES_128_GCM_SHA256"] = 1
    stats.upstream_states = lambda: {"app": {"targets": [target()], "healthy": 1, "available": 1, "total": 1}}
    stats.host_upstreams = lambda: {"shop": "app"}
    return stats.as_dict()


def target(**changes: Any) -> dict[str, Any]:
    return {"address": "10.0.0.1:80", "healthy": True, "cooling_down": False, "active": 0, "weight": 1,
            "draining": False, "enabled": True, "last_error": None, **changes}


def stats_message(body: dict[str, Any]) -> dict[str, Any]:
    return {"type": "stats", "node": "edge-1", "time": 1_700_000_001.0, "totals": body}


# Where a node puts integers, as (description, how to set one to n).
def _set(path: tuple[Any, ...]) -> Any:
    def setter(body: dict[str, Any], n: int) -> None:
        place: Any = body
        for key in path[:-1]:
            place = place[key]
        place[path[-1]] = n
    return setter


COUNTERS = {
    "host counter": _set(("hosts", "shop", "requests")),
    "host active connections": _set(("hosts", "shop", "active_connections")),
    "host counter map": _set(("hosts", "shop", "handshakes_failed", "unknown_ca")),
    "latency count": _set(("hosts", "shop", "latency", "counts", 0)),
    "listener counter": _set(("listeners", "https", "connections")),
    "listener counter map": _set(("listeners", "https", "ciphers", "TLS_AES_128_GCM_SHA256")),
    "config revision": _set(("config_revision",)),
}
UPSTREAM_NUMBERS = {
    "upstream level": _set(("upstreams", "app", "healthy")),
    "upstream counter": _set(("upstreams", "app", "retries")),
    "target level": _set(("upstreams", "app", "targets", 0, "weight")),
}


@pytest.mark.parametrize("where", list(COUNTERS))
def test_every_counter_takes_2_63_minus_1_and_refuses_2_63(where: str) -> None:
    body = totals()
    COUNTERS[where](body, TOP)
    assert agentproto.parse_node_message(stats_message(body))
    COUNTERS[where](body, TOP + 1)
    with pytest.raises(agentproto.ProtocolError, match="from 0 to 9223372036854775807"):
        agentproto.parse_node_message(stats_message(body))


@pytest.mark.parametrize("where", list(UPSTREAM_NUMBERS))
def test_an_upstream_state_out_of_range_is_dropped_not_the_report(where: str) -> None:
    body = totals()
    UPSTREAM_NUMBERS[where](body, TOP)
    assert set(agentproto.validate_totals(copy.deepcopy(body))["upstreams"]) == {"app"}
    UPSTREAM_NUMBERS[where](body, TOP + 1)
    assert agentproto.validate_totals(body)["upstreams"] == {}


@pytest.mark.parametrize(("field", "top"), [("pid", 2**31 - 1), ("revision", TOP)])
def test_hello_numbers_are_bounded_by_their_columns(field: str, top: int) -> None:
    message = hello()
    message[field] = top
    assert getattr(agentproto.parse_node_message(message), field) == top
    message[field] = top + 1
    with pytest.raises(agentproto.ProtocolError):
        agentproto.parse_node_message(message)


@pytest.mark.parametrize("kind", ["config.applied", "config.rejected", "config.changed"])
def test_config_revisions_are_bounded(kind: str) -> None:
    parse = agentproto.parse_control_message if kind == "config.changed" else agentproto.parse_node_message
    message = {"type": kind, "revision": TOP, "error": "bad"}
    assert parse(message).revision == TOP
    with pytest.raises(agentproto.ProtocolError):
        parse({**message, "revision": TOP + 1})


@pytest.mark.parametrize("value", [float("inf"), float("nan"), -1.0, "1"])
def test_latency_sum_and_buckets_must_be_finite_numbers(value: Any) -> None:
    body = totals()
    body["hosts"]["shop"]["latency"]["sum"] = value
    with pytest.raises(agentproto.ProtocolError):
        agentproto.parse_node_message(stats_message(body))


def test_hosts_per_message_are_capped_at_10_000() -> None:
    assert agentproto.MAX_HOSTS == 10_000
    body = totals()
    body["hosts"] = {f"h{n}": {} for n in range(agentproto.MAX_HOSTS)}
    report = agentproto.parse_node_message(stats_message(body))
    assert isinstance(report, agentproto.StatsReport) and len(report.totals["hosts"]) == agentproto.MAX_HOSTS
    body["hosts"]["one-too-many"] = {}
    with pytest.raises(agentproto.ProtocolError, match="at most 10000"):
        agentproto.parse_node_message(stats_message(body))


@pytest.mark.parametrize(("what", "cap", "fill"), [
    ("upstreams", agentproto.MAX_UPSTREAMS,
     lambda body, n: body.__setitem__("upstreams", {f"u{i}": {} for i in range(n)})),
    ("host_upstreams", agentproto.MAX_HOSTS,
     lambda body, n: body.__setitem__("host_upstreams", {f"h{i}": "app" for i in range(n)})),
    ("listeners", agentproto.MAX_LISTENERS,
     lambda body, n: body.__setitem__("listeners", {f"l{i}": {} for i in range(n)})),
    ("counter map", agentproto.MAX_MAP_ENTRIES,
     lambda body, n: body["hosts"]["shop"].__setitem__("responses", {f"{i}xx": 1 for i in range(n)})),
    ("latency buckets", agentproto.MAX_LATENCY_BUCKETS,
     lambda body, n: body["hosts"]["shop"].__setitem__(
         "latency", {"buckets": [float(i) for i in range(n)], "counts": [0] * (n + 1)})),
])
def test_collections_in_a_report_are_capped(what: str, cap: int, fill: Any) -> None:
    body = totals()
    fill(body, cap)
    agentproto.parse_node_message(stats_message(body))
    fill(body, cap + 1)
    with pytest.raises(agentproto.ProtocolError, match=f"at most {cap}"):
        agentproto.parse_node_message(stats_message(body))


def test_targets_per_upstream_are_capped() -> None:
    body = totals()
    app = body["upstreams"]["app"]
    app["targets"] = [target(address=f"10.0.0.{i % 250}:{i}") for i in range(agentproto.MAX_TARGETS)]
    assert len(agentproto.validate_totals(copy.deepcopy(body))["upstreams"]["app"]["targets"]) == agentproto.MAX_TARGETS
    app["targets"].append(target())
    assert "app" not in agentproto.validate_totals(body)["upstreams"]


@pytest.mark.parametrize(("where", "limit"), [
    ("host name", agentproto.MAX_NAME_LENGTH),
    ("counter map key", agentproto.MAX_NAME_LENGTH),
])
def test_names_in_a_report_are_length_bounded(where: str, limit: int) -> None:
    body = totals()
    place = body["hosts"] if where == "host name" else body["hosts"]["shop"]["handshakes_failed"]
    place["x" * limit] = {} if where == "host name" else 1
    agentproto.parse_node_message(stats_message(body))
    place["y" * (limit + 1)] = {} if where == "host name" else 1
    with pytest.raises(agentproto.ProtocolError):
        agentproto.parse_node_message(stats_message(body))


def test_hello_listeners_are_capped() -> None:
    message = hello()
    message["listeners"] = [{"name": f"l{i}", "address": "127.0.0.1:1"} for i in range(agentproto.MAX_LISTENERS)]
    agentproto.parse_node_message(message)
    message["listeners"].append({"name": "more", "address": "127.0.0.1:2"})
    with pytest.raises(agentproto.ProtocolError, match=f"at most {agentproto.MAX_LISTENERS}"):
        agentproto.parse_node_message(message)


def test_unknown_fields_are_not_kept() -> None:
    body = totals()
    body["surprise"] = ["x" * 1000]
    body["hosts"]["shop"]["extra"] = {"deep": 1}
    report = agentproto.parse_node_message(stats_message(body))
    assert isinstance(report, agentproto.StatsReport)
    assert "surprise" not in report.totals and "extra" not in report.totals["hosts"]["shop"]


# -- over the link ---------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_counter_past_2_63_is_dropped_and_logged_and_the_link_stays_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stats = Stats()
    stats.host("-").requests = 3

    async def scenario() -> None:
        link = agent(settings.AGENT_TOKEN)
        assert (await link.connect(timeout=TIMEOUT))[0]
        await link.send_json_to(hello())
        too_big = stats.as_dict()
        too_big["hosts"]["-"]["bytes_out"] = 2**63
        await link.send_json_to({"type": "stats", "node": "edge-1", "time": stats.started_at + 1,
                                 "totals": too_big})
        assert await link.receive_nothing(timeout=0.3), "the link is not closed"
        at_the_top = stats.as_dict()
        at_the_top["hosts"]["-"]["bytes_out"] = TOP
        await link.send_json_to({"type": "stats", "node": "edge-1", "time": stats.started_at + 2,
                                 "totals": at_the_top})
        await eventually(lambda: TrafficRollup.objects.filter(host="-", bytes_out=TOP).exists(),
                         "the report at the bound stored")
        await link.disconnect(timeout=TIMEOUT)

    with caplog.at_level(logging.WARNING, logger="proxyadmin.agentlink"):
        run(scenario)
    assert "'bytes_out' must be a whole number from 0 to 9223372036854775807" in caplog.text
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and "dropped" in r.getMessage()]
    assert errors, caplog.text


def flush_reports(*reports: agentproto.StatsReport) -> traffic.FlushResult:
    """The reports' nodes' first counts, written as one flush into ``MINUTE``."""
    items = []
    for report in reports:
        node = ProxyNode.objects.get(name=report.node)
        counts = ledger.Counts.of_totals(report.time, report.totals)
        items.append(ledger.FlushItem(node.pk, node.link_epoch, None, [(MINUTE, counts)], report.time))
    return traffic.flush_ledgers(items)


@pytest.mark.django_db
def test_rollup_counters_saturate_at_the_bigint_top_instead_of_failing() -> None:
    ProxyNode.objects.create(name="edge-1", connected=True)
    ProxyNode.objects.create(name="edge-2", connected=True)
    stats = Stats()
    stats.host("-").requests = TOP - 1
    report = agentproto.StatsReport("edge-1", stats.started_at + 1, stats.as_dict())
    flush_reports(report)
    flush_reports(agentproto.StatsReport("edge-2", report.time, report.totals))
    assert TrafficRollup.objects.get(host="-", minute=MINUTE).requests == TOP


@pytest.mark.django_db
def test_only_configured_hosts_and_the_unmatched_bucket_are_rolled_up() -> None:
    upstream = Upstream.objects.create(name="app")
    Host.objects.create(name="shop", upstream=upstream)
    ProxyNode.objects.create(name="edge-1", connected=True)
    stats = Stats()
    for name in ("shop", "-", "phantom-1", "phantom-2"):
        stats.host(name).requests = 1
    report = agentproto.StatsReport("edge-1", stats.started_at + 1, stats.as_dict())
    flush_reports(report)
    assert sorted(TrafficRollup.objects.values_list("host", flat=True)) == ["-", "shop"]
    coalescer = TickCoalescer()
    sample = traffic.StatsSample(report.time, report.totals)
    coalescer.add("edge-1", report.time, report.totals, traffic.stats_delta(None, sample), report.time)
    tick = coalescer.take(report.time)
    assert tick is not None and set(tick["hosts"]) == {"shop", "-", "phantom-1", "phantom-2"}, \
        "the live tick still shows what the node sees"


# -- node rows -------------------------------------------------------------------------------


def fill_nodes(count: int, seen: dt.datetime) -> None:
    ProxyNode.objects.bulk_create(
        ProxyNode(name=f"old-{n}", connected=False, last_seen=seen - dt.timedelta(milliseconds=n))
        for n in range(count))


@pytest.mark.django_db(transaction=True)
def test_a_new_node_beyond_the_cap_of_online_nodes_is_refused_with_1008() -> None:
    fill_nodes(ProxyNode.MAX_NODES, timezone.now())  # all heard from within the last minute

    async def scenario() -> None:
        known = agent(settings.AGENT_TOKEN)
        assert (await known.connect(timeout=TIMEOUT))[0]
        await known.send_json_to(hello("old-0"))
        await eventually(lambda: getattr(node_row("old-0"), "connected", False), "a known node's hello")
        await known.disconnect(timeout=TIMEOUT)

        stranger = agent(settings.AGENT_TOKEN)
        assert (await stranger.connect(timeout=TIMEOUT))[0]
        await stranger.send_json_to(hello("edge-new"))
        closed = await stranger.receive_output(timeout=TIMEOUT)
        assert closed["type"] == "websocket.close" and closed["code"] == 1008
        assert "proxy nodes" in closed.get("reason", "")

    run(scenario)
    assert ProxyNode.objects.count() == ProxyNode.MAX_NODES
    assert node_row("edge-new") is None


@pytest.mark.django_db(transaction=True)
def test_at_the_cap_a_new_node_takes_the_place_of_the_longest_offline_one() -> None:
    now = timezone.now()
    fill_nodes(ProxyNode.MAX_NODES - 1, now)
    ProxyNode.objects.create(name="gone", connected=True,  # a link that never said goodbye
                             last_seen=now - dt.timedelta(seconds=ProxyNode.STALE_SECONDS + 1))

    async def scenario() -> None:
        link = agent(settings.AGENT_TOKEN)
        assert (await link.connect(timeout=TIMEOUT))[0]
        await link.send_json_to(hello("edge-new"))
        await eventually(lambda: node_row("edge-new") is not None, "the new node stored")
        await link.disconnect(timeout=TIMEOUT)

    run(scenario)
    assert ProxyNode.objects.count() == ProxyNode.MAX_NODES
    assert node_row("gone") is None


@pytest.mark.django_db
def test_nodes_not_seen_for_a_day_are_forgotten() -> None:
    now = timezone.now()
    ProxyNode.objects.create(name="yesterday", connected=True, last_seen=now - ProxyNode.FORGET_AFTER)
    ProxyNode.objects.create(name="almost", connected=False,
                             last_seen=now - ProxyNode.FORGET_AFTER + dt.timedelta(seconds=1))
    assert ProxyNode.forget_unseen(now) == 1
    assert list(ProxyNode.objects.values_list("name", flat=True)) == ["almost"]


@pytest.mark.django_db
def test_the_once_a_minute_pruning_forgets_old_nodes_too() -> None:
    now = timezone.now()
    ProxyNode.objects.create(name="ancient", last_seen=now - dt.timedelta(days=2))
    traffic.RollupPruner().prune_if_due(now)
    assert not ProxyNode.objects.filter(name="ancient").exists()


# -- worker processes (issue 12's supervised nodes) -----------------------------------------


@pytest.mark.parametrize(("workers", "ok"), [
    ({"count": 1, "restarts": 0}, True),
    ({"count": 1024, "restarts": TOP}, True),
    ({"count": 4}, True),
    ({"count": 0, "restarts": 0}, False),
    ({"count": 1025, "restarts": 0}, False),
    ({"count": 2, "restarts": 2**63}, False),
    ({"count": True, "restarts": 0}, False),
    ([2, 0], False),
])
def test_a_nodes_worker_count_and_restarts_are_bounded(workers: Any, ok: bool) -> None:
    checked = totals()
    checked["workers"] = workers
    if ok:
        kept = agentproto.validate_totals(checked)["workers"]
        assert kept == {"count": workers["count"], "restarts": workers.get("restarts", 0)}
    else:
        with pytest.raises(agentproto.ProtocolError):
            agentproto.validate_totals(checked)


def test_a_node_without_workers_is_taken_as_one_never_restarted() -> None:
    assert "workers" not in agentproto.validate_totals(totals())
    coalescer = TickCoalescer()
    coalescer.add("edge-1", 1.0, agentproto.validate_totals(totals()), None, 1.0)
    tick = coalescer.take(1.0)
    assert tick is not None and tick["nodes"]["edge-1"]["workers"] == 1
    assert tick["nodes"]["edge-1"]["worker_restarts"] == 0
