"""The agent links' reports, taken in memory: one process-wide loop of small tasks, no database per report.

Each daphne process has one ``Ingest`` (``ingest``), bound to its event loop. Agent
consumers hand it their node's ``stats`` frames as they arrive (``offer``); it keeps
at most one unprocessed frame per link -- a newer report replaces an older one, and
since totals are cumulative the next difference covers the dropped one exactly
(``shed`` counts them) -- and works through the links in arrival order (``_work``).
Per report, on the event loop: validation, the node's ledger (``proxyadmin.ledger``)
and the tick's sums (``proxyadmin.coalesce``). Four tasks do the rest, each on its
own so that one waiting never holds up another:

- ``_tick``: once a second, the coalesced tick to every dashboard (channel layer);
- ``_flush``: every ``ROLLUP_FLUSH_SECONDS``, every ledger in one transaction
  (``traffic.flush_ledgers``, on the database thread);
- ``_renew``: once a second, the leases and last-seen times of the nodes that
  reported (``proxyadmin.liveness``, one round trip);
- ``_announce``: the ``nodes`` list, when something changed, at most once a second.

Memory per process: per linked node one unprocessed frame (at most
``AGENT_MAX_REPORT_KB``), its previous validated report (for the tick's
differences: about 6x its JSON size in Python objects) and its ledger (a few copies
of 9 integers per host); plus one tick's sums (per host) and the 15-minute history
(``proxyadmin.livehistory``, bounded on its own).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
from typing import Any, Protocol

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings

from proxyadmin import announce, ledger, liveness, traffic
from proxyadmin.coalesce import TickCoalescer
from proxyadmin.livehistory import history as live_history
from proxycore import agentproto

log = logging.getLogger("proxyadmin.agentlink")

TICK_SECONDS = 1.0
NODES_MIN_INTERVAL = 1.0
WORK_SLICE = 16  # reports processed before the loop serves others
FUTURE_SLACK = 60.0  # a report further ahead of this process's clock is booked now
FAILURE_LOG_EVERY = 100


class Link(Protocol):
    """What ``Ingest`` needs of an agent consumer."""

    node: str | None
    owner: str  # this link's lease owner id
    pending: str | dict[str, Any] | None  # the unprocessed stats frame
    node_ledger: ledger.NodeLedger | None
    previous: traffic.StatsSample | None  # the previous report, for the tick's differences
    count_from_start: bool  # no baseline: the first report's totals are all new
    shed: int

    def drop(self, what: str) -> None: ...
    async def lost_node(self) -> None: ...


class Ingest:
    """This process's reports, ledgers, ticks and leases (one event loop: no locking)."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reset()

    def _reset(self) -> None:
        self.links: set[Link] = set()
        self.queue: collections.deque[Link] = collections.deque()
        self.ledgers: dict[int, ledger.NodeLedger] = {}  # id(ledger) -> ledger, closed ones until flushed
        self.coalescer = TickCoalescer()
        self.reported: dict[str, str] = {}  # node -> owner, since the last renewal
        self.seen: dict[str, float] = {}
        self.shed = 0
        self.processed = 0
        self.flushes = 0
        self.flush_failures = 0
        self.nodes_dirty = False
        self.known_nodes: set[str] = set()
        self._wake_work = asyncio.Event()
        self._wake_flush = asyncio.Event()
        self._wake_nodes = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Runs with the first link of an event loop (tests run one loop per scenario)."""
        loop = asyncio.get_running_loop()
        if self._loop is loop and self._tasks:
            return
        if self._loop is not loop:
            self._reset()
            self._loop = loop
        self._tasks = [loop.create_task(job(), name=f"ingest {job.__name__}")
                       for job in (self._work, self._tick, self._flush, self._renew, self._announce)]

    def add(self, link: Link) -> None:
        self.start()
        self.links.add(link)

    def remove(self, link: Link) -> None:
        """A link closed: its ledger stays until flushed; its node stops counting in ticks."""
        self.links.discard(link)
        if link.node_ledger is not None:
            link.node_ledger.closed = True
            self.coalescer.forget(link.node_ledger.name)
            self._wake_flush.set()  # its counts reach the database now, not in T seconds

    def adopt(self, link: Link, node_ledger: ledger.NodeLedger) -> None:
        """A hello took the node: this link's ledger from now on."""
        if link.node_ledger is not None:
            link.node_ledger.closed = True
        link.node_ledger = node_ledger
        self.ledgers[id(node_ledger)] = node_ledger
        self.nodes_changed()

    def nodes_changed(self) -> None:
        self.nodes_dirty = True
        self._wake_nodes.set()

    # -- reports -----------------------------------------------------------------

    def offer(self, link: Link, frame: str | dict[str, Any]) -> None:
        """A stats frame of a link past its hello: processed soon, or replaced by the node's next one."""
        if link.pending is not None:
            link.shed += 1
            self.shed += 1
            self.coalescer.shed += 1
        else:
            self.queue.append(link)
        link.pending = frame
        self._wake_work.set()

    async def _work(self) -> None:
        while True:
            await self._wake_work.wait()
            self._wake_work.clear()
            done = 0
            while self.queue:
                link = self.queue.popleft()
                frame, link.pending = link.pending, None
                if frame is not None and link in self.links:
                    try:
                        self.take(link, frame)
                    except Exception:  # a bug must not stop every node's reports
                        log.exception("could not take a stats report of proxy node %s", link.node)
                done += 1
                if done % WORK_SLICE == 0:
                    await asyncio.sleep(0)

    def take(self, link: Link, frame: str | dict[str, Any]) -> None:
        """One stats frame: checked, into the node's ledger and the coming tick."""
        try:
            content = json.loads(frame) if isinstance(frame, str) else frame
            report = agentproto.parse_node_message(content)
        except (ValueError, RecursionError) as exc:  # ProtocolError is a ValueError
            bad = isinstance(exc, agentproto.ProtocolError)
            link.drop(f"a message ({exc})" if bad else "a frame that is not JSON")
            return
        if not isinstance(report, agentproto.StatsReport):
            link.drop("a frame that looked like stats")
            return
        if report.node != link.node or link.node_ledger is None:
            link.drop(f"stats naming another node ({report.node!r})")
            return
        now = time.time()
        self.processed += 1
        node_ledger = link.node_ledger
        # Booked by the report's own clock, unless it runs ahead of ours.
        booked = report.time if report.time <= now + FUTURE_SLACK else now
        counts = ledger.Counts.of_totals(report.time, report.totals)
        node_ledger.add(counts, ledger.minute_of(booked), now)
        workers = report.totals.get("workers") or {}
        node_ledger.workers = (workers.get("count", 1), workers.get("restarts", 0))
        node_ledger.totals = report.totals
        current = traffic.StatsSample(report.time, report.totals, counts)
        previous = link.previous
        delta: traffic.StatsDelta | None = None
        if previous is not None or link.count_from_start:
            delta = traffic.stats_delta(previous, current)
        elif node_ledger.flushed is not None and node_ledger.flushed.started_at != current.started_at:
            delta = traffic.stats_delta(None, current)  # restarted while away: all of it is new
        link.previous, link.count_from_start = current, False
        self.coalescer.add(report.node, report.time, report.totals, delta, now)
        self.reported[report.node] = link.owner
        self.seen[report.node] = now

    # -- the four tasks ----------------------------------------------------------

    async def _tick(self) -> None:
        layer = get_channel_layer()
        while True:
            now = time.time()
            await asyncio.sleep(TICK_SECONDS - now % TICK_SECONDS)  # on the second: ticks of processes align
            try:
                tick = self.coalescer.take(time.time())
                if tick is None or layer is None:
                    continue
                live_history.add_tick(tick, tick["time"])
                await layer.group_send(announce.DASHBOARD_GROUP, tick)
            except Exception:
                log.warning("could not send the dashboards their tick", exc_info=True)

    async def _flush(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake_flush.wait(), float(settings.ROLLUP_FLUSH_SECONDS))
            self._wake_flush.clear()
            try:
                await self.flush()
            except Exception:  # flush() keeps what it could not write; this is a bug
                log.exception("the traffic rollup flush failed")

    async def flush(self) -> traffic.FlushResult | None:
        """Every ledger with new counts, in one transaction; None when there was nothing to write."""
        taken: list[ledger.NodeLedger] = []
        items = []
        for node_ledger in list(self.ledgers.values()):
            segments = node_ledger.take()
            if segments is None:
                if node_ledger.closed and node_ledger.idle:
                    del self.ledgers[id(node_ledger)]
                continue
            taken.append(node_ledger)
            items.append(ledger.FlushItem(node_ledger.pk, node_ledger.epoch, node_ledger.flushed, segments,
                                          node_ledger.seen, node_ledger.workers,
                                          ledger.shown_state(node_ledger.totals)))
        if not items:
            return None
        try:
            result = await database_sync_to_async(traffic.flush_ledgers)(items)
        except Exception:
            self.flush_failures += 1
            for node_ledger in taken:
                node_ledger.not_written()
            if self.flush_failures <= 3 or self.flush_failures % FAILURE_LOG_EVERY == 0:
                log.warning("could not write the traffic rollup; kept for the next flush [%d so far]",
                            self.flush_failures, exc_info=True)
            return None
        self.flushes += 1
        self.flush_failures = 0
        lost = []
        for node_ledger in taken:
            if node_ledger.pk in result.fenced:
                node_ledger.in_flight = None  # another link holds the node: it covers these counts
                node_ledger.closed = True
                lost.append(node_ledger)
            else:
                node_ledger.written()
            if node_ledger.closed and node_ledger.idle:
                self.ledgers.pop(id(node_ledger), None)
        for node_ledger in lost:
            await self._lost(node_ledger)
        return result

    async def _lost(self, node_ledger: ledger.NodeLedger) -> None:
        for link in list(self.links):
            if link.node_ledger is node_ledger:
                await link.lost_node()

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            reported, seen = self.reported, self.seen
            self.reported, self.seen = {}, {}
            try:
                await liveness.current().renew(reported, seen)
            except Exception:
                log.warning("could not renew the proxy nodes' leases", exc_info=True)

    async def _announce(self) -> None:
        layer = get_channel_layer()
        while True:
            await self._wake_nodes.wait()
            self._wake_nodes.clear()
            if self.nodes_dirty and layer is not None:
                self.nodes_dirty = False
                try:
                    message = await nodes_message(self.known_nodes)
                    self.known_nodes = {entry["name"] for entry in message["nodes"]}
                    await layer.group_send(announce.DASHBOARD_GROUP, message)
                except Exception:
                    log.warning("could not send the dashboards the node list", exc_info=True)
            await asyncio.sleep(NODES_MIN_INTERVAL)


async def nodes_message(names: set[str]) -> dict[str, Any]:
    """The ``nodes`` message, with the last-seen times of ``names`` from the leases (fresher than rows)."""
    try:
        seen = await liveness.current().seen(names | set(ingest.coalescer.nodes))
    except Exception:
        log.warning("could not read when the proxy nodes were last seen", exc_info=True)
        seen = {}
    return await database_sync_to_async(announce.nodes_message)(seen)


ingest = Ingest()
