"""The servers under test and the shared backend: config files, processes, CPU time.

Every server listens on 127.0.0.1 on a free port, writes its config and logs into
the run's temp dir, and is started as a child process in the foreground so its
pid is known. ``Server.cpu_seconds()`` adds utime+stime from /proc/<pid>/stat of
the process and its children (nginx's master and workers).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.certs import CertFiles

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SMALL_BODY = b"x" * 127 + b"\n"  # 128 bytes
BULK_SIZE = 1024 * 1024
HSTS_VALUE = "max-age=31536000; includeSubDomains"
# Mozilla "intermediate" TLS 1.2 suites, as proxycore.tls uses them (TLS 1.3: OpenSSL's defaults).
INTERMEDIATE_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384", "DHE-RSA-CHACHA20-POLY1305",
))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            found.append(int(entry))
    return found


def _cpu_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)


@dataclass
class Server:
    name: str  # short key: nginx, haproxy, proxycore, ...
    label: str  # what the table shows
    port: int
    proc: subprocess.Popen[bytes]
    output: Path  # stdout and stderr go here (a file: a full pipe would stall the server)
    logs: list[Path] = field(default_factory=list)

    def pids(self) -> list[int]:
        return [self.proc.pid, *_children(self.proc.pid)]

    def cpu_seconds(self) -> float:
        return sum(_cpu_ticks(pid) for pid in self.pids()) / CLOCK_TICKS

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> str:
        """Stop the server (SIGTERM, then SIGKILL) and return what it printed."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.output.read_text("utf-8", "replace")


def _wait_listening(server: Server, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not server.alive():
            raise RuntimeError(f"{server.label} exited at start:\n{server.stop()}")
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", server.port)) == 0:
                return
        time.sleep(0.05)
    out = server.stop()
    raise RuntimeError(f"{server.label} did not listen on 127.0.0.1:{server.port}:\n{out}")


def _start(workdir: Path, name: str, label: str, port: int, argv: list[str],
           logs: list[Path] | None = None, env: dict[str, str] | None = None) -> Server:
    output = workdir / f"{name}.out"
    with output.open("wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                cwd=REPO, env=env)
    server = Server(name, label, port, proc, output, logs or [])
    _wait_listening(server)
    return server


# ---- nginx -----------------------------------------------------------------------


def _nginx_common(workdir: Path, name: str, workers: str) -> str:
    tmp = workdir / f"{name}-tmp"
    tmp.mkdir(exist_ok=True)
    temp_paths = "\n".join(
        f"    {kind}_temp_path {tmp / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""
worker_processes {workers};
daemon off;
pid {workdir / name}.pid;
error_log {workdir / name}-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
{temp_paths}
    default_type application/octet-stream;
    # Clients keep their connection for the whole run, as with the other proxies
    # (nginx's default closes it after 1000 requests).
    keepalive_requests 10000000;
    keepalive_timeout 75s;
"""


def start_backend(workdir: Path) -> Server:
    """The shared fast backend: nginx (1 worker) serving /small, /1m and /headers, plain HTTP."""
    port = free_port()
    www = workdir / "www"
    www.mkdir(exist_ok=True)
    (www / "small").write_bytes(SMALL_BODY)
    (www / "1m").write_bytes(os.urandom(BULK_SIZE))
    conf = workdir / "backend.conf"
    conf.write_text(_nginx_common(workdir, "backend", "1") + f"""
    sendfile on;
    tcp_nopush on;
    open_file_cache max=16;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {www};
        location = /nginx_status {{
            stub_status;
        }}
        location = /headers {{
            default_type text/plain;
            return 200
                "xff=$http_x_forwarded_for proto=$http_x_forwarded_proto host=$http_x_forwarded_host\\n";
        }}
    }}
}}
""")
    return _start(workdir, "backend", "backend nginx", port, ["nginx", "-p", str(workdir), "-c", str(conf),
                                                   "-e", str(workdir / "backend-error.log")])


def start_nginx(workdir: Path, certs: CertFiles, backend_port: int, workers: str = "1",
                resumption: bool = True, keepalive: int = 32) -> Server:
    name, port, argv = nginx_command(workdir, certs, backend_port, workers, resumption, keepalive)
    label = f"nginx (worker_processes {workers})"
    return _start(workdir, name, label, port, argv, logs=[workdir / f"{name}-error.log"])


def nginx_command(workdir: Path, certs: CertFiles, backend_port: int, workers: str = "1",
                  resumption: bool = True, keepalive: int = 32) -> tuple[str, int, list[str]]:
    """The TLS-terminating nginx's config, written: its name, port and command line."""
    name = ("nginx" if workers == "1" else f"nginx-{workers}") + ("" if resumption else "-full")
    sessions = ("ssl_session_cache shared:SSL:10m;\n        ssl_session_timeout 1d;" if resumption
                else "ssl_session_cache off;")
    port = free_port()
    conf = workdir / f"{name}.conf"
    conf.write_text(_nginx_common(workdir, name, workers) + f"""
    upstream backend {{
        server 127.0.0.1:{backend_port};
        keepalive {keepalive};
    }}
    server {{
        listen 127.0.0.1:{port} ssl backlog=4096;
        server_name localhost;
        ssl_certificate {certs.chain};
        ssl_certificate_key {certs.key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_ciphers {INTERMEDIATE_CIPHERS};
        ssl_prefer_server_ciphers off;
        {sessions}
        ssl_session_tickets off;
        add_header Strict-Transport-Security "{HSTS_VALUE}" always;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-Proto https;
            proxy_set_header X-Forwarded-Host $http_host;
            proxy_set_header Forwarded "for=$remote_addr;proto=https;host=\\"$http_host\\"";
            # Stream large responses through memory buffers, as the other proxies do,
            # rather than spooling them to a temp file.
            proxy_max_temp_file_size 0;
        }}
    }}
}}
""")
    error_log = workdir / f"{name}-error.log"
    return name, port, ["nginx", "-p", str(workdir), "-c", str(conf), "-e", str(error_log)]


def backend_accepts(backend: Server) -> int:
    """Connections the backend has accepted so far (its stub_status): upstream connection churn."""
    with socket.create_connection(("127.0.0.1", backend.port), timeout=5) as sock:
        sock.sendall(b"GET /nginx_status HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    # "Active connections: N \nserver accepts handled requests\n A H R \n..."
    numbers = data.partition(b"\r\n\r\n")[2].split(b"\n")[2].split()
    return int(numbers[0])


def nginx_version() -> str:
    out = subprocess.run(["nginx", "-v"], capture_output=True, text=True, check=False)
    return (out.stderr or out.stdout).strip().removeprefix("nginx version: ")


# ---- HAProxy ---------------------------------------------------------------------


def start_haproxy(workdir: Path, certs: CertFiles, backend_port: int, resumption: bool = True,
                  threads: int = 1) -> Server:
    port = free_port()
    name = ("haproxy" if resumption else "haproxy-full") + ("" if threads == 1 else f"-{threads}")
    conf = workdir / f"{name}.cfg"
    cache = "" if resumption else "\n    tune.ssl.cachesize 0"
    conf.write_text(f"""
global
    nbthread {threads}
    maxconn 8000
    ssl-default-bind-ciphers {INTERMEDIATE_CIPHERS}
    ssl-default-bind-options ssl-min-ver TLSv1.2 no-tls-tickets prefer-client-ciphers
    tune.ssl.default-dh-param 2048{cache}

defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 75s
    option http-keep-alive
    # Like nginx's upstream keepalive: any idle server connection serves any request
    # (the default, safe, gives each client connection's first request a new one).
    http-reuse always

frontend tls
    bind 127.0.0.1:{port} ssl crt {certs.combined} alpn http/1.1
    http-request set-header X-Forwarded-For %[src]
    http-request set-header X-Forwarded-Proto https
    http-request set-header X-Forwarded-Host %[req.hdr(host)]
    http-request set-header Forwarded "for=%[src];proto=https;host=\\"%[req.hdr(host)]\\""
    http-response set-header Strict-Transport-Security "{HSTS_VALUE}"
    default_backend backend

backend backend
    server b1 127.0.0.1:{backend_port}
""")
    return _start(workdir, name, f"HAProxy (nbthread {threads})", port, ["haproxy", "-db", "-f", str(conf)])


def haproxy_version() -> str:
    out = subprocess.run(["haproxy", "-v"], capture_output=True, text=True, check=False)
    first = out.stdout.splitlines()[0] if out.stdout else ""
    return first.removeprefix("HAProxy version ").split(" ")[0]


# ---- Caddy --------------------------------------------------------------------------


def start_caddy(workdir: Path, certs: CertFiles, backend_port: int, procs: int = 1) -> Server:
    """Debian's Caddy as a TLS terminator, one OS thread for Go code (GOMAXPROCS=1), like the
    other one-core contenders; HTTP/1.1 only, no access log (Caddy logs none unless asked),
    HSTS added, X-Forwarded-* set by Caddy itself. No full-handshake variant: Caddy's
    Caddyfile cannot turn its session tickets off."""
    port = free_port()
    name = "caddy" if procs == 1 else f"caddy-{procs}"
    conf = workdir / f"Caddyfile-{procs}"
    conf.write_text(f"""
{{
    admin off
    auto_https off
    servers {{
        protocols h1
    }}
}}
https://localhost:{port} {{
    bind 127.0.0.1
    tls {certs.chain} {certs.key}
    header Strict-Transport-Security "{HSTS_VALUE}"
    reverse_proxy 127.0.0.1:{backend_port} {{
        header_up X-Forwarded-Host {{host}}
    }}
}}
""")
    env = os.environ | {"GOMAXPROCS": str(procs), "XDG_DATA_HOME": str(workdir / f"{name}-data"),
                        "XDG_CONFIG_HOME": str(workdir / f"{name}-config")}
    return _start(workdir, name, f"Caddy (GOMAXPROCS={procs})", port,
                  ["caddy", "run", "--config", str(conf), "--adapter", "caddyfile"], env=env)


def caddy_version() -> str:
    out = subprocess.run(["caddy", "version"], capture_output=True, text=True, check=False)
    return out.stdout.split(" ")[0].strip() if out.stdout else ""


# ---- proxycore -------------------------------------------------------------------


def start_proxycore(workdir: Path, certs: CertFiles, backend_port: int, access_log: bool,
                    resumption: bool = True, workers: int = 1) -> Server:
    name, port, argv, logs = proxycore_command(workdir, certs, backend_port, access_log, resumption, workers)
    label = "proxycore (access log on)" if access_log else "proxycore (access log off)"
    label += "" if workers == 1 else f", {workers} workers"
    return _start(workdir, name, label, port, argv, logs=logs)


def proxycore_command(workdir: Path, certs: CertFiles, backend_port: int, access_log: bool,
                      resumption: bool = True, workers: int = 1) -> tuple[str, int, list[str], list[Path]]:
    """bench/launch_proxycore.py's command line: the node's name, port, argv and log files."""
    port = free_port()
    name = ("proxycore" if access_log else "proxycore-nolog") + ("" if resumption else "-full")
    name += "" if workers == 1 else f"-w{workers}"
    argv = [sys.executable, str(BENCH_DIR / "launch_proxycore.py"), "--cert", str(certs.chain),
            "--key", str(certs.key), "--https-port", str(port), "--backend-port", str(backend_port)]
    if not resumption:
        argv.append("--no-resumption")
    if workers != 1:
        argv += ["--workers", str(workers)]
    logs = []
    if access_log:
        log = workdir / f"{name}-access.log"
        argv += ["--access-log", str(log)]
        logs.append(log)
    return name, port, argv, logs
