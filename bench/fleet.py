"""A simulated fleet against the control plane: nodes x hosts x seconds in, the control plane's figures out.

    .venv/bin/python bench/fleet.py --nodes 200 --hosts 50 --seconds 60 [--daphnes 2]
        [--postgres postgres://postgres@127.0.0.1:5432] [--redis redis://127.0.0.1:6379/5]
        [--flush 10]

Starts ``--daphnes`` daphne processes serving the control plane (a fresh PostgreSQL
database made under ``--postgres`` and dropped at the end, or SQLite in a temp dir;
the Redis channel layer on ``--redis``, whose database is flushed at start and end,
or the in-memory layer with one daphne), then ``--nodes`` simulated proxy nodes speaking
the real agent protocol (``hello``, then a ``stats`` report of ``--hosts`` hosts every
second, about 600 bytes per host), spread evenly over the daphnes and over the second,
and one staff dashboard per daphne. Loopback only; bounded to 2,000 nodes and 600 s.

After ``--warmup`` seconds it measures for ``--seconds`` and prints, as text and as JSON
(``--json FILE``):

- reports sent/s, and reports taken/s and shed/s by the control plane (from its ticks);
- CPU of each daphne (percent of one core), of this load generator, and of the machine;
- daphne memory (RSS) at the start and the end of the measurement;
- with PostgreSQL: commits/s in the bench's database, rows inserted + updated/s in the
  rollup and node tables, and WAL bytes/s (the whole server's: other users count too);
- at each dashboard: ticks/s, tick delay (arrival minus the tick's time) p50/p95/max,
  ticks it was told it missed ("lagging"), and whether the delay grew over the run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import websockets  # noqa: E402

from proxycore import agentproto  # noqa: E402
from proxycore.stats import Stats  # noqa: E402

MAX_NODES = 2000
MAX_SECONDS = 600
TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")

SETUP_SCRIPT = """
from importlib import import_module
from django.conf import settings
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY, get_user_model
from proxyadmin.models import Host, Upstream
upstream = Upstream.objects.create(name="app")
Host.objects.bulk_create(Host(name=f"h{n}.example", upstream=upstream) for n in range(HOSTS))
user = get_user_model().objects.create_superuser("bench", "bench@example.com", "a long bench pass phrase")
session = import_module(settings.SESSION_ENGINE).SessionStore()
session[SESSION_KEY] = str(user.pk)
session[BACKEND_SESSION_KEY] = settings.AUTHENTICATION_BACKENDS[0]
session[HASH_SESSION_KEY] = user.get_session_auth_hash()
session.save()
print("SESSION=" + session.session_key)
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# -- services ---------------------------------------------------------------------


@contextlib.contextmanager
def postgres_database(base: str) -> Iterator[str]:
    import psycopg
    from psycopg import sql

    name = f"proxyadmin_fleet_{secrets.token_hex(4)}"
    with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@contextlib.contextmanager
def flushed_redis(url: str) -> Iterator[str]:
    import redis

    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()


class PgFigures:
    """Counters of the bench's PostgreSQL database, read at the start and end of the measurement."""

    def __init__(self, url: str) -> None:
        import psycopg

        self.conn = psycopg.connect(url, autocommit=True)

    def read(self) -> dict[str, int]:
        commits = self.conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()").fetchone()
        rows = self.conn.execute(
            "SELECT COALESCE(SUM(n_tup_ins + n_tup_upd), 0) FROM pg_stat_user_tables "
            "WHERE relname IN ('proxyadmin_trafficrollup', 'proxyadmin_proxynode')").fetchone()
        wal = self.conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()
        return {"commits": int(commits[0]), "rows": int(rows[0]), "wal": int(wal[0])}  # type: ignore[index]


# -- processes ------------------------------------------------------------------------


def cpu_seconds(pid: int | None = None) -> float:
    if pid is None:
        return time.process_time()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS_PER_SECOND


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return float(sum(values) - idle), float(sum(values))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def wait_for_port(port: int, timeout: float = 40) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"daphne on :{port} did not come up")


# -- the simulated fleet -------------------------------------------------------------------


@dataclass
class Fleet:
    sent: int = 0
    failed_links: int = 0
    reconnects: int = 0


def node_stats(hosts: int) -> Stats:
    stats = Stats()
    for n in range(hosts):
        host = stats.host(f"h{n}.example")
        host.active_connections = random.randint(0, 5)  # noqa: S311 (made-up traffic)
    stats.listener("https").tls_versions["TLSv1.3"] = 1
    return stats


def one_second_of_traffic(stats: Stats, rng: random.Random) -> None:
    for host in stats.hosts.values():
        requests = rng.randint(0, 20)
        host.requests += requests
        host.total_connections += requests // 4
        host.bytes_in += requests * 300
        host.bytes_out += requests * 5000
        for _ in range(min(requests, 3)):
            host.response(rng.choice((200, 200, 200, 304, 404, 502)))
            host.latency(rng.random() * 0.05)


async def run_node(
    name: str, url: str, token: str, hosts: int, phase: float, until: float, fleet: Fleet,
) -> None:
    rng = random.Random(name)  # noqa: S311 (made-up traffic)
    stats = node_stats(hosts)
    await asyncio.sleep(phase)
    while time.monotonic() < until:
        try:
            async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {token}"},
                                          max_size=1 << 20, open_timeout=20, ping_interval=None) as link:
                await link.send(json.dumps(agentproto.Hello(name, "bench", os.getpid(), 0).to_message()))
                reader = asyncio.create_task(drain(link))
                try:
                    next_at = time.monotonic()
                    while time.monotonic() < until:
                        one_second_of_traffic(stats, rng)
                        report = agentproto.StatsReport(name, time.time(), stats.as_dict())
                        await link.send(json.dumps(report.to_message()))
                        fleet.sent += 1
                        next_at += 1.0
                        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                finally:
                    reader.cancel()
            return
        except (OSError, websockets.WebSocketException, TimeoutError) as exc:
            fleet.failed_links += 1
            if fleet.failed_links <= 3:
                print(f"{name}: link failed: {exc!r}", file=sys.stderr)
            fleet.reconnects += 1
            await asyncio.sleep(1.0)


async def drain(link: Any) -> None:
    async for _ in link:  # config.changed, requests.watch: a real node would act on them
        pass


@dataclass
class Watcher:
    """One staff dashboard: when each tick arrives, against the tick's own time."""

    delays: list[tuple[float, float]] = field(default_factory=list)  # (arrival, delay)
    reports: int = 0
    shed: int = 0
    lagging: int = 0
    dropped: int = 0
    measuring: bool = False


async def watch(port: int, session: str, until: float, watcher: Watcher) -> None:
    headers = {"Cookie": f"sessionid={session}", "Origin": f"http://127.0.0.1:{port}"}
    async with websockets.connect(f"ws://127.0.0.1:{port}/ws/dashboard/", additional_headers=headers,
                                  max_size=64 << 20, ping_interval=None) as socket_:
        while time.monotonic() < until:
            try:
                async with asyncio.timeout(max(0.1, until - time.monotonic())):
                    raw = await socket_.recv()
            except TimeoutError:
                return
            message = json.loads(raw)
            now = time.time()
            if message.get("type") == "tick" and watcher.measuring:
                watcher.delays.append((now, now - float(message["time"])))
                watcher.reports += int(message.get("reports", 0))
                watcher.shed += int(message.get("shed", 0))
            elif message.get("type") == "lagging":
                watcher.lagging += 1 if message.get("lagging") else 0
                watcher.dropped += int(message.get("dropped", 0))


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def drive(args: argparse.Namespace, ports: list[int], token: str, session: str,
                pids: list[int], pg: PgFigures | None) -> dict[str, Any]:
    fleet = Fleet()
    start = time.monotonic()
    until = start + args.warmup + args.seconds
    watchers = [Watcher() for _ in ports]
    tasks = [asyncio.create_task(watch(port, session, until, w))
             for port, w in zip(ports, watchers, strict=True)]
    for n in range(args.nodes):
        port = ports[n % len(ports)]
        tasks.append(asyncio.create_task(run_node(
            f"sim-{n}", f"ws://127.0.0.1:{port}/ws/agent/", token, args.hosts, n / args.nodes, until, fleet)))
    await asyncio.sleep(args.warmup)
    for w in watchers:
        w.measuring = True
    sent0, failures0, cpu0 = fleet.sent, fleet.failed_links, [cpu_seconds(pid) for pid in pids]
    own0, (busy0, total0) = cpu_seconds(), machine_busy()
    rss0 = [rss_mb(pid) for pid in pids]
    db0 = pg.read() if pg else None
    t0 = time.monotonic()
    await asyncio.sleep(args.seconds)
    elapsed = time.monotonic() - t0
    sent = fleet.sent - sent0
    cpu = [(cpu_seconds(pid) - c) / elapsed * 100 for pid, c in zip(pids, cpu0, strict=True)]
    own = (cpu_seconds() - own0) / elapsed * 100
    busy1, total1 = machine_busy()
    rss1 = [rss_mb(pid) for pid in pids]
    db1 = pg.read() if pg else None
    for w in watchers:
        w.measuring = False
    await asyncio.gather(*tasks, return_exceptions=True)

    # Every dashboard sees every process's ticks (Redis); count the control plane's work once.
    first = watchers[0]
    delays = [d for _, d in first.delays]
    half = len(first.delays) // 2
    early = statistics.median([d for _, d in first.delays[:half]]) if half else float("nan")
    late = statistics.median([d for _, d in first.delays[half:]]) if half else float("nan")
    result: dict[str, Any] = {
        "nodes": args.nodes, "hosts": args.hosts, "seconds": round(elapsed, 1), "daphnes": len(ports),
        "flush_seconds": args.flush, "database": "postgresql" if pg else "sqlite",
        "channel_layer": "redis" if args.redis else "memory",
        "reports_sent_per_s": round(sent / elapsed, 1),
        "reports_taken_per_s": round(first.reports / elapsed, 1),
        "reports_shed_per_s": round(first.shed / elapsed, 1),
        "daphne_cpu_percent": [round(c, 1) for c in cpu],
        "loadgen_cpu_percent": round(own, 1),
        "machine_cpu_percent": round(
            (busy1 - busy0) / max(total1 - total0, 1.0) * 100 * (os.cpu_count() or 1), 1),
        "daphne_rss_mb": [[round(a), round(b)] for a, b in zip(rss0, rss1, strict=True)],
        "ticks_per_s_at_dashboard": round(len(delays) / elapsed, 2),
        "tick_delay_p50_s": round(quantile(delays, 0.5), 3),
        "tick_delay_p95_s": round(quantile(delays, 0.95), 3),
        "tick_delay_max_s": round(max(delays), 3) if delays else None,
        "tick_delay_median_first_half_s": round(early, 3),
        "tick_delay_median_second_half_s": round(late, 3),
        "dashboard_told_lagging": sum(w.lagging for w in watchers),
        "ticks_dropped_as_stale": sum(w.dropped for w in watchers),
        "link_failures_in_warmup": failures0,
        "link_failures_measured": fleet.failed_links - failures0,
    }
    if db0 and db1:
        result.update({
            "db_commits_per_s": round((db1["commits"] - db0["commits"]) / elapsed, 1),
            "db_rows_written_per_s": round((db1["rows"] - db0["rows"]) / elapsed, 1),
            "wal_kb_per_s_whole_server": round((db1["wal"] - db0["wal"]) / elapsed / 1024, 1),
        })
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--hosts", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--warmup", type=float, default=15)
    parser.add_argument("--daphnes", type=int, default=1)
    parser.add_argument("--flush", type=float, default=10.0, help="PROXYADMIN_ROLLUP_FLUSH_SECONDS")
    parser.add_argument("--postgres", default="", help="e.g. postgres://postgres@127.0.0.1:5432")
    parser.add_argument("--redis", default="", help="e.g. redis://127.0.0.1:6379/5 (flushed!)")
    parser.add_argument("--json", default="", help="also write the figures to this file")
    args = parser.parse_args()
    if not 1 <= args.nodes <= MAX_NODES or not 1 <= args.seconds + args.warmup <= MAX_SECONDS:
        raise SystemExit(f"at most {MAX_NODES} nodes and {MAX_SECONDS} s in all")
    if args.daphnes > 1 and not args.redis:
        raise SystemExit("several daphnes need --redis")

    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fleet-")))
        token = secrets.token_urlsafe(24)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PROXYADMIN_", "DATABASE_URL", "REDIS_URL"))}
        env.update(PROXYADMIN_VAR_DIR=str(tmp / "var"), PROXYADMIN_AGENT_TOKEN=token,
                   PROXYADMIN_ROLLUP_FLUSH_SECONDS=str(args.flush), PROXYADMIN_LOG_LEVEL="WARNING",
                   PROXYADMIN_PURE_PYTHON=os.environ.get("PROXYADMIN_PURE_PYTHON", "1"))
        database = stack.enter_context(postgres_database(args.postgres)) if args.postgres else ""
        if database:
            env["DATABASE_URL"] = database
        if args.redis:
            env["REDIS_URL"] = stack.enter_context(flushed_redis(args.redis))
        manage = [sys.executable, "manage.py"]
        subprocess.run([*manage, "migrate", "--verbosity", "0"], cwd=ROOT, env=env, check=True)
        out = subprocess.run([*manage, "shell", "-c", SETUP_SCRIPT.replace("HOSTS", str(args.hosts))],
                             cwd=ROOT, env=env, check=True, capture_output=True, text=True).stdout
        session = next(line.removeprefix("SESSION=") for line in out.splitlines()
                       if line.startswith("SESSION="))
        ports = [free_port() for _ in range(args.daphnes)]
        procs = []
        for n, port in enumerate(ports):
            log = open(tmp / f"daphne-{n}.log", "wb")  # noqa: SIM115 (closed with the stack)
            stack.callback(log.close)
            proc = subprocess.Popen([sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port),
                                     "proxyadmin.asgi:application"], cwd=ROOT, env=env, stdout=log,
                                    stderr=subprocess.STDOUT)
            stack.callback(stop, proc)
            procs.append(proc)
        for port in ports:
            wait_for_port(port)
        pg = PgFigures(database) if database else None
        result = asyncio.run(drive(args, ports, token, session, [p.pid for p in procs], pg))
        for n in range(len(ports)):
            tail = (tmp / f"daphne-{n}.log").read_text(errors="replace")
            if "Traceback" in tail:
                print(f"daphne-{n} logged a traceback:\n{tail[-3000:]}", file=sys.stderr)
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
