"""Scale-out: two control-plane processes (daphne) and two proxy nodes (runproxy) sharing
one PostgreSQL database and one Redis channel layer.

Each node links to a different daphne. A staff dashboard on either daphne sees both
nodes online; traffic through one node reaches the dashboard on the *other* daphne
(the Redis layer fans ``tick`` out across processes); a config revision made by
``importconfig`` -- a third process -- is pushed through Redis to the nodes on both
daphnes, and both serve the new host within seconds.

Needs PostgreSQL on 127.0.0.1:5432 (trust auth, user postgres) and Redis on
127.0.0.1:6379; skipped otherwise. It makes its own database (dropped at the end)
and uses a Redis database of its own (7-15, flushed at start and end; never 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.processes import ROOT, Project, config, daphne_argv, terminate
from tests.proxyharness import TrafficThread, Upstream, free_port, https_get, read_response, tls_connect

PG_HOST, PG_PORT = "127.0.0.1", 5432
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
REDIS_DBS = range(7, 16)  # never 0: that one may be somebody's real data
REDIS_CLAIM_KEY = "proxyadmin-test-scale-out:claim"
WAIT = 30.0  # the longest any single wait may take

SESSION_SCRIPT = """
from importlib import import_module
from django.conf import settings
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY, get_user_model
user = get_user_model().objects.create_superuser("ops", "ops@example.com", "a long scale-out pass phrase")
session = import_module(settings.SESSION_ENGINE).SessionStore()
session[SESSION_KEY] = str(user.pk)
session[BACKEND_SESSION_KEY] = settings.AUTHENTICATION_BACKENDS[0]
session[HASH_SESSION_KEY] = user.get_session_auth_hash()
session.save()
print("SESSION=" + session.session_key)
"""


# -- services -----------------------------------------------------------------


def answers(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(2)
        return probe.connect_ex((host, port)) == 0


def pg_admin() -> Any:
    import psycopg

    return psycopg.connect(host=PG_HOST, port=PG_PORT, user="postgres", dbname="postgres",
                           autocommit=True, connect_timeout=5)


@contextlib.contextmanager
def fresh_database() -> Iterator[str]:
    """A new, empty PostgreSQL database; dropped (FORCE: daphne may still hold connections) after."""
    from psycopg import sql

    name = f"proxyadmin_scale_{secrets.token_hex(6)}"
    with pg_admin() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield name
    finally:
        with pg_admin() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@contextlib.contextmanager
def redis_database() -> Iterator[int]:
    """A Redis database number of our own, flushed at start and end.

    Another run of this test at the same time must not share it (same group names,
    and each would flush the other's groups), so a database is claimed with SET NX;
    flushing and re-claiming happen in one MULTI so the claim is never absent.
    """
    import redis

    token = secrets.token_hex(8)
    for db in REDIS_DBS:
        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db, socket_timeout=5)
        try:
            claimed = client.set(REDIS_CLAIM_KEY, token, nx=True, ex=300)
        except redis.ResponseError:  # fewer databases configured than that
            client.close()
            break
        if not claimed:
            client.close()
            continue
        try:
            pipe = client.pipeline(transaction=True)
            pipe.flushdb()
            pipe.set(REDIS_CLAIM_KEY, token, ex=300)
            pipe.execute()
            yield db
        finally:
            client.flushdb()
            client.close()
        return
    pytest.skip(f"no free Redis database among {REDIS_DBS.start}-{REDIS_DBS.stop - 1} "
                "(another run of this test holds them)")


def require_services() -> None:
    missing = [f"{what} on {host}:{port}" for what, host, port in
               (("PostgreSQL", PG_HOST, PG_PORT), ("Redis", REDIS_HOST, REDIS_PORT))
               if not answers(host, port)]
    if missing:
        pytest.skip(f"scale-out test needs {' and '.join(missing)}")
    try:
        with pg_admin():
            pass
    except Exception as exc:
        pytest.skip(f"PostgreSQL on {PG_HOST}:{PG_PORT} refuses user postgres without a password: {exc}")


# -- processes ----------------------------------------------------------------


class Processes:
    """Child processes with their output in log files; all stopped at the end, whatever happens."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.stopped: set[str] = set()  # on purpose: not a crash

    def start(self, name: str, argv: list[str]) -> None:
        with open(self.logs / f"{name}.log", "ab") as out:
            self.procs[name] = subprocess.Popen(argv, cwd=ROOT, env=self.env, stdout=out,
                                                stderr=subprocess.STDOUT)

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            assert name in self.stopped or proc.poll() is None, f"{name} exited ({proc.returncode}):\n{self.log(name)[-3000:]}"

    def stop(self, name: str) -> None:
        self.stopped.add(name)
        terminate(self.procs[name])

    def stop_all(self) -> None:
        """Newest first: the nodes close their links before the control planes go."""
        for name in reversed(self.procs):
            self.stop(name)

    def dump(self) -> None:
        """Shown by pytest when the test fails."""
        for name in self.procs:
            print(f"---- {name} ----\n{self.log(name)[-4000:]}")


def wait_until(check: Callable[[], bool], what: str, procs: Processes, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            if check():
                return
        procs.check_alive()
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.1)


def http_answers(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2):  # noqa: S310 (loopback)
        return True


def serves(port: int, ca: trustme.CA, host: str) -> bool:
    return https_get(port, ca, host)[0] == 200


class Traffic(TrafficThread):
    """Requests to a.example through some proxy ports from a thread until stopped."""

    def __init__(self, ca: trustme.CA, ports: list[int]) -> None:
        self.ca, self.ports = ca, ports
        self.ok = dict.fromkeys(ports, 0)
        super().__init__()

    def send_round(self) -> None:
        for port in self.ports:
            with contextlib.suppress(OSError):
                sock = tls_connect(port, self.ca, "a.example")
                try:
                    sock.sendall(b"GET /scale-out HTTP/1.1\r\nHost: a.example\r\n\r\n")
                    if read_response(sock)[0] == 200:
                        self.ok[port] += 1
                finally:
                    sock.close()


# -- websockets ---------------------------------------------------------------


class Dashboard:
    """A staff dashboard socket on one daphne; keeps the latest node list it was sent."""

    def __init__(self, port: int, session_key: str) -> None:
        self.port, self.session_key = port, session_key
        self.ws: Any = None
        self.nodes: dict[str, dict[str, Any]] = {}
        self.revision = 0
        self.ticks_from: set[str] = set()

    async def open(self) -> None:
        from websockets.asyncio.client import connect

        self.ws = await connect(
            f"ws://127.0.0.1:{self.port}/ws/dashboard/", origin=f"http://127.0.0.1:{self.port}",
            additional_headers={"Cookie": f"sessionid={self.session_key}"}, open_timeout=10, proxy=None)

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()

    def note(self, message: dict[str, Any]) -> None:
        if message.get("type") in ("state", "nodes"):
            self.nodes = {n["name"]: n for n in message["nodes"]}
        if message.get("type") == "state":
            self.revision = message["revision"]
        if message.get("type") == "tick":
            self.ticks_from.add(message["node"])

    async def until(self, check: Callable[[dict[str, Any]], bool], what: str,
                    timeout: float = WAIT) -> dict[str, Any]:
        """The first message (after ``note``) for which ``check`` holds."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                raw = await asyncio.wait_for(self.ws.recv(), max(remaining, 0.01))
            except TimeoutError:
                raise AssertionError(f"dashboard on daphne :{self.port}: {what} not within {timeout:.0f} s; "
                                     f"nodes {self.nodes}, ticks from {sorted(self.ticks_from)}") from None
            message = json.loads(raw)
            self.note(message)
            if check(message):
                return message

    def online(self, *names: str) -> bool:
        return all(self.nodes.get(name, {}).get("status") == "online" for name in names)


async def dashboard_seeing_online(port: int, session_key: str, names: tuple[str, ...]) -> Dashboard:
    """A dashboard whose state (or a later ``nodes``) shows all ``names`` online.

    ``nodes`` is only broadcast on node events, so a dashboard that connected while a
    node was still starting reconnects to get a fresh state.
    """
    deadline = time.monotonic() + WAIT
    while True:
        dash = Dashboard(port, session_key)
        await dash.open()
        try:
            await dash.until(lambda m, dash=dash: m["type"] in ("state", "nodes") and dash.online(*names),
                             "all nodes online", timeout=min(3.0, max(deadline - time.monotonic(), 0.1)))
            return dash
        except AssertionError:
            await dash.close()
            if time.monotonic() >= deadline:
                raise


async def agent_probe(port: int, token: str) -> Any:
    """An agent-link socket that never says hello: it still receives the agents' group pushes."""
    from websockets.asyncio.client import connect

    return await connect(f"ws://127.0.0.1:{port}/ws/agent/", additional_headers={"Authorization": f"Bearer {token}"},
                         open_timeout=10, proxy=None)


async def next_config_changed(ws: Any, after: int) -> int:
    deadline = time.monotonic() + WAIT
    while True:
        remaining = deadline - time.monotonic()
        try:
            message = json.loads(await asyncio.wait_for(ws.recv(), max(remaining, 0.01)))
        except TimeoutError:
            raise AssertionError(f"no config.changed past revision {after} on the agent link") from None
        if message.get("type") == "config.changed" and message["revision"] > after:
            return int(message["revision"])


# -- the test -----------------------------------------------------------------


def test_two_control_planes_and_two_nodes_share_postgres_and_redis(
    tmp_path: Path, ca: trustme.CA, upstream: Upstream
) -> None:
    require_services()
    with contextlib.ExitStack() as stack:
        database = stack.enter_context(fresh_database())
        redis_db = stack.enter_context(redis_database())

        project = Project(tmp_path)
        token = secrets.token_urlsafe(24)
        project.env.pop("REDIS_URL", None)
        project.env.update(
            DATABASE_URL=f"postgres://postgres@{PG_HOST}:{PG_PORT}/{database}",
            REDIS_URL=f"redis://{REDIS_HOST}:{REDIS_PORT}/{redis_db}",
            PROXYADMIN_AGENT_TOKEN=token,
            PROXYADMIN_SECRET_KEY=secrets.token_urlsafe(50),
        )
        project.manage("migrate", "--verbosity", "0")

        procs = Processes(project.env, tmp_path)
        stack.callback(procs.dump)
        stack.callback(procs.stop_all)
        admin = {"a": free_port(), "b": free_port()}
        https = {"a": free_port(), "b": free_port()}
        for side, port in admin.items():
            procs.start(f"daphne-{side}", daphne_argv(port))
        # While the daphnes boot: the first config, and a staff session for the dashboards.
        project.import_config(config(ca, upstream.port, ["a"]))
        session_key = next(line.removeprefix("SESSION=") for line in
                           project.manage("shell", "-c", SESSION_SCRIPT).stdout.splitlines()
                           if line.startswith("SESSION="))
        for port in admin.values():
            wait_until(lambda port=port: http_answers(f"http://127.0.0.1:{port}/admin/login/"),
                       f"daphne on :{port}", procs)
        for side in admin:
            procs.start(f"node-{side}", [
                sys.executable, "manage.py", "runproxy", "--name", f"node-{side}",
                "--control", f"http://127.0.0.1:{admin[side]}",
                "--https", f"127.0.0.1:{https[side]}", "--http", f"127.0.0.1:{free_port()}", "--no-access-log"])
        for side in admin:
            wait_until(lambda side=side: serves(https[side], ca, "a.example"), f"node-{side} serving a", procs)

        timings = asyncio.run(live_checks(admin, https, ca, project, upstream, session_key, token, procs))
        procs.check_alive()
        for name in procs.procs:
            assert "Traceback" not in procs.log(name), f"{name}:\n{procs.log(name)[-4000:]}"
        print(f"scale-out timings: {timings}")


async def live_checks(admin: dict[str, int], https: dict[str, int], ca: trustme.CA, project: Project,
                      upstream: Upstream, session_key: str, token: str, procs: Processes) -> dict[str, float]:
    names = ("node-a", "node-b")
    # Each node's hello reached only its own daphne: both dashboards see both nodes online.
    dash_a = await dashboard_seeing_online(admin["a"], session_key, names)
    dash_b = await dashboard_seeing_online(admin["b"], session_key, names)
    timings: dict[str, float] = {}
    try:
        # Traffic through node-b (linked to daphne B) ticks on the dashboard on daphne A,
        # and node-a's on daphne B's.
        def tick_with_traffic(node: str) -> Callable[[dict[str, Any]], bool]:
            # One tick per daphne per second, summing its nodes; each names its nodes.
            return lambda m: (m["type"] == "tick" and node in m.get("nodes", {})
                              and m["hosts"].get("a", {}).get("requests", 0) > 0)

        started = time.monotonic()
        with Traffic(ca, [https["a"], https["b"]]) as traffic:
            await asyncio.gather(dash_a.until(tick_with_traffic("node-b"), "a tick with node-b's traffic"),
                                 dash_b.until(tick_with_traffic("node-a"), "a tick with node-a's traffic"))
        timings["cross-daphne tick"] = round(time.monotonic() - started, 2)
        assert traffic.ok[https["a"]] > 0 and traffic.ok[https["b"]] > 0, traffic.ok

        # A revision made by importconfig (its own process) is pushed through Redis: agent
        # sockets on both daphnes get config.changed, both dashboards hear of the new
        # revision, and both nodes apply it and serve the new host.
        probes = [await agent_probe(admin[side], token) for side in ("a", "b")]
        try:
            before = dash_a.revision
            started = time.monotonic()
            await asyncio.to_thread(project.import_config, config(ca, upstream.port, ["a", "b"]))
            imported = time.monotonic()
            pushed = await asyncio.gather(*(next_config_changed(probe, before) for probe in probes))
            timings["config.changed on both daphnes"] = round(time.monotonic() - imported, 2)
        finally:
            for probe in probes:
                await probe.close()
        assert pushed[0] == pushed[1], pushed
        revision = pushed[0]

        def applied_everywhere(dash: Dashboard) -> Callable[[dict[str, Any]], bool]:
            return lambda m: all(dash.nodes.get(n, {}).get("applied_revision") == revision for n in names)

        await asyncio.gather(dash_a.until(applied_everywhere(dash_a), f"both nodes on revision {revision}"),
                             dash_b.until(applied_everywhere(dash_b), f"both nodes on revision {revision}"))
        timings["both nodes applied"] = round(time.monotonic() - imported, 2)
        for side in ("a", "b"):
            await asyncio.to_thread(wait_until, lambda side=side: serves(https[side], ca, "b.example"),
                                    f"node-{side} serving b", procs, 10.0)
        timings["both nodes serve b"] = round(time.monotonic() - imported, 2)
        timings["import"] = round(imported - started, 2)
        assert dash_a.online(*names) and dash_b.online(*names), (dash_a.nodes, dash_b.nodes)
        assert all(dash_a.nodes[n]["current_revision"] == revision for n in names), dash_a.nodes

        # node-b stops: daphne B marks it disconnected, and the dashboard on daphne A hears of it.
        await asyncio.to_thread(procs.stop, "node-b")
        assert procs.procs["node-b"].returncode == 0, procs.log("node-b")
        await dash_a.until(lambda m: m["type"] == "nodes" and dash_a.nodes["node-b"]["status"] != "online"
                           and dash_a.online("node-a"), "node-b gone, node-a still online", timeout=10.0)
    finally:
        await dash_a.close()
        await dash_b.close()
    return timings
