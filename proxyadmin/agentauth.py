"""The agent link's credential: one bearer token shared by the control plane and its nodes.

The token is ``settings.AGENT_TOKEN`` (env ``PROXYADMIN_AGENT_TOKEN``, or generated
once into ``var/agent_token``, mode 0600). It is compared in constant time and
never logged; a browser session is no substitute for it.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping
from typing import Any

from django.conf import settings

Headers = Iterable[tuple[bytes, bytes]]


def bearer_token(headers: Headers) -> bytes | None:
    """The token of the first ``Authorization: Bearer ...`` header, or None."""
    for name, value in headers:
        if name.lower() != b"authorization":
            continue
        scheme, _, token = value.strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return None
        return token.strip() or None
    return None


def token_is_valid(presented: bytes | None, expected: str | None = None) -> bool:
    expected = settings.AGENT_TOKEN if expected is None else expected
    if not presented or not expected:
        return False
    return hmac.compare_digest(presented, expected.encode("utf-8"))


def scope_is_agent(scope: Mapping[str, Any]) -> bool:
    """Whether a websocket scope carries the agent token (cookies and sessions do not count)."""
    return token_is_valid(bearer_token(scope.get("headers", ())))


def peer_address(scope: Mapping[str, Any]) -> str:
    """The peer as ``host:port`` for logs (daphne's ``--proxy-headers`` fills in the real one)."""
    client = scope.get("client")
    if not client:
        return "unknown peer"
    host, port = client[0], client[1] if len(client) > 1 else None
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
