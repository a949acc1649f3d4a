"""A WebSocket upgrade through the proxy becomes a byte pipe after the 101."""

from __future__ import annotations

import asyncio
import ssl

import trustme
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from proxycore import config as core
from tests.proxyharness import LoopThread, bundle, client_context, route, running_node


def test_websocket_echo_through_the_proxy(ca: trustme.CA, loop_thread: LoopThread) -> None:
    seen_headers: list[dict[str, str]] = []

    async def echo(ws: ServerConnection) -> None:
        assert ws.request is not None
        seen_headers.append({k.lower(): v for k, v in ws.request.headers.raw_items()})
        async for message in ws:
            await ws.send(message)

    async def start() -> tuple[object, int]:
        server = await serve(echo, "127.0.0.1", 0)
        return server, server.sockets[0].getsockname()[1]

    server, port = loop_thread.run(start())
    hsts = core.HSTS(31536000, False, False, True)
    snap = core.Snapshot(revision=1, hosts=(
        route("ws", ("ws.example",), port, bundle(ca, "ws.example"), hsts=hsts),
    ))
    with running_node(snap) as node:
        async def talk() -> list[str | bytes]:
            ctx: ssl.SSLContext = client_context(ca)
            async with connect(
                f"wss://ws.example:{node.https_port}/chat", ssl=ctx,
                host="127.0.0.1", port=node.https_port, server_hostname="ws.example",
            ) as ws:
                replies = []
                for message in ("hello", b"\x00\x01binary", "x" * 200_000):
                    await ws.send(message)
                    replies.append(await ws.recv())
                return replies

        replies = asyncio.run(talk())
        stats = node.stats()
    assert replies == ["hello", b"\x00\x01binary", "x" * 200_000]
    assert seen_headers[0]["x-forwarded-proto"] == "https"
    assert seen_headers[0]["upgrade"].lower() == "websocket"
    assert stats["hosts"]["ws"]["responses"]["1xx"] == 1
    loop_thread.call(server.close)  # type: ignore[attr-defined]
