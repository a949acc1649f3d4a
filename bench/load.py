"""Loads: wrk runs against one server, with the server's CPU time over the same interval."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.servers import BENCH_DIR, CLOCK_TICKS, Server, backend_accepts

SUMMARY_LUA = BENCH_DIR / "summary.lua"


@dataclass(frozen=True)
class Load:
    key: str  # keepalive, close, bulk
    title: str
    path: str
    connections: int
    close: bool = False  # "Connection: close": one TLS connection per request
    threads: int = 1  # wrk threads: 1 beside a one-core server, 2 for the scaling runs


LOADS = (
    Load("keepalive", "keep-alive req/s (128 B body)", "/small", 50),
    Load("close", "new TLS conn/s (Connection: close)", "/small", 50, close=True),
    Load("bulk", "bulk MB/s (1 MiB body)", "/1m", 10),
)
# --scaling: the servers get both cores, and wrk two threads to load them.
SCALING_LOADS = tuple(Load(ld.key, ld.title, ld.path, ld.connections * 2 if not ld.close else ld.connections,
                           ld.close, threads=2) for ld in LOADS)


@dataclass
class Result:
    requests: int
    seconds: float  # wrk's own measured duration
    bytes: int
    errors: dict[str, int]
    non_2xx: int
    latency_p50_ms: float
    latency_p99_ms: float
    server_cpu_seconds: float
    wrk_cpu_seconds: float
    backend_cpu_seconds: float
    # Machine-wide CPU used by everything else (other processes on the box) and stolen by
    # the hypervisor over the run: the noise gauge.
    other_cpu_seconds: float
    steal_seconds: float
    upstream_connections: int  # connections the backend accepted during the run
    wrk_command: str
    wrk_output: str

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def megabytes_per_second(self) -> float:
        return self.bytes / self.seconds / 1e6 if self.seconds else 0.0

    @property
    def cpu_us_per_request(self) -> float:
        return self.server_cpu_seconds / self.requests * 1e6 if self.requests else 0.0

    def as_dict(self) -> dict[str, object]:
        data = asdict(self)
        data |= {"per_second": self.per_second, "megabytes_per_second": self.megabytes_per_second,
                 "cpu_us_per_request": self.cpu_us_per_request,
                 "server_cpu_utilisation": self.server_cpu_seconds / self.seconds if self.seconds else 0}
        return data


def wrk_argv(server: Server, load: Load, duration: float) -> list[str]:
    argv = ["wrk", f"-t{load.threads}", f"-c{load.connections}", f"-d{duration:g}s", "--timeout", "5s",
            "-s", str(SUMMARY_LUA)]
    if load.close:
        argv += ["-H", "Connection: close"]
    return [*argv, f"https://localhost:{server.port}{load.path}"]


def machine_cpu() -> tuple[float, float]:
    """Seconds of busy CPU (all cores, steal excluded) and of steal, since boot (/proc/stat)."""
    with open("/proc/stat") as stat:
        ticks = [int(v) for v in stat.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks[:8]
    return (user + nice + system + irq + softirq) / CLOCK_TICKS, steal / CLOCK_TICKS


def run_wrk(server: Server, load: Load, duration: float, backend: Server) -> Result:
    argv = wrk_argv(server, load, duration)
    busy_before, steal_before = machine_cpu()
    backend_before = backend.cpu_seconds()
    accepts_before = backend_accepts(backend)
    cpu_before = server.cpu_seconds()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    output = proc.stdout.read().decode("utf-8", "replace")
    _, status, rusage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    cpu_after = server.cpu_seconds()
    backend_cpu = backend.cpu_seconds() - backend_before
    busy_after, steal_after = machine_cpu()
    accepts = backend_accepts(backend) - accepts_before - 1  # less our own status request
    wrk_cpu = rusage.ru_utime + rusage.ru_stime
    match = re.search(r"^BENCH (\{.*\})$", output, re.MULTILINE)
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed (exit {proc.returncode}): {' '.join(argv)}\n{output}")
    summary = json.loads(match.group(1))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return Result(
        requests=summary["requests"],
        seconds=summary["duration_us"] / 1e6,
        bytes=summary["bytes"],
        errors={k: summary[k] for k in ("connect_errors", "read_errors", "write_errors",
                                        "status_errors", "timeouts")},
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        latency_p50_ms=summary["latency_p50_us"] / 1000,
        latency_p99_ms=summary["latency_p99_us"] / 1000,
        server_cpu_seconds=cpu_after - cpu_before,
        wrk_cpu_seconds=wrk_cpu,
        backend_cpu_seconds=backend_cpu,
        other_cpu_seconds=max(
            0.0, busy_after - busy_before - (cpu_after - cpu_before) - wrk_cpu - backend_cpu
        ),
        steal_seconds=steal_after - steal_before,
        upstream_connections=accepts,
        wrk_command=" ".join(argv),
        wrk_output=output.split("BENCH {")[0].rstrip(),
    )


def warm_up(server: Server, load: Load, seconds: float) -> None:
    if seconds > 0:
        subprocess.run(wrk_argv(server, load, seconds), capture_output=True, check=False)
        time.sleep(0.2)


def client_bound(result: Result) -> bool:
    """wrk's one thread was (nearly) saturated: the rate is partly the client's limit."""
    return result.wrk_cpu_seconds >= 0.9 * result.seconds


def noisy(result: Result) -> bool:
    """Other processes or the hypervisor took a noticeable share of the machine."""
    return result.other_cpu_seconds + result.steal_seconds >= 0.15 * result.seconds


def has_errors(result: Result) -> bool:
    return result.non_2xx > 0 or any(result.errors.values())


def describe_errors(result: Result) -> str:
    parts = [f"{k}={v}" for k, v in result.errors.items() if v]
    if result.non_2xx:
        parts.append(f"non-2xx/3xx={result.non_2xx}")
    return ", ".join(parts)


def result_path(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return directory / "latest.json"
