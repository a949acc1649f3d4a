"""The private channel between a node's supervisor and each of its workers.

One Unix stream socket pair per worker, made by the supervisor; the worker gets its end
as an inherited file descriptor. Frames are a 4-byte big-endian length and a pickle.
Pickle is safe here because both ends are the same program, started by the same user,
over a socket pair nobody else holds: nothing from the network is ever unpickled.

Supervisor → worker: ``Setup`` (first, once), ``Load`` (a new snapshot), ``Health``
(the supervisor's health verdicts), ``Watch`` (a dashboard watches a host's recent
requests), ``Stop``. Worker → supervisor: ``Ready``, ``Loaded``, ``Report`` (its counters
and recent lines, once a second), ``Cooldown`` (a target it put in a passive cool-down,
for the other workers to follow).
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from dataclasses import dataclass
from typing import Any

from proxycore.agentproto import RequestsWatch
from proxycore.config import Snapshot
from proxycore.limits import Limits
from proxycore.upstream import PoolKey

MAX_FRAME = 256 << 20  # a snapshot of thousands of hosts with their certificates fits
_LENGTH = struct.Struct(">I")

@dataclass(frozen=True, slots=True)
class ListenerSocket:
    name: str  # "https" or "http"
    fd: int  # inherited: the worker's own SO_REUSEPORT socket of this listener


@dataclass(frozen=True, slots=True)
class Setup:
    index: int  # 1..N: the worker's number in the log
    snapshot: Snapshot
    listeners: tuple[ListenerSocket, ...]
    limits: Limits
    ticket_secret: bytes  # the node's: every worker derives the same session-ticket keys
    session_resumption: bool
    access_log: str | None  # a file path, "-" for stdout, None for none
    recent: bool  # keep recent lines per host for the dashboard
    log_level: int
    health: dict[PoolKey, tuple[bool, str]]


@dataclass(frozen=True, slots=True)
class Load:
    snapshot: Snapshot


@dataclass(frozen=True, slots=True)
class Health:
    verdicts: dict[PoolKey, tuple[bool, str]]  # pool -> (healthy, last error) by the active checks


@dataclass(frozen=True, slots=True)
class Cooldown:
    pool: PoolKey
    upstream: str
    seconds: float
    error: str


@dataclass(frozen=True, slots=True)
class Watch:
    request: RequestsWatch


@dataclass(frozen=True, slots=True)
class Stop:
    deadline: float  # seconds in-flight requests get


@dataclass(frozen=True, slots=True)
class Ready:
    pid: int
    revision: int


@dataclass(frozen=True, slots=True)
class Loaded:
    revision: int
    error: str  # empty: applied


@dataclass(frozen=True, slots=True)
class Report:
    totals: dict[str, Any]  # Stats.as_dict()
    recent: dict[str, list[tuple[int, str]]]  # RecentLines.take()


def frame(message: object) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    if len(data) > MAX_FRAME:
        raise ValueError(f"a worker message of {len(data)} bytes is over {MAX_FRAME}")
    return _LENGTH.pack(len(data)) + data


async def receive(reader: asyncio.StreamReader) -> object:
    """The next message; ``asyncio.IncompleteReadError`` when the other end is gone."""
    (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    if length > MAX_FRAME:
        raise ValueError(f"a worker message of {length} bytes is over {MAX_FRAME}")
    # Only ever the supervisor or one of its workers at the other end (see above).
    return pickle.loads(await reader.readexactly(length))  # noqa: S301


def send(writer: asyncio.StreamWriter, message: object) -> None:
    writer.write(frame(message))
