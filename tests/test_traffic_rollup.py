"""Traffic deltas and the per-minute rollup: added in the database, pruned after the history."""

from __future__ import annotations

import datetime as dt
import threading
from typing import Any

import pytest
from django.db import connection, transaction
from django.test import override_settings
from django.utils import timezone

from proxyadmin import announce, traffic
from proxyadmin.models import Host, ProxyNode, TrafficRollup, Upstream
from proxycore.agentproto import StatsReport, latency_quantile
from proxycore.stats import Stats

MINUTE = dt.datetime(2030, 5, 17, 12, 34, tzinfo=dt.UTC)


# -- latency quantiles --------------------------------------------------------


def test_latency_quantile_interpolates_inside_the_bucket() -> None:
    buckets = (0.1, 0.2, 0.4)
    assert latency_quantile(buckets, [0, 10, 0, 0], 0.5) == pytest.approx(0.15)
    assert latency_quantile(buckets, [10, 0, 10, 0], 0.75) == pytest.approx(0.3)
    assert latency_quantile(buckets, [4, 0, 0, 0], 1.0) == pytest.approx(0.1)
    assert latency_quantile(buckets, [0, 0, 0, 0], 0.5) is None


def test_latency_quantile_in_the_open_bucket_is_the_highest_bound() -> None:
    assert latency_quantile((0.1, 0.2), [1, 0, 9], 0.95) == 0.2


def test_latency_quantile_refuses_mismatched_histograms() -> None:
    with pytest.raises(ValueError):
        latency_quantile((0.1, 0.2), [1, 2], 0.5)
    with pytest.raises(ValueError):
        latency_quantile((0.1,), [1, 2], 1.5)


# -- deltas -------------------------------------------------------------------


def sample(stats: Stats, at: float) -> traffic.StatsSample:
    return traffic.StatsSample(stats.started_at + at, stats.as_dict())


def test_delta_is_the_difference_of_consecutive_totals() -> None:
    stats = Stats()
    shop = stats.host("shop")
    shop.requests, shop.bytes_in = 5, 500
    shop.response(200)
    shop.upstream_errors["connect"] += 1
    first = sample(stats, 1.0)
    shop.requests, shop.bytes_in = 8, 800
    shop.response(503)
    shop.handshakes_failed["unknown_ca"] += 2
    shop.upstream_errors["timeout"] += 1
    stats.host("idle")

    delta = traffic.stats_delta(first, sample(stats, 3.0))

    assert not delta.restarted and delta.elapsed == 2.0
    assert delta.hosts["shop"].rollup_increments() == {
        "requests": 3, "responses_5xx": 1, "bytes_in": 300, "handshake_failures": 2, "upstream_errors": 1,
    }
    tick = announce.tick_message("edge-1", delta)
    assert set(tick["hosts"]) == {"shop"}, "idle hosts stay out of ticks"
    assert tick["hosts"]["shop"]["rps"] == 1.5


def test_a_new_started_at_is_a_restart_counted_from_zero() -> None:
    before = Stats()
    before.host("shop").requests = 1000
    old = sample(before, 50.0)
    after = Stats()
    after.started_at = before.started_at + 60
    after.host("shop").requests = 7

    delta = traffic.stats_delta(old, sample(after, 4.0))

    assert delta.restarted and delta.elapsed == 4.0
    assert delta.hosts["shop"].requests == 7


def test_counters_that_go_backwards_never_make_negative_deltas() -> None:
    stats = Stats()
    stats.host("shop").requests = 10
    first = sample(stats, 1.0)
    stats.host("shop").requests = 4
    assert traffic.stats_delta(first, sample(stats, 2.0)).hosts["shop"].requests == 0


def test_a_host_whose_last_connection_closed_still_shows_once() -> None:
    stats = Stats()
    stats.host("shop").active_connections = 2
    first = sample(stats, 1.0)
    stats.host("shop").active_connections = 0
    tick = announce.tick_message("edge-1", traffic.stats_delta(first, sample(stats, 2.0)))
    assert tick["hosts"]["shop"]["active"] == 0
    assert announce.tick_message("edge-1", traffic.stats_delta(sample(stats, 2.0), sample(stats, 3.0)))[
        "hosts"] == {}


# -- the rollup -------------------------------------------------------------


def delta_of(**counts: Any) -> traffic.HostDelta:
    return traffic.HostDelta(**counts)


def row(host: str, minute: dt.datetime = MINUTE) -> TrafficRollup:
    return TrafficRollup.objects.get(minute=minute, host=host)


@pytest.mark.django_db
def test_deltas_are_added_into_the_row_of_their_minute() -> None:
    traffic.add_to_rollup({"shop": delta_of(requests=3, responses={"2xx": 3}, bytes_out=30)}, MINUTE)
    traffic.add_to_rollup({"shop": delta_of(requests=2, responses={"5xx": 2}, bytes_out=20),
                           "blog": delta_of(requests=1)}, MINUTE)
    traffic.add_to_rollup({"shop": delta_of(requests=9)}, MINUTE + dt.timedelta(minutes=1))
    traffic.add_to_rollup({"quiet": delta_of(active=4)}, MINUTE)

    shop = row("shop")
    assert (shop.requests, shop.responses_2xx, shop.responses_5xx, shop.bytes_out) == (5, 3, 2, 50)
    assert row("blog").requests == 1
    assert row("shop", MINUTE + dt.timedelta(minutes=1)).requests == 9
    assert not TrafficRollup.objects.filter(host="quiet").exists(), "no row for a host without traffic"


@pytest.mark.django_db
def test_a_row_made_by_another_writer_in_between_is_added_to_not_lost() -> None:
    """The race: our UPDATE finds no row, another process inserts it, our INSERT collides."""
    raced = {"done": False}

    def insert_after_first_update(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        result = execute(sql, params, many, context)
        if not raced["done"] and sql.startswith("UPDATE") and TrafficRollup._meta.db_table in sql:
            raced["done"] = True
            TrafficRollup.objects.bulk_create([TrafficRollup(minute=MINUTE, host="shop", requests=5)])
        return result

    with transaction.atomic(), connection.execute_wrapper(insert_after_first_update):
        traffic.add_to_rollup({"shop": delta_of(requests=3)}, MINUTE)

    assert raced["done"]
    assert row("shop").requests == 8


@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(connection.vendor == "sqlite",
                    reason="SQLite serialises writers itself; the race needs PostgreSQL")
def test_concurrent_writers_lose_no_counts() -> None:
    writers, rounds = 6, 20
    start = threading.Barrier(writers)
    errors: list[BaseException] = []

    def write() -> None:
        try:
            start.wait()
            for _ in range(rounds):
                with transaction.atomic():
                    traffic.add_to_rollup({"shop": delta_of(requests=1), "blog": delta_of(bytes_in=2)},
                                          MINUTE)
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=write) for _ in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert row("shop").requests == writers * rounds
    assert row("blog").bytes_in == 2 * writers * rounds


@pytest.mark.django_db
@override_settings(TRAFFIC_HISTORY_DAYS=2)
def test_rows_older_than_the_history_are_pruned_at_most_once_a_minute() -> None:
    now = MINUTE
    for age in (dt.timedelta(days=2, minutes=1), dt.timedelta(days=1, hours=23), dt.timedelta(0)):
        TrafficRollup.objects.create(minute=now - age, host="shop", requests=1)
    pruner = traffic.RollupPruner()

    assert pruner.prune_if_due(now) == 1
    assert TrafficRollup.objects.count() == 2

    TrafficRollup.objects.create(minute=now - dt.timedelta(days=3), host="shop", requests=1)
    assert pruner.prune_if_due(now + dt.timedelta(seconds=30)) is None
    assert pruner.prune_if_due(now + dt.timedelta(seconds=60)) == 1


@pytest.mark.django_db
def test_stats_reports_of_a_node_are_rolled_up_as_deltas() -> None:
    Host.objects.create(name="shop", upstream=Upstream.objects.create(name="app"))
    ProxyNode.objects.create(name="edge-1", connected=True)
    stats = Stats()
    shop = stats.host("shop")
    shop.requests = 4
    shop.response(200)
    first = traffic.record_stats(StatsReport("edge-1", stats.started_at + 1, stats.as_dict()), MINUTE)
    shop.requests = 10
    shop.response(404)
    second = traffic.record_stats(StatsReport("edge-1", stats.started_at + 2, stats.as_dict()),
                                  MINUTE + dt.timedelta(seconds=1))

    assert first is not None and first.restarted
    assert second is not None and not second.restarted
    shop_row = row("shop")
    assert (shop_row.requests, shop_row.responses_2xx, shop_row.responses_4xx) == (10, 1, 1)
    node = ProxyNode.objects.get(name="edge-1")
    assert node.last_seen == MINUTE + dt.timedelta(seconds=1)
    assert node.started_at is not None
    assert node.started_at.timestamp() == pytest.approx(stats.started_at, abs=1e-3)
    assert traffic.record_stats(StatsReport("stranger", 1.0, stats.as_dict()), MINUTE) is None


@pytest.mark.django_db
def test_history_sums_hosts_per_minute_over_the_last_day() -> None:
    now = timezone.now()
    minute = traffic.minute_of(now) - dt.timedelta(minutes=3)
    TrafficRollup.objects.create(minute=minute, host="a", requests=2, responses_5xx=1)
    TrafficRollup.objects.create(minute=minute, host="b", requests=3, handshake_failures=4)

    history = traffic.history(now)

    assert len(history["requests"]) == 1440
    assert history["minutes"][-1] == int(traffic.minute_of(now).timestamp())
    at = history["minutes"].index(int(minute.timestamp()))
    assert (history["requests"][at], history["errors_5xx"][at], history["handshake_failures"][at]) == (5, 1, 4)
    assert sum(history["requests"]) == 5
