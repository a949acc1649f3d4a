"""A proxy node's worker process: serves the listening sockets it was handed, nothing else.

Started by the node's supervisor (``proxycore.workers``) as ``python -m proxycore.worker
FD``, where FD is its end of a private socket pair (``proxycore.workerproto``). It gets
everything from there: the snapshot, its own SO_REUSEPORT socket of each listener (by
inherited file descriptor), the limits and the node's session-ticket secret. It holds no
database connection and no agent link and runs no active health checks: the supervisor
does those once for the node and sends the verdicts.

It stops gracefully on ``Stop``, on SIGTERM, and when the supervisor's end of the socket
pair closes (the supervisor died); it also asks the kernel for SIGTERM when the
supervisor dies (PR_SET_PDEATHSIG), in case the socket pair is somehow held open. It
ignores SIGINT and SIGHUP: a terminal's Ctrl-C or hang-up reaches the whole process
group, and the stop or reload is the supervisor's to run (a worker stopping on its own
would look like one that died).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import time
from typing import BinaryIO

from proxycore import workerproto as wp
from proxycore.accesslog import AccessLogWriter, tee
from proxycore.agent import RecentLines
from proxycore.server import ProxyNode
from proxycore.tlssessions import TicketKeys
from proxycore.upstream import TargetPool

log = logging.getLogger("proxycore.worker")
REPORT_INTERVAL = 1.0
PR_SET_PDEATHSIG = 1


class Worker:
    def __init__(self, channel: socket.socket) -> None:
        self.channel = channel
        self.stopping = asyncio.Event()
        self.deadline: float | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.node: ProxyNode | None = None

    async def run(self) -> None:
        reader, self.writer = await asyncio.open_unix_connection(sock=self.channel)
        setup = await wp.receive(reader)
        if not isinstance(setup, wp.Setup):
            raise SystemExit("proxycore.worker: the supervisor sent no setup first")
        root = logging.getLogger()
        root.setLevel(setup.log_level)
        root.handlers[0].setFormatter(logging.Formatter(
            f"%(asctime)s %(levelname)s %(name)s [worker {setup.index}] %(message)s"))
        stream = open_access_log(setup.access_log)
        access = AccessLogWriter(stream) if stream is not None else None
        recent = RecentLines() if setup.recent else None
        sockets = {s.name: socket.socket(fileno=s.fd) for s in setup.listeners}
        node = ProxyNode(
            setup.snapshot,
            https_address=_address(sockets["https"]),
            http_address=_address(sockets["http"]) if "http" in sockets else None,
            limits=setup.limits, access_log=tee(access, recent),
            session_resumption=setup.session_resumption, ticket_keys=TicketKeys(setup.ticket_secret),
            listen_sockets=sockets, active_checks=False,
        )
        self.node = node
        node.follow_health(setup.health)
        node.health.on_cooldown = self.cooled_down
        await node.start()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        self.send(wp.Ready(os.getpid(), node.state.snapshot.revision))
        tasks = [loop.create_task(self.follow(reader, node, recent)),
                 loop.create_task(self.report(node, recent))]
        if access is not None:
            tasks.append(loop.create_task(access.flush_every_second()))
        await self.stopping.wait()
        for task in tasks:
            task.cancel()
        await node.stop(self.deadline)
        if access is not None:
            access.flush()
        with contextlib.suppress(ConnectionError):
            self.send(wp.Report(node.stats.as_dict(), {}))  # the last counts
            await self.writer.drain()

    def send(self, message: object) -> None:
        if self.writer is not None and not self.writer.is_closing():
            wp.send(self.writer, message)

    def cooled_down(self, pool: TargetPool, upstream: str, seconds: float, error: str) -> None:
        """This worker put ``pool`` in a passive cool-down: the supervisor tells the others."""
        if self.node is None:
            return
        for key, known in self.node.pools.pools.items():
            if known is pool:
                self.send(wp.Cooldown(key, upstream, seconds, error))
                return

    async def follow(self, reader: asyncio.StreamReader, node: ProxyNode, recent: RecentLines | None) -> None:
        """Act on the supervisor's messages until it says stop or goes away."""
        try:
            while True:
                message = await wp.receive(reader)
                if isinstance(message, wp.Load):
                    ok = node.reload(message.snapshot)
                    error = "" if ok else (node.stats.config_rejected or (0, "rejected"))[1]
                    self.send(wp.Loaded(message.snapshot.revision, error))
                elif isinstance(message, wp.Health):
                    node.follow_health(message.verdicts)
                elif isinstance(message, wp.Cooldown):
                    pool = node.pools.pools.get(message.pool)
                    if pool is not None:
                        node.health.follow_cooldown(pool, message.upstream, message.seconds, message.error)
                elif isinstance(message, wp.Watch):
                    if recent is not None:
                        recent.watch(message.request, time.monotonic())
                elif isinstance(message, wp.Stop):
                    self.deadline = message.deadline
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            log.warning("the supervisor went away: stopping")
        self.stopping.set()

    async def report(self, node: ProxyNode, recent: RecentLines | None) -> None:
        while True:
            lines = recent.take(time.monotonic()) if recent is not None else {}
            self.send(wp.Report(node.stats.as_dict(), lines))
            await asyncio.sleep(REPORT_INTERVAL)


def _address(sock: socket.socket) -> tuple[str, int]:
    host, port = sock.getsockname()[:2]
    return host, port


def open_access_log(target: str | None) -> BinaryIO | None:
    if target is None:
        return None
    if target == "-":
        return sys.stdout.buffer
    return open(target, "ab")  # the supervisor opened it once already: errors were reported there


def _die_with_supervisor() -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() == 1:  # the supervisor died before prctl: nobody would stop this worker
        raise SystemExit(0)


def main(argv: list[str]) -> None:
    if len(argv) != 2 or not argv[1].isdigit():
        raise SystemExit("usage: python -m proxycore.worker FD (started by runproxy --workers)")
    _die_with_supervisor()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the supervisor's: it reloads every worker
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    channel = socket.socket(fileno=int(argv[1]))
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(Worker(channel).run())
    else:
        uvloop.run(Worker(channel).run())


if __name__ == "__main__":
    main(sys.argv)
