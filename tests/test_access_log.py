"""Access-log lines: the documented format, byte for byte, with times in UTC."""

from __future__ import annotations

import datetime as dt
import re

import pytest

from proxycore.accesslog import AccessLog
from proxycore.http1 import RequestHead, RequestParser

STAMP = rb"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.(\d{3})Z"


def head(raw: bytes) -> RequestHead:
    parsed = RequestParser().feed(raw)[0]
    assert isinstance(parsed, RequestHead)
    return parsed


@pytest.mark.parametrize(("elapsed", "shown"), [
    (0.00156, b"1.6ms"), (0.00004, b"0.0ms"), (0.00005, b"0.1ms"), (1.23456, b"1234.6ms"), (0.0, b"0.0ms"),
    # the edges of the table of formatted times (below a second) and past it
    (0.99994, b"999.9ms"), (0.99996, b"1000.0ms"), (1.0, b"1000.0ms"), (3600.0, b"3600000.0ms"),
])
def test_a_request_line_has_the_documented_fields(elapsed: float, shown: bytes) -> None:
    lines: list[bytes] = []
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)
    AccessLog(lines.append).request(b"127.0.0.1 https", b"a", head(b"GET /x?y=1 HTTP/1.1\r\nHost: a\r\n\r\n"),
                                    200, 338, elapsed, b"127.0.0.1:35799")
    (line,) = lines
    match = re.fullmatch(STAMP + rb' 127\.0\.0\.1 https a "GET /x\?y=1 HTTP/1\.1" 200 338 (\S+) 127\.0\.0\.1:35799',
                         line)
    assert match is not None, line
    assert match.group(3) == shown
    when = dt.datetime.strptime(match.group(1).decode(), "%Y-%m-%dT%H:%M:%S").replace(tzinfo=dt.UTC)
    assert before <= when <= dt.datetime.now(dt.UTC)


def test_an_answer_without_a_request_has_dashes() -> None:
    lines: list[bytes] = []
    AccessLog(lines.append).no_request(b"10.0.0.1 http", 408)
    assert re.fullmatch(STAMP + rb' 10\.0\.0\.1 http - "-" 408 0 0\.0ms -', lines[0]), lines


@pytest.mark.parametrize("status", [100, 200, 404, 599, 999])
def test_every_status_is_written_as_sent(status: int) -> None:
    lines: list[bytes] = []
    AccessLog(lines.append).request(b"127.0.0.1 https", b"a", head(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
                                    status, 0, 0.001, b"-")
    assert b'"GET / HTTP/1.1" %d 0 1.0ms -' % status in lines[0]
