"""Strictness rules of the HTTP/1.1 layer: pure functions over what llhttp reported.

llhttp (through httptools) tokenises a head in C and already refuses most
malformed input: bare CR or LF, obs-fold, whitespace before a colon, control
bytes in names or values, non-token names, Content-Length with Transfer-Encoding,
duplicate or malformed Content-Length. What it lets through and a proxy must
not is checked here, once per head: HTTP versions other than 1.0/1.1, loose
request and status lines, Transfer-Encoding other than a single ``chunked``,
Host, absolute-form targets, status codes and reason phrases, chunk-size lines
and trailers. :mod:`proxycore.http1` drives the parsers; every rule lives here
so that the list of what is refused can be read in one place.

Every function raises :class:`ParseError` with status 400; the response parser
turns it into 502.
"""

from __future__ import annotations

import contextlib
import enum
import ipaddress
import re
from collections.abc import Iterable
from typing import Final

import httptools

Fields = tuple[tuple[bytes, bytes], ...]


class ParseError(Exception):
    """A message the proxy refuses; ``status`` is what the peer should be told."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        # What the failing feed() call parsed before the error: earlier pipelined
        # messages, and the head and body so far of a message whose body went bad.
        self.events: list[object] = []


class Framing(enum.Enum):
    """How the body that follows a head is delimited."""

    NONE = "none"  # no body follows, whatever the fields say (HEAD, 1xx, 204, 304, no length)
    LENGTH = "length"  # Content-Length bytes (possibly 0)
    CHUNKED = "chunked"
    UNTIL_CLOSE = "until-close"  # responses only: the body ends when the connection does


# Final: compiled, a C static rather than a class attribute look-up.
_NONE: Final = Framing.NONE
_LENGTH: Final = Framing.LENGTH
_CHUNKED: Final = Framing.CHUNKED

# Fields that decide framing, routing or connection handling; collected while
# llhttp reports the head so that nothing loops over all fields twice.
_SPECIAL: Final = frozenset(
    {b"content-length", b"transfer-encoding", b"host", b"connection", b"upgrade", b"expect"})


class HeadTokens:
    """Every field llhttp reports of a head (or trailer section); its callback object."""

    __slots__ = ("complete", "fields", "special")

    def __init__(self) -> None:
        self.fields: list[tuple[bytes, bytes]] = []
        self.special: dict[bytes, list[bytes]] = {}
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        """Called by httptools once per complete field; llhttp has stripped leading OWS."""
        name = name.lower()
        value = value.rstrip(b" \t")
        self.fields.append((name, value))
        if name in _SPECIAL:
            self.special.setdefault(name, []).append(value)

    def on_headers_complete(self) -> None:
        """Called by llhttp at the empty line that ends the head."""
        self.complete = True


class HeadSeen:
    """The callback object of an llhttp parser that only checks a head: the proxy reads the
    fields it acts on itself (``noted_fields``), so llhttp calls no Python per field."""

    __slots__ = ("complete",)

    def __init__(self) -> None:
        self.complete = False

    def on_headers_complete(self) -> None:
        """Called by llhttp at the empty line that ends the head."""
        self.complete = True


def all_fields(head: bytes, *, request: bool) -> Fields:
    """Every field of a head llhttp has accepted: (lower-cased name, value without OWS)."""
    tokens = HeadTokens()
    parser = httptools.HttpRequestParser(tokens) if request else httptools.HttpResponseParser(tokens)
    with contextlib.suppress(httptools.HttpParserUpgrade):  # upgrades are not llhttp's to decide
        parser.feed_data(head)
    return tuple(tokens.fields)


def _bad(reason: str) -> ParseError:
    return ParseError(400, reason)


# --- lines and fields -------------------------------------------------------

_CTL: Final = bytes(range(0x20)).replace(b"\t", b"") + b"\x7f"
# llhttp also accepts 0.9 (no version at all) and 2.0; a proxy speaks 1.0 and 1.1.
_VERSIONS: Final = frozenset({b"1.1", b"1.0"})


def has_ctl(value: bytes) -> bool:
    """True if ``value`` holds a control byte other than HTAB."""
    return len(value.translate(None, _CTL)) != len(value)


_REQUEST_VERSIONS: Final = {b"HTTP/1.1": b"1.1", b"HTTP/1.0": b"1.0"}


def request_line(head: bytes, method: bytes) -> tuple[bytes, bytes, bytes]:
    """Check that the request line is exactly ``METHOD SP target SP HTTP/1.x``; return its parts.

    llhttp has tokenised the line (``method`` is what it read) and checked the
    target's bytes; it tolerates several spaces between method and target,
    RTSP/ICE protocol names and versions 0.9 and 2.0, which splitting the line on
    single spaces and comparing refuses. The version comes back as ``1.1``/``1.0``.
    """
    parts = head[: head.find(b"\r\n")].split(b" ")
    if len(parts) != 3 or parts[0] != method or not parts[1]:
        raise _bad("malformed request line")
    version = _REQUEST_VERSIONS.get(parts[2])
    if version is None:
        raise _bad("unsupported HTTP version")
    return method, parts[1], version


_STATUS_CODES: Final = {status: b" %d " % status for status in range(100, 600)}


def status_line(head: bytes, status: int) -> tuple[bytes, bytes]:
    """Check ``HTTP/1.x SP 3DIGIT SP reason`` (the SP before an empty reason may be missing).

    Return (version, reason); ``status`` is what llhttp read.
    """
    code = _STATUS_CODES.get(status)
    line = head[: head.find(b"\r\n")]
    version = line[5:8]
    if not line.startswith(b"HTTP/") or version not in _VERSIONS:
        raise _bad("unsupported HTTP version")
    if code is None:
        raise _bad("status code out of range")
    if line[8:13] != code and line[8:] != code[:4]:
        raise _bad("malformed status line")
    reason = line[13:]
    if reason and len(reason.translate(None, _CTL)) != len(reason):  # llhttp lets control bytes by
        raise _bad("control byte in reason phrase")
    return version, reason


HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)


# --- the fields a proxy acts on ------------------------------------------------

# Names a proxy sets itself: what a client sends under them is dropped, never trusted.
PROXY_SET: Final = frozenset({
    b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-port",
    b"forwarded", b"x-real-ip", b"client-cert", b"client-cert-chain",
})


def noted_pattern(
    names: Iterable[bytes], underscored: Iterable[bytes] = (), *, any_case: bool = False
) -> re.Pattern[bytes]:
    """A pattern for the field lines of ``names`` in a head llhttp has accepted.

    After llhttp, a field line is exactly CRLF name ``:`` OWS value, with no CR inside
    the value, so the name is anchored at a CRLF and ends at the colon, and the value
    runs to the next CR. Names in ``underscored`` also match with ``_`` for ``-``:
    CGI-style backends read Client_Cert as HTTP_CLIENT_CERT. The pattern matches
    lower-case names only unless ``any_case`` (a case-blind pattern is twice as slow:
    ``noted_fields`` searches a lower-cased copy of the head instead).
    """
    words = [_atoms(name, False) for name in names] + [_atoms(name, True) for name in underscored]
    flags = re.IGNORECASE if any_case else 0
    return re.compile(rb"\r\n(" + _prefix_tree(words) + rb"):[ \t]*([^\r]*)", flags)


def _atoms(name: bytes, underscored: bool) -> tuple[bytes, ...]:
    """``name`` as one pattern atom per character (``-`` as ``[-_]`` when ``underscored``)."""
    return tuple(b"[-_]" if underscored and c == 0x2D else re.escape(bytes([c])) for c in name)


def _prefix_tree(words: Iterable[tuple[bytes, ...]]) -> bytes:
    """A pattern matching exactly ``words`` (non-empty), factored by their common prefixes.

    A flat ``a|b|c...`` of twenty names makes the regex engine try every name at every
    line of a head; factored (``c(?:on(?:nection|tent-length)|lient-cert...)|...``) it
    reads a line's first letters once: 1,060 fewer instructions per proxied request
    (1.4% of the per-request path, bench/hotpath.py under callgrind).
    """
    branches: dict[bytes, list[tuple[bytes, ...]]] = {}
    for word in words:
        branches.setdefault(word[0], []).append(word[1:])
    parts = []
    for atom, rests in branches.items():
        longer = [rest for rest in rests if rest]
        if not longer:
            parts.append(atom)
        elif len(longer) < len(rests):  # one word ends here, others go on
            parts.append(atom + b"(?:" + _prefix_tree(longer) + b")?")
        else:
            parts.append(atom + _prefix_tree(longer))
    return parts[0] if len(parts) == 1 else b"(?:" + b"|".join(parts) + b")"


# Framing, routing and connection handling need these; hop-by-hop and proxy-set fields are
# noted so that the proxy knows at once whether a head can be forwarded as it came.
_REQUEST_SPECIAL: Final = frozenset({
    b"content-length", b"transfer-encoding", b"host", b"connection", b"upgrade", b"expect",
})
REQUEST_NOTED: Final = noted_pattern(_REQUEST_SPECIAL | HOP_BY_HOP, PROXY_SET)
_RESPONSE_SPECIAL: Final = frozenset({b"content-length", b"transfer-encoding", b"connection", b"upgrade"})
STS: Final = b"strict-transport-security"
RESPONSE_NOTED: Final = noted_pattern(_RESPONSE_SPECIAL | HOP_BY_HOP | {STS})


def noted_fields(head: bytes, pattern: re.Pattern[bytes]) -> dict[bytes, list[bytes]]:
    """The fields of ``head`` that ``pattern`` notes: name -> values in order, both lower-cased
    (what a proxy decides on is case-blind: framing, Host, connection options)."""
    noted: dict[bytes, list[bytes]] = {}
    for name, value in pattern.findall(head.lower()):
        values = noted.get(name)
        if values is None:
            noted[name] = [value.rstrip(b" \t")]
        else:
            values.append(value.rstrip(b" \t"))
    return noted


# --- framing ---------------------------------------------------------------


def body_framing(special: dict[bytes, list[bytes]]) -> tuple[Framing, int]:
    """Framing declared by the fields: (LENGTH, n), (CHUNKED, 0) or (NONE, 0).

    Transfer-Encoding must be exactly one field whose value is ``chunked``
    (case-insensitive, surrounding OWS ignored): any other coding, a list, or a
    second field is refused rather than guessed at, so that the proxy and the
    upstream can never disagree on where a body ends.
    """
    te = special.get(b"transfer-encoding")
    cl = special.get(b"content-length")
    if te is not None:
        if cl is not None:
            raise _bad("both Content-Length and Transfer-Encoding")
        if len(te) != 1 or te[0].lower() != b"chunked":
            raise _bad("Transfer-Encoding other than a single chunked")
        return _CHUNKED, 0
    if cl is not None:
        if len(cl) != 1:
            raise _bad("more than one Content-Length")
        value = cl[0]
        if not value.isdigit() or len(value) > 18:  # isdigit: ASCII digits only, false on b""
            raise _bad("malformed Content-Length")
        return _LENGTH, int(value)
    return _NONE, 0


_HEX: Final = b"0123456789abcdefABCDEF"
MAX_CHUNK_LINE: Final = 4096  # size plus extensions; extensions are ignored, not buffered forever


def chunk_size(line: bytes) -> int:
    """Size of a chunk from its size line (CRLF removed): 1-16 hex digits, then ``;ext``.

    Extensions are allowed and ignored (RFC 9112 §7.1.1) but may hold no control
    byte, which also refuses a bare CR or LF inside the line.
    """
    if 0 < len(line) <= 16 and not line.translate(None, _HEX):  # the usual line: no extension
        return int(line, 16)
    size, semi, ext = line.partition(b";")
    if semi:
        size = size.rstrip(b" \t")  # BWS before ';'
    if not size or len(size) > 16 or size.translate(None, _HEX) or has_ctl(ext):
        raise _bad("invalid chunk size line")
    return int(size, 16)


_TRAILER_PREFIX: Final = b"GET / HTTP/1.1\r\n"
_FORBIDDEN_TRAILERS: Final = frozenset({b"content-length", b"transfer-encoding", b"host"})


def trailer_fields(lines: list[bytes]) -> Fields:
    """Parse and check a trailer section given as its lines without CRLF.

    The lines go through llhttp behind a dummy request line, so trailers obey
    exactly the field rules of heads (no bare CR/LF, obs-fold, bad names...).
    """
    tokens = HeadTokens()
    parser = httptools.HttpRequestParser(tokens)
    try:
        parser.feed_data(b"%s%s\r\n\r\n" % (_TRAILER_PREFIX, b"\r\n".join(lines)))
    except httptools.HttpParserUpgrade:
        pass
    except httptools.HttpParserError as exc:
        raise _bad(f"malformed trailer: {exc}") from None
    if not tokens.complete:
        raise _bad("malformed trailer")
    if not _FORBIDDEN_TRAILERS.isdisjoint(tokens.special):
        raise _bad("framing or Host field in trailer")
    return tuple(tokens.fields)


# --- requests: Host and target ------------------------------------------------

# A proxy routes on Host, so reg-names are held to DNS-like characters.
_HOST_CHARS: Final = b"abcdefghijklmnopqrstuvwxyz0123456789-._"


def _valid_port(port: bytes) -> bool:
    return 0 < len(port) <= 5 and port.isdigit() and int(port) <= 65535


def check_host(value: bytes) -> bytes:
    """Return the lower-cased ``host[:port]``, refusing anything else.

    host is a reg-name of letters, digits, ``-._`` (at most 253 bytes), an IPv4
    address (same characters) or a bracketed IPv6 literal; a port, when its
    colon is present, is 1-65535.
    """
    host = value.lower()
    if host.startswith(b"["):
        address, bracket, port = host[1:].partition(b"]")
        try:
            ipaddress.IPv6Address(address.decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            raise _bad("invalid Host") from None
        if not bracket or (port and not (port[:1] == b":" and _valid_port(port[1:]))):
            raise _bad("invalid Host")
        return host
    name, colon, port = host.partition(b":")
    if not name or len(name) > 253 or name.translate(None, _HOST_CHARS) or (colon and not _valid_port(port)):
        raise _bad("invalid Host")
    return host


def request_host(values: list[bytes] | None, version: bytes) -> bytes:
    """The single Host of a request; HTTP/1.0 may omit it (``b""``)."""
    if values is None:
        if version == b"1.1":
            raise _bad("missing Host")
        return b""
    if len(values) != 1:
        raise _bad("more than one Host")
    return check_host(values[0])


def resolve_target(method: bytes, target: bytes, host: bytes) -> tuple[bytes, bytes]:
    """Return (origin-form target, host) for a request target.

    origin-form passes through; ``*`` only with OPTIONS. An absolute-form
    target (``http(s)://authority/path``) must name the same authority as Host,
    byte for byte after lower-casing (``a`` and ``a:80`` differ), and is reduced
    to its path and query, which is what the upstream is sent. CONNECT
    (authority-form) is refused: a reverse proxy tunnels nothing on request.
    """
    if target.startswith(b"/"):
        return target, host
    if target == b"*" and method == b"OPTIONS":
        return target, host
    if method == b"CONNECT":
        raise _bad("CONNECT is not supported")
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        raise _bad("malformed request target")
    cut = len(rest)
    for delimiter in b"/?#":
        at = rest.find(delimiter)
        if at != -1 and at < cut:
            cut = at
    authority = check_host(rest[:cut])
    if host and authority != host:
        raise _bad("absolute-form target disagrees with Host")
    path = rest[cut:]
    if not path.startswith(b"/"):
        path = b"/" + path
    return path, authority


# --- connection management ------------------------------------------------------

# Listing these in Connection must not make a proxy drop them (hop-by-hop abuse).
_NEVER_HOP_BY_HOP: Final = frozenset({b"host", b"content-length"})
_NO_TOKENS: frozenset[bytes] = frozenset()
_EMPTY: Final = frozenset({b""})


def tokens_of(values: Iterable[bytes]) -> frozenset[bytes]:
    """Lower-cased, non-empty tokens of comma-separated field values."""
    return frozenset([token.strip(b" \t") for token in b",".join(values).lower().split(b",")]) - _EMPTY


def connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Options named in the Connection fields of ``headers`` (lower-cased names)."""
    return tokens_of(value for name, value in headers if name == b"connection")


def expect_continue(values: list[bytes]) -> bool:
    """Expect holds 100-continue (other expectations are left to the caller)."""
    return any(value.lower() == b"100-continue" for value in values)


# Connection values seen on nearly every message, tokenised once.
_COMMON_OPTIONS: Final = {
    value: tokens_of([value])
    for value in (b"keep-alive", b"Keep-Alive", b"close", b"Close", b"upgrade", b"Upgrade",
                  b"keep-alive, Upgrade", b"Keep-Alive, Upgrade")
}


def connection_options(special: dict[bytes, list[bytes]]) -> frozenset[bytes]:
    values = special.get(b"connection")
    if not values:
        return _NO_TOKENS
    if len(values) == 1:
        common = _COMMON_OPTIONS.get(values[0])
        if common is not None:
            return common
    return tokens_of(values)
