"""Where access-log lines go: kept in memory and written once a second.

One write per second instead of one per request: at tens of thousands of requests
a second, a write (and, line-buffered, a syscall) per line costs more than the rest
of the logging. The node formats each line (``ProxyNode.access``); the command that
runs the node calls ``flush_every_second`` and, when it stops, ``flush``.
"""

from __future__ import annotations

import asyncio
from typing import BinaryIO

# Past this many waiting lines, write at once rather than at the next tick.
MAX_PENDING_LINES = 10_000


class AccessLogWriter:
    """Pass an instance as ``ProxyNode(access_log=...)``: it is called with each line."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.pending: list[bytes] = []

    def __call__(self, line: bytes) -> None:
        self.pending.append(line)
        if len(self.pending) >= MAX_PENDING_LINES:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            lines, self.pending = self.pending, []
            lines.append(b"")
            self.stream.write(b"\n".join(lines))
        self.stream.flush()

    async def flush_every_second(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.flush()
