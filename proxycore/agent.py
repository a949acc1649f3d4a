"""The agent link: a proxy node's websocket to the control plane.

The node says ``hello``, then sends its counters (totals since start) once a
second and tells whether each config revision was applied or rejected; the
control plane pushes ``config.changed``. While the link is down the node keeps
serving, the caller polls the revision itself (``AgentLink.connected`` is false),
and the link reconnects with capped exponential backoff. Message shapes are in
``proxycore.agentproto``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.frames import CloseCode

from proxycore import agentproto
from proxycore.agentproto import ConfigApplied, ConfigRejected, Hello, Listener, StatsReport
from proxycore.stats import Stats

log = logging.getLogger("proxycore.agent")

STATS_INTERVAL = 1.0
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0


class AgentLink:
    """Keeps the link up; call ``run()`` as a task and cancel it to stop."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        node: str,
        version: str,
        stats: Stats,
        listeners: Sequence[Listener],
        revision: Callable[[], int],
        on_config_changed: Callable[[int], None],
    ) -> None:
        self.url = url.rstrip("/") + agentproto.AGENT_PATH
        self.token = token
        self.node = node
        self.version = version
        self.stats = stats
        self.listeners = tuple(listeners)
        self.revision = revision
        self.on_config_changed = on_config_changed
        self.connected = False
        self.connections = 0  # links made so far (1 + reconnections)
        self._socket: ClientConnection | None = None
        self._pending: list[ConfigApplied | ConfigRejected] = []  # reports made while the link was down

    async def run(self) -> None:
        delay = BACKOFF_FIRST
        while True:
            started = time.monotonic()
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except InvalidStatus as exc:
                log.error("control plane refused the agent link (%s): check the agent token",
                          exc.response.status_code)
            except (OSError, WebSocketException, TimeoutError) as exc:
                if self.connected or delay == BACKOFF_FIRST:
                    log.warning("agent link to %s down: %s", self.url, exc or type(exc).__name__)
            finally:
                self.connected = False
                self._socket = None
            if time.monotonic() - started > 10:
                delay = BACKOFF_FIRST  # it was up a while: start the backoff over
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    async def _session(self) -> None:
        async with connect(
            self.url,
            additional_headers={"Authorization": f"Bearer {self.token}"},
            open_timeout=5, ping_interval=10, ping_timeout=10, close_timeout=2,
            proxy=None, max_size=1 << 20,
        ) as socket:
            self._socket = socket
            self.connected = True
            self.connections += 1
            log.info("agent link up: %s", self.url)
            await self._send(self.hello())
            for message in self._pending:
                await self._send(message)
            self._pending.clear()
            sender = asyncio.create_task(self._send_stats())
            try:
                async for raw in socket:
                    self._received(raw)
            except asyncio.CancelledError:
                # The node is stopping: say so (1001), rather than the 1011 an error means.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(socket.close(CloseCode.GOING_AWAY, "node stopping"), 2)
                raise
            finally:
                # asyncio.wait, not await: awaiting a cancelled task and suppressing its
                # CancelledError would also swallow a cancel of this task that lands here,
                # and a stopping node would reconnect instead of stopping.
                sender.cancel()
                await asyncio.wait({sender})

    def hello(self) -> Hello:
        return Hello(node=self.node, version=self.version, pid=os.getpid(), revision=self.revision(),
                     listeners=self.listeners)

    async def _send_stats(self) -> None:
        while True:
            await self._send(StatsReport(node=self.node, time=time.time(), totals=self.stats.as_dict()))
            await asyncio.sleep(STATS_INTERVAL)

    async def _send(self, message: agentproto.NodeMessage) -> None:
        if self._socket is not None:
            await self._socket.send(json.dumps(message.to_message()))

    def _received(self, raw: str | bytes) -> None:
        try:
            changed = agentproto.parse_control_message(json.loads(raw))
        except (ValueError, RecursionError) as exc:  # ProtocolError is a ValueError
            log.warning("ignored a malformed message from the control plane: %s",
                        exc if isinstance(exc, agentproto.ProtocolError) else "not JSON")
            return
        self.on_config_changed(changed.revision)

    def report(self, message: ConfigApplied | ConfigRejected) -> None:
        """Send ``config.applied`` / ``config.rejected`` now, or when the link is back."""
        if self._socket is None:
            self._pending = [m for m in self._pending if m.type != message.type] + [message]
            return
        task = asyncio.get_running_loop().create_task(self._send_quietly(message))
        task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    async def _send_quietly(self, message: ConfigApplied | ConfigRejected) -> None:
        with contextlib.suppress(ConnectionClosed, OSError):
            await self._send(message)
