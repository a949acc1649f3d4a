"""Bursts of idle TLS connections leave nothing behind: no connection objects, and the
node's memory comes back to the same level after every burst (``proxycore.heaptrim``).

The node runs in a child process of its own (this module run with ``-m``), so that its
RSS is its own; the clients run here.
"""

from __future__ import annotations

import asyncio
import json
import resource
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxycore.heaptrim import HeapTrim, glibc_malloc_trim

ROOT = Path(__file__).resolve().parent.parent
CONNECTIONS = 1500  # per burst: over the trim threshold (1000 closes)
BURSTS = 4
# Measured by this test (uvloop): without trimming, RSS after each burst was +49, +76, +94
# and +110 MB over the fresh node, about 20 MB more each burst; trimmed, +6.4, +6.5, +6.6
# and +6.6 MB. The bound sits between the two.
MAX_GROWTH_AFTER_FIRST_BURST = 10 * 1024 * 1024


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# ---- the node, in the child -------------------------------------------------------------


def serve_node(ca_path: str) -> None:
    """A node with one TLS host; prints its port, then answers "state" lines on stdin."""
    import trustme
    import uvloop

    from proxycore import config as core
    from proxycore.server import ProxyNode
    from tests.proxyharness import bundle, route

    raise_fd_limit()
    ca = trustme.CA()
    ca.cert_pem.write_to_path(ca_path)
    snapshot = core.Snapshot(revision=1, hosts=(route("a", ("a.example",), 9, bundle(ca, "a.example")),))

    async def main() -> None:
        node = ProxyNode(snapshot, https_address=("127.0.0.1", 0), http_address=None)
        await node.start()
        print(json.dumps({"port": node.https_port}), flush=True)
        reader = asyncio.StreamReader()
        await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while (await reader.readline()).strip() == b"state":
            listener = node.listeners[0]
            heap = getattr(node, "heap", None)
            print(json.dumps({"connections": len(listener.connections), "handshaking": listener.handshaking,
                              "tasks": len(node.tasks), "trims": heap.trims if heap else -1}), flush=True)
        await node.stop(1)

    uvloop.run(main())


# ---- the test ---------------------------------------------------------------------------


class NodeProcess:
    def __init__(self, tmp_path: Path) -> None:
        self.ca_path = tmp_path / "ca.pem"
        self.child = subprocess.Popen(
            [sys.executable, "-m", "tests.test_idle_tls_memory", str(self.ca_path)], cwd=ROOT,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert self.child.stdout is not None
        self.port = json.loads(self.child.stdout.readline())["port"]

    def state(self) -> dict[str, int]:
        assert self.child.stdin is not None and self.child.stdout is not None
        self.child.stdin.write("state\n")
        self.child.stdin.flush()
        return json.loads(self.child.stdout.readline())  # type: ignore[no-any-return]

    def settled(self, trims_before: int) -> dict[str, int]:
        """The state once every connection is gone and the sweep has trimmed (or 5 s passed)."""
        end = time.monotonic() + 5
        while True:
            state = self.state()
            gone = state["connections"] == 0 and state["handshaking"] == 0
            if (gone and state["trims"] > trims_before) or time.monotonic() > end:
                return state
            time.sleep(0.1)

    def rss(self) -> int:
        return rss_bytes(self.child.pid)

    def close(self) -> None:
        if self.child.stdin is not None:
            self.child.stdin.close()
        try:
            self.child.wait(10)
        except subprocess.TimeoutExpired:
            self.child.kill()
            self.child.wait()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    raise_fd_limit()
    process = NodeProcess(tmp_path)
    try:
        yield process
    finally:
        process.close()


async def burst(port: int, ctx: ssl.SSLContext, count: int) -> int:
    """Open ``count`` TLS connections (handshake done, no request), then close them all."""
    gate = asyncio.Semaphore(200)

    async def one() -> asyncio.StreamWriter:
        async with gate:
            _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="a.example")
            return writer

    writers = await asyncio.gather(*(one() for _ in range(count)))
    for writer in writers:
        writer.close()
    await asyncio.sleep(0.2)
    return len(writers)


@pytest.mark.skipif(glibc_malloc_trim() is None or not Path("/proc/self/status").exists(),
                    reason="glibc and /proc only")
def test_bursts_of_idle_tls_connections_leave_the_nodes_memory_where_the_first_left_it(
    node: NodeProcess,
) -> None:
    ctx = ssl.create_default_context(cafile=str(node.ca_path))
    fresh = node.rss()
    after: list[int] = []
    trims = node.state()["trims"]
    for _ in range(BURSTS):
        assert asyncio.run(burst(node.port, ctx, CONNECTIONS)) == CONNECTIONS
        state = node.settled(trims)
        trims = state["trims"]
        assert (state["connections"], state["handshaking"], state["tasks"]) == (0, 0, 0)
        after.append(node.rss())
    growth = [round((rss - fresh) / 2**20, 1) for rss in after]
    assert after[-1] - after[0] < MAX_GROWTH_AFTER_FIRST_BURST, f"MB over the fresh node per burst: {growth}"


def test_the_heap_is_trimmed_once_enough_connections_closed_since_the_last_trim() -> None:
    calls: list[int] = []
    heap = HeapTrim(lambda pad: calls.append(pad) or 1, after_closes=1000)
    assert [heap.check(closed) for closed in (0, 999, 1000, 1999, 2500)] == [False, False, True, False, True]
    assert heap.check(10) is False and heap.check(1009) is False  # counters started over at 10
    assert heap.check(1010) is True
    assert calls == [0, 0, 0] and heap.trims == 3
    assert HeapTrim(None).check(10**6) is False  # no glibc: never


if __name__ == "__main__":
    serve_node(sys.argv[1])
