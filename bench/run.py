"""Benchmark proxycore against nginx and HAProxy as TLS terminators on 127.0.0.1.

    .venv/bin/python bench/run.py            # about 4-5 minutes; see bench/README.md

Every contender terminates TLS with the same ECDSA P-256 certificate, adds HSTS and
X-Forwarded-*, and forwards over pooled keep-alive connections to the same backend
(nginx serving static files on another loopback port). One contender runs at a time;
wrk runs with one thread, so on a 2-core machine the proxy under test has the other
core. Results: a table on stdout and bench/results/latest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import check, load, servers, tools
from bench.certs import CertFiles, make_certificates
from bench.load import LOADS, SCALING_LOADS, Load, Result
from bench.servers import Server
from proxycore import compiled

FULL = Load("full", "new TLS conn/s, full handshakes", "/small", 50, close=True)
RESULTS_DIR = servers.BENCH_DIR / "results"


@dataclass(frozen=True)
class Contender:
    key: str
    column: str
    start: Callable[[Path, CertFiles, int], Server]
    loads: tuple[Load, ...]
    resumption: bool = True


def contenders(args: argparse.Namespace, haproxy: bool, caddy: bool = False) -> list[Contender]:
    def nginx(workers: str, resumption: bool = True) -> Callable[[Path, CertFiles, int], Server]:
        return lambda d, c, b: servers.start_nginx(d, c, b, workers, resumption, args.nginx_keepalive)

    def proxy(log: bool, resumption: bool = True) -> Callable[[Path, CertFiles, int], Server]:
        return lambda d, c, b: servers.start_proxycore(d, c, b, log, resumption)

    def hap(resumption: bool = True) -> Callable[[Path, CertFiles, int], Server]:
        return lambda d, c, b: servers.start_haproxy(d, c, b, resumption)

    found = [Contender("nginx", "nginx w1", nginx("1"), LOADS)]
    if haproxy:
        found.append(Contender("haproxy", "haproxy", hap(), LOADS))
    if caddy:
        found.append(Contender("caddy", "caddy", servers.start_caddy, LOADS))
    found += [Contender("proxy", "proxy+log", proxy(True), LOADS),
              Contender("proxy-nolog", "proxy-nolog", proxy(False), LOADS)]
    if not args.no_nginx_auto:
        found.append(Contender("nginx-auto", "nginx auto", nginx("auto"), LOADS))
    if not args.no_full_handshakes:
        found.append(Contender("nginx", "", nginx("1", False), (FULL,), resumption=False))
        if haproxy:
            found.append(Contender("haproxy", "", hap(False), (FULL,), resumption=False))
        found += [Contender("proxy", "", proxy(True, False), (FULL,), resumption=False),
                  Contender("proxy-nolog", "", proxy(False, False), (FULL,), resumption=False)]
    if args.only:
        found = [c for c in found if c.key in args.only]
    return found


def scaling_contenders(haproxy: bool, caddy: bool) -> list[Contender]:
    """--scaling: every server gets both cores (2 nginx workers, 2 HAProxy threads, Caddy with
    GOMAXPROCS=2) and proxycore runs with 1 and with 2 worker processes, access log on."""
    loads = SCALING_LOADS
    found = [Contender("nginx-2", "nginx w2",
                       lambda d, c, b: servers.start_nginx(d, c, b, "2", True, 32), loads)]
    if haproxy:
        found.append(Contender("haproxy-2", "haproxy t2",
                               lambda d, c, b: servers.start_haproxy(d, c, b, True, threads=2), loads))
    if caddy:
        found.append(Contender("caddy-2", "caddy p2", lambda d, c, b: servers.start_caddy(d, c, b, procs=2),
                               loads))
    found += [Contender("proxy-w1", "proxy w1",
                        lambda d, c, b: servers.start_proxycore(d, c, b, True), loads),
              Contender("proxy-w2", "proxy w2",
                        lambda d, c, b: servers.start_proxycore(d, c, b, True, workers=2), loads)]
    return found


def check_environment() -> None:
    addresses = [a[4][0] for a in socket.getaddrinfo("localhost", 443, type=socket.SOCK_STREAM)]
    if not addresses or addresses[0] != "127.0.0.1":
        raise SystemExit(f"bench: 'localhost' must resolve to 127.0.0.1 first (wrk connects to it "
                         f"and sends it as SNI); it resolves to {addresses}")
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def wait_for_quiet(limit: float) -> float:
    """Wait (up to ``limit`` s) until other processes use under 30% of a core; return their share."""
    end = time.monotonic() + limit
    announced = False
    while True:
        busy, steal = load.machine_cpu()
        time.sleep(1.0)
        busy2, steal2 = load.machine_cpu()
        share = busy2 - busy + steal2 - steal
        if share < 0.3 or time.monotonic() >= end:
            return share
        if not announced:
            print(f"bench: the machine is busy ({share:.0%} of a core used by other processes); "
                  f"waiting up to {limit:g} s for it to calm down", flush=True)
            announced = True


def machine() -> dict[str, object]:
    return {
        "cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION, "nginx": servers.nginx_version(),
        "haproxy": servers.haproxy_version() if shutil.which("haproxy") else None,
        "caddy": servers.caddy_version() if shutil.which("caddy") else None,
    }


@dataclass
class Running:
    contender: Contender
    server: Server
    entry: dict[str, object]
    runs: dict[str, list[Result]]
    deaths: list[str] = field(default_factory=list)  # output of instances that exited mid-run

    @property
    def key(self) -> str:
        return self.contender.key if self.contender.resumption else f"{self.contender.key}/full"

    def best(self, load_key: str) -> Result | None:
        """The least disturbed of the rounds: the highest rate (its CPU figures come with it).

        Runs with errors count only when every round had some.
        """
        runs = self.runs.get(load_key) or []
        clean = [r for r in runs if not load.has_errors(r)] or runs
        return max(clean, key=lambda r: r.requests / r.seconds if r.seconds else 0) if clean else None


def start_contender(c: Contender, workdir: Path, certs: CertFiles, backend: Server) -> Running:
    server = c.start(workdir, certs, backend.port)
    running = Running(c, server, {"label": server.label, "resumption": c.resumption}, {})
    try:
        running.entry["tls"] = check.check_server(server, certs)
        running.entry["resumes_sessions"] = resumes = check.resumes_sessions(server, certs)
    except BaseException:
        print(f"  !! {server.label} failed the correctness check; it printed:\n{server.stop()[-4000:]}")
        raise
    print(f"  {server.label}{'' if c.resumption else ', no session resumption'}: correct "
          f"({running.entry['tls']}, session resumption {'on' if resumes else 'off'})", flush=True)
    return running


def restart(running: Running, workdir: Path, certs: CertFiles, backend: Server) -> None:
    """The server exited between runs: keep what it printed, start a new one, check it again."""
    output = running.server.stop()
    running.deaths.append(output[-4000:])
    print(f"  !! {running.server.label} ({running.key}) exited between runs (exit status "
          f"{running.server.proc.returncode}); it printed:\n{output[-2000:]}\n  restarting it", flush=True)
    fresh = start_contender(running.contender, workdir, certs, backend)
    running.server = fresh.server


def measure(running: Running, ld: Load, args: argparse.Namespace, backend: Server,
            workdir: Path, certs: CertFiles) -> Result | None:
    if not running.server.alive():
        restart(running, workdir, certs, backend)
    server = running.server
    load.warm_up(server, ld, args.warmup)
    result = load.run_wrk(server, ld, args.duration, backend)
    running.runs.setdefault(ld.key, []).append(result)
    line = (f"    {running.key:18} {ld.key:9} {result.per_second:8.0f} req/s "
            f"{result.megabytes_per_second:7.1f} MB/s  cpu {result.server_cpu_seconds / result.seconds:4.0%} "
            f"{result.cpu_us_per_request:6.0f} us/req | wrk {result.wrk_cpu_seconds / result.seconds:4.0%} "
            f"backend {result.backend_cpu_seconds / result.seconds:4.0%} "
            f"others {(result.other_cpu_seconds + result.steal_seconds) / result.seconds:4.0%} | "
            f"{result.upstream_connections} new upstream conns")
    if load.has_errors(result):
        line += f"  ERRORS: {load.describe_errors(result)}"
    print(line, flush=True)
    return result


def stop_contender(running: Running, report: dict[str, object]) -> None:
    server, entry = running.server, running.entry
    alive = server.alive()
    output = server.stop()
    entry["output_tail"] = output[-4000:]
    entry["exited_during_run"] = not alive or bool(running.deaths)
    entry["earlier_instances_output"] = running.deaths
    if "Traceback" in output or not alive:
        what = "exited during the run; it printed" if not alive else "printed"
        print(f"  !! {server.label} {what}:\n{output[-4000:]}", flush=True)
    stats = [ln for ln in output.splitlines() if ln.startswith("stats ")]
    if stats:
        entry["proxy_stats"] = _proxy_stats_summary(json.loads(stats[-1][6:]))
    entry["loads"] = {k: [r.as_dict() for r in runs] for k, runs in running.runs.items()}
    entry["best"] = {k: best.as_dict() for k in running.runs if (best := running.best(k)) is not None}
    servers_report = report.setdefault("servers", {})
    assert isinstance(servers_report, dict)
    servers_report[running.key] = entry


def _proxy_stats_summary(stats: dict[str, object]) -> dict[str, object]:
    """The parts of the node's own counters that show trouble."""
    hosts = stats.get("hosts", {})
    summary: dict[str, object] = {}
    if isinstance(hosts, dict):
        for name, host in hosts.items():
            summary[name] = {k: host.get(k) for k in ("requests", "responses", "handshakes_ok",
                                                      "handshakes_failed", "upstream_errors")}
    return summary


# ---- the table ------------------------------------------------------------------------

ROWS = (
    ("keepalive", "per_second", "keep-alive req/s", "{:.0f}"),
    ("keepalive", "cpu_us_per_request", "  CPU us/request", "{:.0f}"),
    ("close", "per_second", "new TLS conn/s (resumed)", "{:.0f}"),
    ("close", "cpu_us_per_request", "  CPU us/connection", "{:.0f}"),
    ("full", "per_second", "new TLS conn/s (full hs)", "{:.0f}"),
    ("full", "cpu_us_per_request", "  CPU us/connection", "{:.0f}"),
    ("bulk", "megabytes_per_second", "bulk MB/s (1 MiB body)", "{:.1f}"),
    ("bulk", "cpu_us_per_request", "  CPU us/response", "{:.0f}"),
)
RATIOS = (("proxy", "nginx"), ("proxy-nolog", "nginx"), ("proxy", "haproxy"), ("proxy-nolog", "haproxy"),
          ("proxy", "caddy"), ("proxy-nolog", "caddy"),
          ("proxy-w2", "nginx-2"), ("proxy-w2", "haproxy-2"), ("proxy-w2", "caddy-2"),
          ("proxy-w2", "proxy-w1"))
SHORT = {"proxy": "log", "proxy-nolog": "nolog", "nginx": "nginx", "haproxy": "hap", "caddy": "caddy",
         "proxy-w1": "w1", "proxy-w2": "w2", "nginx-2": "nginx2", "haproxy-2": "hap2", "caddy-2": "caddy2"}


def metric(all_results: dict[str, dict[str, Result]], key: str, load_key: str, attr: str) -> float | None:
    result = all_results.get(key, {}).get(load_key)
    return None if result is None else float(getattr(result, attr))


def cell(all_results: dict[str, dict[str, Result]], key: str, load_key: str, attr: str, fmt: str) -> str:
    result = all_results.get(key, {}).get(load_key)
    if result is None:
        return "-"
    flags = ("*" if load.client_bound(result) else "") + ("~" if load.noisy(result) else "")
    flags += "!" if load.has_errors(result) else ""
    return fmt.format(getattr(result, attr)) + flags


def table(all_results: dict[str, dict[str, Result]], columns: list[tuple[str, str]]) -> tuple[str, dict]:
    ratio_cols = [(a, b) for a, b in RATIOS if a in all_results and b in all_results]
    head = f"{'':26}" + "".join(f"{name:>12}" for _, name in columns)
    head += "".join(f"{SHORT[a] + '/' + SHORT[b]:>12}" for a, b in ratio_cols)
    lines = [head, "-" * len(head)]
    ratios: dict[str, dict[str, float]] = {}
    for load_key, attr, title, fmt in ROWS:
        if all(metric(all_results, key, load_key, attr) is None for key, _ in columns):
            continue
        line = f"{title:26}" + "".join(
            f"{cell(all_results, key, load_key, attr, fmt):>12}" for key, _ in columns
        )
        for a, b in ratio_cols:
            va, vb = metric(all_results, a, load_key, attr), metric(all_results, b, load_key, attr)
            if va is None or not vb:
                line += f"{'-':>12}"
                continue
            ratios.setdefault(f"{a}/{b}", {})[f"{load_key}.{attr}"] = round(va / vb, 3)
            line += f"{va / vb:>11.2f}x"
        lines.append(line)
    return "\n".join(lines), ratios


def main() -> None:
    parser = argparse.ArgumentParser(
        description="proxycore vs nginx vs HAProxy, TLS termination on 127.0.0.1")
    parser.add_argument("--duration", type=float, default=6, help="seconds per measured wrk run (6)")
    parser.add_argument("--warmup", type=float, default=1, help="seconds of unmeasured wrk before each (1)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="measure every (server, load) this many times; the table shows the best (2)")
    parser.add_argument("--nginx-keepalive", type=int, default=32,
                        help="idle upstream connections nginx keeps (32; proxycore keeps what its load used)")
    parser.add_argument("--no-haproxy", action="store_true", help="leave HAProxy out")
    parser.add_argument("--no-caddy", action="store_true", help="leave Caddy out")
    parser.add_argument("--no-nginx-auto", action="store_true", help="skip nginx with worker_processes auto")
    parser.add_argument("--no-full-handshakes", action="store_true",
                        help="skip the runs with session resumption off")
    parser.add_argument("--only", nargs="+",
                        choices=["nginx", "haproxy", "caddy", "proxy", "proxy-nolog", "nginx-auto"])
    parser.add_argument("--scaling", action="store_true",
                        help="both cores for every server: nginx w2, HAProxy t2, Caddy p2, proxycore "
                             "with 1 and 2 workers; wrk -t2")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "latest.json")
    parser.add_argument("--keep-workdir", action="store_true",
                        help="keep the temp dir (configs, certificates, logs) for inspection")
    parser.add_argument("--wait-quiet", type=float, default=60,
                        help="wait up to this many seconds for other processes to go idle first (60)")
    args = parser.parse_args()
    command = "python bench/run.py" + ("" if len(sys.argv) == 1 else " " + shlex.join(sys.argv[1:]))

    notes = tools.ensure_tools(want_haproxy=not args.no_haproxy, want_caddy=not args.no_caddy)
    haproxy = not args.no_haproxy and shutil.which("haproxy") is not None
    caddy = not args.no_caddy and shutil.which("caddy") is not None
    check_environment()
    background = wait_for_quiet(args.wait_quiet)
    started = time.monotonic()
    report: dict[str, object] = {
        "command": command, "machine": machine(), "notes": notes, "core": compiled.state(),
        "background_cpu_at_start": round(background, 2),
        "settings": {"duration_s": args.duration, "warmup_s": args.warmup, "rounds": args.rounds,
                     "wrk_threads": 2 if args.scaling else 1, "scaling": args.scaling,
                     "nginx_upstream_keepalive": args.nginx_keepalive,
                     "loads": {ld.key: {"path": ld.path, "connections": ld.connections, "close": ld.close}
                               for ld in (*LOADS, FULL)}},
    }
    all_results: dict[str, dict[str, Result]] = {}
    workdir = Path(tempfile.mkdtemp(prefix="proxyadmin-bench-"))
    workdir.chmod(0o755)  # nginx workers (not root) read the static files under it
    print(f"bench: proxycore's sans-I/O core runs {compiled.state()} (setup.py, mypyc)")
    print(f"bench: work dir {workdir}; {os.cpu_count()} CPUs; wrk -t1; {args.rounds} rounds of "
          f"{args.duration:g} s runs, each after {args.warmup:g} s warm-up", flush=True)
    certs = make_certificates(workdir)
    backend = servers.start_backend(workdir)
    columns: list[tuple[str, str]] = []
    errors: list[str] = []
    started_servers: list[Running] = []
    try:
        chosen = scaling_contenders(haproxy, caddy) if args.scaling else contenders(args, haproxy, caddy)
        loads_run = SCALING_LOADS if args.scaling else (*LOADS, FULL)
        for c in chosen:
            try:
                started_servers.append(start_contender(c, workdir, certs, backend))
            except (RuntimeError, AssertionError, OSError) as exc:
                errors.append(f"{c.key}{'' if c.resumption else '/full'}: {exc}")
                print(f"  !! {c.key}: {exc}", flush=True)
        # Every server is up (idle ones cost nothing); each load visits them back to back,
        # round after round, so that background noise falls on all of them alike.
        for round_no in range(1, args.rounds + 1):
            print(f"round {round_no}/{args.rounds}", flush=True)
            for ld in loads_run:
                for running in started_servers:
                    if ld in running.contender.loads:
                        measure(running, ld, args, backend, workdir, certs)
    finally:
        for running in started_servers:
            stop_contender(running, report)
        backend.stop()
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    for running in started_servers:
        c = running.contender
        if c.column:
            columns.append((c.key, c.column))
        if running.entry["exited_during_run"]:
            outputs = [*running.deaths, str(running.entry["output_tail"])]
            how = ("a Traceback in its output" if any("Traceback" in o for o in outputs) else
                   "it printed its final stats, i.e. it was stopped by a SIGTERM/SIGINT that the bench "
                   "did not send" if any("\nstats " in o or o.startswith("stats ") for o in running.deaths)
                   else "see its output in the JSON")
            errors.append(f"{running.key}: the server exited during the run "
                          f"({len(running.deaths)} restart(s); {how})")
        for ld_key in running.runs:
            best = running.best(ld_key)
            assert best is not None
            all_results.setdefault(c.key, {})[ld_key] = best
        for ld_key, runs in running.runs.items():
            for r in runs:
                if load.has_errors(r):
                    errors.append(f"{running.key} {ld_key}: {load.describe_errors(r)}\n"
                                  f"      {r.wrk_command}\n{r.wrk_output}")
    text, ratios = table(all_results, columns)
    report["table"] = text.splitlines()
    report["ratios"] = ratios
    report["errors"] = errors
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")

    print()
    print(text)
    print()
    if args.scaling:
        print("--scaling: nginx worker_processes 2, HAProxy nbthread 2, Caddy GOMAXPROCS=2, proxycore")
        print("with 1 and 2 worker processes (access log on); wrk -t2 and twice the keep-alive clients.")
        print("With 2 cores shared by wrk, the backend and the server, the client is part of the")
        print("bottleneck: w2/w1 is the node's scaling on this machine, not the code's ceiling.")
    else:
        print("nginx w1: worker_processes 1, the same one-process budget as proxycore (one event loop);")
        print("nginx auto: worker_processes auto (2 here), for reference; haproxy: nbthread 1,")
        print("http-reuse always; caddy: GOMAXPROCS=1, no access log, no full-handshake run (its")
        print("Caddyfile cannot turn session tickets off).")
    print(f"nginx upstream keepalive {args.nginx_keepalive}: with 50 clients it opens new upstream")
    print("connections (see 'new upstream conns' above); proxycore keeps as many idle ones as were")
    print("in use at once in the last 30-60 s (64 to 1,024).")
    print("wrk: 1 thread (the other core is the proxy's); 'resumed' rows: wrk resumes TLS sessions;")
    print("'full hs' rows: the servers issue no tickets and keep no session cache.")
    print("CPU = utime+stime of the server's processes (/proc/<pid>/stat) over the run / requests.")
    print(f"Each cell: the best (highest-rate) of {args.rounds} rounds, with that run's CPU figure.")
    print("Ratios are proxy/other: above 1 is better for rates, worse for CPU per request.")
    print("Flags: * wrk's one thread was >= 90% busy (client-bound: compare CPU/request instead);")
    print("       ~ other processes + hypervisor steal took >= 15% of a core during the run (noisy);")
    print("       ! errors (see below).")
    for note in notes:
        print(f"note: {note}")
    if errors:
        print("\nERRORS under load:")
        for e in errors:
            print(f"  {e}")
    print(f"\nreproduce: {command}    (took {report['elapsed_s']} s; JSON: {args.out})")
    if args.keep_workdir:
        print(f"work dir kept: {workdir}")


if __name__ == "__main__":
    main()
