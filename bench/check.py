"""Before any load: one request per path through a server must come back right."""

from __future__ import annotations

import socket
import ssl

from bench.certs import SERVER_NAME, CertFiles
from bench.servers import BULK_SIZE, HSTS_VALUE, SMALL_BODY, Server

Response = tuple[int, dict[str, list[str]], bytes, str]


def _get(port: int, path: str, context: ssl.SSLContext,
         session: list[ssl.SSLSession | None] | None = None) -> Response:
    """GET ``path`` on a new connection; ``session`` (a one-item list) is offered and updated."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    offer = session[0] if session else None
    with context.wrap_socket(raw, server_hostname=SERVER_NAME, session=offer) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {SERVER_NAME}:{port}\r\n"
                     "X-Forwarded-For: 6.6.6.6\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        cipher = sock.cipher()
        tls = f"{sock.version()} {cipher[0] if cipher else '?'}"
        if sock.session_reused:
            tls += " resumed"
        if session is not None:
            session[0] = sock.session
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return int(lines[0].split()[1]), headers, body, tls


def check_server(server: Server, certs: CertFiles, expect_hsts: bool = True) -> str:
    """Raise AssertionError with the reason unless the server proxies correctly; return the TLS in use."""
    context = ssl.create_default_context(cafile=str(certs.ca))
    tls = ""
    for path, size in (("/small", len(SMALL_BODY)), ("/1m", BULK_SIZE)):
        status, headers, body, tls = _get(server.port, path, context)
        where = f"{server.label} GET {path}"
        assert status == 200, f"{where}: status {status}, body {body[:200]!r}"
        length = headers.get("content-length", [str(len(body))])[0]
        assert len(body) == size, (
            f"{where}: body of {len(body)} bytes (Content-Length {length}), expected {size}"
        )
        if expect_hsts:
            sts = headers.get("strict-transport-security", [])
            assert sts == [HSTS_VALUE], f"{where}: Strict-Transport-Security {sts}, expected [{HSTS_VALUE!r}]"
    status, _, body, _ = _get(server.port, "/headers", context)
    text = body.decode("latin-1").strip()
    assert status == 200 and "xff=127.0.0.1 " in text and "proto=https" in text, (
        f"{server.label}: the backend saw {text!r} (want X-Forwarded-For 127.0.0.1, overwritten, "
        "and X-Forwarded-Proto https)"
    )
    return tls


def resumes_sessions(server: Server, certs: CertFiles) -> bool:
    """Whether a second connection offering the first one's session gets it resumed."""
    context = ssl.create_default_context(cafile=str(certs.ca))
    session: list[ssl.SSLSession | None] = [None]
    _get(server.port, "/small", context, session)
    return _get(server.port, "/small", context, session)[3].endswith(" resumed")
