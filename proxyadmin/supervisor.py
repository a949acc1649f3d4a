"""A tiny process supervisor for ``manage.py up``: start children, restart the ones
that die, stop them all cleanly on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from types import FrameType

log = logging.getLogger("proxyadmin.up")

RESTART_BACKOFF_MAX = 30.0
STOP_GRACE = 10.0


@dataclass
class Child:
    name: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    backoff: float = 1.0
    next_start: float = 0.0
    started_at: float = field(default=0.0)

    def start(self) -> None:
        self.process = subprocess.Popen(self.argv)
        self.started_at = time.monotonic()
        log.info("started %s (pid %d)", self.name, self.process.pid)


class Supervisor:
    def __init__(self, children: list[Child]) -> None:
        self.children = children
        self.stopping = False

    def _request_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True

    def run(self) -> int:
        signal.signal(signal.SIGINT, self._request_stop)
        signal.signal(signal.SIGTERM, self._request_stop)
        for child in self.children:
            child.start()
        while not self.stopping:
            self._tick(time.monotonic())
            time.sleep(0.2)
        return self.stop()

    def _tick(self, now: float) -> None:
        for child in self.children:
            proc = child.process
            if proc is not None and proc.poll() is None:
                if now - child.started_at > 60:
                    child.backoff = 1.0  # it has run a while: forgive earlier crashes
                continue
            if proc is not None:
                log.warning("%s exited with code %s; restarting in %.0f s",
                            child.name, proc.returncode, child.backoff)
                child.process = None
                child.next_start = now + child.backoff
                child.backoff = min(child.backoff * 2, RESTART_BACKOFF_MAX)
            elif now >= child.next_start:
                child.restarts += 1
                child.start()

    def stop(self) -> int:
        running = [c for c in self.children if c.process is not None and c.process.poll() is None]
        for child in running:
            assert child.process is not None
            child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for child in running:
            assert child.process is not None
            try:
                child.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s; killing it", child.name, STOP_GRACE)
                child.process.kill()
                child.process.wait()
        print("Stopped.", file=sys.stderr)
        return 0
