"""The revision watcher: each daphne process pushes every new config revision to its own nodes.

A revision is announced on commit by the process that made it
(``proxyadmin.announce``), but ``importconfig``, a shell or another daphne process
cannot reach this process's in-memory channel layer. So one asyncio task per
control-plane process reads the latest ``ConfigRevision`` id every
``POLL_SECONDS`` -- one indexed query per process, however many nodes are linked --
and when it moves sends ``config.changed`` to each agent consumer of *this* process,
by its own channel. With Redis every process covers its own consumers and none
sends to another's; the announcement on commit may arrive as well, and the consumer
passes on only a revision newer than the one its node has (``AgentConsumer.told``).

The task starts with the first agent link of the process and stops with the last;
a consumer is added before its node's ``hello`` reads the revision, and the watcher
has read its baseline by then, so no revision falls between the two.
"""

from __future__ import annotations

import asyncio
import logging

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer

from proxyadmin import announce
from proxyadmin.models import ConfigRevision

log = logging.getLogger("proxyadmin.agentlink")

# A change is served within a second: at most this, plus the node's reload.
POLL_SECONDS = 0.3
# The database may be away for a while: log the first failures, then now and then.
FAILURE_LOG_FIRST = 3
FAILURE_LOG_EVERY = 200


class RevisionWatcher:
    """Watches ``ConfigRevision`` for the agent consumers of this process (one event loop)."""

    def __init__(self) -> None:
        self.channels: set[str] = set()
        self.seen: int | None = None
        self.failures = 0
        self._task: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def add(self, channel_name: str) -> None:
        """Push to this consumer from now on; returns once the watcher has its baseline."""
        loop = asyncio.get_running_loop()
        if self._task is not None and self._task.get_loop() is not loop:
            # Left by an event loop that has ended (tests run one per scenario): its consumers are gone.
            self._task, self.channels = None, set()
        self.channels.add(channel_name)
        if not self.running:
            self._ready = loop.create_future()
            self._task = loop.create_task(self._run(self._ready), name="config revision watcher")
        assert self._ready is not None
        await asyncio.shield(self._ready)

    def discard(self, channel_name: str) -> None:
        """Stop pushing to this consumer; the watcher stops with the last one."""
        self.channels.discard(channel_name)
        if not self.channels and self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self, ready: asyncio.Future[None]) -> None:
        try:
            self.seen = await self._read()
        finally:
            if not ready.done():
                ready.set_result(None)
        while True:
            await asyncio.sleep(POLL_SECONDS)
            current = await self._read()
            if current is not None and current != self.seen:
                self.seen = current
                await self._push(current)

    async def _read(self) -> int | None:
        try:
            current = await database_sync_to_async(ConfigRevision.current)()
        except Exception:
            self.failures += 1
            if self.failures <= FAILURE_LOG_FIRST or self.failures % FAILURE_LOG_EVERY == 0:
                log.warning("revision watcher: cannot read the config revision [%d so far]", self.failures,
                            exc_info=True)
            return None
        self.failures = 0
        return current

    async def _push(self, revision: int) -> None:
        layer = get_channel_layer()
        if layer is None:
            return
        message = announce.config_changed(revision)
        for channel in list(self.channels):
            try:
                await layer.send(channel, message)
            except Exception:
                log.warning("revision watcher: could not tell a node of revision %d", revision, exc_info=True)


watcher = RevisionWatcher()
