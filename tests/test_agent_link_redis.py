"""With the Redis channel layer, idle agent links stay up when no dashboard is open.

An agent consumer's inbox is a blocking Redis read of up to 5 s (channels_redis);
with nothing sent to it (no dashboard open in that process, no config change) the
read must wait those 5 s out rather than time out on the socket and close the link.

Needs Redis on 127.0.0.1:6379 (skipped otherwise); uses a Redis database of its own
(see ``tests.test_scale_out.redis_database``) and SQLite for the control plane.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from proxycore.agent import AgentLink
from proxycore.stats import Stats
from tests.processes import Project, daphne, wait_for_http
from tests.proxyharness import free_port
from tests.test_scale_out import REDIS_HOST, REDIS_PORT, answers, redis_database

NODES = 3
WATCH_SECONDS = 20.0  # four of channels_redis's 5 s blocking reads, and then some


async def hold_links(port: int, token: str, seconds: float) -> list[AgentLink]:
    """``NODES`` real agent links to the control plane, kept up for ``seconds`` once all are up."""
    links = [
        AgentLink(f"ws://127.0.0.1:{port}", token, node=f"edge-{n}", version="0.1.0", stats=Stats(),
                  listeners=[], revision=lambda: 0, on_config_changed=lambda revision: None)
        for n in range(NODES)
    ]
    tasks = [asyncio.create_task(link.run()) for link in links]
    try:
        deadline = time.monotonic() + 30
        while not all(link.connected for link in links):
            assert time.monotonic() < deadline, "the agent links did not come up"
            await asyncio.sleep(0.05)
        await asyncio.sleep(seconds)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return links


def test_redis_backed_agent_links_stay_up_without_a_dashboard(project: Project, tmp_path: Path) -> None:
    if not answers(REDIS_HOST, REDIS_PORT):
        pytest.skip(f"needs Redis on {REDIS_HOST}:{REDIS_PORT}")
    with redis_database() as db:
        project.env["REDIS_URL"] = f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}"
        token = "a-test-agent-token-for-redis-links"
        project.env["PROXYADMIN_AGENT_TOKEN"] = token
        port = free_port()
        with daphne(project, port):
            wait_for_http(f"http://127.0.0.1:{port}/admin/login/")
            links = asyncio.run(hold_links(port, token, WATCH_SECONDS))
        log = (tmp_path / "daphne.log").read_text(errors="replace")

    assert [link.connections for link in links] == [1] * NODES, log[-4000:]
    assert "two proxy nodes call themselves" not in log, log[-4000:]
    assert "Traceback" not in log, log[-4000:]
