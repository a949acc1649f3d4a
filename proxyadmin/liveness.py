"""Which link holds each node name, and when each node was last heard from: no database row per report.

A node name is held by one agent link at a time through a lease: taken at ``hello``
(``acquire``), renewed once a second for every node of the process that reported since
(``renew``, one round trip for all of them), and given back when the link closes
(``release``). A second link naming a node whose lease another link holds is refused;
a link that stops reporting (a dead peer its daphne has not noticed yet) loses the
lease ``NODE_LEASE_SECONDS`` after its last report.

With ``REDIS_URL`` set the leases and the last-seen times live in Redis, so every
daphne process sees them (``RedisLeases``); without it they live in this process's
memory (``MemoryLeases``): one process, one truth. The database's ``ProxyNode.last_seen``
is written with each rollup flush only; the dashboard's node status comes from here.

Counting does not rely on the lease: the rollup is fenced by ``ProxyNode.link_epoch``
(``proxyadmin.ledger``), so a lease that expires too early can refuse or admit a link
wrongly, never count traffic twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from django.conf import settings

log = logging.getLogger("proxyadmin.agentlink")

MAX_CONNECTIONS = 8  # per process, to Redis, for the leases
LEASE_KEY = "proxyadmin:lease:"
SEEN_KEY = "proxyadmin:seen"

# Renews the leases this process still holds, in one round trip: KEYS are lease keys,
# ARGV their owners then the lease in milliseconds.
RENEW_SCRIPT = """
local ms = ARGV[#ARGV]
local kept = 0
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[i] then
    redis.call('PEXPIRE', key, ms)
    kept = kept + 1
  end
end
return kept
"""
RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Leases(Protocol):
    async def acquire(self, node: str, owner: str) -> bool: ...
    async def renew(self, held: Mapping[str, str], seen: Mapping[str, float]) -> None: ...
    async def release(self, node: str, owner: str) -> None: ...
    async def seen(self, nodes: Iterable[str]) -> dict[str, float]: ...


class MemoryLeases:
    """Leases and last-seen times in this process (no Redis): one event loop, no locking."""

    def __init__(self) -> None:
        self.leases: dict[str, tuple[str, float]] = {}  # node -> (owner, expires, monotonic)
        self.last_seen: dict[str, float] = {}

    def _lease_seconds(self) -> float:
        return float(settings.NODE_LEASE_SECONDS)

    async def acquire(self, node: str, owner: str) -> bool:
        now = time.monotonic()
        held = self.leases.get(node)
        if held is not None and held[0] != owner and held[1] > now:
            return False
        self.leases[node] = (owner, now + self._lease_seconds())
        return True

    async def renew(self, held: Mapping[str, str], seen: Mapping[str, float]) -> None:
        expires = time.monotonic() + self._lease_seconds()
        for node, owner in held.items():
            if self.leases.get(node, ("", 0.0))[0] == owner:
                self.leases[node] = (owner, expires)
        self.last_seen.update(seen)

    async def release(self, node: str, owner: str) -> None:
        if self.leases.get(node, ("", 0.0))[0] == owner:
            del self.leases[node]

    async def seen(self, nodes: Iterable[str]) -> dict[str, float]:
        return {n: self.last_seen[n] for n in nodes if n in self.last_seen}


class RedisLeases:
    """Leases and last-seen times in Redis, shared by every daphne process (one client per event loop)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._client: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def client(self) -> Any:
        import redis.asyncio

        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            # A few connections, waited for when all are busy: a mass disconnect releases
            # hundreds of leases at once, which must queue, not fail.
            pool = redis.asyncio.BlockingConnectionPool.from_url(
                self.url, max_connections=MAX_CONNECTIONS, timeout=10.0, socket_timeout=5.0,
                socket_connect_timeout=5.0, decode_responses=True)
            self._client = redis.asyncio.Redis(connection_pool=pool)
            self._loop = loop
        return self._client

    def _ms(self) -> int:
        return int(float(settings.NODE_LEASE_SECONDS) * 1000)

    async def acquire(self, node: str, owner: str) -> bool:
        redis = self.client()
        if await redis.set(LEASE_KEY + node, owner, nx=True, px=self._ms()):
            return True
        return bool(await redis.get(LEASE_KEY + node) == owner)

    async def renew(self, held: Mapping[str, str], seen: Mapping[str, float]) -> None:
        if not held and not seen:
            return
        redis = self.client()
        async with redis.pipeline(transaction=False) as pipe:
            if held:
                nodes = list(held)
                pipe.eval(RENEW_SCRIPT, len(nodes), *(LEASE_KEY + n for n in nodes),
                          *(held[n] for n in nodes), self._ms())
            if seen:
                pipe.hset(SEEN_KEY, mapping={n: repr(t) for n, t in seen.items()})
            await pipe.execute()

    async def release(self, node: str, owner: str) -> None:
        await self.client().eval(RELEASE_SCRIPT, 1, LEASE_KEY + node, owner)

    async def seen(self, nodes: Iterable[str]) -> dict[str, float]:
        names = list(nodes)
        if not names:
            return {}
        values = await self.client().hmget(SEEN_KEY, names)
        found = {}
        for name, value in zip(names, values, strict=True):
            try:
                found[name] = float(value)
            except (TypeError, ValueError):
                continue
        return found


_leases: dict[str, Leases] = {}


def current() -> Leases:
    """Redis leases when ``REDIS_URL`` is set, else this process's."""
    url = settings.REDIS_URL
    if url not in _leases:
        _leases[url] = RedisLeases(url) if url else MemoryLeases()
    return _leases[url]
