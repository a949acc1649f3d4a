"""The agent link: proxy nodes authenticate with the token, report, and are told of new revisions."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.contrib.auth.models import User
from django.test import Client
from django.utils import timezone

from proxyadmin.asgi import application
from proxyadmin.models import ConfigRevision, HSTSPolicy, ProxyNode
from proxycore import agentproto
from proxycore.stats import Stats
from tests.conftest import run

TIMEOUT = 5


pytestmark = pytest.mark.usefixtures("empty_channel_layer")


def agent(token: str | None = None, *, scheme: str = "Bearer",
          extra: list[tuple[bytes, bytes]] | None = None) -> WebsocketCommunicator:
    headers = [(b"authorization", f"{scheme} {token}".encode())] if token else []
    communicator = WebsocketCommunicator(application, "/ws/agent/", headers=headers + (extra or []))
    communicator.scope["client"] = ("203.0.113.7", 40123)
    return communicator


def hello(node: str = "edge-1", revision: int = 0) -> dict[str, Any]:
    return agentproto.Hello(
        node=node, version="0.1.0", pid=4242, revision=revision,
        listeners=(agentproto.Listener("https", "127.0.0.1:8443"),),
    ).to_message()


async def eventually(check: Callable[[], bool], what: str) -> None:
    """Polls the database until ``check`` holds (the consumer works asynchronously)."""
    for _ in range(100):
        if await database_sync_to_async(check)():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


def node_row(name: str = "edge-1") -> ProxyNode | None:
    return ProxyNode.objects.filter(name=name).first()


@pytest.mark.django_db(transaction=True)
def test_agent_with_the_token_is_accepted() -> None:
    async def scenario() -> None:
        link = agent(settings.AGENT_TOKEN)
        connected, _ = await link.connect(timeout=TIMEOUT)
        assert connected
        await link.disconnect(timeout=TIMEOUT)

    run(scenario)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(("token", "scheme"), [
    (None, "Bearer"),
    ("not-the-agent-token-at-all", "Bearer"),
    (settings.AGENT_TOKEN, "Basic"),
    (settings.AGENT_TOKEN + "x", "Bearer"),
], ids=["missing", "wrong", "not-bearer", "longer"])
def test_agent_without_the_right_token_is_refused_with_4401_and_logged(
    token: str | None, scheme: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        connected, code = await agent(token, scheme=scheme).connect(timeout=TIMEOUT)
        assert (connected, code) == (False, agentproto.CLOSE_UNAUTHORISED)

    with caplog.at_level(logging.WARNING, logger="proxyadmin.agentlink"):
        run(scenario)
    logged = caplog.text
    assert "203.0.113.7:40123" in logged
    assert settings.AGENT_TOKEN not in logged


@pytest.mark.django_db(transaction=True)
def test_a_staff_session_does_not_open_the_agent_link() -> None:
    staff = User.objects.create_user("root", is_staff=True, is_superuser=True)
    client = Client()
    client.force_login(staff)
    cookie = f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"

    async def scenario() -> None:
        link = agent(extra=[(b"cookie", cookie.encode()), (b"origin", b"http://127.0.0.1:8000")])
        assert await link.connect(timeout=TIMEOUT) == (False, agentproto.CLOSE_UNAUTHORISED)

    run(scenario)


@pytest.mark.django_db(transaction=True)
def test_hello_registers_the_node_online_and_disconnect_leaves_it_stale() -> None:
    async def scenario() -> None:
        link = agent(settings.AGENT_TOKEN)
        assert (await link.connect(timeout=TIMEOUT))[0]
        await link.send_json_to(hello())
        await eventually(lambda: node_row() is not None, "hello stored")
        node = await database_sync_to_async(node_row)()
        assert node is not None
        assert node.connected and node.status == "online"
        assert (node.version, node.pid, node.applied_revision) == ("0.1.0", 4242, 0)
        assert node.listeners == [{"name": "https", "address": "127.0.0.1:8443"}]
        await link.disconnect(timeout=TIMEOUT)
        node = await database_sync_to_async(node_row)()
        assert node is not None and not node.connected
        assert node.status == "stale"

    run(scenario)


@pytest.mark.django_db(transaction=True)
def test_a_link_that_dies_with_an_error_still_marks_its_node_disconnected(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        link = agent(settings.AGENT_TOKEN)
        assert (await link.connect(timeout=TIMEOUT))[0]
        await link.send_json_to(hello())
        await eventually(lambda: getattr(node_row(), "connected", False), "hello stored")
        node = await database_sync_to_async(node_row)()
        assert node is not None
        # A message no handler takes kills the consumer with an error, as a failing
        # channel-layer read does: disconnect() is never dispatched.
        await get_channel_layer().send(node.channel_name, {"type": "no.such.handler"})
        with pytest.raises(ValueError, match="No handler"):
            await link.wait(timeout=TIMEOUT)
        await eventually(lambda: not getattr(node_row(), "connected", True), "marked disconnected")

        again = agent(settings.AGENT_TOKEN)
        assert (await again.connect(timeout=TIMEOUT))[0]
        await again.send_json_to(hello())
        await eventually(lambda: getattr(node_row(), "connected", False), "second hello stored")
        await again.disconnect(timeout=TIMEOUT)

    with caplog.at_level(logging.WARNING, logger="proxyadmin.agentlink"):
        run(scenario)
    assert "two proxy nodes" not in caplog.text


def test_node_status_goes_online_stale_offline_with_time_and_link() -> None:
    now = timezone.now()
    ago = lambda seconds: now - dt.timedelta(seconds=seconds)  # noqa: E731
    assert ProxyNode(connected=True, last_seen=ago(1)).status_at(now) == "online"
    assert ProxyNode(connected=True, last_seen=ago(6)).status_at(now) == "stale"
    assert ProxyNode(connected=False, last_seen=ago(1)).status_at(now) == "stale"
    assert ProxyNode(connected=True, last_seen=ago(59)).status_at(now) == "stale"
    assert ProxyNode(connected=True, last_seen=ago(61)).status_at(now) == "offline"
    assert ProxyNode(connected=False, last_seen=None).status_at(now) == "offline"


@pytest.mark.django_db(transaction=True)
def test_a_new_config_revision_is_pushed_to_connected_agents() -> None:
    async def scenario() -> None:
        links = [agent(settings.AGENT_TOKEN), agent(settings.AGENT_TOKEN)]
        for number, link in enumerate(links):
            assert (await link.connect(timeout=TIMEOUT))[0]
            current = await database_sync_to_async(ConfigRevision.current)()
            await link.send_json_to(hello(f"edge-{number}", revision=current))
        await eventually(lambda: ProxyNode.objects.filter(connected=True).count() == 2, "both hellos")
        for link in links:
            assert await link.receive_nothing(timeout=0.2), "an up-to-date node is not told to reload"

        await database_sync_to_async(HSTSPolicy.objects.create)(name="strict")

        revision = await database_sync_to_async(ConfigRevision.current)()
        assert revision > 0
        for link in links:
            assert await link.receive_json_from(timeout=TIMEOUT) == {
                "type": "config.changed", "revision": revision,
            }
            await link.disconnect(timeout=TIMEOUT)

    run(scenario)


@pytest.mark.django_db(transaction=True)
def test_a_node_behind_the_current_revision_is_told_at_hello() -> None:
    HSTSPolicy.objects.create(name="made-while-the-link-was-down")
    current = ConfigRevision.current()

    async def scenario() -> None:
        link = agent(settings.AGENT_TOKEN)
        assert (await link.connect(timeout=TIMEOUT))[0]
        await link.send_json_to(hello(revision=current - 1))
        assert await link.receive_json_from(timeout=TIMEOUT) == {
            "type": "config.changed", "revision": current,
        }
        await link.disconnect(timeout=TIMEOUT)

    run(scenario)


@pytest.mark.django_db(transaction=True)
def test_rejected_then_applied_revisions_are_recorded_on_the_node() -> None:
    async def scenario() -> None:
        link = agent(settings.AGENT_TOKEN)
        assert (await link.connect(timeout=TIMEOUT))[0]
        await link.send_json_to(hello(revision=3))
        await link.send_json_to({"type": "config.rejected", "revision": 4, "error": "key does not open"})
        await eventually(lambda: getattr(node_row(), "last_error", "") == "key does not open", "rejection")
        node = await database_sync_to_async(node_row)()
        assert node is not None and (node.applied_revision, node.last_error_revision) == (3, 4)

        await link.send_json_to({"type": "config.applied", "revision": 5})
        await eventually(lambda: getattr(node_row(), "applied_revision", 0) == 5, "applied")
        node = await database_sync_to_async(node_row)()
        assert node is not None and node.last_error == "" and node.last_error_revision is None
        await link.disconnect(timeout=TIMEOUT)

    run(scenario)


@pytest.mark.django_db(transaction=True)
def test_malformed_messages_are_ignored_and_the_link_keeps_working(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stats = Stats()
    stats.host("shop").requests = 2

    async def scenario() -> None:
        link = agent(settings.AGENT_TOKEN)
        assert (await link.connect(timeout=TIMEOUT))[0]
        await link.send_json_to({"type": "stats", "node": "edge-1", "time": 1.0,
                                 "totals": stats.as_dict()})  # before hello
        await link.send_to(text_data="{not json")
        await link.send_to(text_data="[" * 100_000)
        await link.send_to(bytes_data=b"\x00\x01")
        for junk in (
            {"type": "launch.missiles"}, [1, 2, 3], "hello", {"no": "type"},
            {"type": "hello", "node": 7, "version": "1", "pid": 1, "revision": 0, "listeners": []},
            {"type": "hello", "node": "x", "version": "1", "pid": True, "revision": 0, "listeners": []},
            {"type": "config.applied", "revision": "5"},
        ):
            await link.send_json_to(junk)
        await link.send_json_to(hello())
        await link.send_json_to({"type": "stats", "node": "edge-1", "time": 1.0,
                                 "totals": {"started_at": "yesterday"}})
        await link.send_json_to({"type": "stats", "node": "edge-1", "time": 1.0,
                                 "totals": {"started_at": 1.0, "hosts": {"shop": {"requests": -1}}}})
        await link.send_json_to({"type": "stats", "node": "edge-2", "time": 1.0,
                                 "totals": stats.as_dict()})  # another node's name
        await link.send_json_to({"type": "stats", "node": "edge-1", "time": stats.started_at + 1,
                                 "totals": stats.as_dict()})
        await eventually(lambda: getattr(node_row(), "last_stats", None) is not None, "good stats stored")
        assert await link.receive_nothing(timeout=0.1)
        await link.disconnect(timeout=TIMEOUT)

    with caplog.at_level(logging.WARNING, logger="proxyadmin.agentlink"):
        run(scenario)
    assert "dropped" in caplog.text
    assert "unknown message type 'launch.missiles'" in caplog.text


def test_every_node_message_survives_a_round_trip_through_the_schema() -> None:
    stats = Stats()
    stats.host("shop").latency(0.03)
    stats.listener("https").tls_versions["TLSv1.3"] += 1
    for message in (
        agentproto.Hello("edge-1", "0.1.0", 7, 3, (agentproto.Listener("https", "127.0.0.1:8443"),)),
        agentproto.StatsReport("edge-1", stats.started_at + 1, stats.as_dict()),
        agentproto.ConfigApplied(4),
        agentproto.ConfigRejected(5, "bad key"),
    ):
        assert agentproto.parse_node_message(json.loads(json.dumps(message.to_message()))) == message
    changed = agentproto.ConfigChanged(9)
    assert agentproto.parse_control_message(changed.to_message()) == changed


@pytest.mark.parametrize("totals", [
    {"started_at": float("nan")},
    {"started_at": 1.0, "hosts": {"shop": {"latency": {"buckets": [float("inf")], "counts": [0, 0]}}}},
    {"started_at": 1.0, "hosts": {"shop": {"latency": {"buckets": [0.1], "counts": [0]}}}},
    {"started_at": 1.0, "hosts": {"sh\x00op": {}}},
    {"started_at": 1.0, "hosts": {"shop": {"responses": {"2xx": 1.5}}}},
    {"started_at": 1.0, "listeners": {"https": {"ciphers": {"AES": -1}}}},
], ids=["nan-start", "inf-bucket", "short-counts", "nul-host", "float-count", "negative-count"])
def test_stats_totals_that_arithmetic_or_the_database_would_choke_on_are_refused(totals: Any) -> None:
    with pytest.raises(agentproto.ProtocolError):
        agentproto.parse_node_message({"type": "stats", "node": "edge-1", "time": 2.0, "totals": totals})


def manage_check(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    ours = ("PROXYADMIN_", "DATABASE_URL", "REDIS_URL")
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    full_env.update({"PROXYADMIN_VAR_DIR": str(tmp_path / "var"), **env})
    return subprocess.run([sys.executable, "manage.py", "check"], cwd=Path(__file__).parent.parent,
                          env=full_env, capture_output=True, text=True, timeout=120)


def test_agent_token_is_generated_once_into_a_0600_file_unless_given(tmp_path: Path) -> None:
    first = manage_check(tmp_path)
    assert first.returncode == 0, first.stderr
    path = tmp_path / "var" / "agent_token"
    token = path.read_text().strip()
    assert len(token) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert token not in first.stdout + first.stderr
    assert manage_check(tmp_path).returncode == 0
    assert path.read_text().strip() == token, "generated once, then kept"

    short = manage_check(tmp_path, PROXYADMIN_AGENT_TOKEN="letmein")
    assert short.returncode != 0 and "PROXYADMIN_AGENT_TOKEN must be at least 16" in short.stderr
    days = manage_check(tmp_path, PROXYADMIN_TRAFFIC_HISTORY_DAYS="0")
    assert days.returncode != 0 and "PROXYADMIN_TRAFFIC_HISTORY_DAYS must be at least 1" in days.stderr


@pytest.mark.django_db
def test_nodes_and_traffic_are_listed_read_only_in_the_admin() -> None:
    HSTSPolicy.objects.create(name="strict")
    current = ConfigRevision.current()
    ProxyNode.objects.create(name="edge-9", connected=True, last_seen=timezone.now(),
                             applied_revision=current - 1, last_error="bad key",
                             last_error_revision=current, workers=4, worker_restarts=2)
    client = Client()
    client.force_login(User.objects.create_user("boss", is_staff=True, is_superuser=True))

    page = client.get("/admin/proxyadmin/proxynode/")
    assert page.status_code == 200
    body = page.content.decode()
    assert "edge-9" in body and "online" in body
    assert f"{current - 1} / {current}" in body
    assert f"revision {current}: bad key" in body
    assert "(2 restarts)" in body, "issue 12's worker processes, as of the last flush"
    assert client.get("/admin/proxyadmin/proxynode/add/").status_code == 403
    assert client.get("/admin/proxyadmin/trafficrollup/").status_code == 200
    assert client.get("/admin/proxyadmin/trafficrollup/add/").status_code == 403
