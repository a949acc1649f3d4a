"""The Content-Security-Policy of every control-plane response.

The admin and the dashboard load their scripts and styles from static files
only; nothing inline is allowed, so an injected ``<script>`` or ``style``
attribute does nothing. The dashboard's websocket is same-origin: CSP Level 3
matches ``ws:``/``wss:`` to the page's own host under ``'self'`` (Chromium,
Firefox and Safari all do).
"""

from __future__ import annotations

from collections.abc import Callable

from django.http import HttpRequest, HttpResponse

POLICY = "; ".join([
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data:",
    "connect-src 'self'",
    "frame-ancestors 'none'",
    "base-uri 'none'",
    "form-action 'self'",
    "object-src 'none'",
])


class ContentSecurityPolicyMiddleware:
    """Adds ``POLICY`` to each response that does not bring its own."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        response.headers.setdefault("Content-Security-Policy", POLICY)
        return response
