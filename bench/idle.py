"""Idle TLS connections: the proxy's memory per connection, and new clients served meanwhile.

    python bench/idle.py [--connections 10000] [--workers 2]

Starts the shared backend and one proxycore node as bench/run.py does, opens
``--connections`` TLS connections to it (handshake done, then silent), and prints the
node's resident memory (RSS) before and with them open, and so the memory per idle
connection; then, with all of them still open, times keep-alive requests and new
TLS connections from a fresh client, which must all succeed. The node's connection
limit is set above the count, so the idle ones cannot crowd out the new ones.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import ssl
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uvloop

from bench.certs import make_certificates
from bench.servers import BENCH_DIR, _children, _start, free_port, start_backend

REQUEST = b"GET /small HTTP/1.1\r\nHost: localhost\r\n\r\n"


def rss_mb(pid: int) -> float:
    """Resident memory of the node: its process and its children (the workers, if any)."""
    total = 0.0
    for one in (pid, *_children(pid)):
        for line in Path(f"/proc/{one}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) / 1024
    if not total:
        raise RuntimeError(f"no VmRSS for pid {pid}")
    return total


async def open_idle(
    port: int, ctx: ssl.SSLContext, count: int, at_once: int = 200,
) -> list[asyncio.StreamWriter]:
    writers: list[asyncio.StreamWriter] = []
    gate = asyncio.Semaphore(at_once)

    async def one() -> None:
        async with gate:
            _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
            writers.append(writer)

    await asyncio.gather(*(one() for _ in range(count)))
    return writers


async def served(port: int, ctx: ssl.SSLContext, requests: int) -> tuple[float, float]:
    """(mean ms per keep-alive request, mean ms per new TLS connection with one request)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
    start = time.perf_counter()
    for _ in range(requests):
        writer.write(REQUEST)
        await reader.readuntil(b"\r\n\r\n")
        await reader.read(65536)  # the small body arrives with or right after the head
    keepalive = (time.perf_counter() - start) / requests * 1000
    writer.close()
    start = time.perf_counter()
    for _ in range(requests):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname="localhost")
        writer.write(REQUEST)
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        writer.close()
    fresh = (time.perf_counter() - start) / requests * 1000
    return keepalive, fresh


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=1, help="worker processes (runproxy --workers)")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = args.connections + 1000  # each side's sockets (the node inherits the limit), and some
    if hard != resource.RLIM_INFINITY and hard < need:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, need))  # root may raise it
        except (ValueError, OSError):
            sys.exit(f"the open-files limit is {hard}; {need} are needed (ulimit -Hn)")
    else:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))
    with tempfile.TemporaryDirectory(prefix="proxyidle-") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)
        certs = make_certificates(workdir)
        backend = start_backend(workdir)
        port = free_port()
        argv = [sys.executable, str(BENCH_DIR / "launch_proxycore.py"), "--cert", str(certs.chain),
                "--key", str(certs.key), "--https-port", str(port), "--backend-port", str(backend.port),
                "--max-connections", str(args.connections + 1000), "--workers", str(args.workers)]
        proxy = _start(workdir, "proxy", "proxy", port, argv)
        ctx = ssl.create_default_context(cafile=str(certs.ca))
        try:
            uvloop.run(run(proxy.proc.pid, port, ctx, args.connections))
        finally:
            proxy.stop()
            backend.stop()


async def run(pid: int, port: int, ctx: ssl.SSLContext, count: int) -> None:
    await served(port, ctx, 20)  # warm up
    before = rss_mb(pid)
    start = time.perf_counter()
    writers = await open_idle(port, ctx, count)
    opened = time.perf_counter() - start
    await asyncio.sleep(1.0)
    held = rss_mb(pid)
    keepalive, fresh = await served(port, ctx, 200)
    print(f"{count} idle TLS connections opened in {opened:.1f} s")
    print(f"node RSS {before:.1f} MB before, {held:.1f} MB with them open: "
          f"{(held - before) * 1024 / count:.1f} KiB per idle TLS connection")
    print(f"meanwhile, a new client: {keepalive:.2f} ms per keep-alive request, "
          f"{fresh:.2f} ms per new TLS connection and request (all 200 OK)")
    for writer in writers:
        writer.close()
    await asyncio.sleep(2.0)
    print(f"node RSS {rss_mb(pid):.1f} MB 2 s after they closed")


if __name__ == "__main__":
    main()
