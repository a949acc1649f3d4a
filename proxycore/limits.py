"""Timeouts and size limits of a proxy node, with their documented defaults."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Limits:
    handshake_timeout: float = 10.0  # TLS handshake must finish within
    head_timeout: float = 10.0  # a whole request head, from its first byte (slowloris)
    idle_timeout: float = 60.0  # keep-alive connection with no request in progress
    body_timeout: float = 60.0  # a request body that stops arriving for this long: 408
    max_head_size: int = 16 * 1024  # request line + headers (431 beyond)
    max_request_line: int = 8 * 1024  # (414 beyond)
    max_connections: int = 10_000  # per listener; more are closed at once
    stop_deadline: float = 30.0  # graceful stop: in-flight requests get this long
    max_buffered_body: int = 256 * 1024  # request body held while the upstream connects
