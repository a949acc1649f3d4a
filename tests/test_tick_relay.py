"""Ticks reach dashboards while the database thread is busy: relaying them never waits for it."""

from __future__ import annotations

import asyncio
import time

import pytest
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer

from proxyadmin.announce import DASHBOARD_GROUP
from tests.conftest import run
from tests.test_dashboard_socket import ALLOWED_ORIGIN, TIMEOUT, dashboard, next_of_type, staff_cookie

pytestmark = pytest.mark.usefixtures("empty_channel_layer")

BUSY_SECONDS = 3.0


@pytest.mark.django_db(transaction=True)
def test_a_tick_is_relayed_while_a_slow_flush_holds_the_database_thread() -> None:
    cookie = staff_cookie()

    async def scenario() -> None:
        browser = dashboard(ALLOWED_ORIGIN, cookie)
        assert (await browser.connect(timeout=TIMEOUT))[0]
        assert (await browser.receive_json_from(timeout=TIMEOUT))["type"] == "state"
        # channels has one thread for database work: a slow flush or query holds it.
        busy = asyncio.create_task(database_sync_to_async(time.sleep)(BUSY_SECONDS))
        await asyncio.sleep(0.1)
        sent = time.monotonic()
        await get_channel_layer().group_send(DASHBOARD_GROUP, {
            "type": "tick", "node": "control plane elsewhere:1", "time": time.time(), "hosts": {},
            "nodes": {}, "reports": 0, "shed": 0})
        await next_of_type(browser, "tick")
        assert time.monotonic() - sent < 1.0, "the tick waited for the database thread"
        assert not busy.done()
        await busy
        await browser.disconnect(timeout=TIMEOUT)

    run(scenario)
