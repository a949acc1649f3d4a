"""The responses the proxy makes itself: small, plain, documented bodies.

Each carries ``Content-Length`` and, over HTTPS, the host's HSTS header exactly
once (``render``), like any upstream response.
"""

from __future__ import annotations

from proxycore import http1
from proxycore.config import HSTS
from proxycore.routing import client_response_headers

REASONS: dict[int, bytes] = {
    100: b"Continue", 200: b"OK", 301: b"Moved Permanently", 308: b"Permanent Redirect",
    400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed",
    408: b"Request Timeout", 413: b"Content Too Large",
    414: b"URI Too Long", 421: b"Misdirected Request", 431: b"Request Header Fields Too Large",
    500: b"Internal Server Error", 502: b"Bad Gateway", 503: b"Service Unavailable",
    504: b"Gateway Timeout",
}

# The body of each error the proxy makes; documented in the README.
BODIES: dict[int, bytes] = {
    400: b"400 Bad Request: the request is malformed.\n",
    404: b"404 Not Found\n",
    405: b"405 Method Not Allowed: this host does not accept TRACE.\n",
    408: b"408 Request Timeout: the request did not arrive in time.\n",
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


def render(
    status: int, *, hsts: HSTS | None, https: bool, close: bool,
    extra: list[tuple[bytes, bytes]] | None = None, body: bytes | None = None,
    head_only: bool = False, keep_alive_line: bool = False,
) -> tuple[bytes, int]:
    """A whole response the proxy makes (head and body), and its body's length.

    ``body`` defaults to the status's documented one; ``extra`` fields come first (a
    redirect's Location); ``head_only`` leaves the body out (an answer to HEAD);
    ``keep_alive_line`` tells an HTTP/1.0 client that the connection stays open.
    """
    if body is None:
        body = BODIES.get(status, b"%d\n" % status)
    headers = list(extra) if extra else []
    if not any(name == b"content-type" for name, _ in headers):
        headers.append((b"content-type", b"text/plain; charset=utf-8"))
    headers += [(b"content-length", b"%d" % len(body)), (b"cache-control", b"no-store")]
    headers = client_response_headers(headers, hsts=hsts, https=https)
    if close:
        headers.append((b"connection", b"close"))
    elif keep_alive_line:
        headers.append((b"connection", b"keep-alive"))
    head = http1.serialize_response_head(status, reason(status), headers)
    return (head if head_only else head + body), len(body)
