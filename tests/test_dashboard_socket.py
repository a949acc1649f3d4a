"""The live dashboard socket: staff only, current state first, then ticks and node changes."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import pytest
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.contrib.auth.models import User
from django.test import Client
from django.utils import timezone

from proxyadmin.asgi import application
from proxyadmin.coalesce import PROCESS_KEY
from proxyadmin.models import Certificate, ConfigRevision, TrafficRollup, Upstream
from proxycore import agentproto
from proxycore.stats import LATENCY_BUCKETS, Stats
from tests.conftest import run

TIMEOUT = 5
ALLOWED_ORIGIN = (b"origin", b"http://127.0.0.1:8000")


pytestmark = pytest.mark.usefixtures("empty_channel_layer")


def session_cookie(user: User) -> tuple[bytes, bytes]:
    client = Client()
    client.force_login(user)
    value = client.cookies[settings.SESSION_COOKIE_NAME].value
    return (b"cookie", f"{settings.SESSION_COOKIE_NAME}={value}".encode())


def staff_cookie() -> tuple[bytes, bytes]:
    return session_cookie(User.objects.create_user("ops", is_staff=True))


def dashboard(*headers: tuple[bytes, bytes]) -> WebsocketCommunicator:
    return WebsocketCommunicator(application, "/ws/dashboard/", headers=list(headers))


def agent() -> WebsocketCommunicator:
    token = f"Bearer {settings.AGENT_TOKEN}".encode()
    return WebsocketCommunicator(application, "/ws/agent/", headers=[(b"authorization", token)])


async def next_of_type(socket: WebsocketCommunicator, kind: str) -> dict[str, Any]:
    """The next message of ``kind``, skipping others (``nodes`` updates come and go)."""
    for _ in range(20):
        message = await socket.receive_json_from(timeout=TIMEOUT)
        if message["type"] == kind:
            return message
    raise AssertionError(f"no {kind!r} message")


async def next_tick_with(socket: WebsocketCommunicator, node: str) -> dict[str, Any]:
    """The next tick that carries a report of ``node`` (a process ticks every second, reports or not)."""
    for _ in range(20):
        tick = await next_of_type(socket, "tick")
        if node in tick["nodes"] and tick["hosts"]:
            return tick
    raise AssertionError(f"no tick with {node!r}")


async def dashboard_and_node(
    cookie: tuple[bytes, bytes],
) -> tuple[WebsocketCommunicator, WebsocketCommunicator, dict[str, Any]]:
    """A staff dashboard past its state, then node edge-1 past its hello; the ``nodes`` update it caused."""
    browser = dashboard(ALLOWED_ORIGIN, cookie)
    assert (await browser.connect(timeout=TIMEOUT))[0]
    assert (await browser.receive_json_from(timeout=TIMEOUT))["type"] == "state"
    node = agent()
    assert (await node.connect(timeout=TIMEOUT))[0]
    await node.send_json_to(agentproto.Hello("edge-1", "0.1.0", 99, 0).to_message())
    return browser, node, await next_of_type(browser, "nodes")


@pytest.mark.django_db(transaction=True)
def test_anonymous_browser_is_refused() -> None:
    async def scenario() -> None:
        connected, _ = await dashboard(ALLOWED_ORIGIN).connect(timeout=TIMEOUT)
        assert not connected

    run(scenario)


@pytest.mark.django_db(transaction=True)
def test_logged_in_user_who_is_not_staff_is_refused() -> None:
    cookie = session_cookie(User.objects.create_user("visitor"))

    async def scenario() -> None:
        connected, _ = await dashboard(ALLOWED_ORIGIN, cookie).connect(timeout=TIMEOUT)
        assert not connected

    run(scenario)


@pytest.mark.django_db(transaction=True)
def test_staff_session_from_a_foreign_origin_is_refused() -> None:
    cookie = staff_cookie()

    async def scenario() -> None:
        for origin in (b"https://evil.example", b"http://127.0.0.1.evil.example"):
            connected, _ = await dashboard((b"origin", origin), cookie).connect(timeout=TIMEOUT)
            assert not connected
        connected, _ = await dashboard(cookie).connect(timeout=TIMEOUT)  # no Origin at all
        assert not connected

    run(scenario)


@pytest.mark.django_db(transaction=True)
def test_agent_token_does_not_open_the_dashboard() -> None:
    async def scenario() -> None:
        bearer = (b"authorization", f"Bearer {settings.AGENT_TOKEN}".encode())
        connected, _ = await dashboard(ALLOWED_ORIGIN, bearer).connect(timeout=TIMEOUT)
        assert not connected

    run(scenario)


def make_certificate(name: str, days_left: int) -> Certificate:
    now = timezone.now()
    return Certificate.objects.create(
        name=name, chain_pem="-", key_token="-", subject=f"CN={name}", issuer="CN=test", serial="1",
        not_before=now - dt.timedelta(days=30), not_after=now + dt.timedelta(days=days_left, hours=1),
        key_type="EC", key_size=256, fingerprint_sha256="00" * 32,
    )


@pytest.mark.django_db(transaction=True)
def test_staff_gets_the_current_state_first() -> None:
    cookie = staff_cookie()
    soon = make_certificate("soon", days_left=10)
    make_certificate("later", days_left=200)
    gone = make_certificate("gone", days_left=-3)
    Upstream.objects.create(name="legacy", tls=True, tls_verify=False)
    Upstream.objects.create(name="fine", tls=True, tls_verify=True)
    minute = timezone.now().replace(second=0, microsecond=0) - dt.timedelta(minutes=5)
    TrafficRollup.objects.create(minute=minute, host="shop", requests=30, responses_5xx=2, bytes_in=100)
    TrafficRollup.objects.create(minute=minute, host="blog", requests=12, bytes_out=7, handshake_failures=1)
    TrafficRollup.objects.create(minute=minute - dt.timedelta(days=2), host="shop", requests=999)
    revision = ConfigRevision.current()

    async def scenario() -> None:
        socket = dashboard(ALLOWED_ORIGIN, cookie)
        connected, _ = await socket.connect(timeout=TIMEOUT)
        assert connected
        state = await socket.receive_json_from(timeout=TIMEOUT)
        await socket.disconnect(timeout=TIMEOUT)

        assert state["type"] == "state"
        assert state["revision"] == revision
        assert state["nodes"] == []
        history = state["history"]
        assert len(history["minutes"]) == 24 * 60
        at = history["minutes"].index(int(minute.timestamp()))
        assert (history["requests"][at], history["errors_5xx"][at], history["bytes_in"][at],
                history["bytes_out"][at], history["handshake_failures"][at]) == (42, 2, 100, 7, 1)
        assert sum(history["requests"]) == 42, "the row of two days ago is not in the last 24 h"
        assert [(c["name"], c["days"]) for c in state["certificates"]] == [("gone", -3), ("soon", 10)]
        assert state["certificates"][1]["url"] == f"/admin/proxyadmin/certificate/{soon.pk}/change/"
        assert state["certificates"][0]["not_after"] == gone.not_after.timestamp()
        assert state["warnings"] == ["upstream 'legacy' does not verify its targets' certificates"]

    run(scenario)


@pytest.mark.django_db(transaction=True)
def test_agent_stats_reach_the_dashboard_as_ticks_of_deltas() -> None:
    cookie = staff_cookie()
    stats = Stats()
    stats.started_at = 1_700_000_000.0
    shop = stats.host("shop")
    https = stats.listener("https")

    def traffic(requests: int, status: int, latency: float, size: int) -> None:
        for _ in range(requests):
            shop.requests += 1
            shop.response(status)
            shop.latency(latency)
            shop.bytes_in += size
            shop.bytes_out += 2 * size
        https.tls_versions["TLSv1.3"] += 1
        https.ciphers["TLS_AES_128_GCM_SHA256"] += 1

    async def scenario() -> None:
        browser, node, nodes = await dashboard_and_node(cookie)
        assert [(n["name"], n["status"]) for n in nodes["nodes"]] == [("edge-1", "online")]

        traffic(10, 200, 0.002, 100)
        shop.active_connections = 3
        shop.handshakes_failed["unknown_ca"] += 1
        report = agentproto.StatsReport("edge-1", stats.started_at + 5.0, stats.as_dict())
        await node.send_json_to(report.to_message())
        first = await next_tick_with(browser, "edge-1")
        assert first["node"] == PROCESS_KEY, "one tick per control-plane process, summing its nodes"
        assert first["hosts"]["shop"]["requests"] == 10, "a new node's first report counts from start"
        assert first["hosts"]["shop"]["rps"] == pytest.approx(10 / first["interval"])
        assert first["nodes"]["edge-1"] == {"time": report.time, "requests": 10, "active": 3,
                                            "workers": 1, "worker_restarts": 0}

        traffic(4, 200, 0.02, 50)
        traffic(2, 502, 0.2, 10)
        shop.active_connections = 1
        report = agentproto.StatsReport("edge-1", stats.started_at + 7.0, stats.as_dict())
        await node.send_json_to(report.to_message())
        second = await next_tick_with(browser, "edge-1")
        assert second["nodes"]["edge-1"]["time"] == stats.started_at + 7.0
        entry = second["hosts"]["shop"]
        assert {k: entry[k] for k in ("requests", "active", "2xx", "3xx", "4xx", "5xx",
                                      "bytes_in", "bytes_out", "handshake_failures")} == {
            "requests": 6, "active": 1, "2xx": 4, "3xx": 0, "4xx": 0, "5xx": 2,
            "bytes_in": 4 * 50 + 2 * 10, "bytes_out": 2 * (4 * 50 + 2 * 10), "handshake_failures": 0,
        }
        # Six latencies: four in (0.01, 0.025], two in (0.1, 0.25]; none of the first ten.
        lower, upper = LATENCY_BUCKETS[3], LATENCY_BUCKETS[4]
        assert entry["p50_ms"] == pytest.approx(1000 * (lower + (upper - lower) * 3 / 4))
        assert 100 < entry["p95_ms"] <= 250
        assert second["tls_versions"] == {"TLSv1.3": 2}
        assert second["ciphers"] == {"TLS_AES_128_GCM_SHA256": 2}

        await node.disconnect(timeout=TIMEOUT)
        nodes = await next_of_type(browser, "nodes")
        assert [(n["name"], n["status"]) for n in nodes["nodes"]] == [("edge-1", "stale")]
        await browser.disconnect(timeout=TIMEOUT)

    run(scenario)


@pytest.mark.django_db(transaction=True)
def test_a_dashboard_opened_after_traffic_gets_the_last_15_minutes_in_its_state() -> None:
    from proxyadmin.livehistory import history as live_history

    live_history.__init__()  # type: ignore[misc]  # this process's memory, as a fresh daphne has it
    cookie = staff_cookie()
    stats = Stats()
    stats.started_at = time.time() - 3
    shop = stats.host("shop")

    async def scenario() -> None:
        first, node, _ = await dashboard_and_node(cookie)
        for _ in range(7):
            shop.requests += 1
            shop.response(200)
        report = agentproto.StatsReport("edge-1", time.time(), stats.as_dict())
        await node.send_json_to(report.to_message())
        tick = await next_tick_with(first, "edge-1")
        await first.disconnect(timeout=TIMEOUT)

        later = dashboard(ALLOWED_ORIGIN, cookie)  # opened after the traffic
        assert (await later.connect(timeout=TIMEOUT))[0]
        state = await next_of_type(later, "state")
        live = state["live"]
        requests = 1 + live["counters"].index("requests")
        assert sum(row[requests] for row in live["seconds"]) == pytest.approx(7)
        assert sum(row[requests] for row in live["hosts"]["shop"]) == 7
        assert list(live["nodes"]) == [PROCESS_KEY] and live["nodes"][PROCESS_KEY] >= tick["time"]
        await later.disconnect(timeout=TIMEOUT)
        await node.disconnect(timeout=TIMEOUT)

    run(scenario)


@pytest.mark.django_db(transaction=True)
def test_a_dashboard_showing_a_hosts_recent_requests_gets_its_lines_from_the_nodes() -> None:
    cookie = staff_cookie()
    hostile = '2026-11-28T06:25:39.143Z 127.0.0.1 https shop "GET /<script>x</script> HTTP/1.1" 404 9 1.0ms -'

    async def scenario() -> None:
        browser, node, _ = await dashboard_and_node(cookie)
        await browser.send_to(text_data='{"type": "recent.watch", "host": "shop"}')
        watch = await next_of_type(node, "requests.watch")
        assert agentproto.parse_control_message(watch) == agentproto.RequestsWatch("shop", 30, resend=True)
        await browser.send_to(text_data='{"type": "recent.watch", "host": "shop"}')  # a renewal too soon
        await browser.send_to(text_data="not json")
        assert await node.receive_nothing(timeout=0.3)

        lines = agentproto.RecentRequests("edge-1", {"shop": [(1, hostile)], "other": [(2, "x")]})
        await node.send_json_to(lines.to_message())
        recent = await next_of_type(browser, "recent")
        assert recent == {"type": "recent", "node": "edge-1", "host": "shop", "lines": [[1, hostile]]}

        await browser.send_to(text_data='{"type": "recent.watch", "host": null}')  # the view closed
        await node.send_json_to(lines.to_message())
        assert await browser.receive_nothing(timeout=0.3)
        await browser.disconnect(timeout=TIMEOUT)
        await node.disconnect(timeout=TIMEOUT)

    run(scenario)
