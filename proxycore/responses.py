"""The responses the proxy makes itself: small, plain, documented bodies.

Each carries ``Content-Length``; HSTS is added by the caller through
``routing.client_response_headers`` like for any upstream response.
"""

from __future__ import annotations

REASONS: dict[int, bytes] = {
    100: b"Continue", 301: b"Moved Permanently", 308: b"Permanent Redirect",
    400: b"Bad Request", 404: b"Not Found", 408: b"Request Timeout", 413: b"Content Too Large",
    414: b"URI Too Long", 421: b"Misdirected Request", 431: b"Request Header Fields Too Large",
    500: b"Internal Server Error", 502: b"Bad Gateway", 503: b"Service Unavailable",
    504: b"Gateway Timeout",
}

# The body of each error the proxy makes; documented in the README.
BODIES: dict[int, bytes] = {
    400: b"400 Bad Request: the request is malformed.\n",
    404: b"404 Not Found\n",
    408: b"408 Request Timeout: the request head did not arrive in time.\n",
    413: b"413 Content Too Large: the request body exceeds this host's limit.\n",
    414: b"414 URI Too Long: the request line is too long.\n",
    421: b"421 Misdirected Request: this host is not served on this connection.\n",
    431: b"431 Request Header Fields Too Large\n",
    502: b"502 Bad Gateway: the upstream server failed to answer.\n",
    503: b"503 Service Unavailable: no upstream server is available.\n",
    504: b"504 Gateway Timeout: the upstream server did not answer in time.\n",
}


def reason(status: int) -> bytes:
    return REASONS.get(status, b"Unknown")


def error_headers(status: int, *, close: bool) -> tuple[list[tuple[bytes, bytes]], bytes]:
    body = BODIES.get(status, b"%d\n" % status)
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", b"%d" % len(body)),
        (b"cache-control", b"no-store"),
    ]
    if close:
        headers.append((b"connection", b"close"))
    return headers, body
