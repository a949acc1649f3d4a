"""End to end with real processes: daphne (control plane) + runproxy (a proxy node) + an upstream.

Requests through the proxy show up in the dashboard's websocket feed within 2 seconds with
the right host and counts; a host added in the admin starts serving without restarting the
node; killing the control plane does not stop the proxy, and the node reconnects when it
comes back.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import sys
import time
import urllib.parse
import urllib.request
from http.cookiejar import CookieJar
from pathlib import Path
from typing import Any

import trustme
from websockets.asyncio.client import connect

from tests.processes import Project, config, daphne, process, terminate, wait_for_http, wait_for_port
from tests.proxyharness import Upstream, free_port, https_get, read_response

USERNAME, PASSWORD = "ops", "a long pipeline pass phrase"


class AdminSession:
    """A logged-in staff browser session, over plain HTTP (urllib with cookies)."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.jar = CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))

    def cookie(self, name: str) -> str:
        return next(c.value for c in self.jar if c.name == name)

    def get(self, path: str) -> str:
        with self.opener.open(self.base + path, timeout=10) as response:
            return str(response.read().decode())

    def post(self, path: str, fields: dict[str, str]) -> str:
        page = self.get(path)
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page)
        assert token, "no CSRF token on " + path
        data = urllib.parse.urlencode({"csrfmiddlewaretoken": token.group(1), **fields}).encode()
        request = urllib.request.Request(  # noqa: S310 (loopback http URL)
            self.base + path, data=data, headers={"Referer": self.base + path}
        )
        with self.opener.open(request, timeout=10) as response:
            return str(response.read().decode())

    def login(self) -> None:
        self.post("/admin/login/?next=/admin/", {"username": USERNAME, "password": PASSWORD})
        assert self.cookie("sessionid")


async def dashboard_feed(port: int, session: str, until: Any, timeout: float) -> list[dict[str, Any]]:
    """Messages from /ws/dashboard/ until ``until(messages)`` is true (or the timeout)."""
    messages: list[dict[str, Any]] = []
    async with connect(
        f"ws://127.0.0.1:{port}/ws/dashboard/",
        additional_headers={"Cookie": f"sessionid={session}", "Origin": f"http://127.0.0.1:{port}"},
        proxy=None,
    ) as ws:
        deadline = time.monotonic() + timeout
        while not until(messages) and time.monotonic() < deadline:
            try:
                raw = await asyncio.wait_for(ws.recv(), max(0.05, deadline - time.monotonic()))
            except TimeoutError:
                break
            message = json.loads(raw)
            message["_received"] = time.monotonic()
            messages.append(message)
    return messages


def requests_seen(messages: list[dict[str, Any]], host: str) -> int:
    return sum(m["hosts"].get(host, {}).get("requests", 0) for m in messages if m["type"] == "tick")


def test_traffic_reaches_the_dashboard_and_the_node_outlives_the_control_plane(
    tmp_path: Path, ca: trustme.CA, upstream: Upstream
) -> None:
    project = Project(tmp_path)
    project.manage("migrate", "--verbosity", "0")
    project.import_config(config(ca, upstream.port, ["a", "b"]))
    project.create_superuser(USERNAME, PASSWORD)
    admin, https, http = free_port(), free_port(), free_port()
    node_argv = [sys.executable, "manage.py", "runproxy", "--https", f"127.0.0.1:{https}",
                 "--http", f"127.0.0.1:{http}", "--no-access-log", "--name", "edge-1",
                 "--control", f"http://127.0.0.1:{admin}"]
    control = daphne(project, admin)
    control_proc = control.__enter__()
    try:
        wait_for_http(f"http://127.0.0.1:{admin}/admin/login/")
        with process(node_argv, project.env, tmp_path / "node.log"):
            wait_for_port(https)
            session = AdminSession(f"http://127.0.0.1:{admin}")
            session.login()
            key = session.cookie("sessionid")

            # 1. Requests show up in the feed within 2 seconds, with the right host and count.
            async def watch() -> tuple[list[dict[str, Any]], float]:
                feed = asyncio.ensure_future(dashboard_feed(
                    admin, key, lambda ms: requests_seen(ms, "a") >= 5, timeout=10))
                await asyncio.sleep(1.5)  # the node has said hello and ticks are flowing
                for _ in range(5):
                    assert (await asyncio.to_thread(https_get, https, ca, "a.example"))[0] == 200
                sent = time.monotonic()
                return await feed, sent

            messages, sent_at = asyncio.run(watch())
            assert messages[0]["type"] == "state"
            assert requests_seen(messages, "a") == 5
            arrival = next(
                m["_received"] for i, m in enumerate(messages) if requests_seen(messages[: i + 1], "a") >= 5
            )
            latency = arrival - sent_at
            print(f"request-to-dashboard latency: {latency:.3f} s")
            assert latency < 2.0, f"traffic reached the dashboard after {latency:.2f} s"

            # 2. A host added in the admin is served without restarting the node.
            page = session.post("/admin/proxyadmin/host/add/", {
                "name": "c", "enabled": "on", "mode": "http", "upstream": "1", "certificate": "",
                "local_certificate": "on",  # a host is saved only with a certificate that covers it
                "max_body_size": "1000", "redirect_http": "on", "redirect_status": "308",
                "client_auth": "off", "forward_client_cert": "on", "proxy_protocol": "off",
                "names-TOTAL_FORMS": "1", "names-INITIAL_FORMS": "0", "names-MIN_NUM_FORMS": "0",
                "names-MAX_NUM_FORMS": "1000", "names-0-name": "a2.example",
            })
            assert "errornote" not in page, page[:3000]
            # The HTTP listener shows the node knows the new host: it redirects instead of
            # answering 421. The save pushed
            # config.changed, so this takes well under the 5 s of the slow poll.
            deadline = time.monotonic() + 3
            while True:
                with socket.create_connection(("127.0.0.1", http), timeout=5) as sock:
                    sock.sendall(b"GET /n HTTP/1.1\r\nHost: a2.example\r\n\r\n")
                    status = read_response(sock)[0]
                if status == 308:
                    break
                assert time.monotonic() < deadline, f"the new host was not served in time ({status})"
                time.sleep(0.05)

            # 3. The control plane dies: the proxy keeps serving.
            terminate(control_proc)
            for _ in range(5):
                assert https_get(https, ca, "a.example")[0] == 200

            # 4. It comes back: the node reconnects by itself.
            with daphne(project, admin):
                wait_for_http(f"http://127.0.0.1:{admin}/admin/login/")
                messages = asyncio.run(dashboard_feed(
                    admin, key,
                    lambda ms: any(n["name"] == "edge-1" and n["status"] == "online"
                                   for m in ms if m["type"] in ("state", "nodes") for n in m["nodes"]),
                    timeout=40,
                ))
                online = [n for m in messages if m["type"] in ("state", "nodes")
                          for n in m["nodes"] if n["name"] == "edge-1" and n["status"] == "online"]
                assert online, [m for m in messages if m["type"] != "tick"]
    finally:
        control.__exit__(None, None, None)
