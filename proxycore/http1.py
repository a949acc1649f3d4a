"""Sans-I/O HTTP/1.1 for the data plane: bytes in, events out, no sockets.

A parser is fed the bytes of one connection and returns events; the asyncio
protocol moves bytes and acts on events. Who does what:

* Python frames messages. It finds the end of each head (CRLF CRLF) with one
  ``bytes.find``, enforces the head limits (414, 431) before anything else sees
  the bytes, and walks Content-Length and chunked bodies with slices -- one
  slice per piece of body, never a loop over bytes. llhttp sees a body only to
  count it, when that lets its parser take the next head.
* llhttp (httptools) checks each head in C, calling no Python per field, and
  refuses most malformed heads on its own (bare CR/LF, obs-fold, space before
  colon, control bytes, bad names, Content-Length conflicts). The fields the
  proxy acts on are then read with one pattern (``noted_fields``); the head is
  kept as the bytes it came as (``raw``), for the proxy to forward.
* :mod:`proxycore.http1_checks` holds every rule llhttp does not enforce.
  A message whose head breaks a rule raises :class:`ParseError` before its
  head event is returned; requests get the status to answer (400, 413, 414,
  431), responses always 502.

Event order, per message: a head, then ``BodyData``* and ``MessageEnd`` --
except that an interim (1xx) response is a lone ``ResponseHead``, and an
upgrade request or a 101 response is its head followed by ``Upgraded``, which
takes ``MessageEnd``'s place: the bytes after it are the tunnel's. After
``Upgraded`` every feed() returns ``[Upgraded(data)]``; if the upstream declines
an upgrade, the bytes already handed over are lost to HTTP, so close the
connection after the response. After a message that does not keep the
connection alive, further bytes are ignored (RFC 9112 §9.6). After a
ParseError the parser is dead and raises it again; ``ParseError.events``
holds what that feed() parsed before the error, so pipelined requests ahead
of a bad one can still be answered.

Input is ``bytes``. Body bytes that fill a whole feed() are handed on as the
very same object (the usual case for Content-Length bodies: no copy); others
cost one slice.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Final, Generic, TypeVar, cast

import httptools

from proxycore.http1_checks import (
    HOP_BY_HOP,
    MAX_CHUNK_LINE,
    REQUEST_NOTED,
    RESPONSE_NOTED,
    Fields,
    Framing,
    HeadSeen,
    ParseError,
    all_fields,
    body_framing,
    chunk_size,
    connection_options,
    connection_tokens,
    expect_continue,
    noted_fields,
    request_host,
    request_line,
    resolve_target,
    status_line,
    trailer_fields,
)

if TYPE_CHECKING:
    from httptools.parser.parser import HttpParser

__all__ = [
    "HOP_BY_HOP",
    "LAST_CHUNK",
    "BodyData",
    "Framing",
    "MessageEnd",
    "ParseError",
    "RequestHead",
    "RequestParser",
    "ResponseHead",
    "ResponseParser",
    "Upgraded",
    "connection_tokens",
    "encode_chunk",
    "serialize_response_head",
]


class RequestHead:
    """A checked request head. Plain slots, not a frozen dataclass: one is made per request.

    ``raw`` is the head as received, request line to the empty line; a proxy that
    changes nothing in it can forward it as it is. ``noted`` holds the fields the
    proxy acts on (framing, Host, connection options, hop-by-hop and forwarding
    fields: ``http1_checks.REQUEST_NOTED``), name -> values in order, lower-cased;
    ``headers`` every field, parsed only when asked for.
    """

    __slots__ = (
        "_headers", "content_length", "expect_continue", "framing", "host", "keep_alive", "method",
        "noted", "options", "raw", "target", "upgrade", "version",
    )  # fmt: skip

    def __init__(
        self,
        method: bytes,
        target: bytes,  # origin-form (an absolute-form target is reduced to path and query), or b"*"
        version: bytes,  # b"1.1" or b"1.0"
        raw: bytes,
        host: bytes,  # lower-cased host[:port]; b"" for HTTP/1.0 without Host
        framing: Framing,  # NONE, LENGTH or CHUNKED
        content_length: int,  # meaningful when framing is LENGTH
        keep_alive: bool,
        upgrade: bytes | None,  # lower-cased Upgrade value, set only on a body-less HTTP/1.1 upgrade
        expect_continue: bool,
        noted: dict[bytes, list[bytes]] | None = None,
        options: frozenset[bytes] | None = None,  # Connection tokens, lower-cased
    ) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.raw = raw
        self.host = host
        self.framing = framing
        self.content_length = content_length
        self.keep_alive = keep_alive
        self.upgrade = upgrade
        self.expect_continue = expect_continue
        self.noted = noted if noted is not None else noted_fields(raw, REQUEST_NOTED)
        self.options = options if options is not None else connection_options(self.noted)
        self._headers: Fields | None = None

    @property
    def headers(self) -> Fields:
        """Every field: (lower-cased name, value without surrounding OWS), as received."""
        if self._headers is None:
            self._headers = all_fields(self.raw, request=True)
        return self._headers

    def _key(self) -> tuple[object, ...]:
        return (self.method, self.target, self.version, self.raw, self.host, self.framing,
                self.content_length, self.keep_alive, self.upgrade, self.expect_continue)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RequestHead) and self._key() == other._key()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        version = self.version.decode()
        return f"RequestHead({self.method!r} {self.target!r} HTTP/{version}, host={self.host!r})"


class ResponseHead:
    """A checked response head; ``raw``, ``noted`` (``http1_checks.RESPONSE_NOTED``) and
    ``headers`` as for :class:`RequestHead`."""

    __slots__ = (
        "_headers", "content_length", "framing", "keep_alive", "noted", "options", "raw", "reason", "status",
        "version",
    )  # fmt: skip

    def __init__(
        self,
        status: int,
        reason: bytes,
        version: bytes,
        raw: bytes,
        framing: Framing,  # NONE for HEAD, 1xx, 204, 304 whatever the fields say
        content_length: int,
        keep_alive: bool,
        noted: dict[bytes, list[bytes]] | None = None,
        options: frozenset[bytes] | None = None,  # Connection tokens, lower-cased
    ) -> None:
        self.status = status
        self.reason = reason
        self.version = version
        self.raw = raw
        self.framing = framing
        self.content_length = content_length
        self.keep_alive = keep_alive
        self.noted = noted if noted is not None else noted_fields(raw, RESPONSE_NOTED)
        self.options = options if options is not None else connection_options(self.noted)
        self._headers: Fields | None = None

    @property
    def headers(self) -> Fields:
        if self._headers is None:
            self._headers = all_fields(self.raw, request=False)
        return self._headers

    def _key(self) -> tuple[object, ...]:
        return (self.status, self.reason, self.version, self.raw, self.framing, self.content_length,
                self.keep_alive)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ResponseHead) and self._key() == other._key()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ResponseHead({self.status} {self.reason!r} HTTP/{self.version.decode()}, {self.framing})"


@dataclass(slots=True)  # not frozen: one per piece of body, and frozen dataclasses are slow to make
class BodyData:
    data: bytes  # de-chunked payload, never empty


@dataclass(frozen=True, slots=True)
class MessageEnd:
    trailers: Fields = ()


@dataclass(slots=True)
class Upgraded:
    rest: bytes  # bytes after the head: the tunnel starts here


RequestEvent = RequestHead | BodyData | MessageEnd | Upgraded
ResponseEvent = ResponseHead | BodyData | MessageEnd | Upgraded

H = TypeVar("H", RequestHead, ResponseHead)

# Final: compiled, int constants are inlined and other constants are C statics, where a
# plain module name is a dictionary look-up (bench/hotpath.py under callgrind).

# What follows a head.
_BODY: Final = 0
_INTERIM: Final = 1
_SWITCH: Final = 2

# Parser states. _HEAD: between messages or inside a head; the chunk states
# walk size line -> data -> CRLF -> ... -> size 0 -> trailer lines -> empty line.
_HEAD: Final = 0
_LENGTH: Final = 1
_CHUNK_SIZE: Final = 2
_CHUNK_DATA: Final = 3
_CHUNK_END: Final = 4
_TRAILERS: Final = 5
_UNTIL_CLOSE: Final = 6
_CLOSED: Final = 7
_UPGRADED: Final = 8

_END: Final = MessageEnd()
_NO_OPTIONS: Final[frozenset[bytes]] = frozenset()
_NONE: Final = Framing.NONE
_LENGTH_FRAMING: Final = Framing.LENGTH
_CHUNKED: Final = Framing.CHUNKED
_UNTIL_CLOSE_FRAMING: Final = Framing.UNTIL_CLOSE


class _MessageParser(Generic[H]):
    """Framing shared by requests and responses; subclasses turn a head into an event."""

    __slots__ = (
        "_body_size",
        "_buf",
        "_error",
        "_keep_alive",
        "_left",
        "_line",
        "_ll",
        "_ll_ready",
        "_max_body",
        "_max_head",
        "_seen",
        "_state",
        "_trailer_size",
        "_trailers",
    )
    _error_status: ClassVar[int | None] = None  # forced on every ParseError (502 for responses)
    _llhttp: ClassVar[type[HttpParser]]  # the llhttp parser class
    # A message without Content-Length or Transfer-Encoding has no body for llhttp too: true
    # of requests, not of responses (a response to HEAD may announce a length).
    _bodiless_agrees: ClassVar[bool] = False

    def __init__(self, max_head_size: int, max_body_size: int | None) -> None:
        # limits
        self._max_head = max_head_size
        self._max_body = max_body_size
        # per-connection
        self._state = _HEAD
        self._error: ParseError | None = None
        self._keep_alive = True
        # per-head
        self._buf = bytearray()  # bytes of a head that is not complete yet
        self._seen = HeadSeen()  # llhttp reports the end of each head here
        self._ll_ready = False  # self._ll stands between two messages: reuse it for the next head
        self._ll: HttpParser | None = None
        # per-body
        self._left = 0  # bytes left in the Content-Length body or current chunk
        self._body_size = 0
        self._line = bytearray()  # incomplete chunk-size, chunk-end or trailer line
        self._trailers: list[bytes] = []
        self._trailer_size = 0

    # --- public ---------------------------------------------------------------

    def feed(self, data: bytes) -> list[H | BodyData | MessageEnd | Upgraded]:
        """Parse ``data``; return the events it completes. Raises ParseError."""
        if self._error is not None:
            raise self._error
        events: list[H | BodyData | MessageEnd | Upgraded] = []
        try:
            pos = 0
            if self._state == _HEAD and not self._buf and not data.startswith(b"\r\n"):
                # The usual case, one call deep: a whole head at the start of the data.
                end = data.find(b"\r\n\r\n", 0, self._max_head)
                if end != -1:
                    after = end + 4
                    head = data if after == len(data) else data[:after]
                    pos = self._finish_head(head, 0, data, after, events)
            if pos < len(data):
                self._run(data, pos, events)
        except ParseError as exc:
            raise self._fail(exc, events) from None
        return events

    @property
    def in_head(self) -> bool:
        """Part of a head has arrived and the rest has not (what a head timeout watches)."""
        return self._state == _HEAD and bool(self._buf)

    def feed_eof(self) -> list[H | BodyData | MessageEnd | Upgraded]:
        """The peer closed: end an UNTIL_CLOSE body, or raise if a message is cut short."""
        if self._error is not None:
            raise self._error
        state = self._state
        if state != _UPGRADED:
            self._state = _CLOSED
        if state == _UNTIL_CLOSE:
            return [_END]
        if state in (_CLOSED, _UPGRADED) or (state == _HEAD and not self._buf):
            return []
        raise self._fail(ParseError(400, "connection closed in the middle of a message"), [])

    # --- driving ----------------------------------------------------------------

    def _fail(self, exc: ParseError, events: list[H | BodyData | MessageEnd | Upgraded]) -> ParseError:
        if self._error_status is not None and exc.status != self._error_status:
            exc = ParseError(self._error_status, exc.reason)
        exc.events = list(events)
        self._error = exc
        return exc

    def _run(self, data: bytes, pos: int, events: list[H | BodyData | MessageEnd | Upgraded]) -> None:
        end = len(data)
        while pos < end:
            state = self._state
            if state == _HEAD:
                pos = self._feed_head(data, pos, events)
            elif state in (_LENGTH, _CHUNK_DATA):
                pos = self._feed_counted(data, pos, events)
            elif state == _UNTIL_CLOSE:
                events.append(BodyData(data[pos:]))
                return
            elif state == _UPGRADED:
                events.append(Upgraded(data[pos:]))
                return
            elif state == _CLOSED:
                return
            elif state == _CHUNK_SIZE and not self._line:
                pos = self._feed_chunks(data, pos, events)
            else:
                pos = self._feed_chunk_line(data, pos, events)

    def _feed_head(self, data: bytes, pos: int, events: list[H | BodyData | MessageEnd | Upgraded]) -> int:
        buf = self._buf
        if not buf:
            while data.startswith(b"\r\n", pos):  # RFC 9112 §2.2: empty lines before a message
                pos += 2
            if pos == len(data):
                return pos
            end = data.find(b"\r\n\r\n", pos, pos + self._max_head)
            if end != -1:  # the usual case: the whole head is in this piece of data
                head = data if pos == 0 and end + 4 == len(data) else data[pos : end + 4]
                return self._finish_head(head, 0, data, end + 4, events)
        old = len(buf)
        if not old:  # the first bytes of a head that did not come whole
            self._seen.complete = False
            if not self._ll_ready:
                self._ll = self._llhttp(self._seen)
            self._ll_ready = False
        piece = data[pos : pos + self._max_head + 4 - old]  # never buffer past the limit
        buf += piece
        end = buf.find(b"\r\n\r\n", max(0, old - 3))
        if end == -1:
            self._check_size(buf)
            self._feed_llhttp(piece)  # so that garbage is refused now, not at the limit
            return len(data)
        head = bytes(buf[: end + 4])
        buf.clear()
        return self._finish_head(head, old, data, pos + end + 4 - old, events)

    def _finish_head(
        self,
        head: bytes,
        fed: int,
        data: bytes,
        after: int,
        events: list[H | BodyData | MessageEnd | Upgraded],
    ) -> int:
        """``head`` is complete, llhttp has seen its first ``fed`` bytes; ``after`` indexes data."""
        self._check_size(head)
        seen = self._seen
        if fed:
            ll: HttpParser = self._ll  # type: ignore[assignment]
            head_left = head[fed:]
        else:
            seen.complete = False
            if self._ll_ready:  # llhttp ended the last message where we did: it takes the next
                ll = self._ll  # type: ignore[assignment]
                self._ll_ready = False
            else:
                ll = self._ll = self._llhttp(seen)
            head_left = head
        reusable = True  # llhttp will be between messages once it has seen this one whole
        try:
            ll.feed_data(head_left)
        except httptools.HttpParserUpgrade:
            reusable = False  # upgrades are decided from the fields, not by llhttp
        except httptools.HttpParserError as exc:
            raise ParseError(400, str(exc) or "malformed head") from None
        if not seen.complete:
            raise ParseError(400, "malformed head")
        message, follows = self._make_head(head, ll)
        events.append(message)
        if follows == _BODY:
            self._keep_alive = keep = message.keep_alive
            framing = message.framing
            length = message.content_length
            if framing is _NONE or (framing is _LENGTH_FRAMING and not length):
                events.append(_END)  # the usual GET: no body
                self._state = _HEAD if keep else _CLOSED
                # llhttp ended the message too unless it expects a body we know is not there
                # (a response to HEAD); a parser is cheap, but not free.
                self._ll_ready = reusable and keep and (framing is _LENGTH_FRAMING or self._bodiless_agrees)
            elif framing is _LENGTH_FRAMING and after + length <= len(data):
                # the usual small response: its whole body came with it
                body = data[after : after + length]
                events.append(BodyData(body))
                events.append(_END)
                self._state = _HEAD if keep else _CLOSED
                if keep and reusable:  # let llhttp count the body too, so that it can take the next head
                    ll.feed_data(body)
                    self._ll_ready = True
                return after + length
            else:
                self._start_body(framing, length, events)
        elif follows == _SWITCH:
            events.append(Upgraded(data[after:]))
            self._state = _UPGRADED
            return len(data)
        return after

    def _feed_llhttp(self, piece: bytes) -> None:
        try:
            cast("HttpParser", self._ll).feed_data(piece)
        except httptools.HttpParserUpgrade:
            pass  # upgrades are decided from the fields, not by llhttp
        except httptools.HttpParserError as exc:
            raise ParseError(400, str(exc) or "malformed head") from None

    def _start_body(
        self, framing: Framing, length: int, events: list[H | BodyData | MessageEnd | Upgraded]
    ) -> None:
        if framing is _NONE or (framing is _LENGTH_FRAMING and not length):
            self._end_message(_END, events)
        elif framing is _LENGTH_FRAMING:
            self._state = _LENGTH
            self._left = length
        elif framing is _CHUNKED:
            self._state = _CHUNK_SIZE
            self._body_size = 0
        else:
            self._state = _UNTIL_CLOSE

    def _end_message(self, end: MessageEnd, events: list[H | BodyData | MessageEnd | Upgraded]) -> None:
        events.append(end)
        self._state = _HEAD if self._keep_alive else _CLOSED

    # --- bodies -------------------------------------------------------------

    def _feed_counted(self, data: bytes, pos: int, events: list[H | BodyData | MessageEnd | Upgraded]) -> int:
        """Content-Length body or chunk data: one slice (none when data is all body)."""
        take = min(self._left, len(data) - pos)
        events.append(BodyData(data if take == len(data) else data[pos : pos + take]))
        self._left -= take
        if not self._left:
            if self._state == _LENGTH:
                self._end_message(_END, events)
            else:
                self._state = _CHUNK_END
        return pos + take

    def _feed_chunks(self, data: bytes, pos: int, events: list[H | BodyData | MessageEnd | Upgraded]) -> int:
        """Chunks lying whole in ``data``, one slice each; anything partial goes to the states."""
        while True:
            end = data.find(b"\r\n", pos, pos + MAX_CHUNK_LINE + 2)
            if end == -1:  # size line split between feeds, or too long
                return self._feed_chunk_line(data, pos, events)
            size = self._chunk_starts(chunk_size(data[pos:end]))
            pos = end + 2
            stop = pos + size
            if not size or stop + 2 > len(data):
                return pos
            if data[stop : stop + 2] != b"\r\n":
                raise ParseError(400, "chunk data not followed by CRLF")
            events.append(BodyData(data[pos:stop]))
            self._state = _CHUNK_SIZE
            pos = stop + 2
            if pos == len(data):
                return pos

    def _chunk_starts(self, size: int) -> int:
        """Enter the data of a chunk of ``size``, or the trailers after the last chunk."""
        if not size:
            self._state = _TRAILERS
            self._trailers = []
            self._trailer_size = 0
            return 0
        self._body_size += size
        if self._max_body is not None and self._body_size > self._max_body:
            raise ParseError(413, "body too large")
        self._left = size
        self._state = _CHUNK_DATA
        return size

    def _feed_chunk_line(
        self, data: bytes, pos: int, events: list[H | BodyData | MessageEnd | Upgraded]
    ) -> int:
        state = self._state
        line, pos = self._take_line(data, pos)
        if line is None:
            return pos
        if state == _CHUNK_SIZE:
            self._chunk_starts(chunk_size(line))
        elif state == _CHUNK_END:
            if line:
                raise ParseError(400, "chunk data not followed by CRLF")
            self._state = _CHUNK_SIZE
        elif line:
            self._trailers.append(line)
            self._trailer_size += len(line) + 2
        else:
            self._end_message(MessageEnd(trailer_fields(self._trailers)) if self._trailers else _END, events)
        return pos

    def _line_limit(self) -> int:
        if self._state == _CHUNK_SIZE:
            return MAX_CHUNK_LINE
        if self._state == _CHUNK_END:
            return 0
        return self._max_head - self._trailer_size

    def _take_line(self, data: bytes, pos: int) -> tuple[bytes | None, int]:
        """Next CRLF-terminated line (without CRLF), or None after buffering what there is."""
        buf = self._line
        if buf and buf[-1] == 13 and data.startswith(b"\n", pos):  # CRLF split between feeds
            line = bytes(buf[:-1])
            pos += 1
        else:
            limit = self._line_limit()
            window = pos + limit + 2 - len(buf)  # a CRLF must end before this to keep within limit
            end = data.find(b"\r\n", pos, window)
            if end == -1:
                self._buffer_line(data, pos, window, limit)
                return None, len(data)
            line = bytes(buf) + data[pos:end] if buf else data[pos:end]
            pos = end + 2
        buf.clear()
        if b"\n" in line or b"\r" in line:
            raise ParseError(400, "bare CR or LF in chunked framing")
        return line, pos

    def _buffer_line(self, data: bytes, pos: int, window: int, limit: int) -> None:
        if data.find(b"\n", pos, window) != -1:  # no CRLF in the window: any LF in it is bare
            raise ParseError(400, "bare CR or LF in chunked framing")
        if len(self._line) + len(data) - pos > limit + 1:  # +1: a CR whose LF is yet to come
            if self._state == _TRAILERS:
                raise ParseError(431, "trailer section too large")
            if self._state == _CHUNK_END:
                raise ParseError(400, "chunk data not followed by CRLF")
            raise ParseError(400, "chunk size line too long")
        self._line += data[pos:]

    # --- per role -----------------------------------------------------------

    def _check_size(self, head: bytes | bytearray) -> None:
        if len(head) > self._max_head:
            raise ParseError(431, "head too large")

    def _make_head(self, head: bytes, ll: HttpParser) -> tuple[H, int]:
        raise NotImplementedError


class RequestParser(_MessageParser[RequestHead]):
    """Requests of one client connection: RequestHead, BodyData*, MessageEnd | Upgraded.

    A request line over ``max_request_line`` bytes gets 414, a head over
    ``max_head_size`` (request line and final CRLF included) 431, both as soon
    as the bytes received show it; a body over ``max_body_size``, when set, 413.
    """

    __slots__ = ("_host_checked", "_host_seen", "_max_line")

    def __init__(
        self, max_head_size: int = 16384, max_request_line: int = 8192, max_body_size: int | None = None
    ) -> None:
        super().__init__(max_head_size, max_body_size)
        self._max_line = max_request_line
        self._host_seen: bytes | None = None  # the last Host value and what check_host made of it
        self._host_checked = b""

    _llhttp: ClassVar[type[HttpParser]] = httptools.HttpRequestParser
    _bodiless_agrees: ClassVar[bool] = True

    def _check_size(self, head: bytes | bytearray) -> None:
        line_end = head.find(b"\r\n")
        if (len(head) if line_end == -1 else line_end) > self._max_line:
            raise ParseError(414, "request line too long")
        if len(head) > self._max_head:
            raise ParseError(431, "head too large")

    def _make_head(self, head: bytes, ll: HttpParser) -> tuple[RequestHead, int]:
        method, target, version = request_line(head, ll.get_method())  # type: ignore[attr-defined]
        noted = noted_fields(head, REQUEST_NOTED)
        if b"content-length" in noted or b"transfer-encoding" in noted:
            if version == b"1.0" and b"transfer-encoding" in noted:
                # RFC 9112 §6.1: HTTP/1.0 has no Transfer-Encoding; its framing is faulty.
                raise ParseError(400, "Transfer-Encoding in an HTTP/1.0 message")
            framing, length = body_framing(noted)
        else:
            framing, length = _NONE, 0
        if self._max_body is not None and length > self._max_body:
            raise ParseError(413, "body too large")
        host_values = noted.get(b"host")
        if host_values is not None and len(host_values) == 1 and host_values[0] == self._host_seen:
            host = self._host_checked  # the same Host as the last request: checked already
        else:
            host = request_host(host_values, version)
            if host_values is not None:
                self._host_seen, self._host_checked = host_values[0], host
        if target[:1] != b"/":
            target, host = resolve_target(method, target, host)
        options = connection_options(noted) if b"connection" in noted else _NO_OPTIONS
        upgrade = None
        if b"upgrade" in options and version == b"1.1" and framing is not _CHUNKED and not length:
            values = noted.get(b"upgrade")
            if values:
                upgrade = b", ".join(values).lower()
        expect = b"expect" in noted and version == b"1.1" and expect_continue(noted[b"expect"])
        alive = b"close" not in options and (version == b"1.1" or b"keep-alive" in options)
        message = RequestHead(
            method, target, version, head, host, framing, length, alive, upgrade, expect, noted, options,
        )  # fmt: skip
        return message, _BODY if upgrade is None else _SWITCH


class ResponseParser(_MessageParser[ResponseHead]):
    """Responses of one upstream connection; call expect() for every request sent."""

    __slots__ = ("_methods",)
    _error_status: ClassVar[int | None] = 502

    def __init__(self, max_head_size: int = 65536) -> None:
        super().__init__(max_head_size, None)
        self._methods: collections.deque[bytes] = collections.deque()

    def expect(self, method: bytes) -> None:
        """Record the method of a request sent upstream; its final response comes in order."""
        self._methods.append(method)

    _llhttp: ClassVar[type[HttpParser]] = httptools.HttpResponseParser

    def _make_head(self, head: bytes, ll: HttpParser) -> tuple[ResponseHead, int]:
        status = ll.get_status_code()  # type: ignore[attr-defined]
        version, reason = status_line(head, status)
        noted = noted_fields(head, RESPONSE_NOTED)
        if version == b"1.0" and b"transfer-encoding" in noted:
            raise ParseError(502, "Transfer-Encoding in an HTTP/1.0 message")  # RFC 9112 §6.1
        framing, length = body_framing(noted)
        if not self._methods:
            raise ParseError(502, "response without a request")
        options = connection_options(noted) if b"connection" in noted else _NO_OPTIONS
        if status < 200 and status != 101:
            return ResponseHead(status, reason, version, head, _NONE, 0, True, noted, options), _INTERIM
        method = self._methods.popleft()
        if status == 101:
            return ResponseHead(status, reason, version, head, _NONE, 0, False, noted, options), _SWITCH
        if method == b"HEAD" or status == 204 or status == 304:
            framing, length = _NONE, 0
        elif framing is _NONE:
            framing = _UNTIL_CLOSE_FRAMING
        alive = (framing is not _UNTIL_CLOSE_FRAMING and b"close" not in options
                 and (version == b"1.1" or b"keep-alive" in options))
        return ResponseHead(status, reason, version, head, framing, length, alive, noted, options), _BODY


# --- serialisation ------------------------------------------------------------

LAST_CHUNK: Final = b"0\r\n\r\n"


def encode_chunk(data: bytes) -> bytes:
    """One chunk of a chunked body. Empty data encodes to b"" (a 0 chunk would end the body)."""
    if not data:
        return b""
    return b"%x\r\n%b\r\n" % (len(data), data)


def _serialize(start: bytes, headers: Fields | list[tuple[bytes, bytes]]) -> bytes:
    lines = [start]
    lines += [name + b": " + value for name, value in headers]
    lines += (b"", b"")
    out = b"\r\n".join(lines)
    # A CR or LF smuggled into a name or value would start a new field upstream.
    if out.count(b"\n") != len(lines) - 1 or out.count(b"\r") != len(lines) - 1:
        raise ValueError("CR or LF inside a header name or value")
    return out


def serialize_response_head(
    status: int, reason: bytes, headers: Fields | list[tuple[bytes, bytes]], version: bytes = b"1.1"
) -> bytes:
    """``HTTP/version status reason`` and ``headers`` as given, CRLF-terminated."""
    return _serialize(b"HTTP/%s %d %s" % (version, status, reason), headers)
