"""The agent link: a proxy node's websocket to the control plane.

The node says ``hello``, then sends its counters (totals since start) once a
second and tells whether each config revision was applied or rejected; the
control plane pushes ``config.changed``. ``RecentLines`` keeps the node's last
access-log lines per host; while a dashboard watches a host (``requests.watch``)
its new lines go with the stats each second. While the link is down the node keeps
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
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.frames import CloseCode

from proxycore import agentproto
from proxycore.agentproto import (
    ConfigApplied,
    ConfigRejected,
    Hello,
    Listener,
    RecentRequests,
    RequestsWatch,
    StatsReport,
)

log = logging.getLogger("proxycore.agent")

STATS_INTERVAL = 1.0
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
# Hosts with a ring of recent lines: 200 lines of at most 512 bytes each, so at most
# about 100 MB if a thousand hosts all served huge request targets, a few MB in practice.
RECENT_MAX_HOSTS = 1000
RECENT_MAX_WATCHED = 64


class RecentLines:
    """The last ``per_host`` access-log lines of each host: an access-log sink (``ProxyNode(access_log=)``).

    The host is the fourth field of a line (``proxycore.accesslog``), ``-`` for none.
    Each line gets a sequence number; ``take`` returns the lines of the watched hosts
    that were not sent yet, within ``agentproto``'s bounds for one message.
    """

    def __init__(
        self, per_host: int = agentproto.MAX_RECENT_PER_HOST, max_hosts: int = RECENT_MAX_HOSTS,
    ) -> None:
        self.per_host = per_host
        self.max_hosts = max_hosts
        self.rings: dict[bytes, deque[tuple[int, bytes]]] = {}
        self.seq = 0
        self.watched: dict[str, float] = {}  # host -> monotonic time the watch ends
        self.sent: dict[str, int] = {}  # host -> sequence number of the last line sent

    def __call__(self, line: bytes) -> None:
        fields = line.split(b" ", 4)
        host = fields[3] if len(fields) == 5 else b"-"
        ring = self.rings.get(host)
        if ring is None:
            if len(self.rings) >= self.max_hosts:
                return
            ring = self.rings[host] = deque(maxlen=self.per_host)
        self.seq += 1
        ring.append((self.seq, line[:agentproto.MAX_LINE_LENGTH]))

    def watch(self, request: RequestsWatch, now: float) -> None:
        if request.host not in self.watched and len(self.watched) >= RECENT_MAX_WATCHED:
            return
        if request.resend or request.host not in self.watched:
            self.sent[request.host] = 0
        self.watched[request.host] = now + request.seconds

    def take(self, now: float) -> dict[str, list[tuple[int, str]]]:
        """The new lines of the hosts watched at ``now`` (newest last), marked as sent."""
        for host in [h for h, until in self.watched.items() if until <= now]:
            del self.watched[host]
            self.sent.pop(host, None)
        found: dict[str, list[tuple[int, str]]] = {}
        room = agentproto.MAX_RECENT_LINES
        for host in self.watched:
            ring = self.rings.get(host.encode())
            last = self.sent.get(host, 0)
            if not ring or ring[-1][0] <= last or room <= 0:
                continue
            new = [(seq, line) for seq, line in ring if seq > last][-room:]
            found[host] = [(seq, line.decode("utf-8", "replace")[:agentproto.MAX_LINE_LENGTH])
                           for seq, line in new]
            self.sent[host] = new[-1][0]
            room -= len(new)
        return found



class Totals(Protocol):
    """What the link reports: a node's ``Stats``, or a supervisor's sum of its workers'."""

    def as_dict(self) -> dict[str, Any]: ...


class AgentLink:
    """Keeps the link up; call ``run()`` as a task and cancel it to stop."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        node: str,
        version: str,
        stats: Totals,
        listeners: Sequence[Listener],
        revision: Callable[[], int],
        on_config_changed: Callable[[int], None],
        recent: RecentLines | None = None,
    ) -> None:
        self.url = url.rstrip("/") + agentproto.AGENT_PATH
        self.token = token
        self.node = node
        self.version = version
        self.stats = stats
        self.listeners = tuple(listeners)
        self.revision = revision
        self.on_config_changed = on_config_changed
        self.recent = recent
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
            lines = self.recent.take(time.monotonic()) if self.recent is not None else {}
            if lines:
                await self._send(RecentRequests(node=self.node, hosts=lines))
            await asyncio.sleep(STATS_INTERVAL)

    async def _send(self, message: agentproto.NodeMessage) -> None:
        if self._socket is not None:
            await self._socket.send(json.dumps(message.to_message()))

    def _received(self, raw: str | bytes) -> None:
        try:
            message = agentproto.parse_control_message(json.loads(raw))
        except (ValueError, RecursionError) as exc:  # ProtocolError is a ValueError
            log.warning("ignored a malformed message from the control plane: %s",
                        exc if isinstance(exc, agentproto.ProtocolError) else "not JSON")
            return
        if isinstance(message, RequestsWatch):
            if self.recent is not None:
                self.recent.watch(message, time.monotonic())
            return
        self.on_config_changed(message.revision)

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
