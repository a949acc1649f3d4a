"""Back-pressure: a process that falls behind keeps one report per node, and counts; reports are size-bounded."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from proxyadmin import ledger, traffic
from proxyadmin.ingest import ingest
from proxyadmin.models import Host, ProxyNode, TrafficRollup, Upstream
from proxycore import agentproto
from proxycore.stats import Stats
from tests.conftest import run
from tests.test_agent_link import TIMEOUT, agent, eventually, hello, node_row

pytestmark = pytest.mark.usefixtures("empty_channel_layer")


@dataclass(eq=False)
class SlowLink:
    """An agent link as ``Ingest`` sees one."""

    node: str
    node_ledger: ledger.NodeLedger
    owner: str = "link-1"
    pending: str | dict[str, Any] | None = None
    previous: traffic.StatsSample | None = None
    count_from_start: bool = True
    shed: int = 0
    dropped: list[str] = field(default_factory=list)

    def drop(self, what: str) -> None:
        self.dropped.append(what)

    async def lost_node(self) -> None:
        raise AssertionError("not taken by another link")


@pytest.mark.django_db(transaction=True)
def test_a_process_behind_keeps_the_newest_report_per_node_and_loses_no_traffic() -> None:
    Host.objects.create(name="shop", upstream=Upstream.objects.create(name="app"))
    node = ProxyNode.objects.create(name="edge-1", connected=True, link_epoch=1)
    stats = Stats()
    stats.started_at = time.time() - 100

    async def scenario() -> None:
        link = SlowLink("edge-1", ledger.NodeLedger("edge-1", node.pk, 1, None))
        ingest.add(link)
        ingest.adopt(link, link.node_ledger)
        # Five reports arrive while the loop is busy elsewhere: nothing runs in between.
        for second in range(1, 6):
            stats.host("shop").requests += 10
            ingest.offer(link, json.dumps(agentproto.StatsReport(
                "edge-1", stats.started_at + 90 + second, stats.as_dict()).to_message()))
        assert (link.shed, ingest.shed) == (4, 4)
        for _ in range(100):
            if ingest.processed:
                break
            await asyncio.sleep(0.01)
        assert ingest.processed == 1, "only the newest was worth processing"
        assert link.dropped == []
        await ingest.flush()
        tick = ingest.coalescer.take(time.time())
        assert tick is not None and tick["shed"] == 4, "the dashboards are told"
        ingest.links.discard(link)

    run(scenario)
    assert TrafficRollup.objects.get(host="shop").requests == 50, "totals are cumulative: none lost"


@pytest.mark.django_db(transaction=True)
def test_a_report_over_the_size_bound_is_dropped_and_logged(caplog: pytest.LogCaptureFixture,
                                                            settings: Any) -> None:
    settings.AGENT_MAX_REPORT_KB = 4
    stats = Stats()
    for n in range(40):  # some 6 KB of totals
        stats.host(f"host-{n}.example").requests = 1

    async def scenario() -> None:
        link = agent(settings.AGENT_TOKEN)
        assert (await link.connect(timeout=TIMEOUT))[0]
        await link.send_json_to(hello())
        await eventually(lambda: getattr(node_row(), "connected", False), "hello stored")
        await link.send_json_to(agentproto.StatsReport("edge-1", time.time(), stats.as_dict()).to_message())
        assert await link.receive_nothing(timeout=0.3), "the link stays up"
        assert ingest.processed == 0
        await link.disconnect(timeout=TIMEOUT)

    with caplog.at_level(logging.WARNING, logger="proxyadmin.agentlink"):
        run(scenario)
    assert "(at most 4 KiB are taken)" in caplog.text
    assert not TrafficRollup.objects.exists()
