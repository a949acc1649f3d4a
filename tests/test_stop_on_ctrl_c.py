"""`manage.py up --demo` stops every part gracefully and quickly: on Ctrl-C in a terminal
(SIGINT to the whole foreground process group), on SIGTERM to `up` alone, and when the
terminal closes (SIGHUP to the group). A proxy node's stop never waits on an agent link
that swallowed its cancel."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from proxyadmin.management.commands.runproxy import RunningLink, stop_agent_link
from proxycore.agent import AgentLink
from proxycore.stats import Stats
from tests.processes import ROOT, Project, wait_for_http, wait_for_port
from tests.proxyharness import free_port, read_response


def children_of(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def get_through_the_proxy(https: int, ca_file: Path) -> bytes:
    """One GET to the demo host through the node; its keep-alive upstream connection stays pooled."""
    ctx = ssl.create_default_context(cafile=str(ca_file))
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", https), timeout=5) as raw, \
                    ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"GET /hi HTTP/1.1\r\nHost: localhost\r\n\r\n")
                status, _, body = read_response(tls)
            if status == 200:
                return body
        except OSError:
            pass
        assert time.monotonic() < deadline, "the demo host did not answer through the proxy"
        time.sleep(0.3)


@pytest.mark.parametrize(("signum", "whole_group"), [
    pytest.param(signal.SIGINT, True, id="ctrl-c-in-a-terminal"),
    pytest.param(signal.SIGTERM, False, id="sigterm-to-up"),
    pytest.param(signal.SIGHUP, True, id="terminal-closed"),
])
def test_up_demo_stops_every_part_gracefully_within_seconds(
    tmp_path: Path, signum: signal.Signals, whole_group: bool
) -> None:
    project = Project(tmp_path)
    admin, https, demo = free_port(), free_port(), free_port()
    argv = [sys.executable, "manage.py", "up", "--demo", "--admin", f"127.0.0.1:{admin}",
            "--https", f"127.0.0.1:{https}", "--http", f"127.0.0.1:{free_port()}",
            "--demo-upstream", f"127.0.0.1:{demo}"]
    # A session of its own: the process group a terminal would signal, without a terminal.
    proc = subprocess.Popen(argv, cwd=ROOT, env=project.env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    parts: list[int] = []
    try:
        wait_for_http(f"http://127.0.0.1:{admin}/admin/login/")
        wait_for_port(demo)
        body = get_through_the_proxy(https, tmp_path / "var" / "local-ca.pem")
        assert b"Hello from the proxyadmin demo upstream." in body
        parts = children_of(proc.pid)
        assert len(parts) == 4  # daphne, the ACME worker, the demo upstream, the proxy node
        time.sleep(1.5)  # the node's agent link is up and has sent its counters

        started = time.monotonic()
        if whole_group:
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
        out, _ = proc.communicate(timeout=20)  # EOF: every part has closed the shared pipe
        took = time.monotonic() - started
    finally:
        for pid in [proc.pid, *parts]:  # whatever is left, in whatever group it runs
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.communicate(timeout=10)
    assert took < 3, out
    assert not [pid for pid in parts if alive(pid)]
    assert proc.returncode == 0, out
    assert "Stopped." in out
    for symptom in ("Traceback", "CancelledError", "killing it", "KeyboardInterrupt", "exited with code"):
        assert symptom not in out, out


def test_a_node_stop_cancels_an_agent_link_again_after_it_swallowed_the_cancel() -> None:
    link = AgentLink("ws://127.0.0.1:9", "token", node="n", version="0", stats=Stats(), listeners=[],
                     revision=lambda: 0, on_config_changed=lambda revision: None)

    async def session_then_reconnects() -> None:
        # What AgentLink.run does when a cancel lands as its session ends on its own: the
        # CancelledError is suppressed while it waits for its stats sender, then it goes on.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(3600)
        while True:
            await asyncio.sleep(0.5)  # the reconnect backoff

    async def scenario() -> float:
        task = asyncio.get_running_loop().create_task(session_then_reconnects())
        await asyncio.sleep(0)
        started = time.monotonic()
        await asyncio.wait_for(stop_agent_link(RunningLink(link, task)), 10)
        assert task.cancelled()
        return time.monotonic() - started

    assert asyncio.run(scenario()) < 1


def test_the_parts_stop_when_up_itself_is_killed(tmp_path: Path) -> None:
    project = Project(tmp_path)
    admin = free_port()
    argv = [sys.executable, "manage.py", "up", "--no-proxy", "--admin", f"127.0.0.1:{admin}"]
    proc = subprocess.Popen(argv, cwd=ROOT, env=project.env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    parts: list[int] = []
    try:
        wait_for_http(f"http://127.0.0.1:{admin}/admin/login/")
        parts = children_of(proc.pid)
        assert parts
        proc.kill()  # SIGKILL: `up` cannot relay anything
        proc.wait(10)
        deadline = time.monotonic() + 10
        while [pid for pid in parts if alive(pid)] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in parts if alive(pid)]
    finally:
        for pid in [proc.pid, *parts]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
