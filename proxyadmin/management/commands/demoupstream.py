"""``manage.py demoupstream``: a tiny HTTP server to put behind the proxy in the demo.

``up --demo`` runs it on 127.0.0.1:8081 as the upstream of the host ``localhost``,
so a newcomer has something to send traffic to. It answers every request with a
short text saying what it received (method, path, the forwarding headers).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from proxyadmin.management.commands.up import parse_address

MAX_HEAD = 16 * 1024


def answer(head: bytes) -> tuple[bytes, bool]:
    """The response to one request head, and whether to keep the connection."""
    lines = head.decode("latin-1").split("\r\n")
    method, _, rest = lines[0].partition(" ")
    target = rest.rpartition(" ")[0] or "/"
    headers = {n.strip().lower(): v.strip() for n, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    keep = headers.get("connection", "").lower() != "close"
    forwarded = "".join(
        f"{name}: {headers[name]}\n"
        for name in ("host", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host")
        if name in headers
    )
    body = f"Hello from the proxyadmin demo upstream.\n{method} {target}\n{forwarded}".encode()
    status = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n"
    close = b"" if keep else b"Connection: close\r\n"
    head_out = status + b"Content-Length: %d\r\n%s\r\n" % (len(body), close)
    return head_out + (b"" if method == "HEAD" else body), keep


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1].strip() or 0)
            if length:
                await reader.readexactly(length)  # the demo ignores request bodies
            response, keep = answer(head)
            writer.write(response)
            await writer.drain()
            if not keep:
                return
    except (ConnectionError, ValueError, asyncio.IncompleteReadError):
        return
    except asyncio.CancelledError:
        # Python 3.11's StreamReaderProtocol logs a cancelled handler as an error with a
        # traceback (3.12 checks for it); the stop closes connections first, so this is
        # only a handler that outlived that.
        return
    finally:
        writer.close()


class DemoServer:
    """The listening server and its open connections: a stop closes both, so no handler
    is still running (and cancelled) when the event loop ends."""

    def __init__(self) -> None:
        self.handlers: set[asyncio.Task[Any]] = set()
        self.writers: set[asyncio.StreamWriter] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        self.writers.add(writer)
        try:
            await serve(reader, writer)
        finally:
            self.writers.discard(writer)
            self.handlers.discard(task)

    async def close_connections(self, timeout: float = 1.0) -> None:
        """Close every connection (a keep-alive client, e.g. the proxy's pool, reads EOF)."""
        for writer in list(self.writers):
            writer.close()
        if self.handlers:
            await asyncio.wait(set(self.handlers), timeout=timeout)


class Command(BaseCommand):
    help = "Run the demo upstream (an HTTP server that says what it received)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--listen", default="127.0.0.1:8081", help="address (127.0.0.1:8081)")

    def handle(self, *args: Any, **options: Any) -> None:
        host, port = parse_address(options["listen"], "--listen")
        try:
            asyncio.run(self.run(host, port))
        except OSError as exc:
            raise CommandError(f"Cannot listen on {options['listen']}: {exc}") from None

    async def run(self, host: str, port: int) -> None:
        demo = DemoServer()
        server = await asyncio.start_server(demo.handle, host, port, limit=MAX_HEAD)
        self.stdout.write(f"Demo upstream on http://{host}:{port}/")
        self.stdout.flush()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        server.close()
        await demo.close_connections()
        with contextlib.suppress(Exception):
            await server.wait_closed()
