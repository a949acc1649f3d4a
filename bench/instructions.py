"""Instructions per TLS connection and per keep-alive request: proxycore beside nginx.

    python bench/instructions.py                 # about 2 minutes
    python bench/instructions.py --connections 300 --requests 3000 --only proxycore nginx

Times on this shared 2-core machine move by 10-30 % from one run to the next (other
tenants, CPU frequency); instruction counts do not. Each server runs under valgrind's
callgrind with instrumentation off; after a warm-up, this process (not instrumented)
turns it on, makes ``--connections`` resumed TLS 1.3 connections one after another
(one ``GET /small`` each, ``Connection: close``), dumps the counts, then sends
``--requests`` keep-alive requests one after another on one connection, dumps
again, then ``--bulk`` requests for a 1 MiB body on that connection, and dumps a
third time. Per server it prints:

- instructions per connection, and how many of them are OpenSSL's handshake
  (``SSL_do_handshake``, inclusive): the handshake is the same library's work in
  every server, the rest is the server's own per-connection and per-request work;
- instructions per keep-alive request;
- instructions per 1 MiB response, and how many of them are libcrypto's own (the
  record encryption, mostly).

What the counts do not show: how fast the instructions run. Interpreted Python
runs at a lower rate per cycle than nginx's C or OpenSSL's assembly, and valgrind's
simulated CPU makes OpenSSL take portable code paths (no AVX-512), so compare the
non-handshake counts between servers, and use bench/run.py for rates and CPU time.
Same backend (nginx, /small = 128 bytes) and certificate as bench/run.py.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.certs import CertFiles, make_certificates
from bench.servers import nginx_command, proxycore_command, start_backend

WARM_CONNECTIONS = 50
WARM_REQUESTS = 200
STARTUP_TIMEOUT = 120.0  # valgrind starts Python slowly
IO_TIMEOUT = 60.0


@dataclass
class Counts:
    per_connection: float
    handshake: float  # of which SSL_do_handshake
    per_request: float
    per_bulk: float  # per 1 MiB response
    bulk_crypto: float  # of which libcrypto (the record encryption, mostly)


def total(dump: Path) -> int:
    match = re.search(r"^totals:\s+(\d+)", dump.read_text("utf-8", "replace"), re.M)
    if match is None:
        raise RuntimeError(f"no totals in {dump}")
    return int(match.group(1))


def inclusive(dump: Path, function: str) -> int:
    """The inclusive count of ``function`` in a callgrind dump (0 if it never ran)."""
    out = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", str(dump)],
                         capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if f":{function} [" in line:  # the first is the largest: the output is sorted
            return int(line.split()[0].replace(",", ""))
    return 0


class Client:
    """Sequential HTTPS requests to 127.0.0.1:port, SNI localhost, TLS sessions resumed."""

    def __init__(self, port: int, certs: CertFiles) -> None:
        self.port = port
        self.context = ssl.create_default_context(cafile=str(certs.ca))
        self.session: ssl.SSLSession | None = None

    def _connect(self) -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=IO_TIMEOUT)
        conn = self.context.wrap_socket(raw, server_hostname="localhost", session=self.session)
        self.session = conn.session
        return conn

    def one_connection(self) -> None:
        """One TLS connection, one request with Connection: close, read to the end."""
        with self._connect() as conn:
            conn.sendall(b"GET /small HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            data = bytearray()
            while chunk := conn.recv(65536):
                data += chunk
            self.session = conn.session  # TLS 1.3: the ticket came after the handshake
        if not data.startswith(b"HTTP/1.1 200 "):
            raise RuntimeError(f"unexpected answer: {bytes(data[:80])!r}")

    def keep_alive(self, conn: ssl.SSLSocket, requests: int, path: str = "/small") -> None:
        """``requests`` requests for ``path`` one after another; each response read whole."""
        for _ in range(requests):
            conn.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
            data = bytearray()
            end = -1
            while end == -1 or len(data) < end:
                chunk = conn.recv(1 << 20)
                if not chunk:
                    raise RuntimeError("the server closed a keep-alive connection")
                data += chunk
                if end == -1 and (head_end := data.find(b"\r\n\r\n")) != -1:
                    length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", data[:head_end + 2])
                    if length is None:
                        raise RuntimeError("a response without Content-Length")
                    end = head_end + 4 + int(length.group(1))


def callgrind(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)


def measure(name: str, port: int, argv: list[str], workdir: Path, certs: CertFiles,
            connections: int, requests: int, bulk: int, keep_dumps: Path | None = None) -> Counts:
    out = workdir / f"{name}.callgrind"
    command = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}", *argv]
    with (workdir / f"{name}.out").open("wb") as log:
        env = dict(os.environ, PYTHONHASHSEED="0")  # the same dict layouts every run
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=env)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited: {(workdir / f'{name}.out').read_text()[-2000:]}")
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not listen on {port}")
            time.sleep(0.2)
        client = Client(port, certs)
        for _ in range(WARM_CONNECTIONS):
            client.one_connection()
        keep = client._connect()
        client.keep_alive(keep, WARM_REQUESTS)
        callgrind(proc.pid, "-i", "on")
        callgrind(proc.pid, "-z")
        for _ in range(connections):
            client.one_connection()
        callgrind(proc.pid, "-d")  # dump 1: the connections
        client.keep_alive(keep, requests)
        callgrind(proc.pid, "-d")  # dump 2: the keep-alive requests
        client.keep_alive(keep, bulk, "/1m")
        callgrind(proc.pid, "-d")  # dump 3: the 1 MiB responses
        callgrind(proc.pid, "-i", "off")
        keep.close()
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    first, second, third = Path(f"{out}.1"), Path(f"{out}.2"), Path(f"{out}.3")
    if keep_dumps is not None:
        for dump in (first, second, third):
            shutil.copy(dump, keep_dumps / f"{name}.{dump.suffix[1:]}.callgrind")
    return Counts(total(first) / connections, inclusive(first, "SSL_do_handshake") / connections,
                  total(second) / requests, total(third) / bulk, library(third, "libcrypto.so") / bulk)


def library(dump: Path, name: str) -> int:
    """Instructions spent in the shared library ``name`` itself (exclusive)."""
    out = subprocess.run(["callgrind_annotate", "--inclusive=no", "--threshold=100", str(dump)],
                         capture_output=True, text=True, check=True).stdout
    return sum(int(line.split()[0].replace(",", "")) for line in out.splitlines()
               if re.match(r"^\s*[\d,]+ ", line) and f"/{name}" in line.rpartition("[")[2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=300, help="resumed TLS connections (300)")
    parser.add_argument("--requests", type=int, default=3000, help="keep-alive requests (3000)")
    parser.add_argument("--bulk", type=int, default=30, help="1 MiB responses on the same connection (30)")
    parser.add_argument("--only", nargs="+", choices=["proxycore", "proxycore-log", "nginx"],
                        default=["proxycore", "proxycore-log", "nginx"])
    parser.add_argument("--keep-dumps", type=Path, metavar="DIR",
                        help="copy the callgrind dumps here (for callgrind_annotate)")
    args = parser.parse_args()
    if not (1 <= args.connections <= 100_000 and 1 <= args.requests <= 1_000_000
            and 1 <= args.bulk <= 10_000):
        parser.error("--connections 1..100000, --requests 1..1000000, --bulk 1..10000")
    for tool in ("valgrind", "callgrind_control", "callgrind_annotate", "nginx"):
        if shutil.which(tool) is None:
            sys.exit(f"bench/instructions.py needs {tool}: apt-get install -y valgrind nginx")
    results: dict[str, Counts] = {}
    with tempfile.TemporaryDirectory(prefix="proxyinstr-") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)  # nginx workers (not root) read the static files under it
        certs = make_certificates(workdir)
        backend = start_backend(workdir)
        try:
            for key in args.only:
                if key == "nginx":
                    name, port, argv = nginx_command(workdir, certs, backend.port)
                    argv += ["-g", "master_process off;"]  # one process: the one instrumented
                else:
                    name, port, argv, _ = proxycore_command(workdir, certs, backend.port,
                                                            access_log=key == "proxycore-log")
                counts = measure(name, port, argv, workdir, certs, args.connections, args.requests,
                                 args.bulk, args.keep_dumps)
                results[key] = counts
                rest = counts.per_connection - counts.handshake
                print(f"{key:14s} {counts.per_connection:12,.0f} per connection (handshake "
                      f"{counts.handshake:,.0f}, the rest {rest:,.0f})  "
                      f"{counts.per_request:10,.0f} per keep-alive request  {counts.per_bulk:12,.0f} per "
                      f"1 MiB response (libcrypto {counts.bulk_crypto:,.0f})", flush=True)
        finally:
            backend.stop()
    base = results.get("nginx")
    if base is None:
        return
    for key, counts in results.items():
        if key == "nginx":
            continue
        rest, base_rest = counts.per_connection - counts.handshake, base.per_connection - base.handshake
        print(f"{key} / nginx: connection {counts.per_connection / base.per_connection:.2f}x, "
              f"handshake {counts.handshake / base.handshake:.2f}x, the rest {rest / base_rest:.1f}x, "
              f"keep-alive request {counts.per_request / base.per_request:.2f}x, "
              f"1 MiB response {counts.per_bulk / base.per_bulk:.2f}x")


if __name__ == "__main__":
    main()
