"""A node's worker processes and their restarts reach the dashboard's node table and the node's row."""

from __future__ import annotations

import time

import pytest
from channels.db import database_sync_to_async

from proxyadmin.ingest import ingest
from proxyadmin.models import ProxyNode
from proxycore import agentproto
from proxycore.stats import Stats
from tests.conftest import run
from tests.test_dashboard_socket import dashboard_and_node, next_tick_with, staff_cookie

pytestmark = pytest.mark.usefixtures("empty_channel_layer")


@pytest.mark.django_db(transaction=True)
def test_worker_count_and_restarts_are_shown_live_and_kept_on_the_node() -> None:
    cookie = staff_cookie()
    stats = Stats()
    stats.started_at = time.time() - 30
    stats.host("-").requests = 3
    stats.workers = {"count": 4, "restarts": 2}

    async def scenario() -> None:
        browser, node, nodes = await dashboard_and_node(cookie)
        assert nodes["nodes"][0]["workers"] == 1, "one until the node says otherwise"
        await node.send_json_to(agentproto.StatsReport("edge-1", time.time(), stats.as_dict()).to_message())
        tick = await next_tick_with(browser, "edge-1")
        assert (tick["nodes"]["edge-1"]["workers"], tick["nodes"]["edge-1"]["worker_restarts"]) == (4, 2)
        await ingest.flush()
        row = await database_sync_to_async(ProxyNode.objects.get)(name="edge-1")
        assert (row.workers, row.worker_restarts) == (4, 2)
        await node.disconnect()
        await browser.disconnect()

    run(scenario)
