"""A tiny process supervisor for ``manage.py up``: start children, restart the ones
that die, stop them all cleanly on Ctrl-C, SIGTERM or a closed terminal (SIGHUP).

Each child runs in a process group of its own, so a terminal's Ctrl-C (SIGINT to the
whole foreground group) reaches ``up`` alone and every part stops one way: ``up``
sends SIGTERM to its children, the last started first. When the terminal's SIGINT
reached the children as well, each began stopping on its own at the same moment as the
others: the proxy node's agent link lost the control plane in the middle of its own
stop and the node hung until it was killed, and a child still importing Django printed
a KeyboardInterrupt traceback.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from types import FrameType

log = logging.getLogger("proxyadmin.up")

RESTART_BACKOFF_MAX = 30.0
STOP_GRACE = 10.0  # seconds each child gets after SIGTERM before it is killed
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


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
        # Its own process group: the terminal's signals are for `up`, which relays them.
        # No stdin: a background group reading the terminal would be stopped (SIGTTIN).
        self.process = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, process_group=0,
                                        preexec_fn=_die_with_parent)
        self.started_at = time.monotonic()
        log.info("started %s (pid %d)", self.name, self.process.pid)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when ``up`` dies, even by SIGKILL (Linux only).

    A child in a process group of its own no longer gets the terminal's signals, so a
    killed ``up`` would otherwise leave its children running.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: children outlive a killed `up`, as any process group would


class Supervisor:
    def __init__(self, children: list[Child]) -> None:
        self.children = children
        self.stopping = False

    def _request_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True

    def run(self) -> int:
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._request_stop)
        # Inherited by the children: a background group writing to a terminal set to
        # `stty tostop` would otherwise be stopped by SIGTTOU at its first log line.
        signal.signal(signal.SIGTTOU, signal.SIG_IGN)
        for child in self.children:
            if not self.stopping:
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
                    child.backoff = 1.0  # it has run a while: forget earlier crashes
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
        """Stop the children one by one, the last started first: a child may use the ones
        started before it (the proxy node finishes its requests against the demo upstream
        and says goodbye to the control plane while both are still up)."""
        for child in reversed(self.children):
            if child.running():
                self._stop_child(child)
        print("Stopped.", file=sys.stderr)
        return 0

    def _stop_child(self, child: Child) -> None:
        assert child.process is not None
        child.process.send_signal(signal.SIGTERM)
        try:
            child.process.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0f s; killing it", child.name, STOP_GRACE)
            child.process.kill()
            child.process.wait()
