"""The access log: one line per request, formatted here, written once a second.

``AccessLog`` formats lines (format in the README) as bytes, with one formatting
operation per line: the request's own bytes are never decoded. It hands each line
to a sink, a callable; ``AccessLogWriter`` is the one the commands use: it keeps
lines in memory and writes them once a second, because at tens of thousands of
requests a second a write (and, line-buffered, a syscall) per line costs more than
the rest of the logging. The command that runs the node calls
``flush_every_second`` and, when it stops, ``flush``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, BinaryIO, Final

if TYPE_CHECKING:
    from proxycore.http1 import RequestHead

Sink = Callable[[bytes], None]  # called with each line (no newline)

def tee(first: Sink | None, second: Sink | None) -> Sink | None:
    """One sink that hands each line to both (the log file and the dashboard's recent lines)."""
    if first is None or second is None:
        return first or second

    def both(line: bytes) -> None:
        first(line)
        second(line)

    return both


# The small numbers of a line, formatted once (``bytes %`` formats each %d through a str,
# which cost more than the rest of a line): the milliseconds of the time, status codes,
# whole milliseconds of the elapsed time below a second, and its tenths.
_MILLIS: Final = tuple(b".%03dZ " % n for n in range(1000))
_STATUS: Final = tuple(b'" %d ' % n for n in range(600))
_ELAPSED_MS: Final = tuple(b" %d." % n for n in range(1000))
_TENTHS: Final = tuple(b"%dms " % n for n in range(10))


class AccessLog:
    """Formats access-log lines and hands them to ``sink``."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self._second = -1
        self._stamp = b""

    def _second_stamp(self, second: int) -> bytes:
        """``second`` as UTC date and time, formatted once per second."""
        if second != self._second:
            self._second = second
            self._stamp = dt.datetime.fromtimestamp(second, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S").encode()
        return self._stamp

    def request(
        self, prefix: bytes, host: bytes, request: RequestHead, status: int, body_bytes: int,
        elapsed: float, upstream: bytes,
    ) -> None:
        """A request's line. ``prefix`` is the client address and listener; ``elapsed`` in seconds."""
        # Integers only: the time's milliseconds and the elapsed tenths of a millisecond.
        now = time.time()
        second = int(now)
        tenths = int(elapsed * 10_000 + 0.5)
        self.sink(b"".join((
            self._second_stamp(second), _MILLIS[int((now - second) * 1000)], prefix, b" ", host, b' "',
            request.method, b" ", request.target, b" HTTP/", request.version,
            _STATUS[status] if 0 <= status < 600 else b'" %d ' % status, b"%d" % body_bytes,
            _ELAPSED_MS[tenths // 10] if tenths < 10_000 else b" %d." % (tenths // 10), _TENTHS[tenths % 10],
            upstream,
        )))

    def no_request(self, prefix: bytes, status: int) -> None:
        """The line of an answer to a head that made no request (malformed, or too late)."""
        now = time.time()
        second = int(now)
        self.sink(b'%s.%03dZ %s - "-" %d 0 0.0ms -' % (
            self._second_stamp(second), int((now - second) * 1000), prefix, status))


# Past this many waiting lines, write at once rather than at the next tick.
MAX_PENDING_LINES = 10_000
# Lines are written in whole-line chunks of at most this many bytes, one write(2) each:
# the workers of a node append to the same file or pipe, and a write of up to PIPE_BUF
# bytes is never interleaved with another process's (O_APPEND files: any single write).
WRITE_CHUNK = 4096


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
            chunk: list[bytes] = []
            size = 0
            for line in lines:
                if chunk and size + len(line) >= WRITE_CHUNK:
                    self._write(chunk)
                    chunk = []
                    size = 0
                chunk.append(line)
                size += len(line) + 1
            self._write(chunk)
        self.stream.flush()

    def _write(self, lines: list[bytes]) -> None:
        lines.append(b"")
        self.stream.write(b"\n".join(lines))
        self.stream.flush()  # one write(2) per chunk: whole lines, never split by a buffer

    async def flush_every_second(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.flush()
