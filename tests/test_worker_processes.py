"""`runproxy --workers N`: N worker processes serve the listeners under one supervisor,
sessions resume across them, a killed worker comes back without touching the others,
reloads and stops cover every worker, and the node reports one set of summed counters.

Which worker holds a connection is read from /proc: the server side of the TCP
connection (its socket inode) is among that worker's open files.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from tests.processes import ROOT, Project, config, kill, wait_for_port
from tests.proxyharness import (
    Exchange,
    LoopThread,
    Upstream,
    client_context,
    free_port,
    read_response,
    wait_until,
)

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")

WORKERS = 2


# ---- which process holds a connection ------------------------------------------------------


def server_side_inode(server_port: int, client_port: int) -> int | None:
    """The inode of the accepted socket of the TCP connection 127.0.0.1:client_port → server_port."""
    local, remote = f"0100007F:{server_port:04X}", f"0100007F:{client_port:04X}"
    with open("/proc/net/tcp") as table:
        for row in table.readlines()[1:]:
            fields = row.split()
            if fields[1] == local and fields[2] == remote and fields[9] != "0":
                return int(fields[9])
    return None


def holder(pids: list[int], server_port: int, sock: socket.socket) -> int | None:
    inode = server_side_inode(server_port, sock.getsockname()[1])
    wanted = f"socket:[{inode}]"
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == wanted:
                    return pid
            except OSError:
                continue
    return None


def worker_pids(supervisor: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        if ppid == supervisor and b"proxycore.worker" in cmdline:
            pids.append(int(entry))
    return sorted(pids)


# ---- a node of workers ----------------------------------------------------------------------


class Node:
    def __init__(self, proc: subprocess.Popen[str], https: int, metrics: int, log: Path) -> None:
        self.proc, self.https, self.metrics, self.log = proc, https, metrics, log

    def workers(self) -> list[int]:
        return worker_pids(self.proc.pid)

    def connect(self, ca: trustme.CA | None, host: str = "a.example", ctx: ssl.SSLContext | None = None,
                session: ssl.SSLSession | None = None) -> ssl.SSLSocket:
        context = ctx if ctx is not None else client_context(ca) if ca is not None else None
        assert context is not None
        raw = socket.create_connection(("127.0.0.1", self.https), timeout=10)
        return context.wrap_socket(raw, server_hostname=host, session=session)

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/metrics", timeout=5) as response:
            text = response.read().decode()
        found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        assert found, f"{name} not in /metrics"
        return float(found.group(1))


def get(sock: ssl.SSLSocket, host: str = "a.example") -> int:
    sock.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    return read_response(sock)[0]


def one_per_worker(node: Node, ca: trustme.CA) -> dict[int, ssl.SSLSocket]:
    """Open connections until every worker holds one; the others are closed."""
    held: dict[int, ssl.SSLSocket] = {}
    pids = node.workers()
    for _ in range(60):
        sock = node.connect(ca)
        pid = holder(pids, node.https, sock)
        if pid is not None and pid not in held:
            held[pid] = sock
        else:
            sock.close()
        if len(held) == len(pids):
            return held
    raise AssertionError(f"connections never reached every worker: {sorted(held)} of {pids}")


def requests_on_new_connections(node: Node, ca: trustme.CA, count: int) -> set[int | None]:
    """``count`` requests, each on a new connection, all 200; the workers that served them."""
    pids = node.workers()
    holders = set()
    for _ in range(count):
        with node.connect(ca) as sock:
            holders.add(holder(pids, node.https, sock))
            assert get(sock) == 200
    return holders


def served_by_every_worker(node: Node, ca: trustme.CA, host: str) -> bool:
    """12 new connections to ``host`` all get 200, and every worker served at least one."""
    pids, seen = node.workers(), set()
    for _ in range(12):
        try:
            with node.connect(ca, host) as sock:
                if get(sock, host) != 200:
                    return False
                seen.add(holder(pids, node.https, sock))
        except OSError:
            return False
    return seen == set(pids)


def start_node(project: Project, ca: trustme.CA, upstream_port: int, *extra: str,
               document: dict[str, object] | None = None, output: Path | None = None) -> Node:
    """runproxy --workers 2; what it prints goes to a pipe, or to ``output`` to be read while it runs."""
    project.import_config(document or config(ca, upstream_port, ["a"]))
    https, http, metrics = free_port(), free_port(), free_port()
    log = project.tmp / "access.log"
    args = ["runproxy", "--https", f"127.0.0.1:{https}", "--http", f"127.0.0.1:{http}",
            "--workers", str(WORKERS), "--access-log", str(log), "--stop-deadline", "5",
            "--metrics", f"127.0.0.1:{metrics}", *extra]
    if output is None:
        proc = project.start(*args)
    else:
        with output.open("w") as sink:
            proc = subprocess.Popen([sys.executable, "manage.py", *args], cwd=ROOT, env=project.env,
                                    stdout=sink, stderr=subprocess.STDOUT, text=True)
    wait_for_port(https, 40)
    node = Node(proc, https, metrics, log)
    wait_until(lambda: len(node.workers()) == WORKERS, 10)
    return node


@pytest.fixture
def node(project: Project, ca: trustme.CA, upstream: Upstream) -> Iterator[Node]:
    running = start_node(project, ca, upstream.port, "--no-control")
    yield running
    kill(running.proc)


class Load(threading.Thread):
    """Requests on new and kept-alive connections until stopped; failures are kept."""

    def __init__(self, node: Node, ca: trustme.CA, host: str = "a.example") -> None:
        super().__init__(daemon=True)
        self.node, self.ctx, self.host = node, client_context(ca), host
        self.done = threading.Event()
        self.ok = 0
        self.failures: list[str] = []

    def run(self) -> None:
        while not self.done.is_set():
            try:
                with self.node.connect(None, self.host, ctx=self.ctx) as sock:
                    for _ in range(3):
                        status = get(sock, self.host)
                        if status != 200:
                            self.failures.append(f"status {status}")
                        self.ok += 1
            except (OSError, ConnectionError) as exc:
                self.failures.append(repr(exc))

    def stop(self) -> None:
        self.done.set()
        self.join(20)


# ---- tests ----------------------------------------------------------------------------------


def test_every_worker_serves_and_connections_spread_over_their_pids(node: Node, ca: trustme.CA) -> None:
    pids = node.workers()
    assert len(pids) == WORKERS and node.proc.pid not in pids
    holders: list[int | None] = []
    socks = [node.connect(ca) for _ in range(24)]
    try:
        for sock in socks:
            holders.append(holder(pids, node.https, sock))
            assert get(sock) == 200
    finally:
        for sock in socks:
            sock.close()
    assert set(holders) == set(pids), holders  # every worker took some: none is the supervisor
    # Every worker's lines reach the one access log whole.
    wait_until(lambda: len(node.log.read_text().splitlines()) >= 24, 5)
    lines = node.log.read_text().splitlines()
    assert len(lines) == 24
    assert all(re.fullmatch(r'\S+ 127\.0\.0\.1 https a "GET / HTTP/1\.1" 200 .*', line) for line in lines), lines


def test_a_session_issued_by_one_worker_resumes_on_another(node: Node, ca: trustme.CA) -> None:
    ctx = client_context(ca)
    pids = node.workers()
    with node.connect(ca, ctx=ctx) as first:
        assert get(first) == 200  # the TLS 1.3 ticket comes with the first response's bytes
        issued_by = holder(pids, node.https, first)
        session = first.session
        assert not first.session_reused
    assert session is not None and issued_by in pids
    for _ in range(60):
        with node.connect(ca, ctx=ctx, session=session) as again:
            if holder(pids, node.https, again) != issued_by:
                assert again.session_reused, "the other worker did not resume the session"
                assert get(again) == 200
                return
    raise AssertionError("no connection reached the other worker")


def test_a_killed_worker_comes_back_and_the_others_keep_their_connections(
    node: Node, ca: trustme.CA,
) -> None:
    held = one_per_worker(node, ca)
    victim, survivor = sorted(held)
    load = Load(node, ca)
    load.start()
    time.sleep(0.3)
    os.kill(victim, signal.SIGKILL)
    # The survivor's connection goes on as if nothing happened.
    assert get(held[survivor]) == 200
    wait_until(lambda: len(node.workers()) == WORKERS and victim not in node.workers(), 15)
    time.sleep(0.5)
    load.stop()
    assert get(held[survivor]) == 200
    with pytest.raises((OSError, ConnectionError)):
        get(held[victim])
    for sock in held.values():
        sock.close()
    assert load.ok > 0
    # New connections: every one is served, by the survivor and by the new worker.
    assert requests_on_new_connections(node, ca, 16) == set(node.workers())
    wait_until(lambda: node.metric("proxyadmin_worker_restarts_total") == 1, 5)
    # Only connections the killed worker had accepted could fail (the kernel keeps what
    # was queued on its socket for the new worker).
    assert len(load.failures) <= 3, load.failures


def test_reload_under_load_across_workers_fails_no_request(
    project: Project, node: Node, ca: trustme.CA, upstream: Upstream,
) -> None:
    loads = [Load(node, ca) for _ in range(3)]
    for load in loads:
        load.start()
    for hosts in (["a", "b"], ["a", "b", "c"], ["a", "c"]):
        project.import_config(config(ca, upstream.port, hosts))
        time.sleep(0.8)
    # Every worker serves the last revision: c on each worker.
    wait_until(lambda: served_by_every_worker(node, ca, "c.example"), 15)
    for load in loads:
        load.stop()
    assert sum(load.ok for load in loads) > 50
    assert [f for load in loads for f in load.failures] == []


def test_graceful_stop_drains_every_worker(project: Project, ca: trustme.CA, loop_thread: LoopThread) -> None:
    async def slow(ex: Exchange) -> None:
        await asyncio.sleep(1.5)
        ex.respond(200, b"late")

    slow_upstream = Upstream(loop_thread, slow).start()
    node = start_node(project, ca, slow_upstream.port, "--no-control")
    try:
        held = one_per_worker(node, ca)
        for sock in held.values():
            sock.sendall(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
        time.sleep(0.4)  # the requests are at the upstream, on both workers
        node.proc.send_signal(signal.SIGTERM)
        for sock in held.values():
            status, _, body = read_response(sock)
            assert (status, body) == (200, b"late")
            sock.close()
        out, _ = node.proc.communicate(timeout=20)
        assert node.proc.returncode == 0, out
        assert "Traceback" not in out
        assert worker_pids(node.proc.pid) == []
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", node.https), timeout=2).close()
    finally:
        kill(node.proc)


def test_the_agent_link_reports_the_sum_of_every_worker(
    project: Project, ca: trustme.CA, upstream: Upstream, loop_thread: LoopThread,
) -> None:
    reports: list[dict[str, Any]] = []

    async def agent(socket_: ServerConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for raw in socket_:
                message = json.loads(raw)
                if message.get("type") == "stats":
                    reports.append(message["totals"])

    async def start() -> Any:
        return await serve(agent, "127.0.0.1", 0)

    server = loop_thread.run(start())
    control = server.sockets[0].getsockname()[1]
    project.env["PROXYADMIN_AGENT_TOKEN"] = "t" * 32
    node = start_node(project, ca, upstream.port, "--control", f"http://127.0.0.1:{control}")
    try:
        assert requests_on_new_connections(node, ca, 20) == set(node.workers())

        def summed() -> bool:
            host = reports[-1]["hosts"].get("a", {}) if reports else {}
            return host.get("requests") == 20

        wait_until(summed, 10)
        last = reports[-1]
        assert last["workers"] == {"count": WORKERS, "restarts": 0}
        assert sum(last["hosts"]["a"]["latency"]["counts"]) == 20
        assert last["hosts"]["a"]["responses"]["2xx"] == 20
        assert last["listeners"]["https"]["connections"] == 21  # and wait_for_port's
        assert last["hosts"]["a"]["active_connections"] == 0
        assert node.metric('proxyadmin_requests_total{host="a"}') == 20
    finally:
        kill(node.proc)
        loop_thread.call(server.close)


@pytest.mark.parametrize("value", ["0", "1025", "two"])
def test_a_bad_worker_count_is_refused_with_a_clear_message(project: Project, value: str) -> None:
    if value.isdigit():
        stderr = project.refuses("runproxy", "--workers", value)
        assert f"--workers must be between 1 and 1024, not {value}" in stderr
    else:
        project.env["PROXYADMIN_WORKERS"] = value
        stderr = project.refuses("runproxy")
        assert "PROXYADMIN_WORKERS must be a whole number" in stderr


def test_health_is_checked_once_per_node_and_every_worker_routes_by_it(
    project: Project, ca: trustme.CA, upstream: Upstream, loop_thread: LoopThread,
) -> None:
    checks: list[float] = []

    async def failing_checks(ex: Exchange) -> None:
        if ex.target == "/health":
            checks.append(time.monotonic())
            ex.respond(500, b"down")
        else:
            ex.respond(200, b"the target whose checks fail")

    bad = Upstream(loop_thread, failing_checks).start()

    async def good_checks(ex: Exchange) -> None:
        ex.respond(200, b"good")

    good = Upstream(loop_thread, good_checks).start()
    document = config(ca, good.port, ["a"])
    document["upstreams"] = [{
        "name": "app", "health_check_path": "/health", "health_check_interval": 0.5,
        "unhealthy_threshold": 1, "healthy_threshold": 1,
        "targets": [{"host": "127.0.0.1", "port": good.port}, {"host": "127.0.0.1", "port": bad.port}],
    }]
    node = start_node(project, ca, good.port, "--no-control", document=document)
    try:
        # Taken out by the supervisor's checks: no worker sends it a request any more.
        wait_until(lambda: len(checks) >= 2, 10)
        time.sleep(0.5)
        pids = node.workers()
        served_by = set()
        for _ in range(16):
            with node.connect(ca) as sock:
                served_by.add(holder(pids, node.https, sock))
                sock.sendall(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
                status, _, body = read_response(sock)
                assert (status, body) == (200, b"good")
        assert served_by == set(pids)
        # One checker for the node: a check every 0.5 s, not one per worker.
        first = len(checks)
        time.sleep(3)
        assert 4 <= len(checks) - first <= 8, len(checks) - first
    finally:
        kill(node.proc)


def test_a_cool_down_one_worker_starts_is_followed_by_the_others(
    project: Project, ca: trustme.CA, loop_thread: LoopThread,
) -> None:
    async def broken(ex: Exchange) -> None:
        ex.respond(503, b"broken")

    async def fine(ex: Exchange) -> None:
        ex.respond(200, b"fine")

    bad = Upstream(loop_thread, broken).start()
    good = Upstream(loop_thread, fine).start()
    document = config(ca, good.port, ["a"])
    document["upstreams"] = [{
        "name": "app", "health_check_enabled": False, "passive_failures": 2, "passive_cooldown": 30,
        "targets": [{"host": "127.0.0.1", "port": good.port}, {"host": "127.0.0.1", "port": bad.port}],
    }]
    node = start_node(project, ca, good.port, "--no-control", document=document)
    try:
        held = one_per_worker(node, ca)
        first, second = sorted(held)
        statuses = []
        for _ in range(6):  # round robin: the broken target gets every other request
            held[first].sendall(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
            statuses.append(read_response(held[first])[0])
        assert statuses.count(503) == 2, statuses  # then it cools down
        time.sleep(0.5)
        for _ in range(6):
            held[second].sendall(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
            assert read_response(held[second])[:3:2] == (200, b"fine")
        for sock in held.values():
            sock.close()
    finally:
        kill(node.proc)


def test_workers_stop_when_their_supervisor_is_killed(node: Node, ca: trustme.CA) -> None:
    pids = node.workers()
    node.proc.kill()
    node.proc.communicate(timeout=10)

    def running(pid: int) -> bool:
        try:
            return b"proxycore.worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False

    def gone() -> bool:
        return not any(running(pid) for pid in pids)

    wait_until(gone, 15)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", node.https), timeout=2).close()


def test_sighup_to_the_node_reloads_every_worker(project: Project, ca: trustme.CA, upstream: Upstream) -> None:
    output = project.tmp / "node.out"
    node = start_node(project, ca, upstream.port, "--no-control", output=output)
    try:
        pids = node.workers()
        os.kill(node.proc.pid, signal.SIGHUP)

        def both_reloaded() -> bool:
            text = output.read_text()
            return all(re.search(rf"\[worker {i}\] config revision \d+ applied", text) for i in (1, 2))

        wait_until(both_reloaded, 15)
        held = one_per_worker(node, ca)
        for sock in held.values():
            assert get(sock) == 200
            sock.close()
        assert sorted(held) == pids  # the same workers: reloaded, not restarted
        node.proc.send_signal(signal.SIGTERM)
        node.proc.wait(20)
        assert node.workers() == [] and "died" not in output.read_text()
    finally:
        kill(node.proc)


def lowest_free_fd(pid: int) -> int:
    open_fds = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    return next(n for n in range(len(open_fds) + 1) if n not in open_fds)


def test_a_snapshot_one_worker_cannot_load_is_rolled_back_on_every_worker(
    project: Project, ca: trustme.CA, upstream: Upstream,
) -> None:
    """A worker at its open-files limit cannot load the new certificates (each is read
    through a memfd): the supervisor proved the snapshot, the worker refuses it, and
    every worker goes back to the revision before; the next revision applies everywhere."""
    import resource

    output = project.tmp / "node.out"
    node = start_node(project, ca, upstream.port, "--no-control", output=output)
    try:
        wait_until(lambda: len(re.findall(r"worker \d \(pid \d+\) serving revision", output.read_text())) == 2, 20)
        victim = node.workers()[0]
        soft, hard = resource.prlimit(victim, resource.RLIMIT_NOFILE)
        resource.prlimit(victim, resource.RLIMIT_NOFILE, (lowest_free_fd(victim), hard))
        try:
            project.import_config(config(ca, upstream.port, ["a", "b"]))
            wait_until(lambda: "rejected by a worker" in output.read_text(), 15)
        finally:
            resource.prlimit(victim, resource.RLIMIT_NOFILE, (soft, hard))
        # Both workers serve the revision before: a, never b.
        held = one_per_worker(node, ca)
        for sock in held.values():
            assert get(sock) == 200
            sock.close()
        for _ in range(12):
            with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"), node.connect(ca, "b.example"):
                pass
        # The fault gone, the next revision reaches every worker.
        project.import_config(config(ca, upstream.port, ["a", "c"]))
        wait_until(lambda: served_by_every_worker(node, ca, "c.example"), 15)
        assert victim in node.workers()  # rolled back and reloaded, never restarted
    finally:
        kill(node.proc)


def test_a_second_node_on_the_same_port_is_refused(project: Project, node: Node) -> None:
    stderr = project.refuses("runproxy", "--workers", "2", "--no-control",
                             "--https", f"127.0.0.1:{node.https}", "--http", "off")
    assert "Cannot listen" in stderr
    assert node.proc.poll() is None
