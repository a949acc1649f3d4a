"""Two real proxy nodes, one applying revisions late: the CA is asked only once both answer.

daphne, two ``runproxy`` nodes and pebble, with pebble's validation ports pointed at the
*late* node's listeners. The late node is frozen (SIGSTOP) as the worker starts its
order and resumed (SIGCONT) a few seconds after the challenges are published: less
than the 5 s after which the control plane stops counting a silent node as online.
The worker must wait for it, so pebble's first validation attempt comes after the
resume, and the certificate is issued and served by both nodes for both names.

The opposite: a late node the worker cannot see (not linked to the control plane)
gets no such wait, and the same freeze makes pebble's validation fail.
"""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.acmeharness import Pebble, needs_pebble, pebble, served_leaf, wait_for_text
from tests.processes import Project, daphne, process, wait_for_http, wait_for_port
from tests.proxyharness import Upstream, free_port
from tests.test_acme_issuance import NAMES, acme_config

pytestmark = needs_pebble

FREEZE = 2.5  # seconds the late node stays frozen after the challenges are published
VALIDATION = "Attempting to validate"  # pebble's log line for each validation it makes


@dataclass
class Node:
    name: str
    proc: subprocess.Popen[bytes]
    http_port: int
    https_port: int


@dataclass
class Cluster:
    project: Project
    pebble: Pebble
    early: Node
    late: Node

    def shell(self, code: str) -> str:
        return self.project.manage("shell", "-c", code).stdout.strip().splitlines()[-1]

    def wait_both_applied_latest(self, timeout: float = 20) -> None:
        """Until both linked nodes report the latest config revision applied."""
        code = ("from proxyadmin.models import ConfigRevision, ProxyNode; "
                "r = ConfigRevision.objects.latest('pk').pk; "
                "print(sorted(n.name for n in ProxyNode.objects.filter(applied_revision=r)))")
        deadline = time.monotonic() + timeout
        while self.shell(code) != str(sorted([self.early.name, self.late.name])):
            assert time.monotonic() < deadline, "the nodes did not apply the imported config"
            time.sleep(0.2)


@contextlib.contextmanager
def cluster(tmp_path: Path, *, late_linked: bool = True) -> Iterator[Cluster]:
    """pebble validating on the late node's ports; daphne; an early and a late runproxy node."""
    project = Project(tmp_path)
    project.manage("migrate", "--verbosity", "0")
    admin = free_port()
    ports = {name: (free_port(), free_port()) for name in ("edge-early", "edge-late")}
    late_http, late_https = ports["edge-late"]
    with pebble(tmp_path, late_http, late_https) as server:
        project.env.update({"PROXYADMIN_ACME_DIRECTORY": server.directory,
                            "PROXYADMIN_ACME_CA_BUNDLE": str(server.ca_bundle),
                            "PROXYADMIN_ACME_EMAIL": "ops@example.com"})

        def argv(name: str) -> list[str]:
            http, https = ports[name]
            link = (["--control", f"http://127.0.0.1:{admin}"]
                    if name == "edge-early" or late_linked else ["--no-control"])
            return [sys.executable, "manage.py", "runproxy", "--name", name, "--no-access-log",
                    "--https", f"127.0.0.1:{https}", "--http", f"127.0.0.1:{http}", *link]

        with daphne(project, admin):
            wait_for_http(f"http://127.0.0.1:{admin}/admin/login/")
            with process(argv("edge-early"), project.env, tmp_path / "early.log") as early, \
                    process(argv("edge-late"), project.env, tmp_path / "late.log") as late:
                try:
                    for name in ports:
                        wait_for_port(ports[name][1])
                    wait_for_text(tmp_path / "daphne.log", "proxy node edge-early connected")
                    if late_linked:
                        wait_for_text(tmp_path / "daphne.log", "proxy node edge-late connected")
                    yield Cluster(project, server, Node("edge-early", early, *ports["edge-early"]),
                                  Node("edge-late", late, *ports["edge-late"]))
                finally:
                    late.send_signal(signal.SIGCONT)  # a frozen node cannot stop


@dataclass
class WorkerOutput:
    """The worker's lines as they come, each with the monotonic time it was read."""

    proc: subprocess.Popen[str]
    lines: list[tuple[float, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def wait_for(self, text: str, timeout: float = 60) -> tuple[float, str]:
        deadline = time.monotonic() + timeout
        while True:
            for when, line in list(self.lines):
                if text in line:
                    return when, line
            assert time.monotonic() < deadline, f"{text!r} not in the worker's output: {self.lines}"
            assert self.proc.poll() is None or self.lines, "the worker exited without output"
            time.sleep(0.02)

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


def frozen_late_node_order(c: Cluster) -> tuple[WorkerOutput, float, float]:
    """Run the worker with the late node frozen from the order until ``FREEZE`` s after the
    challenges are published; (worker output, when published, when resumed)."""
    worker = WorkerOutput(c.project.start("acme", "--once", "--node-wait", "15"))
    worker.wait_for("Ordering a certificate for host 'site'")
    c.late.proc.send_signal(signal.SIGSTOP)
    published, _ = worker.wait_for("Published 2 ACME challenge(s) for host 'site'")
    time.sleep(max(0.0, published + FREEZE - time.monotonic()))
    # Frozen, the late node cannot have applied the challenges, so the CA must not have been asked.
    assert VALIDATION not in c.pebble.log.read_text(), "pebble validated while the late node was frozen"
    assert "/chalZ/" not in c.pebble.log.read_text(), "the worker answered a challenge too early"
    resumed = time.monotonic()
    c.late.proc.send_signal(signal.SIGCONT)
    worker.proc.wait(120)
    return worker, published, resumed


def test_validation_waits_for_a_late_node_and_both_nodes_serve_the_certificate(
    tmp_path: Path, upstream: Upstream
) -> None:
    with cluster(tmp_path) as c:
        c.project.import_config(acme_config(upstream.port, "http-01"))
        c.wait_both_applied_latest()  # both serve the host before the order: nothing is late yet
        worker, published, resumed = frozen_late_node_order(c)
        assert worker.proc.returncode == 0, worker.text()
        ready_at, ready = worker.wait_for("Every online proxy node")
        assert "edge-early" in ready and "edge-late" in ready, ready
        waited = float(re.search(r"after ([0-9.]+) s", ready).group(1))  # type: ignore[union-attr]
        print(f"\n{ready}\nresumed {resumed - published:.2f} s after publishing")
        assert ready_at > resumed, "the worker went on while the late node was frozen"
        assert waited >= FREEZE - 0.2, ready
        assert "Stored the certificate 'site (ACME)'" in worker.text(), worker.text()
        assert c.pebble.log.read_text().count(VALIDATION) >= 2  # validated, after the resume
        leaves = set()
        for node in (c.early, c.late):
            for name in NAMES:
                deadline = time.monotonic() + 10
                while True:
                    try:
                        leaves.add(served_leaf(node.https_port, name, c.pebble.root_pem).serial_number)
                        break
                    except OSError:  # not (yet) a chain pebble's root verifies
                        assert time.monotonic() < deadline, f"{node.name} does not serve {name}"
                        time.sleep(0.05)
        assert len(leaves) == 1  # one certificate, on both nodes, for both names


def test_without_the_wait_the_same_late_node_makes_validation_fail(
    tmp_path: Path, upstream: Upstream
) -> None:
    # The late node polls the database instead of being linked: the worker cannot see it,
    # so it waits for the early node only, and pebble asks the frozen node.
    with cluster(tmp_path, late_linked=False) as c:
        c.project.import_config(acme_config(upstream.port, "http-01"))
        worker = WorkerOutput(c.project.start("acme", "--once", "--node-wait", "15"))
        worker.wait_for("Ordering a certificate for host 'site'")
        c.late.proc.send_signal(signal.SIGSTOP)
        _, ready = worker.wait_for("Every online proxy node")
        assert "Every online proxy node (edge-early) serves" in ready, ready
        wait_for_text(c.pebble.log, VALIDATION)  # pebble asks while the late node is frozen
        time.sleep(0.5)
        c.late.proc.send_signal(signal.SIGCONT)
        worker.proc.wait(120)
        failed = [line for _, line in worker.lines if "The certificate order for host 'site' failed" in line]
        assert failed, worker.text()
        print(f"\n{failed[0]}")
        assert "returned 404 (unauthorized)" in failed[0]  # pebble's words: the old config answered
        assert "Stored the certificate" not in worker.text()
        state = c.shell("from proxyadmin.acme.models import HostState; "
                        "s = HostState.objects.get(host__name='site'); print(s.status, s.error)")
        assert state.startswith("failing "), state
