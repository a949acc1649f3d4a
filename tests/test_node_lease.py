"""One link per node name: a second link naming a node another link holds is refused, not taken as the same node.

In memory here (no ``REDIS_URL``); ``test_node_lease_redis.py`` shows the same across
two daphne processes sharing Redis.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest
import websockets
from channels.db import database_sync_to_async
from django.conf import settings
from django.db.models import F

from proxyadmin import liveness
from proxyadmin.consumers import CLOSE_NAME_TAKEN
from proxyadmin.ingest import ingest
from proxyadmin.models import ProxyNode, TrafficRollup
from proxycore import agentproto
from proxycore.agent import AgentLink
from proxycore.stats import Stats
from tests.conftest import run
from tests.test_agent_link import TIMEOUT, agent, eventually, hello, node_row

pytestmark = pytest.mark.usefixtures("empty_channel_layer")


@pytest.mark.django_db(transaction=True)
def test_a_second_link_with_a_name_in_use_is_refused_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        first = agent(settings.AGENT_TOKEN)
        assert (await first.connect(timeout=TIMEOUT))[0]
        await first.send_json_to(hello("edge-1"))
        await eventually(lambda: getattr(node_row(), "connected", False), "first hello stored")
        epoch = await database_sync_to_async(lambda: node_row().link_epoch)()  # type: ignore[union-attr]

        second = agent(settings.AGENT_TOKEN)
        assert (await second.connect(timeout=TIMEOUT))[0]
        await second.send_json_to(hello("edge-1"))
        closed = await second.receive_output(timeout=TIMEOUT)
        assert closed["type"] == "websocket.close" and closed["code"] == CLOSE_NAME_TAKEN
        await eventually(lambda: node_row().link_epoch == epoch,  # type: ignore[union-attr]
                         "the refused link did not take the node")

        await first.disconnect(timeout=TIMEOUT)  # gives the name back
        third = agent(settings.AGENT_TOKEN)
        assert (await third.connect(timeout=TIMEOUT))[0]
        await third.send_json_to(hello("edge-1"))
        await eventually(lambda: getattr(node_row(), "link_epoch", 0) == epoch + 1, "the name taken again")
        assert await third.receive_nothing(timeout=0.2)
        await third.disconnect(timeout=TIMEOUT)

    with caplog.at_level(logging.WARNING, logger="proxyadmin.agentlink"):
        run(scenario)
    assert "two proxy nodes call themselves 'edge-1'" in caplog.text


def test_a_lease_not_renewed_runs_out_and_another_link_may_take_the_name(settings: object) -> None:
    leases = liveness.MemoryLeases()
    settings.NODE_LEASE_SECONDS = 0.2  # type: ignore[attr-defined]

    async def scenario() -> None:
        assert await leases.acquire("edge-1", "link-a")
        assert not await leases.acquire("edge-1", "link-b")
        await leases.renew({"edge-1": "link-a"}, {"edge-1": time.time()})
        assert not await leases.acquire("edge-1", "link-b"), "renewed: still held"
        time.sleep(0.25)  # link-a stopped reporting (a dead peer not noticed yet)
        assert await leases.acquire("edge-1", "link-b")
        await leases.release("edge-1", "link-a")  # a late release of the old link changes nothing
        assert not await leases.acquire("edge-1", "link-a")

    run(scenario)


@pytest.mark.django_db(transaction=True)
def test_a_link_whose_node_another_process_took_is_closed_at_its_next_flush(settings: Any) -> None:
    settings.ROLLUP_FLUSH_SECONDS = 60  # flushed by hand
    stats = Stats()
    stats.host("-").requests = 5

    async def scenario() -> None:
        link = agent(settings.AGENT_TOKEN)
        assert (await link.connect(timeout=TIMEOUT))[0]
        await link.send_json_to(hello("edge-1"))
        await eventually(lambda: getattr(node_row(), "connected", False), "hello stored")
        # Another daphne's hello (its lease expired here first): the row's epoch moves on.
        await database_sync_to_async(
            lambda: ProxyNode.objects.filter(name="edge-1").update(link_epoch=F("link_epoch") + 1))()
        await link.send_json_to(agentproto.StatsReport("edge-1", time.time(), stats.as_dict()).to_message())
        for _ in range(100):
            if ingest.processed:
                break
            await asyncio.sleep(0.01)
        result = await ingest.flush()
        assert result is not None and result.rows == 0 and len(result.fenced) == 1
        closed = await link.receive_output(timeout=TIMEOUT)
        assert closed["type"] == "websocket.close" and closed["code"] == CLOSE_NAME_TAKEN

    run(scenario)
    assert not TrafficRollup.objects.exists(), "the link that holds the node counts these"


def test_a_refused_node_says_why_and_tries_again(caplog: pytest.LogCaptureFixture) -> None:
    """The node's side: a 4409 is logged as a name held elsewhere, and the node retries (jittered)."""
    hellos: list[float] = []

    async def control_plane(socket: Any) -> None:
        await socket.recv()  # the hello
        hellos.append(time.monotonic())
        await socket.close(agentproto.CLOSE_NAME_TAKEN, "another link holds this node name")

    async def scenario() -> None:
        async with websockets.serve(control_plane, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            link = AgentLink(f"ws://127.0.0.1:{port}", "t" * 20, node="edge-1", version="0.1.0",
                             stats=Stats(), listeners=[], revision=lambda: 0,
                             on_config_changed=lambda revision: None)
            task = asyncio.create_task(link.run())
            await asyncio.sleep(2.0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    with caplog.at_level(logging.ERROR, logger="proxycore.agent"):
        asyncio.run(scenario())
    assert len(hellos) >= 2, "it tries again"
    assert "another link holds the node name 'edge-1'" in caplog.text
