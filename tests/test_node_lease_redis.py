"""Two daphne processes sharing PostgreSQL and Redis: a node name is held by one link across both,
and a node that moves from one process to the other is counted exactly once.

Needs PostgreSQL and Redis on 127.0.0.1 (skipped otherwise); a database and a Redis
database of its own (see ``tests.test_scale_out``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from pathlib import Path
from typing import Any

import websockets

from proxycore import agentproto
from proxycore.stats import Stats
from tests.processes import Project, daphne_argv
from tests.proxyharness import free_port
from tests.test_scale_out import (
    PG_HOST,
    PG_PORT,
    REDIS_HOST,
    REDIS_PORT,
    Processes,
    fresh_database,
    http_answers,
    redis_database,
    require_services,
    wait_until,
)

CLOSE_NAME_TAKEN = 4409


async def link(port: int, token: str, node: str) -> Any:
    socket = await websockets.connect(f"ws://127.0.0.1:{port}/ws/agent/",
                                      additional_headers={"Authorization": f"Bearer {token}"})
    await socket.send(json.dumps(agentproto.Hello(node, "0.1.0", 1, 0).to_message()))
    return socket


async def closed_with(socket: Any) -> int | None:
    with contextlib.suppress(TimeoutError, websockets.ConnectionClosed):
        async with asyncio.timeout(10):
            async for _ in socket:
                pass
    return socket.close_code  # type: ignore[no-any-return]


async def send_stats(socket: Any, stats: Stats, requests: int) -> None:
    stats.host("-").requests += requests
    report = agentproto.StatsReport("edge-1", time.time(), stats.as_dict())
    await socket.send(json.dumps(report.to_message()))


def rolled_up(database: str) -> int:
    import psycopg

    with psycopg.connect(host=PG_HOST, port=PG_PORT, user="postgres", dbname=database) as conn:
        row = conn.execute("SELECT COALESCE(SUM(requests), 0) FROM proxyadmin_trafficrollup").fetchone()
    return int(row[0]) if row else 0


async def scenario(ports: list[int], token: str, database: str) -> None:
    stats = Stats()
    stats.started_at = time.time() - 60
    on_a = await link(ports[0], token, "edge-1")
    await send_stats(on_a, stats, 10)
    on_b = await link(ports[1], token, "edge-1")  # the same name, on the other process
    assert await closed_with(on_b) == CLOSE_NAME_TAKEN, "the name is held on the other daphne"

    for _ in range(3):
        await asyncio.sleep(0.3)
        await send_stats(on_a, stats, 5)
    await on_a.close()  # the node moves to the other process, maybe before A has flushed
    deadline = time.monotonic() + 10
    while True:
        moved = await link(ports[1], token, "edge-1")
        with contextlib.suppress(TimeoutError, websockets.ConnectionClosed):
            async with asyncio.timeout(0.5):
                await moved.recv()  # config.changed or nothing: a refusal closes it
        if moved.close_code is None:
            break
        assert time.monotonic() < deadline, "daphne A never gave the name back"
        await asyncio.sleep(0.2)
    await send_stats(moved, stats, 7)
    await asyncio.sleep(0.5)
    await send_stats(moved, stats, 1)
    expected = stats.host("-").requests
    deadline = time.monotonic() + 10
    while (found := await asyncio.to_thread(rolled_up, database)) != expected:
        assert found < expected, f"counted twice: {found} > {expected}"
        assert time.monotonic() < deadline, f"only {found} of {expected} requests rolled up"
        await asyncio.sleep(0.2)
    await asyncio.sleep(1.5)  # later flushes add nothing
    assert await asyncio.to_thread(rolled_up, database) == expected
    await moved.close()


def test_one_link_per_node_name_across_two_daphnes_and_exact_counts_when_a_node_moves(
    tmp_path: Path,
) -> None:
    require_services()
    with contextlib.ExitStack() as stack:
        database = stack.enter_context(fresh_database())
        redis_db = stack.enter_context(redis_database())
        project = Project(tmp_path)
        token = secrets.token_urlsafe(24)
        project.env.update(
            DATABASE_URL=f"postgres://postgres@{PG_HOST}:{PG_PORT}/{database}",
            REDIS_URL=f"redis://{REDIS_HOST}:{REDIS_PORT}/{redis_db}",
            PROXYADMIN_AGENT_TOKEN=token,
            PROXYADMIN_SECRET_KEY=secrets.token_urlsafe(50),
        )
        project.manage("migrate", "--verbosity", "0")
        procs = Processes(project.env, tmp_path)
        stack.callback(procs.dump)
        stack.callback(procs.stop_all)
        ports = [free_port(), free_port()]
        for n, port in enumerate(ports):
            procs.start(f"daphne-{n}", daphne_argv(port))
        for port in ports:
            wait_until(lambda port=port: http_answers(f"http://127.0.0.1:{port}/admin/login/"),
                       f"daphne on :{port}", procs)
        asyncio.run(scenario(ports, token, database))
        procs.check_alive()
        logs = procs.log("daphne-0") + procs.log("daphne-1")
        assert "two proxy nodes call themselves 'edge-1'" in logs
        assert "Traceback" not in logs, logs[-4000:]
