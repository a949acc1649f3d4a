"""Give the memory of closed connections back to the system (glibc's ``malloc_trim``).

Measured (issue 9, uvloop, one TLS host): a fresh node that opened and closed 5,000 idle
TLS connections four times grew from 49 MB RSS to 213, 324, 422 and 505 MB, with nothing
of those connections left alive: no connection, acceptor or SSL objects and no tasks
(``gc.get_objects``, nothing for ``gc.collect``; tracemalloc: under 0.5 MB more Python
memory), and glibc's main heap 99 % free (``mallinfo2``: 8 MB in use). Not a leak but
memory that is free and still resident. Each connection's OpenSSL state and uvloop's
256 KiB read buffer land at other places in the heap each burst, glibc only hands back
the top of the heap, so every burst dirties new pages while the free ones stay. (With
glibc's mmap threshold pinned at 128 KiB, so the read buffers are mmapped and unmapped,
the heap still grew 75 MB a burst.) ``malloc_trim(0)`` also releases the free pages
inside the heap: with it, the same node went back to 67-70 MB after every burst, in
5-6 ms per call after 5,000 closes.

So the node's sweep asks ``HeapTrim.check`` once a second, which trims once at least
``TRIM_AFTER_CLOSES`` connections have closed since the last trim: at most one trim a
second, and none while connections only come. Where there is no glibc (musl, macOS)
nothing is trimmed.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

# Connections closed since the last trim that make the next sweep trim. A few hundred
# idle TLS connections leave a few MB behind; a trim costs milliseconds.
TRIM_AFTER_CLOSES = 1000


def glibc_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None when the process does not run on glibc."""
    try:
        os.confstr("CS_GNU_LIBC_VERSION")  # only glibc answers this
        trim = ctypes.CDLL(None).malloc_trim  # the C library the process already runs on
    except (AttributeError, OSError, ValueError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


class HeapTrim:
    """Decides when the heap is trimmed; the node's sweep calls ``check``."""

    def __init__(self, trim: Callable[[int], int] | None, after_closes: int = TRIM_AFTER_CLOSES) -> None:
        self.trim = trim
        self.after_closes = after_closes
        self.closed_at_last_trim = 0
        self.trims = 0

    def check(self, closed: int) -> bool:
        """``closed``: connections closed since the node started. Trims when enough did."""
        if closed < self.closed_at_last_trim:  # the counters started over
            self.closed_at_last_trim = closed
        if self.trim is None or closed - self.closed_at_last_trim < self.after_closes:
            return False
        self.closed_at_last_trim = closed
        self.trim(0)
        self.trims += 1
        return True
