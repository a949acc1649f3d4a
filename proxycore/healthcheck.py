"""Active health checks, passive marking and the log of every target state change.

``plan_checks`` (pure) says which target pools get an active check and how: one
check per pool, whatever the number of upstreams or hosts that use it; an HTTP
``GET <path>`` when an ``http`` host uses the upstream, a TCP connect (with the
TLS handshake when the upstream speaks TLS) when only ``tcp`` hosts do.

``HealthMonitor`` is the asyncio side, owned by the ``ProxyNode``: one task per
planned pool probing every ``interval``; ``replan`` after each reload keeps the
tasks whose plan did not change, restarts the changed ones and cancels those of
pools that left; health state itself stays on the pools. Requests report their
failures through ``request_failed`` and a cool-down ends by a timer. Decisions
are ``proxycore.health``'s; this module moves bytes, keeps timers, logs and counts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from proxycore import health
from proxycore.config import HealthCheck, Mode, Snapshot, Target, Upstream
from proxycore.stats import Stats
from proxycore.upstream import Balancer, TargetPool

log = logging.getLogger("proxycore.health")


@dataclass(frozen=True, slots=True)
class CheckPlan:
    upstream: str  # the name the log lines use
    check: HealthCheck
    http: bool  # False: a TCP connect (and TLS handshake) is the whole check
    host_header: str


def plan_checks(snapshot: Snapshot, balancers: Mapping[str, Balancer]) -> dict[TargetPool, CheckPlan]:
    """The active check of every pool that has one, for this snapshot."""
    upstreams: dict[str, Upstream] = {}
    http_used: set[str] = set()
    for route in snapshot.hosts:
        if not route.enabled:
            continue  # nothing is sent to a disabled host's upstream: no reason to check it
        upstreams.setdefault(route.upstream.name, route.upstream)
        if route.mode is Mode.HTTP:
            http_used.add(route.upstream.name)
    plans: dict[TargetPool, CheckPlan] = {}
    for name, upstream in upstreams.items():
        balancer = balancers.get(name)
        if not upstream.health.enabled or balancer is None:
            continue
        http = name in http_used
        for pool, target in balancer.members:
            if not target.enabled:
                continue
            earlier = plans.get(pool)
            if earlier is None or (http and not earlier.http):  # HTTP says more than TCP
                plans[pool] = CheckPlan(name, upstream.health, http, host_header(upstream, target))
    return plans


def host_header(upstream: Upstream, target: Target) -> str:
    if upstream.tls is not None and upstream.tls.server_name:
        return upstream.tls.server_name
    return f"[{target.host}]" if ":" in target.host else target.host


def check_request(plan: CheckPlan) -> bytes:
    return (
        f"GET {plan.check.path} HTTP/1.1\r\nHost: {plan.host_header}\r\n"
        "User-Agent: proxyadmin-health-check\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    ).encode()


async def probe(pool: TargetPool, plan: CheckPlan) -> tuple[bool, str]:
    """One check of one target: (passed, why not)."""
    host, port = pool.target.address
    context = pool.ssl_context
    try:
        async with asyncio.timeout(plan.check.timeout):
            reader, writer = await asyncio.open_connection(
                host, port, ssl=context,
                server_hostname=(pool.server_name or host) if context else None,
            )
            try:
                if not plan.http:
                    return True, ""
                writer.write(check_request(plan))
                return health.check_verdict(await reader.readline())
            finally:
                writer.close()
    except Exception as exc:  # whatever went wrong, the check failed and the checker goes on
        return False, health.describe_error(exc)


class HealthMonitor:
    """The node's health bookkeeping; every method runs on the node's event loop."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.checkers: dict[TargetPool, tuple[CheckPlan, asyncio.Task[None]]] = {}
        self.cooldowns: dict[TargetPool, asyncio.TimerHandle] = {}
        # A worker tells its supervisor of each cool-down it starts, so the others follow it.
        self.on_cooldown: Callable[[TargetPool, str, float, str], None] | None = None

    # ---- active checks --------------------------------------------------------------

    def replan(self, plans: Mapping[TargetPool, CheckPlan], pools: Iterable[TargetPool]) -> None:
        """Run exactly ``plans``; ``pools`` are all the pools of the current state."""
        loop = asyncio.get_running_loop()
        for pool, (plan, task) in list(self.checkers.items()):
            if plans.get(pool) == plan and not pool.retired:
                continue
            task.cancel()
            del self.checkers[pool]
            if pool not in plans and not pool.retired:
                self.report(pool, plan.upstream, health.checks_stopped(pool.health))
        for pool, plan in plans.items():
            if pool not in self.checkers:
                self.checkers[pool] = (plan, loop.create_task(self.run_checks(pool, plan)))
        live = set(pools)
        for pool in [p for p in self.cooldowns if p not in live]:
            self.cooldowns.pop(pool).cancel()

    async def run_checks(self, pool: TargetPool, plan: CheckPlan) -> None:
        while not pool.retired:
            ok, error = await probe(pool, plan)
            self.report(pool, plan.upstream, health.record_check(pool.health, ok, plan.check, error))
            await asyncio.sleep(plan.check.interval)

    def stop(self) -> None:
        for _, task in self.checkers.values():
            task.cancel()
        self.checkers.clear()
        for timer in self.cooldowns.values():
            timer.cancel()
        self.cooldowns.clear()

    # ---- passive marking ------------------------------------------------------------

    def request_failed(self, pool: TargetPool, upstream: Upstream, error: str) -> None:
        """A request to ``pool`` could not connect or got a 5xx."""
        now = time.monotonic()
        if 0.0 < pool.health.down_until <= now:  # over, though its timer has not run yet
            self.cooldown_over(pool, upstream.name, pool.health.down_until)
        transition = health.record_passive_failure(pool.health, upstream.health, now, error)
        if transition is None:
            return
        self.report(pool, upstream.name, transition)
        until = pool.health.down_until
        self.cooldowns[pool] = asyncio.get_running_loop().call_later(
            until - now, self.cooldown_over, pool, upstream.name, until)
        if self.on_cooldown is not None:
            self.on_cooldown(pool, upstream.name, until - now, error)

    def follow_cooldown(self, pool: TargetPool, upstream: str, seconds: float, error: str) -> None:
        """Another worker of the node put ``pool`` in a cool-down: keep it out here as well.

        That worker logged and counted it; here it is only followed, silently.
        """
        now = time.monotonic()
        until = now + seconds
        if pool.health.down_until >= until or seconds <= 0:
            return
        pool.health.down_until = until
        pool.health.last_error = error
        timer = self.cooldowns.pop(pool, None)
        if timer is not None:
            timer.cancel()
        self.cooldowns[pool] = asyncio.get_running_loop().call_later(
            seconds, self.followed_cooldown_over, pool, until)

    def followed_cooldown_over(self, pool: TargetPool, until: float) -> None:
        self.cooldowns.pop(pool, None)
        health.end_cooldown(pool.health, until)

    def cooldown_over(self, pool: TargetPool, upstream: str, until: float) -> None:
        timer = self.cooldowns.pop(pool, None)
        if timer is not None:
            timer.cancel()
        self.report(pool, upstream, health.end_cooldown(pool.health, until))

    # ---- logging and counting -------------------------------------------------------

    def report(self, pool: TargetPool, upstream: str, transition: health.Transition | None) -> None:
        if transition is None:
            return
        label = health.target_label(*pool.target.address)
        counters = self.stats.upstream(upstream)
        if transition.up:
            counters.came_up += 1
            log.info("upstream %r target %s is UP (%s)", upstream, label, transition.reason)
        else:
            counters.went_down += 1
            log.warning("upstream %r target %s is DOWN (%s)", upstream, label, transition.reason)


def describe_upstreams(balancers: Mapping[str, Balancer], now: float) -> dict[str, dict[str, Any]]:
    """Every upstream's targets as the dashboard shows them (``Stats.as_dict()["upstreams"]``)."""
    described: dict[str, dict[str, Any]] = {}
    for name, balancer in balancers.items():
        open_to_requests = set(balancer.pools)
        targets = []
        for pool, target in balancer.members:
            state = pool.health
            healthy = health.takes_requests(state, now)
            targets.append({
                "address": health.target_label(target.host, target.port),
                "healthy": healthy,
                "cooling_down": state.healthy and not healthy,
                "active": pool.active,
                "weight": target.weight,
                "draining": target.draining,
                "enabled": target.enabled,
                "last_error": state.last_error,
            })
        described[name] = {
            "targets": targets,
            "healthy": sum(1 for t in targets if t["healthy"]),
            "available": sum(1 for p in open_to_requests if health.takes_requests(p.health, now)),
            "total": len(targets),
        }
    return described
