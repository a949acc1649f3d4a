"""The control plane's two websockets: proxy nodes' agent link, and the staff's live dashboard.

``AgentConsumer`` (``/ws/agent/``, bearer token only) takes a node's ``hello`` (the
node's lease, ``proxyadmin.liveness``, and its row), hands its ``stats`` to this
process's ``proxyadmin.ingest`` (memory only: ledgers, ticks, flushes), writes its
config reports, and passes on ``config.changed`` (from ``proxyadmin.announce`` and
from this process's ``proxyadmin.revisionwatcher``). ``DashboardConsumer``
(``/ws/dashboard/``, staff sessions only) sends the current state on connect, then
relays each process's ``tick`` (or says the page lags) and ``nodes`` as they come.

Both join a channel-layer group, so with a Redis layer any daphne process can
reach every node and every dashboard.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Any

from channels.consumer import get_handler_name
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from proxyadmin import agentauth, announce, ledger, liveness, traffic
from proxyadmin.announce import AGENTS_GROUP, DASHBOARD_GROUP
from proxyadmin.ingest import ingest
from proxyadmin.livehistory import history as live_history
from proxyadmin.models import ConfigRevision, ProxyNode
from proxyadmin.revisionwatcher import watcher
from proxycore import agentproto

log = logging.getLogger("proxyadmin.agentlink")

# channels_redis forgets group members after a day (group_expiry): long-lived sockets re-join.
GROUP_REFRESH_SECONDS = 3600.0
# A broken node sends the same bad message every second: log the first few, then now and then.
MALFORMED_LOG_FIRST = 5
MALFORMED_LOG_EVERY = 100
CLOSE_FORBIDDEN = 4403
CLOSE_NAME_TAKEN = 4409  # another link holds this node's name
CLOSE_POLICY_VIOLATION = 1008
# How a node's stats frame starts (json.dumps of agentproto's message): queued as text,
# decoded only when its turn comes, so a newer one can replace it unread.
STATS_FRAME = re.compile(r'\s*\{\s*"type"\s*:\s*"stats"')
# A tick this old when a dashboard's consumer gets to it is not shown: the page is told it lags.
LAG_SECONDS = 3.0
LAG_RESYNC_SECONDS = 5.0


# -- node bookkeeping (sync, database) --------------------------------------


@dataclass(frozen=True, slots=True)
class HelloTaken:
    revision: int  # the current config revision
    pk: int
    epoch: int  # the node's link_epoch, now this link's
    baseline: ledger.Counts | None  # the node's counters as the rollup last took them


def save_hello(hello: agentproto.Hello, channel_name: str, take: bool = True) -> HelloTaken | None:
    """Record a node's hello and, with ``take``, give the node to this link.

    None for a new node that does not fit under ``ProxyNode.MAX_NODES``.

    The epoch is bumped and the baseline read under the row's lock, in one
    transaction: a flush of an older link of the node either came before (and the
    baseline holds its counts) or finds the epoch moved on and writes none of them.
    """
    now = timezone.now()
    with transaction.atomic():
        existing = ProxyNode.objects.select_for_update().filter(name=hello.node).first()
        if existing is None and not ProxyNode.make_room(now):
            return None
        node = existing or ProxyNode(name=hello.node)
        node.version, node.pid = hello.version, hello.pid
        node.listeners = [{"name": lst.name, "address": lst.address} for lst in hello.listeners]
        node.note_applied(hello.revision)
        node.connected, node.last_seen, node.channel_name = True, now, channel_name
        if take:
            node.link_epoch += 1
        node.save()
    baseline = ledger.Counts.from_json(node.last_stats)
    return HelloTaken(ConfigRevision.current(), node.pk, node.link_epoch, baseline)


def save_config_report(name: str, report: agentproto.ConfigApplied | agentproto.ConfigRejected) -> None:
    node = ProxyNode.objects.filter(name=name).first()
    if node is None:
        return
    if isinstance(report, agentproto.ConfigRejected):
        node.note_rejected(report.revision, report.error)
    else:
        node.note_applied(report.revision)
    node.last_seen = timezone.now()
    node.save(update_fields=["applied_revision", "last_error", "last_error_revision", "last_seen"])


def mark_disconnected(name: str, channel_name: str) -> int:
    # Only the link that holds the node now: a newer one may already be up elsewhere.
    return ProxyNode.objects.filter(name=name, channel_name=channel_name).update(connected=False)


# -- consumers --------------------------------------------------------------


class GroupMember(AsyncJsonWebsocketConsumer):
    """A consumer in one group, re-joined now and then so the membership never expires.

    ``clean_up`` runs once per socket: from ``disconnect()``, or -- when the consumer
    dies with an error (a failing channel-layer read, a bug), where channels never
    dispatches a disconnect -- on the way out of ``__call__``.
    """

    group = ""
    cleaned_up = False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.cleaned_up:
                try:
                    await self.clean_up(None)
                except Exception:
                    log.warning("could not clean up after a failed websocket", exc_info=True)

    async def dispatch(self, message: dict[str, Any]) -> None:
        """As channels does it, without closing stale database connections first.

        channels runs that on the one database thread before every handler, so a relayed
        tick would wait behind any flush or query; ``database_sync_to_async`` closes them
        itself around each piece of database work, which is where it matters.
        """
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)

    async def disconnect(self, code: int) -> None:
        await self.clean_up(code)

    async def clean_up(self, code: int | None) -> None:
        self.cleaned_up = True
        await self.leave_group()

    async def join_group(self) -> None:
        self._joined_at = time.monotonic()
        await self.channel_layer.group_add(self.group, self.channel_name)

    async def rejoin_group_if_due(self) -> None:
        if time.monotonic() - getattr(self, "_joined_at", 0.0) >= GROUP_REFRESH_SECONDS:
            await self.join_group()

    async def leave_group(self) -> None:
        await self.channel_layer.group_discard(self.group, self.channel_name)


class AgentConsumer(GroupMember):
    """One proxy node's link. Not behind the session or origin middleware: the token is all.

    Stats reports go to ``proxyadmin.ingest`` (no database work per report); hello and
    config reports are written to the node's row.
    """

    group = AGENTS_GROUP

    async def connect(self) -> None:
        self.node: str | None = None
        # The newest revision the node serves or was told of: a push of an older or the
        # same one (the announcement on commit and the watcher both send each) is not passed on.
        self.told = 0
        self.malformed = 0
        self.owner = self.channel_name
        self.pending: str | dict[str, Any] | None = None
        self.node_ledger: ledger.NodeLedger | None = None
        self.previous: traffic.StatsSample | None = None
        self.count_from_start = False
        self.shed = 0
        self.peer = agentauth.peer_address(self.scope)
        if not agentauth.scope_is_agent(self.scope):
            log.warning("agent link refused from %s: missing or wrong agent token", self.peer)
            await self.close(code=agentproto.CLOSE_UNAUTHORISED)
            return
        await watcher.add(self.channel_name)
        await self.join_group()
        await self.accept()
        ingest.add(self)

    async def clean_up(self, code: int | None) -> None:
        self.cleaned_up = True
        watcher.discard(self.channel_name)
        ingest.remove(self)
        node = getattr(self, "node", None)
        if node is None:
            await self.leave_group()
            return
        try:
            await self.release_lease(node)
            # A link that died must not leave its node "connected".
            await database_sync_to_async(mark_disconnected)(node, self.channel_name)
            log.info("proxy node %s disconnected (%s, %s)", node, self.peer,
                     "the link failed" if code is None else f"code {code}")
        finally:
            ingest.nodes_changed()
            await self.leave_group()

    # node -> control plane

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if text_data is None:
            self.drop("a binary frame")
            return
        limit = int(settings.AGENT_MAX_REPORT_KB) * 1024
        if len(text_data) > limit:
            self.drop(f"a message of {len(text_data) // 1024} KiB (at most {limit // 1024} KiB are taken)")
            return
        if self.node is not None and STATS_FRAME.match(text_data):
            ingest.offer(self, text_data)
            return
        try:
            content = await self.decode_json(text_data)
        except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
            self.drop("a frame that is not JSON")
            return
        await self.receive_json(content)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        try:
            message = agentproto.parse_node_message(content)
        except agentproto.ProtocolError as exc:
            self.drop(f"a message ({exc})")
            return
        if isinstance(message, agentproto.Hello):
            await self.on_hello(message)
        elif self.node is None:
            self.drop(f"{message.type} before hello")
        elif isinstance(message, agentproto.StatsReport):
            ingest.offer(self, content)
        elif isinstance(message, agentproto.RecentRequests):
            await self.on_recent_requests(message)
        else:
            await self.on_config_report(message)

    async def on_hello(self, hello: agentproto.Hello) -> None:
        if self.node is not None and hello.node != self.node:
            self.drop(f"hello naming another node ({hello.node!r})")
            return
        again = self.node is not None
        if not again and not await self.acquire_lease(hello.node):
            log.warning("agent link from %s refused: two proxy nodes call themselves %r (another link "
                        "holds the name): give each a name of its own (runproxy --name)",
                        self.peer, hello.node)
            await self.close(code=CLOSE_NAME_TAKEN, reason="another link holds this node name")
            return
        taken = await database_sync_to_async(save_hello)(hello, self.channel_name, not again)
        if taken is None:
            await self.release_lease(hello.node)
            log.error("agent link from %s refused: proxy node %r would be one more than the %d kept, "
                      "and none of them has been offline long enough to be forgotten",
                      self.peer, hello.node, ProxyNode.MAX_NODES)
            await self.close(code=CLOSE_POLICY_VIOLATION, reason="too many proxy nodes online")
            return
        self.node = hello.node
        if not again:
            ingest.adopt(self, ledger.NodeLedger(hello.node, taken.pk, taken.epoch, taken.baseline,
                                                 seen=time.time()))
            self.previous, self.count_from_start = None, taken.baseline is None
        else:
            ingest.nodes_changed()
        self.told = max(self.told, hello.revision)
        log.info("proxy node %s connected from %s: version %s, pid %d, revision %d",
                 hello.node, self.peer, hello.version, hello.pid, hello.revision)
        await self.tell(taken.revision)  # it may have missed a push while the link was down

    async def acquire_lease(self, node: str) -> bool:
        """The node's name for this link; taken when Redis cannot say (counting is fenced without it)."""
        try:
            return await liveness.current().acquire(node, self.owner)
        except Exception:
            log.warning("could not check that proxy node %s has one link only; taking it", node,
                        exc_info=True)
            return True

    async def release_lease(self, node: str) -> None:
        try:
            await liveness.current().release(node, self.owner)
        except Exception:  # it runs out by itself
            log.warning("could not give back the name of proxy node %s", node, exc_info=True)

    async def lost_node(self) -> None:
        """Another link took this node (this one stopped reporting long enough to lose its lease)."""
        log.warning("agent link of proxy node %s (%s) closed: another link took the node",
                    self.node, self.peer)
        await self.close(code=CLOSE_NAME_TAKEN, reason="another link took this node")

    async def on_recent_requests(self, message: agentproto.RecentRequests) -> None:
        """Lines of watched hosts: to the dashboards, which keep those of the host they show."""
        if message.node != self.node:
            self.drop(f"requests naming another node ({message.node!r})")
            return
        await self.channel_layer.group_send(DASHBOARD_GROUP, announce.recent_lines_message(message))

    async def on_config_report(self, report: agentproto.ConfigApplied | agentproto.ConfigRejected) -> None:
        assert self.node is not None
        if isinstance(report, agentproto.ConfigRejected):
            log.warning("proxy node %s rejected config revision %d: %s",
                        self.node, report.revision, report.error)
        self.told = max(self.told, report.revision)
        await database_sync_to_async(save_config_report)(self.node, report)
        ingest.nodes_changed()

    def drop(self, what: str) -> None:
        """Drop a message the node should not have sent, and keep the link (agentproto says why)."""
        self.malformed += 1
        if self.malformed <= MALFORMED_LOG_FIRST or self.malformed % MALFORMED_LOG_EVERY == 0:
            log.error("agent link %s (%s): dropped %s [%d so far]",
                      self.node or "before hello", self.peer, what, self.malformed)

    # control plane -> node

    async def config_changed(self, event: dict[str, Any]) -> None:
        """A new revision, from the announcement on commit or from this process's revision watcher."""
        await self.tell(event["revision"])

    async def requests_watch(self, event: dict[str, Any]) -> None:
        """A dashboard shows a host's recent requests: the node sends that host's lines."""
        await self.send_json(event)

    async def tell(self, revision: int) -> None:
        if revision > self.told:
            self.told = revision
            await self.send_json(announce.config_changed(revision))


class DashboardConsumer(GroupMember):
    """A staff member's live dashboard; must be wrapped in origin and session middleware."""

    group = DASHBOARD_GROUP

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated or not user.is_active or not user.is_staff:
            await self.close(code=CLOSE_FORBIDDEN)
            return
        await self.join_group()
        await self.accept()
        state = await database_sync_to_async(announce.dashboard_state)()
        # Built here, on the event loop that records ticks, after joining the group: the
        # ticks relayed from now on are the ones the snapshot does not hold yet.
        state["live"] = live_history.snapshot(time.time())
        await self.send_json(state)

    recent_host: str | None = None
    recent_asked = 0.0

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        """The browser may say which host's recent requests it shows; anything else is dropped."""
        host = announce.parse_recent_watch(text_data)
        if host is None:
            return
        started = host != self.recent_host
        self.recent_host = host or None
        now = time.monotonic()
        # The page renews its watch every 10 s; more often than this is not passed on to the nodes.
        if not host or (not started and now - self.recent_asked < announce.RECENT_WATCH_MIN_INTERVAL):
            return
        self.recent_asked = now
        watch = agentproto.RequestsWatch(host, announce.RECENT_WATCH_SECONDS, resend=started)
        await self.channel_layer.group_send(AGENTS_GROUP, watch.to_message())

    async def recent_lines(self, event: dict[str, Any]) -> None:
        """Nodes' recent lines: those of the host this page shows, as text (the page never parses HTML)."""
        lines = event["hosts"].get(self.recent_host) if self.recent_host else None
        if lines:
            await self.send_json({"type": "recent", "node": event["node"], "host": self.recent_host,
                                  "lines": lines})

    # relayed group messages: they are already in the dashboard's format

    lagging = False
    lagged_ticks = 0
    lag_told = 0.0

    async def tick(self, event: dict[str, Any]) -> None:
        """A process's tick: relayed if fresh; a stale one is dropped and the page told it lags.

        While it lags, and when it has caught up, the page gets this process's memory of
        the window (``livehistory``) instead, every ``LAG_RESYNC_SECONDS``: it fills in what
        the dropped ticks held, at their own times, under the "lagging" banner.
        """
        await self.rejoin_group_if_due()
        now = time.time()
        # A tick of another process: this process keeps it too (counted once).
        live_history.add_tick(event, now)
        behind = now - float(event.get("time", now))
        if behind > LAG_SECONDS:
            self.lagged_ticks += 1
            if not self.lagging:
                log.warning("a dashboard (%s) lags %.1f s behind the live ticks", self.peer_name(), behind)
            if not self.lagging or now - self.lag_told >= LAG_RESYNC_SECONDS:
                self.lagging, self.lag_told = True, now
                await self.send_json({"type": "lagging", "lagging": True, "behind": round(behind, 1),
                                      "dropped": self.lagged_ticks, "live": live_history.snapshot(now)})
            return
        if self.lagging:
            self.lagging = False
            await self.send_json({"type": "lagging", "lagging": False, "dropped": self.lagged_ticks,
                                  "live": live_history.snapshot(now)})
            self.lagged_ticks = 0
        await self.send_json(event)

    def peer_name(self) -> str:
        user = self.scope.get("user")
        return str(getattr(user, "username", "?"))

    async def nodes(self, event: dict[str, Any]) -> None:
        await self.send_json(event)
