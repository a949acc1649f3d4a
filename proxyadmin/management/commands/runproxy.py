"""``manage.py runproxy``: run a proxy node on the configuration in the database.

Builds the snapshot, starts ``proxycore``, reloads when the config revision
moves or on SIGHUP, and stops gracefully on SIGTERM or SIGINT. The agent link's
``config.changed`` says when to look; while the link is down the revision is polled
every second (every 5 s while it is up, as a safety net). One access-log line per
request goes to stdout or ``--access-log FILE``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass
from typing import Any, BinaryIO

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import close_old_connections

from proxyadmin.models import ConfigRevision
from proxyadmin.snapshot import SnapshotError, build_snapshot
from proxycore import compiled
from proxycore.accesslog import AccessLogWriter, tee
from proxycore.agent import AgentLink, RecentLines
from proxycore.agentproto import ConfigApplied, ConfigRejected, Listener
from proxycore.config import Snapshot
from proxycore.limits import Limits
from proxycore.metrics import start_metrics_server
from proxycore.server import ProxyNode
from proxycore.tls import TLSConfigError
from proxycore.workers import MAX_WORKERS, NodeSupervisor, default_workers

log = logging.getLogger("proxyadmin.runproxy")
POLL_INTERVAL = 1.0
LINKED_POLL_EVERY = 5  # with the agent link up, poll the database every 5th interval only
VERSION = "0.1.0"
LINK_STOP_TIMEOUT = 3.0  # the link's goodbye takes up to 2 s


@dataclass
class RunningLink:
    link: AgentLink
    task: asyncio.Task[None]


class Wakeup:
    """Why ``follow_revisions`` should look at the config before its next poll.

    ``check()``: a push said a revision was made; reload if the revision moved (a
    revision already served or rejected is not built again, so repeated pushes are
    harmless). ``force()``: SIGHUP; rebuild the snapshot whatever the revision.
    """

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.forced = False

    def check(self) -> None:
        self.event.set()

    def force(self) -> None:
        self.forced = True
        self.event.set()

    async def wait(self, timeout: float) -> tuple[bool, bool]:
        """(woken, forced) after at most ``timeout`` seconds."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.event.wait(), timeout)
        woken, forced = self.event.is_set(), self.forced
        self.event.clear()
        self.forced = False
        return woken, forced


def agent_url(control: str) -> str:
    """ws:// or wss:// URL of the control plane from an http(s):// or ws(s):// one."""
    for plain, secure in (("http://", "ws://"), ("https://", "wss://")):
        if control.startswith(plain):
            return secure + control[len(plain):]
    if control.startswith(("ws://", "wss://")):
        return control
    raise CommandError(f"--control must be an http:// or https:// URL, not {control!r}.")


def parse_address(value: str, option: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise CommandError(f"{option} must look like 127.0.0.1:8443, not {value!r}.")
    return host.strip("[]"), int(port)


def _snapshot_in_thread() -> Snapshot:
    close_old_connections()
    try:
        return build_snapshot()
    finally:
        close_old_connections()


def _revision_in_thread() -> int:
    close_old_connections()
    return ConfigRevision.current()


async def stop_agent_link(running: RunningLink, timeout: float = LINK_STOP_TIMEOUT) -> None:
    """Cancel the agent link and wait until it has said goodbye (1001, up to 2 s) and ended.

    A cancel that lands while the link's session is ending on its own (the control plane
    went away at the same moment, as when one Ctrl-C stops both) is swallowed where the
    session waits for its stats sender under ``suppress(CancelledError)``; the link then
    reconnects forever. A plain ``await`` held the stop until the supervisor killed the
    node, so a link that is no longer connected, hence closing nothing, is cancelled again;
    after ``timeout`` the stop goes on without it.
    """
    task = running.task
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    task.cancel()
    while not task.done() and loop.time() < end:
        await asyncio.wait({task}, timeout=0.05)
        if not task.done() and not running.link.connected:
            task.cancel()
    if not task.done():
        log.warning("the agent link did not stop in %.0f s; stopping without it", timeout)
    elif not task.cancelled() and task.exception() is not None:
        log.warning("the agent link ended with an error: %s", task.exception())


def worker_count(option: int | None) -> int:
    """--workers, else PROXYADMIN_WORKERS, else the CPUs this process may use."""
    if option is None:
        raw = os.environ.get("PROXYADMIN_WORKERS", "").strip()
        if not raw:
            return default_workers()
        if not raw.isdigit():
            raise CommandError(f"PROXYADMIN_WORKERS must be a whole number, not {raw!r}.")
        option = int(raw)
    if not 1 <= option <= MAX_WORKERS:
        raise CommandError(f"--workers must be between 1 and {MAX_WORKERS}, not {option}.")
    return option


class Command(BaseCommand):
    help = "Run a proxy node: terminate TLS for the configured hosts and forward to upstreams."
    session_resumption = True  # --no-session-resumption turns it off

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--https", default="127.0.0.1:8443", help="HTTPS listener (127.0.0.1:8443)")
        parser.add_argument("--http", default="127.0.0.1:8080",
                            help="HTTP listener for redirects and ACME (127.0.0.1:8080); 'off' for none")
        parser.add_argument("--access-log", default="-", help="file for the access log; '-' is stdout")
        parser.add_argument("--no-access-log", action="store_true", help="log no requests")
        defaults = Limits()
        parser.add_argument("--max-connections", type=int, default=defaults.max_connections)
        parser.add_argument(
            "--workers", type=int, default=None,
            help="worker processes serving the listeners (default: the CPUs this process may use, "
                 "or PROXYADMIN_WORKERS); 1: one process that serves itself")
        parser.add_argument("--no-session-resumption", action="store_true",
                            help="resume no TLS session: every handshake is a full one")
        parser.add_argument("--stop-deadline", type=float, default=defaults.stop_deadline,
                            help="seconds in-flight requests get on SIGTERM (30)")
        parser.add_argument("--metrics", default=None, metavar="HOST:PORT",
                            help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off)")
        parser.add_argument(
            "--control", default=os.environ.get("PROXYADMIN_CONTROL_URL", "http://127.0.0.1:8000"),
            help="control plane to report to over the agent link (http://127.0.0.1:8000)")
        parser.add_argument("--no-control", action="store_true",
                            help="no agent link: poll the database for config changes only")
        parser.add_argument("--name", default="",
                            help="node name on the dashboard (default: host name and HTTPS port)")

    def handle(self, *args: Any, **options: Any) -> None:
        https = parse_address(options["https"], "--https")
        http = None if options["http"] == "off" else parse_address(options["http"], "--http")
        metrics = (None if options["metrics"] in (None, "off")
                   else parse_address(options["metrics"], "--metrics"))
        if options["max_connections"] < 1:
            raise CommandError("--max-connections must be at least 1.")
        self.workers = worker_count(options["workers"])
        try:
            snapshot = build_snapshot()
        except SnapshotError as exc:
            raise CommandError(f"The configuration cannot be served: {exc}") from None
        close_old_connections()
        limits = Limits(max_connections=options["max_connections"],
                        stop_deadline=options["stop_deadline"])
        access = self.open_access_log(options)
        self.control = None if options["no_control"] else agent_url(options["control"])
        self.node_name = options["name"] or f"{socket.gethostname()}:{https[1]}"
        self.session_resumption = not options["no_session_resumption"]
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
            runner = asyncio.run
        else:
            runner = uvloop.run
        try:
            runner(self.serve(snapshot, https, http, limits, access, metrics=metrics))
        finally:
            if access is not None and access is not sys.stdout.buffer:
                access.close()

    def open_access_log(self, options: dict[str, Any]) -> BinaryIO | None:
        """The access log a single-process node writes; a node of workers checks here that the
        file opens, and each worker opens it for appending (lines never split: see AccessLogWriter)."""
        self.access_target = None if options["no_access_log"] else options["access_log"]
        if options["no_access_log"]:
            return None
        if options["access_log"] == "-":
            return sys.stdout.buffer
        try:
            # Block-buffered: flushed every second and at stop, not one write(2) per request.
            return open(options["access_log"], "ab")
        except OSError as exc:
            raise CommandError(f"--access-log: cannot open {options['access_log']}: {exc}") from None

    async def serve(
        self, snapshot: Snapshot, https: tuple[str, int], http: tuple[str, int] | None,
        limits: Limits, access: BinaryIO | None, *, metrics: tuple[str, int] | None = None,
    ) -> None:
        # Signals are handled from the start: a SIGHUP or SIGTERM while the node starts must
        # not kill it with its workers half started (SIGTERM then stops it once it serves).
        stop = asyncio.Event()
        wake = Wakeup()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, wake.force)
        writer = AccessLogWriter(access) if access is not None else None
        # A linked node keeps its last lines per host for the dashboard's recent requests,
        # with --no-access-log too.
        linked = self.control is not None and bool(getattr(settings, "AGENT_TOKEN", ""))
        self.recent = RecentLines() if linked else None
        node: ProxyNode | NodeSupervisor
        try:
            if self.workers > 1:
                writer = None  # each worker writes its own lines
                self.recent = None
                node = NodeSupervisor(snapshot, workers=self.workers, https_address=https, http_address=http,
                                      limits=limits, access_log=self.access_target,
                                      session_resumption=self.session_resumption, recent=linked)
                await node.start()
                self.recent = node.recent
            else:
                node = ProxyNode(snapshot, https_address=https, http_address=http, limits=limits,
                                 access_log=tee(writer, self.recent),
                                 session_resumption=self.session_resumption)
                await node.start()
        except TLSConfigError as exc:
            raise CommandError(f"The configuration cannot be served: {exc}") from None
        except OSError as exc:
            raise CommandError(f"Cannot listen: {exc}") from None
        except RuntimeError as exc:
            raise CommandError(str(exc)) from None
        ports = ", ".join(f"{lst.name}://{lst.host}:{lst.port}" for lst in node.listeners)
        processes = (f" with {self.workers} worker processes ({', '.join(map(str, node.worker_pids()))})"
                     if isinstance(node, NodeSupervisor) else "")
        self.stdout.write(f"Proxy node serving revision {snapshot.revision} on {ports}{processes}")
        log.info("data plane core: %s", compiled.state())
        metrics_server = await self.start_metrics(node, metrics) if metrics is not None else None
        self.stdout.flush()
        link = self.start_agent_link(node, wake)
        poller = loop.create_task(self.follow_revisions(node, wake, link))
        flusher = loop.create_task(writer.flush_every_second()) if writer is not None else None
        await stop.wait()
        if isinstance(node, NodeSupervisor):
            node.stop_restarting()
        poller.cancel()
        if link is not None:
            await stop_agent_link(link)
        log.info("stopping: finishing in-flight requests (up to %.0f s)", limits.stop_deadline)
        await node.stop()
        if flusher is not None and writer is not None:
            flusher.cancel()
            writer.flush()
        if metrics_server is not None:
            metrics_server.close()

    async def start_metrics(
        self, node: ProxyNode | NodeSupervisor, address: tuple[str, int],
    ) -> asyncio.Server:
        """Serve /metrics on the node's loop; a taken port stops the node and fails the command."""
        host, port = address
        stats = node.view if isinstance(node, NodeSupervisor) else node.stats
        try:
            server = await start_metrics_server(stats, host, port)
        except OSError as exc:
            await node.stop(0)
            raise CommandError(f"Cannot listen on --metrics {host}:{port}: {exc}") from None
        bound_port = server.sockets[0].getsockname()[1]
        url_host = f"[{host}]" if ":" in host else host
        self.stdout.write(f"Prometheus metrics at http://{url_host}:{bound_port}/metrics")
        return server

    def start_agent_link(self, node: ProxyNode | NodeSupervisor, wake: Wakeup) -> RunningLink | None:
        token = getattr(settings, "AGENT_TOKEN", "")
        if self.control is None or not token:
            return None
        listeners = [Listener(lst.name, f"{lst.host}:{lst.port}") for lst in node.listeners]
        link = AgentLink(
            self.control, token, node=self.node_name, version=VERSION,
            stats=node if isinstance(node, NodeSupervisor) else node.stats,
            listeners=listeners, revision=lambda: node.revision,
            on_config_changed=lambda revision: wake.check(), recent=self.recent,
        )
        return RunningLink(link, asyncio.get_running_loop().create_task(link.run()))

    async def follow_revisions(
        self, node: ProxyNode | NodeSupervisor, wake: Wakeup, link: RunningLink | None,
    ) -> None:
        """Reload on a push, on SIGHUP, or on a poll: every second while the agent link is down."""
        applied = node.revision
        rejected = 0
        links_seen = 0
        polls = 0
        while True:
            woken, forced = await wake.wait(POLL_INTERVAL)
            polls += 1
            if not woken and link is not None and link.link.connected:
                # The control plane pushes every revision (its revision watcher sees those
                # made by other processes too); the slow poll is a safety net.
                if link.link.connections == links_seen and polls % LINKED_POLL_EVERY:
                    continue
                links_seen = link.link.connections
            try:
                current = await asyncio.to_thread(_revision_in_thread)
                if not forced and current in (applied, rejected):
                    continue
                snapshot = await asyncio.to_thread(_snapshot_in_thread)
            except SnapshotError as exc:
                log.error("config revision rejected, still serving %d: %s", applied, exc)
                node.stats.config_failed(current, str(exc))
                rejected = current
                self.report(link, ConfigRejected(current, str(exc)))
                continue
            except Exception:
                log.exception("cannot read the configuration; still serving revision %d", applied)
                continue
            if await node.reload(snapshot) if isinstance(node, NodeSupervisor) else node.reload(snapshot):
                applied = snapshot.revision
                self.report(link, ConfigApplied(applied))
            else:
                rejected = snapshot.revision
                error = node.stats.config_rejected[1] if node.stats.config_rejected else "rejected"
                self.report(link, ConfigRejected(rejected, error))

    @staticmethod
    def report(link: RunningLink | None, message: ConfigApplied | ConfigRejected) -> None:
        if link is not None:
            link.link.report(message)
