"""The proxy's per-request Python path, without sockets, TLS or a kernel in the way.

    python bench/hotpath.py [--requests 200000] [--access-log] [--guarded]
    valgrind --tool=callgrind --callgrind-out-file=/dev/null python bench/hotpath.py --requests 20000

Drives one client connection (``ClientConnection``) with in-memory transports: each
keep-alive request goes in as bytes, is parsed, decided, handed to a pooled upstream
connection, answered, and its response rewritten and "written" to the client. It
prints the time per request. Machines here are shared and noisy; under callgrind
the instruction count per request (printed by ``callgrind_control`` or read off the
totals divided by ``--requests``) is the same from run to run, which makes it the
figure to compare two versions of the code by (``bench/README.md``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxycore import config as core
from proxycore.client import ClientConnection
from proxycore.server import ProxyNode
from proxycore.upstream import UpstreamConnection

REQUEST = (b"GET /small HTTP/1.1\r\nHost: bench.local\r\nUser-Agent: wrk\r\n"
           b"Accept: */*\r\n\r\n")
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Fri, 04 Dec 2026 23:00:00 GMT\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 13\r\nConnection: keep-alive\r\n\r\n"
            b"hello, world\n")


class MemoryTransport:
    """Just enough of an asyncio transport: writes are kept, the last one readable."""

    def __init__(self, peer: tuple[str, int]) -> None:
        self.peer = peer
        self.written = 0
        self.last = b""

    def write(self, data: bytes) -> None:
        self.written += len(data)
        self.last = data

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": self.peer, "sockname": ("127.0.0.1", 8443)}.get(name, default)

    def is_closing(self) -> bool:
        return False

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        raise AssertionError("the bench connection was closed")

    abort = close


def guards() -> dict[str, Any]:
    """1,000 CIDRs (the client's address, 127.0.0.1, allowed by the last one) and a rate limit."""
    deny, allow = core.AccessAction.DENY, core.AccessAction.ALLOW
    rules = [core.AccessRule(deny, f"10.{i // 256}.{i % 256}.0/24") for i in range(999)]
    rules.append(core.AccessRule(allow, "127.0.0.0/8"))
    return {
        "access": core.AccessList("bench", deny, tuple(rules)),
        "rate_limit": core.RateLimit(requests_per_second=1e9, burst=1_000_000_000,
                                     connections_per_client=100),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--access-log", action="store_true", help="format an access-log line per request")
    parser.add_argument("--guarded", action="store_true",
                        help="the host has an access list of 1,000 CIDRs and a rate limit (never reached)")
    args = parser.parse_args()

    hsts = core.HSTS(max_age=31536000, include_subdomains=True, preload=False, override_upstream=True)
    upstream = core.Upstream(name="backend", targets=(core.Target("127.0.0.1", 9),))
    route = core.HostRoute(name="bench", names=("bench.local",), mode=core.Mode.HTTP, upstream=upstream,
                           hsts=hsts, **(guards() if args.guarded else {}))
    lines: list[bytes] = []
    node = ProxyNode(core.Snapshot(revision=1, hosts=(route,)),
                     access_log=lines.append if args.access_log else None)
    listener = node.listeners[0]
    client = ClientConnection(node, listener, sni_route=route)
    client_transport = MemoryTransport(("127.0.0.1", 40000))
    client.connection_made(client_transport)  # type: ignore[arg-type]
    pool = node.state.pools[0]
    conn = UpstreamConnection(pool)
    conn.connection_made(MemoryTransport(("127.0.0.1", 9)))  # type: ignore[arg-type]
    conn.idle_since = time.monotonic()
    pool.idle.append(conn)

    def one() -> None:
        client.data_received(REQUEST)
        conn.data_received(RESPONSE)

    for _ in range(1000):  # warm up: the per-host lines and parsers are made once
        one()
    lines.clear()
    start = time.perf_counter()
    for _ in range(args.requests):
        one()
    elapsed = time.perf_counter() - start
    assert client_transport.last.endswith(b"hello, world\n"), client_transport.last
    assert not args.access_log or len(lines) == args.requests
    print(f"{elapsed / args.requests * 1e6:.2f} us/request over {args.requests} requests "
          f"({'access log on' if args.access_log else 'no access log'}"
          f"{', 1,000-CIDR access list and rate limit' if args.guarded else ''})")


if __name__ == "__main__":
    main()
