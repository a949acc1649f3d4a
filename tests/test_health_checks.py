"""Target health: active checks take targets out and bring them back, passive failures cool
them down, every change is logged and counted, and a reload keeps the state of targets that stay."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from dataclasses import replace

import pytest
import trustme

from proxycore import config as core
from proxycore import health
from proxycore.healthcheck import plan_checks
from proxycore.server import build_state
from proxycore.upstream import Pools
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

FAST = core.HealthCheck(enabled=True, path="/healthz", interval=0.2, timeout=0.5,
                        healthy_threshold=2, unhealthy_threshold=2)
PASSIVE_ONLY = core.HealthCheck(enabled=False, passive_failures=3, passive_cooldown=2.0)


def app(*ports: int, name: str = "app", check: core.HealthCheck = FAST, **fields: object) -> core.Upstream:
    return core.Upstream(name=name, targets=tuple(core.Target("127.0.0.1", p) for p in ports),
                         connect_timeout=1.0, read_timeout=5.0, health=check,
                         **fields)  # type: ignore[arg-type]


def host(ca: trustme.CA, name: str, upstream: core.Upstream, **fields: object) -> core.HostRoute:
    return route(name, (f"{name}.example",), 0, bundle(ca, f"{name}.example"), upstream=upstream, **fields)


def get(sock: socket.socket, name: str = "a") -> tuple[int, bytes]:
    sock.sendall(f"GET / HTTP/1.1\r\nHost: {name}.example\r\n\r\n".encode())
    status, _, body = read_response(sock)
    return status, body


def targets(node: RunningNode, name: str = "app") -> dict[int, dict[str, object]]:
    return {int(str(t["address"]).rsplit(":", 1)[1]): t for t in node.stats()["upstreams"][name]["targets"]}


class Server(Upstream):
    """Answers its name (or ``status`` for requests other than health checks); can die and come back."""

    def __init__(self, loop: LoopThread, name: str, status: int = 200) -> None:
        super().__init__(loop, self.answer)
        self.name, self.status = name.encode(), status
        self.writers: set[asyncio.StreamWriter] = set()

    async def answer(self, ex: Exchange) -> None:
        ex.respond(200 if ex.target == "/healthz" else self.status, self.name)

    @property
    def served(self) -> list[Exchange]:
        """The requests that were not health checks."""
        return [ex for ex in self.requests if ex.target != "/healthz"]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            await super()._serve(reader, writer)
        finally:
            self.writers.discard(writer)

    def kill(self) -> None:
        """Stop listening and cut every connection, as a crashed server would."""
        async def kill() -> None:
            assert self.server is not None
            self.server.close()
            for writer in list(self.writers):
                writer.transport.abort()
        self.loop.run(kill())

    def restart(self) -> None:
        async def start() -> None:  # same port: asyncio binds with SO_REUSEADDR
            self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True)
        self.loop.run(start())


# ---- decisions (no sockets) -------------------------------------------------------------------


def test_thresholds_of_consecutive_checks_take_a_target_out_and_bring_it_back() -> None:
    state = health.TargetHealth()
    check = core.HealthCheck(enabled=True, healthy_threshold=2, unhealthy_threshold=3)
    assert health.record_check(state, False, check, "connection refused") is None
    assert health.record_check(state, True, check) is None  # a success breaks the run
    assert [health.record_check(state, False, check, "status 500") for _ in range(3)][:2] == [None, None]
    assert state.healthy is False and state.failures == 3
    assert health.record_check(state, True, check) is None
    assert health.record_check(state, True, check) == health.Transition(True, "2 successful checks")
    for _ in range(2):
        health.record_check(state, False, check, "timed out")
    assert health.record_check(state, False, check, "timed out") == health.Transition(
        False, "3 failed checks: timed out")
    assert health.checks_stopped(state) == health.Transition(True, "no longer checked")
    assert health.takes_requests(state, time.monotonic())


def test_passive_failures_cool_a_target_down_and_the_first_request_after_is_a_probe() -> None:
    state = health.TargetHealth()
    check = core.HealthCheck(passive_failures=3, passive_cooldown=10.0)
    for _ in range(2):
        assert health.record_passive_failure(state, check, 100.0, "status 502") is None
    health.record_passive_success(state)  # a success resets the count
    assert [health.record_passive_failure(state, check, 100.0, "status 502") for _ in range(2)] == [None, None]
    down = health.record_passive_failure(state, check, 100.0, "status 502")
    assert down == health.Transition(False, "3 failed requests: status 502; cool-down 10s")
    assert not health.takes_requests(state, 109.9) and health.takes_requests(state, 110.0)
    assert health.end_cooldown(state, 110.0) == health.Transition(True, "cool-down over")
    assert health.record_passive_failure(state, check, 111.0, "connection refused") is not None
    assert health.end_cooldown(state, 110.0) is None  # a stale timer changes nothing


def test_check_verdicts() -> None:
    assert health.check_verdict(b"HTTP/1.1 204 No Content\r\n") == (True, "")
    assert health.check_verdict(b"HTTP/1.0 302 Found\r\n") == (True, "")
    assert health.check_verdict(b"HTTP/1.1 503 Busy\r\n") == (False, "status 503")
    assert health.check_verdict(b"") == (False, "closed without a response")
    assert health.check_verdict(b"SSH-2.0-OpenSSH\r\n") == (False, "not an HTTP response")


def test_one_check_per_target_http_when_an_http_host_uses_it(ca: trustme.CA) -> None:
    shared = app(7001, 7002)
    tcp_only = app(7002, 7003, name="raw")
    snapshot = core.Snapshot(revision=1, hosts=(
        host(ca, "a", shared), host(ca, "b", shared),
        host(ca, "t", tcp_only, mode=core.Mode.TCP),
        host(ca, "o", app(7004, name="off", check=core.HealthCheck(enabled=False))),
    ))
    state = build_state(snapshot, Pools())
    plans = {pool.target.port: plan for pool, plan in plan_checks(snapshot, state.balancers).items()}
    assert sorted(plans) == [7001, 7002, 7003]
    assert plans[7002].http and plans[7002].upstream == "app"
    assert not plans[7003].http
    assert plans[7001].host_header == "127.0.0.1"


# ---- active checks through the proxy --------------------------------------------------------


def test_a_stopped_target_is_taken_out_and_comes_back_when_it_returns(
    ca: trustme.CA, loop_thread: LoopThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="proxycore.health")
    a, b = Server(loop_thread, "a").start(), Server(loop_thread, "b").start()
    snapshot = core.Snapshot(revision=1, hosts=(host(ca, "a", app(a.port, b.port), hsts=HSTS),))
    with running_node(snapshot) as node:
        wait_until(lambda: len(a.requests) >= 1)
        check = a.requests[0]
        assert (check.method, check.target) == ("GET", "/healthz")
        assert check.header("host") == ["127.0.0.1"] and check.header("connection") == ["close"]
        a.kill()
        taken_out = wait_until(lambda: targets(node)[a.port]["healthy"] is False)
        assert taken_out < 2.0  # two failed checks 0.2 s apart, with room for a slow machine
        sock = tls_connect(node.https_port, ca, "a.example")
        assert [get(sock) for _ in range(50)] == [(200, b"b")] * 50
        a.restart()
        wait_until(lambda: targets(node)[a.port]["healthy"] is True)
        bodies = [get(sock)[1] for _ in range(20)]
        stats = node.stats()["upstreams"]["app"]
    assert bodies.count(b"a") == 10
    assert (stats["went_down"], stats["came_up"], stats["healthy"], stats["total"]) == (1, 1, 2, 2)
    messages = [r.getMessage() for r in caplog.records if r.name == "proxycore.health"]
    assert messages == [
        f"upstream 'app' target 127.0.0.1:{a.port} is DOWN (2 failed checks: connection refused)",
        f"upstream 'app' target 127.0.0.1:{a.port} is UP (2 successful checks)",
    ]


def test_with_every_target_down_the_answer_is_503_with_hsts(ca: trustme.CA) -> None:
    ports = (free_port(), free_port())
    snapshot = core.Snapshot(revision=1, hosts=(host(ca, "a", app(*ports), hsts=HSTS),))
    with running_node(snapshot) as node:
        wait_until(lambda: node.stats()["upstreams"]["app"]["healthy"] == 0)
        sock = tls_connect(node.https_port, ca, "a.example")
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
        status, headers, _ = read_response(sock)
        stats = node.stats()
    assert status == 503
    assert headers[b"strict-transport-security"] == [b"max-age=31536000"]
    assert stats["upstreams"]["app"]["went_down"] == 2
    assert all(t["last_error"] == "connection refused" for t in stats["upstreams"]["app"]["targets"])


def test_an_upstream_of_tcp_hosts_only_is_checked_by_connecting(ca: trustme.CA, loop_thread: LoopThread) -> None:
    live, dead = Server(loop_thread, "live").start(), free_port()
    snapshot = core.Snapshot(revision=1, hosts=(host(ca, "t", app(live.port, dead), mode=core.Mode.TCP),))
    with running_node(snapshot) as node:
        wait_until(lambda: targets(node)[dead]["healthy"] is False)
        assert targets(node)[live.port]["healthy"] is True
    assert live.connections >= 2 and live.requests == []  # connected, never spoke HTTP


def test_a_tls_upstream_is_checked_over_tls_with_its_server_name(ca: trustme.CA, loop_thread: LoopThread) -> None:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("backend.example").configure_cert(server_ctx)

    class TLSServer(Server):
        ssl_context = server_ctx

    server = TLSServer(loop_thread, "tls").start()
    upstream_tls = core.UpstreamTLS(verify=True, ca_pem=ca.cert_pem.bytes(), server_name="backend.example")
    snapshot = core.Snapshot(revision=1, hosts=(host(ca, "a", app(server.port, tls=upstream_tls)),))
    with running_node(snapshot) as node:
        wait_until(lambda: len(server.requests) >= 3)
        assert targets(node)[server.port]["healthy"] is True
    assert server.requests[0].target == "/healthz"
    assert server.requests[0].header("host") == ["backend.example"]


# ---- passive failures -------------------------------------------------------------------------


def test_three_5xx_in_a_row_take_a_target_out_for_the_cool_down(
    ca: trustme.CA, loop_thread: LoopThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="proxycore.health")
    broken, good = Server(loop_thread, "broken", status=500).start(), Server(loop_thread, "good").start()
    snapshot = core.Snapshot(revision=1, hosts=(host(ca, "a", app(broken.port, good.port, check=PASSIVE_ONLY)),))
    with running_node(snapshot) as node:
        sock = tls_connect(node.https_port, ca, "a.example")
        for _ in range(10):
            if len(broken.served) == 3:
                break
            get(sock)
        assert len(broken.served) == 3
        assert [get(sock) for _ in range(6)] == [(200, b"good")] * 6
        assert targets(node)[broken.port]["cooling_down"] is True
        wait_until(lambda: targets(node)[broken.port]["healthy"] is True, timeout=4.0)
        # After the cool-down the target gets requests again; still failing, it goes straight back.
        assert sorted(get(sock)[0] for _ in range(2)) == [200, 500]
        stats = node.stats()["upstreams"]["app"]
    assert len(broken.served) == 4
    assert (stats["went_down"], stats["came_up"]) == (2, 1)
    down = f"upstream 'app' target 127.0.0.1:{broken.port} is DOWN (3 failed requests: status 500; cool-down 2s)"
    assert down in [r.getMessage() for r in caplog.records]


def test_failed_connects_of_a_tcp_host_cool_its_target_down(ca: trustme.CA, loop_thread: LoopThread) -> None:
    # Passive checks are always on, for stream hosts too: connects that fail take the target out.
    dead = free_port()
    snapshot = core.Snapshot(revision=1, hosts=(
        host(ca, "t", app(dead, check=PASSIVE_ONLY), mode=core.Mode.TCP),))
    with running_node(snapshot) as node:
        for _ in range(3):
            sock = tls_connect(node.https_port, ca, "t.example")
            sock.settimeout(5)
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(1) == b""  # the pipe closes: nothing to connect to
            sock.close()
        wait_until(lambda: targets(node)[dead]["cooling_down"] is True)
        assert node.stats()["upstreams"]["app"]["went_down"] == 1


def test_a_reload_keeps_the_health_of_targets_that_stay(ca: trustme.CA, loop_thread: LoopThread) -> None:
    broken, good = Server(loop_thread, "broken", status=500).start(), Server(loop_thread, "good").start()
    check = replace(FAST, passive_cooldown=30.0)  # active checks pass (/healthz answers 200)
    shared = app(broken.port, good.port, check=check)
    other = app(good.port, name="other", check=check)
    snapshot = core.Snapshot(revision=1, hosts=(
        host(ca, "a", shared), host(ca, "b", other), host(ca, "c", shared),
    ))
    with running_node(snapshot) as node:
        checkers = node.loop.call(lambda: {p.target.port: t for p, (_, t) in node.node.health.checkers.items()})
        assert sorted(checkers) == sorted([broken.port, good.port])  # one per target, not per use
        sock = tls_connect(node.https_port, ca, "a.example")
        while len(broken.served) < 3:
            get(sock)
        assert targets(node)[broken.port]["healthy"] is False
        # Only host b changes; the new snapshot builds new balancers over the same pools.
        changed = replace(snapshot, revision=2, hosts=(
            snapshot.hosts[0], replace(snapshot.hosts[1], hsts=HSTS), snapshot.hosts[2]))
        assert node.reload(changed)
        assert targets(node)[broken.port]["healthy"] is False
        sock = tls_connect(node.https_port, ca, "a.example")
        assert [get(sock) for _ in range(6)] == [(200, b"good")] * 6
        after = node.loop.call(lambda: {p.target.port: t for p, (_, t) in node.node.health.checkers.items()})
        assert after == checkers  # the same tasks go on
        # The broken target leaves the config: its checker stops.
        assert node.reload(replace(changed, revision=3, hosts=(
            host(ca, "a", app(good.port, check=check)),)))
        remaining = node.loop.call(lambda: [p.target.port for p in node.node.health.checkers])
        wait_until(lambda: checkers[broken.port].done())
    assert remaining == [good.port]
    assert len(broken.served) == 3


def test_the_node_stops_its_checkers(ca: trustme.CA, loop_thread: LoopThread) -> None:
    server = Server(loop_thread, "a").start()
    with running_node(core.Snapshot(revision=1, hosts=(host(ca, "a", app(server.port)),))) as node:
        wait_until(lambda: len(server.requests) >= 1)
        tasks = node.loop.call(lambda: [t for _, t in node.node.health.checkers.values()])
        node.stop()
        wait_until(lambda: all(t.done() for t in tasks))
        seen = len(server.requests)
        time.sleep(0.5)
    assert len(server.requests) == seen
