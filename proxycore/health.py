"""Target health: the state one target carries and the pure decisions that change it.

Two sources move a target in or out of rotation, independently:

- **Active checks** (``record_check``): ``unhealthy_threshold`` consecutive failed
  checks take a healthy target out (``healthy = False``); ``healthy_threshold``
  consecutive successes bring it back. A check that agrees with the current
  state only updates the counters.
- **Passive failures** (``record_passive_failure``): connect failures and 5xx
  answers seen by real requests. ``passive_failures`` of them in a row put the
  target in a cool-down (``down_until``) for ``passive_cooldown`` seconds; when
  it ends the target gets requests again. Only a success resets the count, so the
  first request after a cool-down is a probe: if it fails too, the target goes
  straight back into cool-down (a circuit breaker's half-open state).

A target takes new requests when it is healthy and not cooling down
(``takes_requests``); enabled/draining are the snapshot's business, not this
module's. The state lives on the ``TargetPool``, which outlives snapshots, so a
reload keeps it for the targets that stay. Every function here returns the
``Transition`` it caused (or ``None``) and the asyncio layer logs and counts it.
"""

from __future__ import annotations

import errno
import ssl
from dataclasses import dataclass

from proxycore.config import HealthCheck


@dataclass(slots=True)
class TargetHealth:
    healthy: bool = True  # the active checks' verdict; targets start in rotation
    successes: int = 0  # consecutive successful active checks
    failures: int = 0  # consecutive failed active checks
    passive_failures: int = 0  # consecutive failed requests
    down_until: float = 0.0  # end of the passive cool-down (time.monotonic()); 0: none
    last_error: str = ""


@dataclass(frozen=True, slots=True)
class Transition:
    """A target went in (``up``) or out of rotation, and why (for the log line)."""

    up: bool
    reason: str


def takes_requests(state: TargetHealth, now: float) -> bool:
    """Whether health lets the target have new requests at ``now`` (monotonic)."""
    return state.healthy and state.down_until <= now


def record_check(state: TargetHealth, ok: bool, check: HealthCheck, error: str = "") -> Transition | None:
    """One active check finished; ``error`` says why it failed."""
    if ok:
        state.successes += 1
        state.failures = 0
        if not state.healthy and state.successes >= check.healthy_threshold:
            state.healthy = True
            state.last_error = ""
            return Transition(True, f"{state.successes} successful check{_s(state.successes)}")
        return None
    state.failures += 1
    state.successes = 0
    state.last_error = error
    if state.healthy and state.failures >= check.unhealthy_threshold:
        state.healthy = False
        return Transition(False, f"{state.failures} failed check{_s(state.failures)}: {error}")
    return None


def checks_stopped(state: TargetHealth) -> Transition | None:
    """Active checks stopped (turned off, or the target disabled): they keep it out no longer."""
    state.successes = state.failures = 0
    if state.healthy:
        return None
    state.healthy = True
    state.last_error = ""
    return Transition(True, "no longer checked")


def record_passive_failure(
    state: TargetHealth, check: HealthCheck, now: float, error: str
) -> Transition | None:
    """A request to the target failed to connect or got a 5xx."""
    state.passive_failures += 1
    state.last_error = error
    if check.passive_failures <= 0 or state.passive_failures < check.passive_failures:
        return None
    if state.down_until > now:
        return None  # already cooling down: a request that was in flight failed too
    state.down_until = now + check.passive_cooldown
    n = state.passive_failures
    return Transition(False, f"{n} failed request{_s(n)}: {error}; cool-down {check.passive_cooldown:g}s")


def record_passive_success(state: TargetHealth) -> None:
    """A request to the target got a non-5xx answer. Called on the hot path: cheap."""
    state.passive_failures = 0


def end_cooldown(state: TargetHealth, until: float) -> Transition | None:
    """The cool-down that was to end at ``until`` is over (a timer's callback)."""
    if state.down_until != until:
        return None  # a newer cool-down replaced it
    state.down_until = 0.0
    if not state.healthy:
        return None  # the active checks keep it out
    return Transition(True, "cool-down over")


# ---- what a check saw ------------------------------------------------------------


def status_of(line: bytes) -> int | None:
    """The status code of an HTTP/1.x status line, or None if it is not one."""
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or len(parts[1]) != 3 or not parts[1].isdigit():
        return None
    return int(parts[1])


def check_verdict(line: bytes) -> tuple[bool, str]:
    """An HTTP check passes on a 2xx or 3xx status line."""
    if not line:
        return False, "closed without a response"
    status = status_of(line.rstrip(b"\r\n"))
    if status is None:
        return False, "not an HTTP response"
    if 200 <= status < 400:
        return True, ""
    return False, f"status {status}"


def describe_error(exc: BaseException) -> str:
    """A short, stable reason for the log line: 'connection refused', 'timed out', ..."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate: {exc.verify_message or getattr(exc, 'reason', None) or exc}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {getattr(exc, 'reason', None) or exc}"
    if isinstance(exc, ConnectionRefusedError) or getattr(exc, "errno", None) == errno.ECONNREFUSED:
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


def target_label(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _s(n: int) -> str:
    return "" if n == 1 else "s"
