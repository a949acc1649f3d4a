"""A node of N worker processes: the supervisor that owns the node's identity.

``NodeSupervisor`` binds the listeners, starts N workers (``proxycore.worker``), and is
what the rest of the node talks to: the agent link, ``/metrics`` and the reload loop see
one node. It never serves traffic itself.

- **Listening sockets**: one SO_REUSEPORT socket per listener *per worker*, all bound by
  the supervisor (so port 0 works, and the bind error is the supervisor's to report).
  The kernel spreads new connections over the workers by a hash of the addresses, so
  every core gets its share even under light load (a single shared socket wakes
  whichever worker is ready first and one worker takes most of a light load). The
  supervisor keeps its copy of each socket: when a worker dies, the connections the
  kernel queued on its socket wait there for the replacement instead of being reset.
- **Snapshots** are built once (by the caller, from the database) and checked once here
  (a trial build of every TLS context); only a snapshot that builds is sent to the
  workers, and it counts as applied when every worker serves it.
- **Health checks** run once per node, here, on pools of the supervisor's own that carry
  no traffic; the verdicts go to every worker (at most 0.25 s later). A passive cool-down
  one worker starts is sent to the others.
- **Counters**: workers report their totals once a second; the node's totals are their
  sum (``proxycore.statsmerge``), with what dead workers had reported kept.
- **Faults**: a worker that dies is logged, counted and started again (at once if it
  had run a while, else after a back-off that doubles up to 30 s); the other workers
  and their connections are not touched.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from proxycore import statsmerge
from proxycore import workerproto as wp
from proxycore.agent import RecentLines
from proxycore.agentproto import RequestsWatch
from proxycore.config import Snapshot
from proxycore.limits import Limits
from proxycore.server import ProxyNode
from proxycore.stats import Stats
from proxycore.tlssessions import TicketKeys
from proxycore.upstream import PoolKey

log = logging.getLogger("proxycore.workers")

SUPERVISE_INTERVAL = 0.25
READY_TIMEOUT = 30.0  # a worker that is not serving by then is killed and started again
LOAD_TIMEOUT = 30.0
STOP_GRACE = 5.0  # after the stop deadline, before workers are killed
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0
STABLE_AFTER = 10.0  # a worker that ran this long and died is restarted at once
MAX_WORKERS = 1024


def default_workers() -> int:
    """The CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - Linux has it
        return max(1, os.cpu_count() or 1)


@dataclass
class ListenerAddress:
    name: str
    host: str
    port: int


@dataclass
class WorkerHandle:
    index: int
    sockets: list[wp.ListenerSocket]
    process: subprocess.Popen[bytes] | None = None
    writer: asyncio.StreamWriter | None = None
    reader_task: asyncio.Task[None] | None = None
    pid: int = 0
    ready: bool = False
    revision: int = 0  # the revision it serves
    load_error: tuple[int, str] | None = None
    report: dict[str, Any] | None = None
    started_at: float = 0.0
    next_start: float = 0.0
    backoff: float = BACKOFF_FIRST
    lines: dict[str, list[tuple[int, str]]] = field(default_factory=dict)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


class MergedRecent(RecentLines):
    """The workers' recent lines, as the agent link reads them from a single-process node."""

    def __init__(self, supervisor: NodeSupervisor) -> None:
        super().__init__()
        self.supervisor = supervisor
        self.pending: dict[str, list[tuple[int, str]]] = {}

    def watch(self, request: RequestsWatch, now: float) -> None:
        self.supervisor.broadcast(wp.Watch(request))

    def add(self, lines: dict[str, list[tuple[int, str]]]) -> None:
        for host, new in lines.items():
            kept = self.pending.setdefault(host, [])
            for _, line in new:
                self.seq += 1
                kept.append((self.seq, line))
            del kept[:-self.per_host]

    def take(self, now: float) -> dict[str, list[tuple[int, str]]]:
        taken, self.pending = self.pending, {}
        return taken


class NodeSupervisor:
    def __init__(
        self,
        snapshot: Snapshot,
        *,
        workers: int,
        https_address: tuple[str, int],
        http_address: tuple[str, int] | None,
        limits: Limits,
        access_log: str | None,
        session_resumption: bool = True,
        recent: bool = False,
    ) -> None:
        if not 1 <= workers <= MAX_WORKERS:
            raise ValueError(f"workers must be 1..{MAX_WORKERS}")
        self.limits = limits
        self.access_log = access_log
        self.session_resumption = session_resumption
        self.tickets = TicketKeys()
        # Runs the health checks and proves each snapshot builds; it listens on nothing.
        self.checker = ProxyNode(snapshot, https_address=https_address, http_address=http_address,
                                 limits=limits, session_resumption=session_resumption,
                                 ticket_keys=self.tickets)
        self.listeners = [ListenerAddress("https", *https_address)]
        if http_address is not None:
            self.listeners.append(ListenerAddress("http", *http_address))
        self.count = workers
        self.handles: list[WorkerHandle] = []
        self.own_sockets: list[socket.socket] = []
        self.restarts = 0
        self.retired: dict[str, Any] = {}  # what dead workers had counted
        self.retired_upstreams: dict[str, dict[str, Any]] = {}  # their upstream counters
        self.recent = MergedRecent(self) if recent else None
        self.view = Stats()  # the summed counters, for /metrics
        self.stopping = False
        self._supervisor: asyncio.Task[None] | None = None
        self._verdicts: dict[PoolKey, tuple[bool, str]] = {}
        self.applied_revision = snapshot.revision

    @property
    def revision(self) -> int:
        """The revision every worker serves."""
        return self.applied_revision

    @property
    def stats(self) -> Stats:
        return self.checker.stats

    # ---- start and stop -------------------------------------------------------------

    async def start(self) -> None:
        """Bind every listener, start the workers and wait until each serves (or raise)."""
        sockets = [self._bind(listener) for listener in self.listeners]
        self.handles = [
            WorkerHandle(i + 1, [wp.ListenerSocket(li.name, group[i].fileno())
                                 for li, group in zip(self.listeners, sockets, strict=True)])
            for i in range(self.count)
        ]
        await self.checker.start(listen=False)
        self._verdicts = self.checker.health_verdicts()
        for handle in self.handles:
            self._spawn(handle)
        try:
            await self._wait_until(lambda: all(h.ready for h in self.handles), READY_TIMEOUT)
        except TimeoutError:
            await self.stop(0)
            raise RuntimeError("the worker processes did not start; see their errors above") from None
        self.refresh_view()
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())

    def _bind(self, listener: ListenerAddress) -> list[socket.socket]:
        """``count`` sockets in one SO_REUSEPORT group on the listener's address."""
        family = socket.AF_INET6 if ":" in listener.host else socket.AF_INET
        # First without SO_REUSEPORT: a port another node (or anything else) listens on is
        # refused here, rather than joined and its traffic split with a stranger.
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((listener.host, listener.port))
            listener.port = probe.getsockname()[1]
        group: list[socket.socket] = []
        try:
            for _ in range(self.count):
                sock = socket.socket(family, socket.SOCK_STREAM)
                group.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind((listener.host, listener.port))
                listener.port = sock.getsockname()[1]  # port 0: the rest join the first's port
                sock.listen(1024)
                sock.set_inheritable(True)
        except OSError:
            for sock in group:
                sock.close()
            raise
        self.own_sockets += group
        return group

    def stop_restarting(self) -> None:
        """The node is stopping: a worker that exits now is not started again."""
        self.stopping = True

    async def stop(self, deadline: float | None = None) -> None:
        """Drain every worker: they finish in-flight requests within ``deadline`` seconds."""
        self.stopping = True
        limit = self.limits.stop_deadline if deadline is None else deadline
        if self._supervisor is not None:
            self._supervisor.cancel()
        for sock in self.own_sockets:
            sock.close()  # the workers' copies close as they stop: then new clients are refused
        self.broadcast(wp.Stop(limit))
        end = time.monotonic() + limit + STOP_GRACE
        while any(h.alive() for h in self.handles) and time.monotonic() < end:
            await asyncio.sleep(0.05)
        for handle in self.handles:
            if handle.alive():
                assert handle.process is not None
                log.warning("worker %d (pid %d) did not stop in time: killed", handle.index, handle.pid)
                handle.process.kill()
                handle.process.wait()
            if handle.reader_task is not None:
                handle.reader_task.cancel()
        await self.checker.stop(0)

    # ---- workers ------------------------------------------------------------------

    def _spawn(self, handle: WorkerHandle) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = [theirs.fileno(), *(s.fd for s in handle.sockets)]
        try:
            handle.process = subprocess.Popen(
                [sys.executable, "-m", "proxycore.worker", str(theirs.fileno())],
                pass_fds=fds, stdin=subprocess.DEVNULL)
        except OSError:
            mine.close()
            raise
        finally:
            theirs.close()
        handle.pid = handle.process.pid
        handle.ready = False
        handle.report = None
        handle.started_at = time.monotonic()
        handle.reader_task = asyncio.get_running_loop().create_task(self._talk(handle, mine))

    async def _talk(self, handle: WorkerHandle, channel: socket.socket) -> None:
        reader, writer = await asyncio.open_unix_connection(sock=channel)
        handle.writer = writer
        wp.send(writer, wp.Setup(
            index=handle.index, snapshot=self.checker.state.snapshot, listeners=tuple(handle.sockets),
            limits=self.limits, ticket_secret=self.tickets.secret,
            session_resumption=self.session_resumption, access_log=self.access_log,
            recent=self.recent is not None, health=self._verdicts,
            log_level=logging.getLogger().getEffectiveLevel(),
        ))
        try:
            while True:
                self._received(handle, await wp.receive(reader))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # it exited: _supervise sees the process end
        except Exception:  # a frame that makes no sense: the worker is broken, start it again
            log.exception("worker %d (pid %d) sent a bad message: killed", handle.index, handle.pid)
            if handle.alive() and handle.process is not None:
                handle.process.kill()
        finally:
            writer.close()

    def _received(self, handle: WorkerHandle, message: object) -> None:
        if isinstance(message, wp.Report):
            handle.report = message.totals
            if self.recent is not None and message.recent:
                self.recent.add(message.recent)
        elif isinstance(message, wp.Ready):
            handle.ready, handle.revision = True, message.revision
            log.info("worker %d (pid %d) serving revision %d", handle.index, message.pid, message.revision)
        elif isinstance(message, wp.Loaded):
            if message.error:
                handle.load_error = (message.revision, message.error)
            else:
                handle.revision = message.revision
        elif isinstance(message, wp.Cooldown):
            for other in self.handles:
                if other is not handle:
                    self._send(other, message)

    def _send(self, handle: WorkerHandle, message: object) -> None:
        if handle.writer is not None and not handle.writer.is_closing():
            wp.send(handle.writer, message)

    def broadcast(self, message: object) -> None:
        for handle in self.handles:
            self._send(handle, message)

    async def _supervise(self) -> None:
        """Restart dead workers; pass on health verdicts when they change."""
        ticks = 0
        while not self.stopping:
            await asyncio.sleep(SUPERVISE_INTERVAL)
            ticks += 1
            if ticks % 4 == 0:
                self.refresh_view()
            now = time.monotonic()
            for handle in self.handles:
                self._check(handle, now)
            verdicts = self.checker.health_verdicts()
            if verdicts != self._verdicts:
                self._verdicts = verdicts
                self.broadcast(wp.Health(verdicts))

    def _check(self, handle: WorkerHandle, now: float) -> None:
        process = handle.process
        if process is None:
            if now >= handle.next_start and not self.stopping:
                self._start_again(handle, now)
            return
        code = process.poll()
        if code is None:
            if not handle.ready and now - handle.started_at > READY_TIMEOUT:
                log.error("worker %d (pid %d) not serving after %.0f s: killed", handle.index,
                          handle.pid, READY_TIMEOUT)
                process.kill()
            return
        how = f"killed by {_signal_name(-code)}" if code < 0 else f"exit status {code}"
        log.error("worker %d (pid %d) died (%s): starting it again", handle.index, handle.pid, how)
        self.restarts += 1
        if handle.report is not None:
            self._retire(handle.report)
        lived = now - handle.started_at
        handle.backoff = BACKOFF_FIRST if lived > STABLE_AFTER else min(handle.backoff * 2, BACKOFF_MAX)
        handle.next_start = now if lived > STABLE_AFTER else now + handle.backoff
        handle.process = None
        handle.ready = False
        handle.report = None
        if handle.next_start <= now:
            self._start_again(handle, now)

    def _start_again(self, handle: WorkerHandle, now: float) -> None:
        try:
            self._spawn(handle)
        except OSError as exc:  # out of processes or files: try again after the back-off
            handle.backoff = min(handle.backoff * 2, BACKOFF_MAX)
            handle.next_start = now + handle.backoff
            log.error("worker %d cannot be started (%s); next try in %.0f s", handle.index, exc,
                      handle.backoff)

    def _retire(self, report: dict[str, Any]) -> None:
        """Keep a dead worker's counters in the node's totals (bounded: sums, not a list)."""
        statsmerge.add(self.retired, statsmerge.without_gauges(report))
        for name, state in report.get("upstreams", {}).items():
            mine = self.retired_upstreams.setdefault(name, {"targets": []})
            for counter in statsmerge.UPSTREAM_COUNTERS:
                mine[counter] = mine.get(counter, 0) + state.get(counter, 0)

    # ---- reload -------------------------------------------------------------------

    async def reload(self, snapshot: Snapshot) -> bool:
        """Serve ``snapshot`` on every worker; False (all keep the old one) if it cannot be built.

        It is built here first, so a snapshot that fails never reaches a worker. Should a
        worker still reject it (it builds the same contexts, so only a fault of its own
        would), every worker goes back to the revision before, as does this process.
        """
        previous = self.checker.state.snapshot
        if not self.checker.reload(snapshot):
            return False
        error = await self._load_everywhere(snapshot)
        if error is None:
            self.applied_revision = snapshot.revision
            return True
        log.error("config revision %d rejected by a worker, every worker back on %d: %s",
                  snapshot.revision, previous.revision, error)
        self.checker.reload(previous)
        await self._load_everywhere(previous)
        self.stats.config_failed(snapshot.revision, error)
        return False

    async def _load_everywhere(self, snapshot: Snapshot) -> str | None:
        """Send ``snapshot`` to every worker and wait for each: None, or the first error."""
        for handle in self.handles:
            handle.load_error = None
        self.broadcast(wp.Load(snapshot))
        revision = snapshot.revision

        def settled() -> bool:
            return all(h.revision == revision or h.load_error is not None or not h.alive()
                       for h in self.handles)

        try:
            await self._wait_until(settled, LOAD_TIMEOUT)
        except TimeoutError:
            return f"not every worker answered within {LOAD_TIMEOUT:.0f} s"
        failed = [h.load_error for h in self.handles if h.load_error is not None]
        return failed[0][1] if failed else None

    async def _wait_until(self, condition: Any, timeout: float) -> None:
        end = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > end:
                raise TimeoutError
            await asyncio.sleep(0.02)

    # ---- counters -----------------------------------------------------------------

    def as_dict(self) -> dict[str, Any]:
        """The node's totals: every worker's summed (what the agent link sends)."""
        reports = [h.report for h in self.handles if h.report is not None]
        merged: dict[str, Any] = {}
        statsmerge.add(merged, self.retired)
        for report in reports:
            statsmerge.add(merged, report)
        own = self.checker.stats.as_dict()
        for key in ("started_at", "config_rejected", "host_upstreams"):
            merged[key] = own[key]
        merged["config_revision"] = self.applied_revision
        merged.setdefault("hosts", {})
        merged.setdefault("listeners", {})
        merged["upstreams"] = statsmerge.merge_upstreams(
            own["upstreams"], [*reports, {"upstreams": self.retired_upstreams}])
        merged["workers"] = {"count": self.count, "restarts": self.restarts}
        return merged

    def refresh_view(self) -> Stats:
        """The summed counters as a ``Stats`` (for ``/metrics``)."""
        totals = self.as_dict()
        view = statsmerge.rebuild(totals, self.view)
        view.started_at = totals["started_at"]
        view.config_revision = self.applied_revision
        view.config_rejected = self.checker.stats.config_rejected
        view.workers = dict(totals["workers"])
        return view

    def worker_pids(self) -> list[int]:
        return [h.pid for h in self.handles if h.alive()]


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
