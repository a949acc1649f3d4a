"""Checking HTTP Basic credentials without pinning the CPU: caches and a bounded pool.

A password hash is slow on purpose (PBKDF2, Django's iteration count), so the proxy
runs one as rarely as it can:

- a connection remembers the Authorization value it had verified (``ClientConnection``),
  so a keep-alive client pays nothing after its first request;
- the node remembers recent successes (``CredentialCache``): at most
  ``CACHE_SIZE`` entries for ``CACHE_TTL`` seconds, keyed by a keyed BLAKE2 digest of the
  list's identity and the exact header value (clear credentials are not kept as keys);
  a new connection with a known credential pays one digest;
- a miss is verified in a pool of ``WORKERS`` thread (PBKDF2 in OpenSSL releases the GIL,
  so the event loop goes on) with at most ``MAX_PENDING`` waiting; beyond that a request
  gets 503 rather than a place in an unbounded queue;
- a client address with ``MAX_FAILURES`` failures within ``FAILURE_WINDOW`` seconds gets
  429 without any hashing until the window passes: a flood of wrong passwords costs at
  most one core's worth of hashing, and one client cannot take all of it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Final

from proxycore.access import AccessPolicy, basic_credentials

CACHE_SIZE: Final = 4096
CACHE_TTL: Final = 300.0  # seconds a verified credential is remembered by the node
WORKERS: Final = 1
MAX_PENDING: Final = 32
MAX_FAILURES: Final = 10
FAILURE_WINDOW: Final = 60.0
MAX_FAILING_CLIENTS: Final = 4096

# Outcomes of ``Verifier.verify``
OK: Final = 0
WRONG: Final = 1
BUSY: Final = 2  # too many verifications waiting: 503
THROTTLED: Final = 3  # this client failed too often lately: 429


class CredentialCache:
    """Recent successes, bounded (least recently used dropped) and expiring."""

    def __init__(self, size: int = CACHE_SIZE, ttl: float = CACHE_TTL) -> None:
        self.size = size
        self.ttl = ttl
        self.secret = os.urandom(16)  # the digests mean nothing outside this process
        self.entries: dict[bytes, float] = {}  # digest -> expiry (monotonic)

    def key(self, policy: AccessPolicy, value: bytes) -> bytes:
        return hashlib.blake2b(policy.identity + value, digest_size=16, key=self.secret).digest()

    def known(self, policy: AccessPolicy, value: bytes, now: float) -> bool:
        key = self.key(policy, value)
        expiry = self.entries.pop(key, None)
        if expiry is None or expiry < now:
            return False
        self.entries[key] = expiry  # (re-inserted: most recently used last)
        return True

    def remember(self, policy: AccessPolicy, value: bytes, now: float) -> None:
        entries = self.entries
        key = self.key(policy, value)
        entries.pop(key, None)
        while len(entries) >= self.size:
            del entries[next(iter(entries))]
        entries[key] = now + self.ttl


class Verifier:
    """Verifies Basic credentials off the event loop, bounded; one per node."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.cache = CredentialCache()
        self.pending = 0
        self.failures: dict[str, tuple[int, float]] = {}  # client address -> (count, window start)
        self.pool: ThreadPoolExecutor | None = None
        self.loop = loop

    def throttled(self, client: str, now: float) -> bool:
        entry = self.failures.get(client)
        return entry is not None and entry[0] >= MAX_FAILURES and now - entry[1] < FAILURE_WINDOW

    def failed(self, client: str, now: float) -> None:
        failures = self.failures
        count, since = failures.pop(client, (0, now))
        if now - since >= FAILURE_WINDOW:
            count, since = 0, now
        while len(failures) >= MAX_FAILING_CLIENTS:
            del failures[next(iter(failures))]
        failures[client] = (count + 1, since)

    def verify(self, policy: AccessPolicy, value: bytes, client: str, done: Callable[[int], None]) -> None:
        """Check ``value`` for ``policy``; ``done(outcome)`` is called on the event loop,
        at once when the answer is known without hashing."""
        now = time.monotonic()
        if self.cache.known(policy, value, now):
            done(OK)
            return
        if self.throttled(client, now):
            done(THROTTLED)
            return
        credentials = basic_credentials(value)
        user = policy.users.get(credentials[0]) if credentials is not None else None
        if credentials is None or user is None:
            self.failed(client, now)
            done(WRONG)  # no such user: no hash to run (the timing says so; usernames are not secret here)
            return
        if self.pending >= MAX_PENDING:
            done(BUSY)
            return
        if self.pool is None:
            self.pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="basic-auth")
        loop = self.loop or asyncio.get_running_loop()
        self.pending += 1
        future = loop.run_in_executor(self.pool, user.verify, credentials[1])

        def finished(fut: asyncio.Future[bool]) -> None:
            self.pending -= 1
            ok = not fut.cancelled() and fut.exception() is None and fut.result()
            when = time.monotonic()
            if ok:
                self.cache.remember(policy, value, when)
                done(OK)
            else:
                self.failed(client, when)
                done(WRONG)

        future.add_done_callback(finished)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None
