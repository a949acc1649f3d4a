"""One link per node name: a second link naming a node another link holds is refused, not taken as the same node.

In memory here (no ``REDIS_URL``); ``test_node_lease_redis.py`` shows the same across
two daphne processes sharing Redis.
"""

from __future__ import annotations

import logging
import time

import pytest
from channels.db import database_sync_to_async
from django.conf import settings

from proxyadmin import liveness
from proxyadmin.consumers import CLOSE_NAME_TAKEN
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
