"""Each control-plane process pushes every new revision to its own nodes, once.

``tests/test_config_propagation.py`` measures this end to end with ``importconfig``
in its own process; here the "other process" is the announcement on commit turned
off, so the revision watcher is the only way the news can travel.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
from channels.db import database_sync_to_async
from django.conf import settings
from django.db.models.signals import post_save

from proxyadmin import announce
from proxyadmin.models import ConfigRevision, HSTSPolicy
from proxyadmin.revisionwatcher import POLL_SECONDS, watcher
from tests.conftest import run
from tests.test_agent_link import TIMEOUT, agent, eventually, hello, node_row

pytestmark = pytest.mark.usefixtures("empty_channel_layer")


@contextlib.contextmanager
def made_in_another_process() -> Iterator[None]:
    """Revisions made inside are not announced here, as those of ``importconfig`` are not."""
    post_save.disconnect(sender=ConfigRevision, dispatch_uid="announce-new-config-revision")
    try:
        yield
    finally:
        announce.connect_signals()


@pytest.mark.django_db(transaction=True)
def test_a_revision_no_announcement_reaches_is_pushed_by_the_watcher_once() -> None:
    async def scenario() -> None:
        link = agent(settings.AGENT_TOKEN)
        assert (await link.connect(timeout=TIMEOUT))[0]
        await link.send_json_to(hello(revision=await database_sync_to_async(ConfigRevision.current)()))
        await eventually(lambda: getattr(node_row(), "connected", False), "hello stored")
        with made_in_another_process():
            await database_sync_to_async(HSTSPolicy.objects.create)(name="from-an-import")
        revision = await database_sync_to_async(ConfigRevision.current)()
        assert await link.receive_json_from(timeout=POLL_SECONDS * 3) == {
            "type": "config.changed", "revision": revision}
        assert await link.receive_nothing(timeout=POLL_SECONDS * 3)
        await link.disconnect(timeout=TIMEOUT)

    run(scenario)


@pytest.mark.django_db(transaction=True)
def test_announced_and_watched_the_node_is_told_once() -> None:
    async def scenario() -> None:
        links = [agent(settings.AGENT_TOKEN) for _ in range(2)]
        for number, link in enumerate(links):
            assert (await link.connect(timeout=TIMEOUT))[0]
            await link.send_json_to(hello(f"edge-{number}", await database_sync_to_async(ConfigRevision.current)()))
        await eventually(lambda: getattr(node_row("edge-1"), "connected", False), "hellos stored")
        await database_sync_to_async(HSTSPolicy.objects.create)(name="made-here")
        revision = await database_sync_to_async(ConfigRevision.current)()
        for link in links:
            assert await link.receive_json_from(timeout=TIMEOUT) == {
                "type": "config.changed", "revision": revision}
        for link in links:
            assert await link.receive_nothing(timeout=POLL_SECONDS * 3), "the watcher's push is not passed on"
            await link.disconnect(timeout=TIMEOUT)
        assert not watcher.running, "the watcher stops with the last link"

    run(scenario)
