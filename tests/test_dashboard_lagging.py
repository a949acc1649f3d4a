"""A dashboard that falls behind the live ticks is told so, and is never shown stale figures as live."""

from __future__ import annotations

import time

import pytest
from channels.layers import get_channel_layer

from proxyadmin.announce import DASHBOARD_GROUP
from proxyadmin.livehistory import history as live_history
from tests.conftest import run
from tests.test_dashboard_socket import ALLOWED_ORIGIN, TIMEOUT, dashboard, next_of_type, staff_cookie

pytestmark = pytest.mark.usefixtures("empty_channel_layer")


def tick(at: float) -> dict[str, object]:
    return {"type": "tick", "node": "control plane elsewhere:1", "time": at, "interval": 1.0,
            "hosts": {"shop": {"requests": 1}}, "nodes": {}, "shed": 0}


@pytest.mark.django_db(transaction=True)
def test_stale_ticks_are_dropped_and_the_page_told_it_lags_until_fresh_ones_come() -> None:
    live_history.__init__()  # type: ignore[misc]  # this process's memory, as a fresh daphne has it
    cookie = staff_cookie()

    async def scenario() -> None:
        browser = dashboard(ALLOWED_ORIGIN, cookie)
        assert (await browser.connect(timeout=TIMEOUT))[0]
        assert (await browser.receive_json_from(timeout=TIMEOUT))["type"] == "state"
        layer = get_channel_layer()
        now = time.time()
        for age in (30, 29, 28):  # queued behind a stall: relayed late
            await layer.group_send(DASHBOARD_GROUP, tick(now - age))
        lagging = await browser.receive_json_from(timeout=TIMEOUT)
        assert lagging["type"] == "lagging" and lagging["lagging"] is True and lagging["behind"] >= 28
        assert "live" in lagging, "the page gets the window as this process holds it instead"
        await layer.group_send(DASHBOARD_GROUP, tick(time.time()))
        caught_up = await browser.receive_json_from(timeout=TIMEOUT)
        assert (caught_up["type"], caught_up["lagging"], caught_up["dropped"]) == ("lagging", False, 3)
        requests = 1 + caught_up["live"]["counters"].index("requests")
        # The three dropped ticks and the fresh one, at their own times; the page then
        # ignores the fresh tick itself (not newer than what the window says it has).
        assert sum(row[requests] for row in caught_up["live"]["seconds"]) == pytest.approx(4)
        assert caught_up["live"]["nodes"] == {"control plane elsewhere:1": pytest.approx(time.time(), abs=2)}
        fresh = await next_of_type(browser, "tick")
        assert fresh["hosts"] == {"shop": {"requests": 1}}
        assert await browser.receive_nothing(timeout=0.2), "the stale ticks were never sent"
        await browser.disconnect(timeout=TIMEOUT)

    run(scenario)
