"""The agent link's messages, shared by the proxy node and the control plane.

Every message is one JSON object in one websocket text frame, with a ``type``.
This module builds and validates them; it does no I/O and imports no Django.

Connecting
    A proxy node opens ``/ws/agent/`` on the control plane with the header
    ``Authorization: Bearer <token>``. The token is the control plane's
    ``AGENT_TOKEN`` (env ``PROXYADMIN_AGENT_TOKEN``, or generated once into
    ``var/agent_token``) and is the link's only credential: session cookies are
    ignored. A missing or wrong token is refused before the handshake completes
    (close code 4401 at the ASGI level, which daphne turns into HTTP 403). A node
    name is held by one link at a time: a ``hello`` naming a node another link
    holds closes the link with 4409, and the node tries again with its backoff.

node → control plane
    ``{"type": "hello", "node": str, "version": str, "pid": int, "revision": int,
    "listeners": [{"name": "https", "address": "127.0.0.1:8443"}, ...]}``
        First message on every connection. ``revision`` is the config revision
        the node serves (0 for none). The node name identifies the node on the
        dashboard; one name, one running node. The control plane keeps a bounded
        list of nodes: a new name that does not fit is refused by closing the
        link with 1008 (policy violation) and a reason.
    ``{"type": "stats", "node": str, "time": float, "totals": {...}}``
        Once a second. ``time`` is the node's epoch clock; ``totals`` is
        ``proxycore.stats.Stats.as_dict()``: counters since the node started at
        ``totals["started_at"]``. The control plane keeps the previous totals of
        each node and works with the differences; a new ``started_at`` means the
        node restarted and its totals start from zero again.
        ``workers`` is ``{"count": int, "restarts": int}``: the node's worker
        processes (1 to 1,024) and how many times they were restarted; absent
        means one worker, never restarted (older and single-process nodes).
        Two entries of ``totals`` are current state, not counters:
        ``upstreams`` maps an upstream's name to ``{"targets": [{"address": str,
        "healthy": bool, "cooling_down": bool, "active": int, "weight": int,
        "draining": bool, "enabled": bool, "last_error": str | null}, ...],
        "healthy": int, "available": int, "total": int}`` plus its counters
        ``went_down``, ``came_up`` and ``retries``; ``host_upstreams`` maps a
        host's name to its upstream's name. Both are optional, and an entry of
        either that does not follow this shape is dropped, not the report: a
        node's traffic still counts when one upstream's description is odd.
    ``{"type": "requests", "node": str, "hosts": {host: [[seq, line], ...]}}``
        The node's latest access-log lines of the hosts a dashboard watches (see
        ``requests.watch``), each with the node's sequence number of the line (it
        grows by one per line; a dashboard drops a line it already has). Sent with
        the stats, each second while a host is watched and has new lines; at most
        ``MAX_RECENT_PER_HOST`` lines per host and ``MAX_RECENT_LINES`` in all, each
        at most ``MAX_LINE_LENGTH`` characters (the node cuts longer ones). The lines
        hold what clients sent (request targets): text to show, never markup.
    ``{"type": "config.applied", "revision": int}``
    ``{"type": "config.rejected", "revision": int, "error": str}``
        After every reload attempt: the revision now served, or the revision
        that could not be built (the node keeps serving its last good one).

control plane → node
    ``{"type": "config.changed", "revision": int}``
        Pushed to every connected node when a config revision is made, by
        whichever process, and right after ``hello`` when the node's revision is
        behind; at most once per revision and link. The node reloads from the
        database unless it already serves (or rejected) that revision, and
        answers ``config.applied`` or ``config.rejected``.
    ``{"type": "requests.watch", "host": str, "seconds": int, "resend": bool}``
        A staff dashboard shows this host's recent requests: send its new lines
        for the next ``seconds`` (1 to ``MAX_WATCH_SECONDS``; the dashboard renews
        it while it looks), and with ``resend`` all the lines kept for it, not only
        the new ones (a dashboard that just opened the view). Sent to every node.

Bounds
    Every integer is a whole number from 0 to 2**63-1 (PostgreSQL's bigint, the type
    the control plane stores counters and revisions in); a ``pid`` fits 2**31-1.
    Times and latency figures are finite numbers. Names are at most 253 characters,
    ``version`` 100; error texts are cut to 4000. A report holds at most 10,000
    hosts, 10,000 upstreams of at most 1,000 targets each, 64 listeners, 256 entries
    per counter map and 64 latency buckets (the ``MAX_*`` constants below). A
    ``requests`` message holds at most 200 lines per host and 1,000 in all, of at
    most 512 characters each.

Anything else (not a JSON object, an unknown ``type``, a field of the wrong type, a
number or a count out of bounds) is a ``ProtocolError``: the receiver drops that
message, logs it, and carries on; it never closes the link for it -- a node with one
odd counter still gets its config pushes. Unknown extra fields are ignored so that
either side can grow, and are not kept: parsers return checked copies.

The dashboard's messages (``state``, ``nodes``, ``tick``) are built by the
control plane from these; ``latency_quantile`` below is how a ``tick`` turns
latency-histogram differences into p50/p95.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

AGENT_PATH = "/ws/agent/"
# Close code for a refused token (4000-4999 are the application's; 401 for "unauthorised").
CLOSE_UNAUTHORISED = 4401
# Close code for a hello naming a node another link holds (409 for "conflict").
CLOSE_NAME_TAKEN = 4409

# -- bounds: what a message may hold (see "Bounds" above) --
MAX_NAME_LENGTH = 253
MAX_VERSION_LENGTH = 100
MAX_ERROR_LENGTH = 4000  # longer error texts are cut, not refused
# Any epoch time past year 9999 is garbage, and datetime cannot hold it.
MAX_EPOCH = 253402300799.0
# PostgreSQL's bigint: the rollup's counters and the revision columns.
MAX_COUNTER = 2**63 - 1
# ProxyNode.pid's column (a signed 32-bit integer); Linux pids stop at 2**22.
MAX_PID = 2**31 - 1
# Per report. A node reports the hosts and upstreams of the configs it served since it
# started (and "-"): 10,000 is far above a real config, and keeps the work one report
# costs (deltas, the tick, the stored copy) bounded.
MAX_HOSTS = 10_000
MAX_UPSTREAMS = 10_000
MAX_TARGETS = 1_000  # per upstream
MAX_LISTENERS = 64  # a node has two (https, http)
# Status classes, handshake failure reasons, upstream error kinds, TLS versions, ciphers:
# each a short fixed list on a real node.
MAX_MAP_ENTRIES = 256
MAX_LATENCY_BUCKETS = 64  # proxycore.stats has 13
MAX_LATENCY_SECONDS = 86_400.0  # a bucket bound; no upstream answer is awaited longer
# The recent-requests view: the last 200 lines per host are what it shows; 1,000 lines of
# at most 512 characters keep a message under 600 KB (the node's link allows 1 MiB).
MAX_RECENT_PER_HOST = 200
MAX_RECENT_LINES = 1000
MAX_LINE_LENGTH = 512
MAX_WATCH_SECONDS = 300
MAX_WORKERS = 1024  # worker processes of one node (``totals["workers"]["count"]``)

HOST_COUNTERS = (
    "active_connections", "total_connections", "handshakes_ok", "requests", "bytes_in", "bytes_out",
    "denied", "unauthorized", "rate_limited",
)
# limited_clients: {client address: count} of the last 15 minutes (top 20 per worker)
HOST_COUNTER_MAPS = ("handshakes_failed", "responses", "upstream_errors", "limited_clients")
LISTENER_COUNTERS = ("connections", "rejected_connections", "resumed_sessions")
LISTENER_COUNTER_MAPS = ("tls_versions", "ciphers")
UPSTREAM_LEVELS = ("healthy", "available", "total")
UPSTREAM_COUNTERS = ("went_down", "came_up", "retries")
TARGET_FLAGS = ("healthy", "cooling_down", "draining", "enabled")
TARGET_LEVELS = ("active", "weight")


class ProtocolError(ValueError):
    """A message that does not follow the schema; the text is safe to log (no payload echoed)."""


# -- messages ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Listener:
    name: str
    address: str


@dataclass(frozen=True, slots=True)
class Hello:
    type: ClassVar[str] = "hello"
    node: str
    version: str
    pid: int
    revision: int
    listeners: tuple[Listener, ...] = ()

    def to_message(self) -> dict[str, Any]:
        return {
            "type": self.type, "node": self.node, "version": self.version, "pid": self.pid,
            "revision": self.revision,
            "listeners": [{"name": lst.name, "address": lst.address} for lst in self.listeners],
        }


@dataclass(frozen=True, slots=True)
class StatsReport:
    type: ClassVar[str] = "stats"
    node: str
    time: float
    totals: dict[str, Any]

    @property
    def started_at(self) -> float:
        return float(self.totals["started_at"])

    def to_message(self) -> dict[str, Any]:
        return {"type": self.type, "node": self.node, "time": self.time, "totals": self.totals}


@dataclass(frozen=True, slots=True)
class RecentRequests:
    type: ClassVar[str] = "requests"
    node: str
    hosts: dict[str, list[tuple[int, str]]]  # host -> [(sequence number, access-log line)]

    def to_message(self) -> dict[str, Any]:
        return {"type": self.type, "node": self.node,
                "hosts": {host: [[seq, line] for seq, line in lines] for host, lines in self.hosts.items()}}


@dataclass(frozen=True, slots=True)
class ConfigApplied:
    type: ClassVar[str] = "config.applied"
    revision: int

    def to_message(self) -> dict[str, Any]:
        return {"type": self.type, "revision": self.revision}


@dataclass(frozen=True, slots=True)
class ConfigRejected:
    type: ClassVar[str] = "config.rejected"
    revision: int
    error: str

    def to_message(self) -> dict[str, Any]:
        return {"type": self.type, "revision": self.revision, "error": self.error}


@dataclass(frozen=True, slots=True)
class ConfigChanged:
    type: ClassVar[str] = "config.changed"
    revision: int

    def to_message(self) -> dict[str, Any]:
        return {"type": self.type, "revision": self.revision}


@dataclass(frozen=True, slots=True)
class RequestsWatch:
    type: ClassVar[str] = "requests.watch"
    host: str
    seconds: int
    resend: bool = False

    def to_message(self) -> dict[str, Any]:
        return {"type": self.type, "host": self.host, "seconds": self.seconds, "resend": self.resend}


NodeMessage = Hello | StatsReport | RecentRequests | ConfigApplied | ConfigRejected
ControlMessage = ConfigChanged | RequestsWatch


# -- validation -------------------------------------------------------------
#
# Every parser returns a clean copy: the fields this module knows, each checked
# against its bound, so what the control plane stores is bounded by this module.


def _keys_are_text(mapping: dict[Any, Any]) -> bool:
    # NUL is refused because PostgreSQL cannot store it in text or jsonb. One join checks
    # every key at C speed (a key that is not a string makes it fail).
    try:
        return "\x00" not in "".join(mapping)
    except TypeError:
        return False


def _object(value: object, what: str, *, limit: int | None = None) -> dict[str, Any]:
    if not isinstance(value, dict) or not _keys_are_text(value):
        raise ProtocolError(f"{what} must be a JSON object")
    if limit is not None and len(value) > limit:
        raise ProtocolError(f"{what} must have at most {limit} entries")
    return value


def _whole(value: object, what: str, limit: int = MAX_COUNTER) -> int:
    # bool is an int to Python, never to the protocol.
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit:
        raise ProtocolError(f"{what} must be a whole number from 0 to {limit}")
    return value


def _int(content: dict[str, Any], key: str, what: str, *, default: int | None = None,
         limit: int = MAX_COUNTER) -> int:
    value = content.get(key, default)
    if type(value) is int and 0 <= value <= limit:  # every counter of every report: no message built
        return value
    return _whole(value, f"{what}: {key!r}", limit)


def _real(value: object, what: str, low: float, high: float) -> float:
    # Compared before any float(): a 400-digit integer must not raise OverflowError; NaN fails both.
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ProtocolError(f"{what} must be a number from {low:g} to {high:g}")
    return float(value)


def _epoch(content: dict[str, Any], key: str, what: str) -> float:
    return _real(content.get(key), f"{what}: {key!r} (an epoch time in seconds)", 0.0, MAX_EPOCH)


def _str(content: dict[str, Any], key: str, what: str, *, limit: int = MAX_NAME_LENGTH,
         empty: bool = False) -> str:
    value = content.get(key)
    if (not isinstance(value, str) or (not value and not empty) or len(value) > limit
            or "\x00" in value):
        raise ProtocolError(f"{what}: {key!r} must be a string of at most {limit} characters")
    return value


def _error_text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ProtocolError(f"{what} must be a string")
    return value.replace("\x00", "")[:MAX_ERROR_LENGTH]


def _valid_name(name: object) -> bool:
    return isinstance(name, str) and 0 < len(name) <= MAX_NAME_LENGTH and "\x00" not in name


def _name(name: str, what: str) -> str:
    if not _valid_name(name):
        raise ProtocolError(f"{what}: a name is empty or longer than {MAX_NAME_LENGTH} characters")
    return name


def _counter_map(value: object, what: str) -> dict[str, int]:
    mapping = _object(value, what, limit=MAX_MAP_ENTRIES)
    # Keys are NUL-free strings already (_object); the per-entry checks only run to say what is wrong.
    if all(type(n) is int and 0 <= n <= MAX_COUNTER and 0 < len(key) <= MAX_NAME_LENGTH
           for key, n in mapping.items()):
        return dict(mapping)
    return {_name(key, what): _whole(n, f"{what} {key[:40]!r}") for key, n in mapping.items()}


def _latency(value: object, what: str) -> dict[str, Any]:
    if value is None:
        return {"buckets": [], "counts": [0], "sum": 0.0}
    latency = _object(value, what)
    buckets, counts = latency.get("buckets"), latency.get("counts")
    if not isinstance(buckets, list) or not isinstance(counts, list) or len(counts) != len(buckets) + 1:
        raise ProtocolError(f"{what}: must have buckets and one more count than buckets")
    if len(buckets) > MAX_LATENCY_BUCKETS:
        raise ProtocolError(f"{what}: must have at most {MAX_LATENCY_BUCKETS} buckets")
    # The common case in one pass each (every report carries one histogram per host); the
    # per-item checks below only run to say what is wrong.
    fine_buckets = [float(b) for b in buckets
                    if (type(b) is float or type(b) is int) and 0.0 <= b <= MAX_LATENCY_SECONDS]
    fine_counts = [c for c in counts if type(c) is int and 0 <= c <= MAX_COUNTER]
    if len(fine_buckets) != len(buckets) or len(fine_counts) != len(counts):
        fine_buckets = [_real(b, f"{what} bucket", 0.0, MAX_LATENCY_SECONDS) for b in buckets]
        fine_counts = [_whole(c, f"{what} count") for c in counts]
    return {
        "buckets": fine_buckets,
        "counts": fine_counts,
        "sum": _real(latency.get("sum", 0.0), f"{what} sum", 0.0, sys.float_info.max),
    }


def _host_stats(value: object, what: str) -> dict[str, Any]:
    host = _object(value, what)
    return {
        **{key: _int(host, key, what, default=0) for key in HOST_COUNTERS},
        **{key: _counter_map(host.get(key, {}), f"{what} {key}") for key in HOST_COUNTER_MAPS},
        "latency": _latency(host.get("latency"), f"{what} latency"),
    }


def _listener_stats(value: object, what: str) -> dict[str, Any]:
    listener = _object(value, what)
    return {
        **{key: _int(listener, key, what, default=0) for key in LISTENER_COUNTERS},
        **{key: _counter_map(listener.get(key, {}), f"{what} {key}") for key in LISTENER_COUNTER_MAPS},
    }


def _config_rejected(value: object) -> dict[str, Any] | None:
    if value is None:
        return None
    rejected = _object(value, "stats config_rejected")
    return {"revision": _int(rejected, "revision", "stats config_rejected"),
            "error": _error_text(rejected.get("error"), "stats config_rejected: 'error'")}


def _target(value: object) -> dict[str, Any]:
    target = _object(value, "stats upstream target")
    last_error = target.get("last_error")
    if last_error is not None:
        last_error = _error_text(last_error, "stats upstream target: 'last_error'")
    for key in TARGET_FLAGS:
        if not isinstance(target.get(key), bool):
            raise ProtocolError(f"stats upstream target: {key!r} must be true or false")
    return {
        "address": _str(target, "address", "stats upstream target"),
        **{key: target[key] for key in TARGET_FLAGS},
        **{key: _int(target, key, "stats upstream target", default=0) for key in TARGET_LEVELS},
        "last_error": last_error,
    }


def _upstream(value: object) -> dict[str, Any]:
    upstream = _object(value, "stats upstream")
    targets = upstream.get("targets", [])
    if not isinstance(targets, list) or len(targets) > MAX_TARGETS:
        raise ProtocolError(f"stats upstream: 'targets' must be a list of at most {MAX_TARGETS}")
    return {
        "targets": [_target(t) for t in targets],
        **{key: _int(upstream, key, "stats upstream", default=0)
           for key in (*UPSTREAM_LEVELS, *UPSTREAM_COUNTERS)},
    }


def _upstreams(value: object) -> dict[str, dict[str, Any]]:
    """The well-formed upstream states of a report; a malformed one is left out."""
    if not isinstance(value, dict):
        return {}
    _object(value, "stats upstreams", limit=MAX_UPSTREAMS)
    found = {}
    for name, upstream in value.items():
        if not _valid_name(name):
            continue
        try:
            found[name] = _upstream(upstream)
        except ProtocolError:
            continue
    return found


def _host_upstreams(value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    _object(value, "stats host_upstreams", limit=MAX_HOSTS)
    return {host: name for host, name in value.items() if _valid_name(host) and _valid_name(name)}


def _workers(value: object) -> dict[str, int]:
    """A node's worker processes (absent: an older or single-process node, one never restarted)."""
    workers = _object(value, "stats workers")
    count = _int(workers, "count", "stats workers", default=1, limit=MAX_WORKERS)
    if count < 1:
        raise ProtocolError(f"stats workers: 'count' must be from 1 to {MAX_WORKERS}")
    return {"count": count, "restarts": _int(workers, "restarts", "stats workers", default=0)}


def validate_totals(totals: object) -> dict[str, Any]:
    """A checked copy of ``Stats.as_dict()``: arithmetic on it cannot fail, and storing it cannot either."""
    checked = _object(totals, "stats totals")
    workers = {"workers": _workers(checked["workers"])} if checked.get("workers") is not None else {}
    hosts = _object(checked.get("hosts", {}), "stats hosts", limit=MAX_HOSTS)
    listeners = _object(checked.get("listeners", {}), "stats listeners", limit=MAX_LISTENERS)
    return {
        "started_at": _epoch(checked, "started_at", "stats totals"),
        "config_revision": _int(checked, "config_revision", "stats totals", default=0),
        "config_rejected": _config_rejected(checked.get("config_rejected")),
        **workers,
        "hosts": {_name(name, "stats hosts"): _host_stats(host, "stats host")
                  for name, host in hosts.items()},
        "listeners": {_name(name, "stats listeners"): _listener_stats(entry, "stats listener")
                      for name, entry in listeners.items()},
        # State, not counters: what is malformed is dropped rather than the whole report.
        "upstreams": _upstreams(checked.get("upstreams", {})),
        "host_upstreams": _host_upstreams(checked.get("host_upstreams", {})),
    }


def _recent_lines(value: object, host: str) -> list[tuple[int, str]]:
    what = f"requests for {host[:40]!r}"
    if not isinstance(value, list) or len(value) > MAX_RECENT_PER_HOST:
        raise ProtocolError(f"{what} must be a list of at most {MAX_RECENT_PER_HOST} lines")
    lines = []
    for entry in value:
        if not isinstance(entry, list) or len(entry) != 2:
            raise ProtocolError(f"{what}: each line must be [sequence number, text]")
        line = entry[1]
        if not isinstance(line, str) or len(line) > MAX_LINE_LENGTH or "\x00" in line:
            raise ProtocolError(f"{what}: a line must be a string of at most {MAX_LINE_LENGTH} characters")
        lines.append((_whole(entry[0], f"{what}: a sequence number"), line))
    return lines


def _recent_requests(message: dict[str, Any]) -> RecentRequests:
    hosts = _object(message.get("hosts"), "requests: 'hosts'", limit=MAX_RECENT_LINES)
    found = {_name(host, "requests: 'hosts'"): _recent_lines(lines, host) for host, lines in hosts.items()}
    if sum(len(lines) for lines in found.values()) > MAX_RECENT_LINES:
        raise ProtocolError(f"requests: at most {MAX_RECENT_LINES} lines in all")
    return RecentRequests(node=_str(message, "node", "requests"), hosts=found)


def _listeners(value: object) -> tuple[Listener, ...]:
    if not isinstance(value, list) or len(value) > MAX_LISTENERS:
        raise ProtocolError(f"hello: 'listeners' must be a list of at most {MAX_LISTENERS}")
    found = []
    for item in value:
        entry = _object(item, "hello listener")
        found.append(Listener(_str(entry, "name", "hello listener"),
                              _str(entry, "address", "hello listener")))
    return tuple(found)


def parse_node_message(content: object) -> NodeMessage:
    """The typed message a node sent, or ``ProtocolError`` saying what is wrong with it."""
    message = _object(content, "message")
    kind = message.get("type")
    if kind == Hello.type:
        return Hello(
            node=_str(message, "node", "hello"),
            version=_str(message, "version", "hello", limit=MAX_VERSION_LENGTH, empty=True),
            pid=_int(message, "pid", "hello", limit=MAX_PID),
            revision=_int(message, "revision", "hello"),
            listeners=_listeners(message.get("listeners", [])),
        )
    if kind == StatsReport.type:
        return StatsReport(
            node=_str(message, "node", "stats"),
            time=_epoch(message, "time", "stats"),
            totals=validate_totals(message.get("totals")),
        )
    if kind == RecentRequests.type:
        return _recent_requests(message)
    if kind == ConfigApplied.type:
        return ConfigApplied(revision=_int(message, "revision", "config.applied"))
    if kind == ConfigRejected.type:
        return ConfigRejected(revision=_int(message, "revision", "config.rejected"),
                              error=_error_text(message.get("error"), "config.rejected: 'error'"))
    if isinstance(kind, str):
        raise ProtocolError(f"unknown message type {kind[:40]!r}")
    raise ProtocolError("message has no 'type'")


def parse_control_message(content: object) -> ControlMessage:
    """The typed message the control plane sent a node."""
    message = _object(content, "message")
    kind = message.get("type")
    if kind == ConfigChanged.type:
        return ConfigChanged(revision=_int(message, "revision", "config.changed"))
    if kind == RequestsWatch.type:
        resend = message.get("resend", False)
        if not isinstance(resend, bool):
            raise ProtocolError("requests.watch: 'resend' must be true or false")
        seconds = _int(message, "seconds", "requests.watch", limit=MAX_WATCH_SECONDS)
        return RequestsWatch(host=_str(message, "host", "requests.watch"), seconds=max(seconds, 1),
                             resend=resend)
    raise ProtocolError("unknown message type from the control plane")


# -- latency ----------------------------------------------------------------


def latency_quantile(buckets: Sequence[float], counts: Sequence[int], q: float) -> float | None:
    """The ``q`` quantile (0..1) of a histogram, interpolated linearly inside its bucket.

    ``buckets`` are the upper bounds of the finite buckets in ascending order and
    ``counts`` has one more entry, the +Inf bucket. As Prometheus'
    ``histogram_quantile`` does, the first bucket starts at 0 and a quantile that
    falls in the +Inf bucket is reported as the highest finite bound. ``None``
    when the histogram is empty.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError("q must be between 0 and 1")
    if len(counts) != len(buckets) + 1:
        raise ValueError("counts must have one entry more than buckets (+Inf)")
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    below = 0
    for index, count in enumerate(counts):
        if count and below + count >= rank:
            if index == len(buckets):
                return float(buckets[-1]) if buckets else None
            lower = float(buckets[index - 1]) if index else 0.0
            upper = float(buckets[index])
            return lower + (upper - lower) * max(rank - below, 0.0) / count
        below += count
    return float(buckets[-1]) if buckets else None  # pragma: no cover - rank <= total always stops above
