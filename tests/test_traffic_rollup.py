"""Traffic deltas and the per-minute rollup: added in the database, pruned after the history."""

from __future__ import annotations

import datetime as dt
import threading
from typing import Any

import pytest
from django.db import connection, transaction
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from proxyadmin import ledger, traffic
from proxyadmin.coalesce import TickCoalescer
from proxyadmin.models import TrafficRollup
from proxycore.agentproto import latency_quantile
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


def tick_of(delta: traffic.StatsDelta) -> dict[str, Any]:
    """The tick of a process whose one node made ``delta`` in the last second."""
    coalescer = TickCoalescer()
    coalescer.last_take = delta.time - 1.0
    coalescer.add("edge-1", delta.time, {"hosts": {}}, delta, delta.time)
    tick = coalescer.take(delta.time)
    assert tick is not None
    return tick


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
    tick = tick_of(delta)
    assert set(tick["hosts"]) == {"shop"}, "idle hosts stay out of ticks"
    # The process's tick covers its last second: the 3 requests the report brought in it.
    assert tick["hosts"]["shop"]["rps"] == 3.0


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
    tick = tick_of(traffic.stats_delta(first, sample(stats, 2.0)))
    assert tick["hosts"]["shop"]["active"] == 0
    assert tick_of(traffic.stats_delta(sample(stats, 2.0), sample(stats, 3.0)))["hosts"] == {}


# -- the rollup -------------------------------------------------------------


def counters(**columns: int) -> list[int]:
    return [columns.get(name, 0) for name in ledger.COLUMNS]


def row(host: str, minute: dt.datetime = MINUTE) -> TrafficRollup:
    return TrafficRollup.objects.get(minute=minute, host=host)


@pytest.mark.django_db
def test_counts_are_added_into_the_row_of_their_minute() -> None:
    traffic.add_to_rollup({(MINUTE, "shop"): counters(requests=3, responses_2xx=3, bytes_out=30)})
    written = traffic.add_to_rollup({
        (MINUTE, "shop"): counters(requests=2, responses_5xx=2, bytes_out=20),
        (MINUTE, "blog"): counters(requests=1),
        (MINUTE + dt.timedelta(minutes=1), "shop"): counters(requests=9),
        (MINUTE, "quiet"): counters(),
    })

    assert written == 3
    shop = row("shop")
    assert (shop.requests, shop.responses_2xx, shop.responses_5xx, shop.bytes_out) == (5, 3, 2, 50)
    assert row("blog").requests == 1
    assert row("shop", MINUTE + dt.timedelta(minutes=1)).requests == 9
    assert not TrafficRollup.objects.filter(host="quiet").exists(), "no row for a host without traffic"


@pytest.mark.django_db
def test_one_statement_adds_a_batch_of_rows() -> None:
    table = {(MINUTE, f"host-{n}"): counters(requests=n + 1) for n in range(traffic.UPSERT_ROWS + 1)}
    with CaptureQueriesContext(connection) as queries:
        traffic.add_to_rollup(table)
    inserts = [q["sql"] for q in queries.captured_queries if q["sql"].startswith("INSERT")]
    assert len(inserts) == 2, "one statement per 500 rows"
    assert TrafficRollup.objects.count() == traffic.UPSERT_ROWS + 1


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
                    traffic.add_to_rollup({(MINUTE, "shop"): counters(requests=1),
                                           (MINUTE, "blog"): counters(bytes_in=2)})
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
