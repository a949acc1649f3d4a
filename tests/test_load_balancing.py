"""Load balancing over an upstream's targets: weights, least connections, retry, draining."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import Counter

import trustme

from proxycore import config as core
from proxycore.upstream import Balancer, TargetPool
from tests.proxyharness import (
    HSTS,
    Exchange,
    LoopThread,
    RunningNode,
    Upstream,
    bundle,
    free_port,
    read_response,
    route,
    running_node,
    tls_connect,
    wait_until,
)


def snapshot_for(ca: trustme.CA, upstream: core.Upstream, revision: int = 1) -> core.Snapshot:
    return core.Snapshot(revision=revision, hosts=(
        route("a", ("a.example",), 0, bundle(ca, "a.example"), upstream=upstream, hsts=HSTS),
    ))


def app(*targets: core.Target, **fields: object) -> core.Upstream:
    return core.Upstream(name="app", targets=targets, connect_timeout=2.0, read_timeout=5.0,
                         **fields)  # type: ignore[arg-type]


def target(port: int, **fields: object) -> core.Target:
    return core.Target("127.0.0.1", port, **fields)  # type: ignore[arg-type]


def request(sock: socket.socket, method: str = "GET", path: str = "/", body: bytes = b"") -> tuple[int, bytes]:
    length = f"Content-Length: {len(body)}\r\n" if body else ""
    sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: a.example\r\n{length}\r\n".encode() + body)
    status, _, answer = read_response(sock)
    return status, answer


class Holding(Upstream):
    """Answers at once, except ``/hold`` which waits for ``release``; counts open connections."""

    def __init__(self, loop: LoopThread, name: str) -> None:
        super().__init__(loop, self.answer)
        self.name = name.encode()
        self.release = threading.Event()
        self.open = 0

    async def answer(self, ex: Exchange) -> None:
        if ex.target == "/hold":
            for _ in range(1000):  # at most 10 s
                if self.release.is_set():
                    break
                await asyncio.sleep(0.01)
        ex.respond(200, self.name)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        try:
            await super()._serve(reader, writer)
        finally:
            self.open -= 1


# ---- the choice itself (no sockets) -------------------------------------------------------


def pools(*weights: int) -> list[TargetPool]:
    return [TargetPool(core.Target("10.0.0.1", 8000 + i, weight=w), None, "") for i, w in enumerate(weights)]


def test_smooth_weighted_round_robin_interleaves_by_weight() -> None:
    a, b, c = pools(1, 1, 2)
    balancer = Balancer([a, b, c])
    assert [balancer.pick() for _ in range(8)] == [c, a, b, c, c, a, b, c]


def test_least_connections_compares_active_requests_relative_to_weight() -> None:
    heavy, light = pools(3, 1)
    balancer = Balancer([heavy, light], core.Balancing.LEAST_CONNECTIONS)
    heavy.active, light.active = 2, 1  # 2/3 < 1/1
    assert balancer.pick() is heavy
    heavy.active = 3  # 3/3 == 1/1: a tie, taken in turn
    assert {balancer.pick(), balancer.pick()} == {heavy, light}
    assert balancer.pick(exclude=heavy) is light


def test_targets_that_take_no_requests_are_never_picked() -> None:
    a, b, c, d = pools(1, 1, 1, 1)
    targets = [a.target, core.Target("10.0.0.1", 8001, enabled=False),
               core.Target("10.0.0.1", 8002, draining=True), d.target]
    d.health.healthy = False
    for balancing in core.Balancing:
        balancer = Balancer([a, b, c, d], balancing, targets)
        assert {balancer.pick() for _ in range(6)} == {a}
        assert balancer.pick(exclude=a) is None
        a.health.down_until = time.monotonic() + 60  # cooling down after passive failures
        assert balancer.pick() is None
        a.health.down_until = 0.0


# ---- through the proxy ----------------------------------------------------------------------


def test_weights_1_1_2_share_400_requests_25_25_50_percent(ca: trustme.CA, loop_thread: LoopThread) -> None:
    servers = [Holding(loop_thread, n).start() for n in ("one", "two", "four")]
    upstream = app(*(target(s.port, weight=w) for s, w in zip(servers, (1, 1, 2), strict=True)))
    seen: Counter[bytes] = Counter()
    with running_node(snapshot_for(ca, upstream)) as node:
        for _ in range(4):  # four keep-alive client connections share the snapshot's balancer
            sock = tls_connect(node.https_port, ca, "a.example")
            for _ in range(100):
                status, body = request(sock)
                assert status == 200
                seen[body] += 1
            sock.close()
    assert sum(seen.values()) == 400
    for name, share in ((b"one", 0.25), (b"two", 0.25), (b"four", 0.50)):
        assert abs(seen[name] / 400 - share) <= 0.05, seen


def test_least_connections_sends_new_requests_to_the_idle_target(
    ca: trustme.CA, loop_thread: LoopThread
) -> None:
    a, b = Holding(loop_thread, "a").start(), Holding(loop_thread, "b").start()
    upstream = app(target(a.port), target(b.port), balancing=core.Balancing.LEAST_CONNECTIONS)
    with running_node(snapshot_for(ca, upstream)) as node:
        slow = tls_connect(node.https_port, ca, "a.example")
        slow.sendall(b"GET /hold HTTP/1.1\r\nHost: a.example\r\n\r\n")
        wait_until(lambda: len(a.requests) + len(b.requests) == 1)
        busy, idle = (a, b) if a.requests else (b, a)
        sock = tls_connect(node.https_port, ca, "a.example")
        answers = [request(sock) for _ in range(10)]  # one at a time: the idle target has 0 active
        assert answers == [(200, idle.name)] * 10
        busy.release.set()
        assert read_response(slow)[0] == 200
        # Both idle again: ties are taken in turn.
        assert Counter(request(sock)[1] for _ in range(10)) == {b"a": 5, b"b": 5}


def test_a_get_that_cannot_connect_is_retried_once_on_another_target(
    ca: trustme.CA, loop_thread: LoopThread
) -> None:
    live = Holding(loop_thread, "live").start()
    upstream = app(target(free_port()), target(live.port))  # no active checks
    with running_node(snapshot_for(ca, upstream)) as node:
        for _ in range(4):
            sock = tls_connect(node.https_port, ca, "a.example")
            assert request(sock) == (200, b"live")
            sock.close()
        stats = node.stats()
    assert len(live.requests) == 4
    assert stats["upstreams"]["app"]["retries"] >= 1
    assert stats["hosts"]["a"]["responses"]["5xx"] == 0


def test_a_post_that_cannot_connect_is_not_retried(ca: trustme.CA, loop_thread: LoopThread) -> None:
    live = Holding(loop_thread, "live").start()
    upstream = app(target(free_port()), target(live.port))
    statuses = []
    with running_node(snapshot_for(ca, upstream)) as node:
        for _ in range(2):  # round robin: one to each target
            sock = tls_connect(node.https_port, ca, "a.example")
            statuses.append(request(sock, "POST", "/order", b"one order")[0])
            sock.close()
        stats = node.stats()
    assert sorted(statuses) == [200, 502]
    assert [(ex.method, ex.body) for ex in live.requests] == [("POST", b"one order")]
    assert stats["upstreams"]["app"]["retries"] == 0


def test_a_draining_target_gets_no_new_requests_and_its_in_flight_request_finishes(
    ca: trustme.CA, loop_thread: LoopThread
) -> None:
    a, b = Holding(loop_thread, "a").start(), Holding(loop_thread, "b").start()
    first = snapshot_for(ca, app(target(a.port), target(b.port, enabled=False)))
    with running_node(first) as node:
        slow = tls_connect(node.https_port, ca, "a.example")
        slow.sendall(b"GET /hold HTTP/1.1\r\nHost: a.example\r\n\r\n")
        wait_until(lambda: len(a.requests) == 1)
        quick = tls_connect(node.https_port, ca, "a.example")
        assert request(quick) == (200, b"a")  # a second upstream connection, now pooled
        assert a.open == 2
        assert node.reload(snapshot_for(ca, app(target(a.port, draining=True), target(b.port)), 2))
        wait_until(lambda: a.open == 1)  # the idle pooled connection was closed
        sock = tls_connect(node.https_port, ca, "a.example")  # new connections: new snapshot
        assert [request(sock) for _ in range(10)] == [(200, b"b")] * 10
        a.release.set()
        status, _, body = read_response(slow)
        assert (status, body) == (200, b"a")  # the in-flight request finished
        wait_until(lambda: a.open == 0)  # and its connection was not kept
        states = upstream_targets(node)
    assert len(a.requests) == 2
    assert states[f"127.0.0.1:{a.port}"]["draining"] is True
    assert states[f"127.0.0.1:{b.port}"]["draining"] is False


def upstream_targets(node: RunningNode, name: str = "app") -> dict[str, dict[str, object]]:
    return {t["address"]: t for t in node.stats()["upstreams"][name]["targets"]}
