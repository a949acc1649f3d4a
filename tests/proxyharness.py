"""Test harness for the data plane: a proxy node and scriptable upstreams on 127.0.0.1.

The node runs on its own event loop (uvloop) in a background thread, as it runs
in production; tests talk to it through real sockets with ordinary clients.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import random
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Self, TypeVar

import pytest
import trustme
import uvloop

from proxycore import config as core
from proxycore.limits import Limits
from proxycore.server import ProxyNode

T = TypeVar("T")

# A year of HSTS that replaces whatever the upstream sends: the usual policy of a test host.
HSTS = core.HSTS(max_age=31536000, include_subdomains=False, preload=False, override_upstream=True)
# The TLS versions a client may end up on, as ids for parametrized tests.
TLS_VERSIONS = [pytest.param(ssl.TLSVersion.TLSv1_3, id="tls1.3"),
                pytest.param(ssl.TLSVersion.TLSv1_2, id="tls1.2")]


class LoopThread:
    """An event loop running in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop() if os.environ.get("PROXY_TEST_ASYNCIO") else uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T], timeout: float = 10) -> T:
        async def wrapper() -> T:
            return fn()
        return self.run(wrapper(), timeout)

    def close(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.run(cancel_all(), timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


# ---- snapshot building -------------------------------------------------------------


def bundle(ca: trustme.CA, *names: str, name: str | None = None) -> core.CertificateBundle:
    leaf = ca.issue_cert(*names)
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    return core.CertificateBundle(
        name=name or names[0],
        chain_pem=b"".join(b.bytes() for b in leaf.cert_chain_pems),
        key_pem=leaf.private_key_pem.bytes(),
        fingerprint_sha256=hashlib.sha256(leaf.cert_chain_pems[0].bytes()).hexdigest(),
        serial=f"{cert.serial_number:x}",
        sans=names,
        not_after=cert.not_valid_after_utc,
    )


def route(
    name: str, names: tuple[str, ...], upstream_port: int, cert: core.CertificateBundle | None,
    **fields: Any,
) -> core.HostRoute:
    upstream = fields.pop("upstream", None) or core.Upstream(
        name=f"{name}-up", targets=(core.Target("127.0.0.1", upstream_port),),
        connect_timeout=fields.pop("connect_timeout", 2.0),
        read_timeout=fields.pop("read_timeout", 5.0),
    )
    return core.HostRoute(name=name, names=names, mode=fields.pop("mode", core.Mode.HTTP),
                          upstream=upstream, certificate=cert, **fields)


# ---- the node ---------------------------------------------------------------------


@dataclass
class RunningNode:
    loop: LoopThread
    node: ProxyNode
    access_lines: list[bytes] = field(default_factory=list)

    @property
    def https_port(self) -> int:
        return self.node.listeners[0].port

    @property
    def http_port(self) -> int:
        return self.node.listeners[1].port

    def reload(self, snapshot: core.Snapshot) -> bool:
        return self.loop.call(lambda: self.node.reload(snapshot))

    def stats(self) -> dict[str, Any]:
        return self.loop.call(self.node.stats.as_dict)

    def stop(self, deadline: float = 5.0) -> None:
        self.loop.run(self.node.stop(deadline), timeout=deadline + 10)


def host_counts(node: RunningNode, host: str, counter: str, expected: dict[str, int]) -> dict[str, int]:
    """The host's ``counter`` counts, once they reach ``expected`` (or after 3 s)."""
    end = time.monotonic() + 3
    while True:
        seen: dict[str, int] = node.stats()["hosts"].get(host, {}).get(counter, {})
        if seen == expected or time.monotonic() > end:
            return seen
        time.sleep(0.02)


def handshake_failures(node: RunningNode, host: str, expected: dict[str, int]) -> dict[str, int]:
    """The host's failed-handshake counts, once they reach ``expected`` (or after 3 s)."""
    return host_counts(node, host, "handshakes_failed", expected)


@contextlib.contextmanager
def running_node(snapshot: core.Snapshot, limits: Limits | None = None, address: str = "127.0.0.1",
                 **options: Any) -> Iterator[RunningNode]:
    """A node serving ``snapshot`` on ``address``; ``options`` go to ``ProxyNode``
    (``session_resumption``)."""
    loop = LoopThread()
    lines: list[bytes] = []

    async def start() -> ProxyNode:
        node = ProxyNode(snapshot, https_address=(address, 0), http_address=(address, 0),
                         limits=limits, access_log=lines.append, **options)
        await node.start()
        return node

    node = loop.run(start())
    running = RunningNode(loop, node, lines)
    try:
        yield running
    finally:
        if not node.stopping:
            with contextlib.suppress(Exception):
                running.stop(1.0)
        loop.close()


# ---- clients -----------------------------------------------------------------------


def client_context(ca: trustme.CA, cert: trustme.LeafCert | None = None,
                   version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    """A client trusting ``ca``, presenting ``cert`` when given, at most TLS ``version`` when given."""
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    if version is not None:
        ctx.maximum_version = version
    if cert is not None:
        cert.configure_cert(ctx)
    return ctx


def tls_connect(port: int, ca: trustme.CA, server_name: str | None,
                ctx: ssl.SSLContext | None = None) -> ssl.SSLSocket:
    ctx = ctx or client_context(ca)
    if server_name is None:
        ctx.check_hostname = False
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return ctx.wrap_socket(raw, server_hostname=server_name)


def https_get(port: int, ca: trustme.CA, host: str,
              path: str = "/") -> tuple[int, dict[bytes, list[bytes]], bytes]:
    """One GET of ``path`` from ``host`` on a new TLS connection, and its response."""
    sock = tls_connect(port, ca, host)
    try:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        return read_response(sock)
    finally:
        sock.close()


def read_response(sock: socket.socket, *, head_only: bool = False) -> tuple[int, dict[bytes, list[bytes]], bytes]:
    """Read one HTTP/1.1 response (Content-Length, chunked or until close)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response head; got {buf!r}")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    if head_only or status in (204, 304) or 100 <= status < 200:
        return status, headers, rest
    if b"content-length" in headers:
        length = int(headers[b"content-length"][0])
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed inside the body")
            rest += chunk
        return status, headers, rest[:length]
    if headers.get(b"transfer-encoding") == [b"chunked"]:
        body = b""
        while True:
            while b"\r\n" not in rest:
                rest += sock.recv(65536)
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            while len(rest) < size + 2:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("closed inside a chunk")
                rest += chunk
            body += rest[:size]
            rest = rest[size + 2:]
            if size == 0:
                return status, headers, body
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return status, headers, rest
        rest += chunk


class TrafficThread:
    """Sends a round of requests (``send_round``) every 0.2 s from a daemon thread while in ``with``."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def send_round(self) -> None:
        raise NotImplementedError

    def run(self) -> None:
        while not self.done.is_set():
            self.send_round()
            self.done.wait(0.2)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join(10)


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_EPHEMERAL_LOW = _ephemeral_low()
_handed_out: set[int] = set()


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on: for a process to take, or as a dead target.

    Taken below the kernel's ephemeral range: a port from that range, once closed here, can
    become the source port of any outgoing connection before the process that was to
    listen on it binds it ("Address already in use"). Never the same port twice per run.
    """
    low = max(1024, _EPHEMERAL_LOW - 12000)
    for _ in range(200):
        port = random.randrange(low, _EPHEMERAL_LOW)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket() as s:  # nothing free down there: the kernel's choice, as before
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> float:
    """Polls ``condition`` until it holds (failing after ``timeout`` s); the seconds it took."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, "timed out"
        time.sleep(0.02)
    return time.monotonic() - start


# ---- upstreams ---------------------------------------------------------------------


Handler = Callable[["Exchange"], Awaitable[None]]


@dataclass
class Exchange:
    """One request as an upstream saw it."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def header(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def respond(self, status: int = 200, body: bytes = b"", headers: list[tuple[str, str]] | None = None) -> None:
        lines = [f"HTTP/1.1 {status} X"]
        hdrs = headers if headers is not None else [("Content-Length", str(len(body)))]
        lines += [f"{n}: {v}" for n, v in hdrs]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)


async def echo_handler(ex: Exchange) -> None:
    """Answers with a JSON description of the request it received."""
    body = json.dumps({
        "method": ex.method, "target": ex.target, "headers": ex.headers,
        "body_sha256": hashlib.sha256(ex.body).hexdigest(), "body_length": len(ex.body),
    }).encode()
    ex.respond(200, body, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])


class LoopServer:
    """A server on a free 127.0.0.1 port on a LoopThread (TLS with ``ssl_context``); ``_serve`` serves."""

    ssl_context: ssl.SSLContext | None = None

    def __init__(self, loop: LoopThread) -> None:
        self.loop = loop
        self.server: asyncio.Server | None = None
        self.port = 0

    def start(self) -> Self:
        """Starts listening; the port is then in ``port``."""
        async def start() -> None:
            self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl_context)
            self.port = self.server.sockets[0].getsockname()[1]
        self.loop.run(start())
        return self

    def stop(self) -> None:
        """Stops listening (connections already open go on)."""
        async def stop() -> None:
            if self.server is not None:
                self.server.close()
        self.loop.run(stop())

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class Upstream(LoopServer):
    """A recording HTTP/1.1 upstream on 127.0.0.1 (asyncio streams: test code, not the proxy)."""

    def __init__(self, loop: LoopThread, handler: Handler = echo_handler) -> None:
        super().__init__(loop)
        self.handler = handler
        self.connections = 0
        self.raw = bytearray()
        self.requests: list[Exchange] = []

    async def _read_head(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        self.raw += head
        return head

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await self._read_head(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = [(n.strip(), v.strip()) for n, _, v in (ln.partition(":") for ln in lines[1:] if ln)]
                names = {n.lower(): v for n, v in headers}
                body = b""
                if "content-length" in names:
                    body = await reader.readexactly(int(names["content-length"]))
                elif names.get("transfer-encoding", "").lower() == "chunked":
                    body = await self._read_chunked(reader)
                self.raw += body
                ex = Exchange(method, target, headers, body, reader, writer)
                self.requests.append(ex)
                await self.handler(ex)
                await writer.drain()
                if writer.is_closing():
                    return
        finally:
            writer.close()

    async def _read_chunked(self, reader: asyncio.StreamReader) -> bytes:
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass  # trailers
                return body
            data = await reader.readexactly(size + 2)
            body += data[:-2]


def with_host(snapshot: core.Snapshot, new: core.HostRoute) -> core.Snapshot:
    return replace(snapshot, revision=snapshot.revision + 1, hosts=(*snapshot.hosts, new))


def password_hash(password: str, iterations: int = 1000, salt: str = "testsalt") -> str:
    """A Django ``pbkdf2_sha256`` hash, with few iterations so that tests stay fast."""
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), iterations)
    return f"pbkdf2_sha256${iterations}${salt}${base64.b64encode(digest).decode()}"


def basic(username: str, password: str) -> str:
    """An ``Authorization`` field line for HTTP Basic."""
    return f"Authorization: Basic {base64.b64encode(f'{username}:{password}'.encode()).decode()}\r\n"


def connect_from(source: str, port: int, ca: trustme.CA | None = None, server_name: str | None = None,
                 target: str = "127.0.0.1") -> socket.socket:
    """A connection to ``target``:``port`` from the local address ``source`` (127.0.0.2, ::1 ...),
    wrapped in TLS for ``server_name`` when ``ca`` is given."""
    family = socket.AF_INET6 if ":" in target else socket.AF_INET
    raw = socket.socket(family, socket.SOCK_STREAM)
    raw.settimeout(10)
    raw.bind((source, 0))
    raw.connect((target, port))
    if ca is None:
        return raw
    return client_context(ca).wrap_socket(raw, server_hostname=server_name)
