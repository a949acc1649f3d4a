"""Nodes' traffic reaches the rollup in batches, exactly: across a flush, a reconnect, a restart of either side.

Each scenario runs real agent links (``WebsocketCommunicator``) against the real
database; a scenario's end is the end of its event loop, so what the control plane
held in memory is gone, as after a crash.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from typing import Any

import pytest
from channels.db import database_sync_to_async
from django.conf import settings
from django.db import connection
from django.test.utils import CaptureQueriesContext

from proxyadmin import ledger, traffic
from proxyadmin.ingest import ingest
from proxyadmin.models import Host, ProxyNode, TrafficRollup, Upstream
from proxycore import agentproto
from proxycore.stats import Stats
from tests.conftest import run
from tests.test_agent_link import TIMEOUT, agent, eventually, hello

pytestmark = pytest.mark.usefixtures("empty_channel_layer")

# The start of a minute an hour ago (reports from ahead of the control plane's clock are booked now).
T0 = (time.time() - 3600) // 60 * 60


@pytest.fixture
def shop() -> None:
    Host.objects.create(name="shop", upstream=Upstream.objects.create(name="app"))


def node_stats(started_at: float = T0 - 600) -> Stats:
    stats = Stats()
    stats.started_at = started_at
    return stats


def serve(stats: Stats, requests: int, status: int = 200) -> None:
    shop = stats.host("shop")
    for _ in range(requests):
        shop.requests += 1
        shop.response(status)
        shop.bytes_out += 100


def report(stats: Stats, at: float, node: str = "edge-1") -> dict[str, Any]:
    return agentproto.StatsReport(node, at, stats.as_dict()).to_message()


def rolled_up() -> dict[dt.datetime, int]:
    return {r.minute: r.requests for r in TrafficRollup.objects.filter(host="shop")}


def total() -> int:
    return sum(rolled_up().values())


async def linked(node: str = "edge-1") -> Any:
    link = agent(settings.AGENT_TOKEN)
    assert (await link.connect(timeout=TIMEOUT))[0]
    await link.send_json_to(hello(node))
    await eventually(lambda: getattr(ProxyNode.objects.filter(name=node).first(), "connected", False),
                     "hello stored")
    return link


async def processed(count: int) -> None:
    """Waits until this process has taken ``count`` reports in all."""
    for _ in range(200):
        if ingest.processed >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"only {ingest.processed} reports processed, not {count}")


@pytest.mark.django_db(transaction=True)
def test_a_nodes_reports_reach_the_rollup_once_per_flush_as_exact_deltas(shop: None, settings: Any) -> None:
    settings.ROLLUP_FLUSH_SECONDS = 60  # flushed by hand below
    stats = node_stats()

    async def scenario() -> None:
        link = await linked()
        for second in range(1, 6):
            serve(stats, second)
            await link.send_json_to(report(stats, T0 + second))
            await processed(second)
        assert await database_sync_to_async(total)() == 0, "nothing is written per report"
        await ingest.flush()
        serve(stats, 7)
        await link.send_json_to(report(stats, T0 + 6))
        await processed(6)
        await ingest.flush()
        assert await ingest.flush() is None, "nothing new: no transaction at all"
        await link.disconnect(timeout=TIMEOUT)

    run(scenario)
    assert rolled_up() == {dt.datetime.fromtimestamp(T0, dt.UTC): 1 + 2 + 3 + 4 + 5 + 7}, \
        "the node's first report counts from its start"
    node = ProxyNode.objects.get(name="edge-1")
    baseline = ledger.Counts.from_json(node.last_stats)
    assert baseline is not None and baseline.time == T0 + 6
    assert baseline.hosts["shop"][0] == stats.host("shop").requests


@pytest.mark.django_db(transaction=True)
def test_traffic_is_booked_in_the_minute_of_the_reports_own_time(shop: None, settings: Any) -> None:
    settings.ROLLUP_FLUSH_SECONDS = 60
    stats = node_stats()

    async def scenario() -> None:
        link = await linked()
        serve(stats, 3)
        await link.send_json_to(report(stats, T0 + 50))
        await processed(1)
        serve(stats, 4)
        await link.send_json_to(report(stats, T0 + 59))
        await processed(2)
        serve(stats, 5)
        await link.send_json_to(report(stats, T0 + 61))  # the next minute, processed in the same flush
        await processed(3)
        serve(stats, 6)
        await link.send_json_to(report(stats, T0 + 125))
        await processed(4)
        await ingest.flush()
        await link.disconnect(timeout=TIMEOUT)

    run(scenario)
    minute = dt.datetime.fromtimestamp(T0, dt.UTC)
    assert rolled_up() == {minute: 7, minute + dt.timedelta(minutes=1): 5, minute + dt.timedelta(minutes=2): 6}


@pytest.mark.django_db(transaction=True)
def test_a_reconnect_neither_loses_nor_counts_twice(shop: None, settings: Any) -> None:
    settings.ROLLUP_FLUSH_SECONDS = 60
    stats = node_stats()

    async def scenario() -> None:
        link = await linked()
        serve(stats, 10)
        await link.send_json_to(report(stats, T0 + 1))
        await processed(1)
        await ingest.flush()
        serve(stats, 5)
        await link.send_json_to(report(stats, T0 + 2))  # not flushed when the link drops
        await processed(2)
        await link.disconnect(timeout=TIMEOUT)
        again = await linked()
        serve(stats, 3)
        await again.send_json_to(report(stats, T0 + 3))
        await processed(3)
        await ingest.flush()
        await again.disconnect(timeout=TIMEOUT)
        await ingest.flush()

    run(scenario)
    assert total() == 18


@pytest.mark.django_db(transaction=True)
def test_a_control_plane_restart_between_flushes_loses_nothing(shop: None, settings: Any) -> None:
    settings.ROLLUP_FLUSH_SECONDS = 60
    stats = node_stats()

    async def before_the_crash() -> None:
        link = await linked()
        serve(stats, 10)
        await link.send_json_to(report(stats, T0 + 1))
        await processed(1)
        await ingest.flush()
        serve(stats, 20)
        await link.send_json_to(report(stats, T0 + 2))
        await processed(2)
        # The event loop ends here with the 20 requests in memory only: a crash.

    async def after_the_restart() -> None:
        link = await linked()
        assert ingest.processed == 0, "a new process: nothing in memory"
        serve(stats, 1)
        await link.send_json_to(report(stats, T0 + 70))
        await processed(1)
        await ingest.flush()
        await link.disconnect(timeout=TIMEOUT)

    run(before_the_crash)
    assert total() == 10
    run(after_the_restart)
    minute = dt.datetime.fromtimestamp(T0, dt.UTC)
    assert rolled_up() == {minute: 10, minute + dt.timedelta(minutes=1): 21}, \
        "the lost seconds are covered by the next report, booked in its minute"


@pytest.mark.django_db(transaction=True)
def test_a_node_restart_counts_its_new_totals_from_zero(shop: None, settings: Any) -> None:
    settings.ROLLUP_FLUSH_SECONDS = 60
    first_life = node_stats()
    second_life = node_stats(started_at=T0 + 5)

    async def scenario() -> None:
        link = await linked()
        serve(first_life, 100)
        await link.send_json_to(report(first_life, T0 + 1))
        await processed(1)
        serve(first_life, 2)
        await link.send_json_to(report(first_life, T0 + 2))
        await processed(2)
        await ingest.flush()
        await link.disconnect(timeout=TIMEOUT)
        again = await linked()  # the node came back with counters from zero
        serve(second_life, 4)
        await again.send_json_to(report(second_life, T0 + 6))
        await processed(3)
        serve(second_life, 1)
        await again.send_json_to(report(second_life, T0 + 7))
        await processed(4)
        await ingest.flush()
        await again.disconnect(timeout=TIMEOUT)

    run(scenario)
    assert total() == 102 + 5


@pytest.mark.django_db(transaction=True)
def test_a_flush_that_fails_keeps_its_counts_for_the_next(shop: None, settings: Any) -> None:
    settings.ROLLUP_FLUSH_SECONDS = 60
    stats = node_stats()
    real = traffic.flush_ledgers
    failures = {"left": 1}

    def failing_once(items: Any) -> traffic.FlushResult:
        if failures["left"]:
            failures["left"] -= 1
            raise traffic.DatabaseError("the database is away")
        return real(items)

    async def scenario() -> None:
        link = await linked()
        serve(stats, 8)
        await link.send_json_to(report(stats, T0 + 1))
        await processed(1)
        traffic.flush_ledgers = failing_once  # type: ignore[assignment]
        try:
            assert await ingest.flush() is None
            serve(stats, 2)
            await link.send_json_to(report(stats, T0 + 2))
            await processed(2)
            assert await ingest.flush() is not None
        finally:
            traffic.flush_ledgers = real  # type: ignore[assignment]
        await link.disconnect(timeout=TIMEOUT)

    run(scenario)
    assert total() == 10


@pytest.mark.django_db(transaction=True)
def test_an_older_links_late_flush_is_fenced_off_by_the_newer_hello(shop: None) -> None:
    """Two processes, one node: the old one's flush comes after the new link took the node."""
    stats = node_stats()
    serve(stats, 10)
    node = ProxyNode.objects.create(name="edge-1", connected=True)
    counts = ledger.Counts.of_totals(T0 + 1, stats.as_dict())
    minute = dt.datetime.fromtimestamp(T0, dt.UTC)
    old = ledger.FlushItem(node.pk, node.link_epoch, None, [(minute, counts)], T0 + 1)
    ProxyNode.objects.filter(pk=node.pk).update(link_epoch=node.link_epoch + 1)  # a hello elsewhere

    result = traffic.flush_ledgers([old])

    assert result.fenced == {node.pk} and result.rows == 0
    assert total() == 0, "the newer link counts these from the stored baseline instead"


@pytest.mark.django_db
def test_a_flush_writes_two_statements_whatever_the_number_of_nodes() -> None:
    hosts = [f"host-{n}" for n in range(50)]
    for name in hosts:
        Host.objects.create(name=name, upstream=Upstream.objects.get_or_create(name="app")[0])
    minute = dt.datetime.fromtimestamp(T0, dt.UTC)
    items = []
    for n in range(40):
        stats = node_stats()
        for name in hosts:
            stats.host(name).requests = n + 1
        node = ProxyNode.objects.create(name=f"edge-{n}", connected=True)
        counts = ledger.Counts.of_totals(T0 + 1, stats.as_dict())
        items.append(ledger.FlushItem(node.pk, node.link_epoch, None, [(minute, counts)], T0 + 1, (4, 1)))

    with CaptureQueriesContext(connection) as queries:
        result = traffic.flush_ledgers(items)

    writes = [q["sql"][:30] for q in queries.captured_queries if q["sql"].startswith(("INSERT", "UPDATE"))]
    assert len(writes) == 2, f"one upsert of the rollup, one update of the nodes: {writes}"
    assert (result.rows, result.nodes) == (50, 40)
    assert TrafficRollup.objects.get(host="host-7").requests == sum(range(1, 41))
    assert ProxyNode.objects.filter(workers=4, worker_restarts=1).count() == 40


def test_a_baseline_stored_by_an_older_version_is_read_as_counts() -> None:
    """Before batching, ``last_stats`` held the node's whole previous report: it still counts as a baseline."""
    stats = node_stats()
    serve(stats, 6)
    stats.host("shop").handshakes_failed["unknown_ca"] = 2
    old = {"time": T0 + 1, "totals": stats.as_dict()}
    baseline = ledger.Counts.from_json(old)
    assert baseline is not None and baseline.started_at == stats.started_at
    assert dict(zip(ledger.COLUMNS, baseline.hosts["shop"], strict=True)) == {
        "requests": 6, "responses_2xx": 6, "responses_3xx": 0, "responses_4xx": 0, "responses_5xx": 0,
        "bytes_in": 0, "bytes_out": 600, "handshake_failures": 2, "upstream_errors": 0}
    assert ledger.Counts.from_json(baseline.to_json()) == baseline
    assert ledger.Counts.from_json({"time": "yesterday"}) is None
