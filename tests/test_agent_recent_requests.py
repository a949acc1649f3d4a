"""Recent requests over the agent link: the node's bounded ring of access-log lines per host
(``proxycore.agent.RecentLines``), and the ``requests`` / ``requests.watch`` messages checked at
their bounds (``proxycore.agentproto``)."""

from __future__ import annotations

from typing import Any

import pytest

from proxycore import agentproto
from proxycore.agent import RecentLines
from proxycore.agentproto import (
    MAX_LINE_LENGTH,
    MAX_RECENT_LINES,
    MAX_RECENT_PER_HOST,
    MAX_WATCH_SECONDS,
    ProtocolError,
    RecentRequests,
    RequestsWatch,
)


def line(host: str, n: int, status: int = 200) -> bytes:
    return (f'2026-11-28T06:25:39.{n % 1000:03d}Z 127.0.0.1 https {host} "GET /{n} HTTP/1.1" '
            f'{status} 12 1.6ms 127.0.0.1:8081').encode()


def requests(hosts: dict[str, list[Any]]) -> dict[str, Any]:
    return {"type": "requests", "node": "edge-1", "hosts": hosts}


def lines(count: int, length: int = 20) -> list[list[Any]]:
    return [[n + 1, "x" * length] for n in range(count)]


# -- the message ----------------------------------------------------------------------


def test_requests_at_their_bounds_are_taken() -> None:
    parsed = agentproto.parse_node_message(requests({"a": lines(MAX_RECENT_PER_HOST, MAX_LINE_LENGTH)}))
    assert isinstance(parsed, RecentRequests)
    assert len(parsed.hosts["a"]) == MAX_RECENT_PER_HOST
    per_host = MAX_RECENT_LINES // MAX_RECENT_PER_HOST
    parsed = agentproto.parse_node_message(requests({f"h{i}": lines(MAX_RECENT_PER_HOST) for i in range(per_host)}))
    assert isinstance(parsed, RecentRequests)
    assert sum(len(v) for v in parsed.hosts.values()) == MAX_RECENT_LINES
    hostile = '<img src=x onerror=alert(1)>"'
    parsed = agentproto.parse_node_message(requests({"a": [[7, hostile]]}))
    assert isinstance(parsed, RecentRequests)
    assert parsed.hosts == {"a": [(7, hostile)]}  # text is text: validated, not altered
    assert agentproto.parse_node_message(parsed.to_message()) == parsed


@pytest.mark.parametrize(("hosts", "reason"), [
    ({"a": lines(MAX_RECENT_PER_HOST + 1)}, "at most 200 lines"),
    ({f"h{i}": lines(MAX_RECENT_PER_HOST) for i in range(5)} | {"one-more": lines(1)}, "at most 1000 lines"),
    ({"a": lines(1, MAX_LINE_LENGTH + 1)}, "at most 512 characters"),
    ({"a": [[1, "nul \x00 byte"]]}, "at most 512 characters"),
    ({"a": [[1, 200]]}, "at most 512 characters"),
    ({"a": [[-1, "x"]]}, "sequence number"),
    ({"a": [[True, "x"]]}, "sequence number"),
    ({"a": [[1, "x", "extra"]]}, "[sequence number, text]"),
    ({"a": "not a list"}, "must be a list"),
    ({"": lines(1)}, "a name is empty"),
    ({"h" * 254: lines(1)}, "a name is empty or longer than 253"),
])
def test_requests_out_of_bounds_are_refused(hosts: dict[str, Any], reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason.replace("[", r"\[").replace("]", r"\]")):
        agentproto.parse_node_message(requests(hosts))


def test_requests_without_hosts_or_node_are_refused() -> None:
    with pytest.raises(ProtocolError):
        agentproto.parse_node_message({"type": "requests", "node": "edge-1"})
    with pytest.raises(ProtocolError):
        agentproto.parse_node_message({"type": "requests", "hosts": {}})


def test_requests_watch_is_checked() -> None:
    watch = RequestsWatch("a", 30, resend=True)
    assert agentproto.parse_control_message(watch.to_message()) == watch
    longest = RequestsWatch("a", MAX_WATCH_SECONDS)
    assert agentproto.parse_control_message(longest.to_message()) == longest
    for bad in ({"host": "a", "seconds": MAX_WATCH_SECONDS + 1}, {"host": "", "seconds": 5},
                {"host": "a", "seconds": 5, "resend": "yes"}, {"seconds": 5}):
        with pytest.raises(ProtocolError):
            agentproto.parse_control_message({"type": "requests.watch", **bad})


# -- the node's ring ------------------------------------------------------------------


def test_the_ring_keeps_the_last_lines_per_host_and_sends_only_watched_hosts() -> None:
    recent = RecentLines(per_host=3)
    for n in range(5):
        recent(line("a", n))
    recent(line("b", 9))
    recent(b'2026-11-28T06:25:39.143Z 127.0.0.1 https - "-" 400 0 0.0ms -')  # no request
    assert recent.take(0.0) == {}  # nobody watches
    recent.watch(RequestsWatch("a", 10), now=0.0)
    taken = recent.take(1.0)
    assert [seq for seq, _ in taken["a"]] == [3, 4, 5]  # the last three of host a
    assert taken["a"][-1][1] == line("a", 4).decode()
    assert recent.take(2.0) == {}  # nothing new
    recent(line("a", 5))
    assert [seq for seq, _ in recent.take(3.0)["a"]] == [8]
    recent.watch(RequestsWatch("a", 10, resend=True), now=3.0)
    assert len(recent.take(4.0)["a"]) == 3  # a dashboard that just opened the view gets them all
    recent(line("a", 6))
    assert recent.take(20.0) == {}  # the watch ran out
    recent.watch(RequestsWatch("-", 10), now=20.0)
    assert recent.take(21.0)["-"][0][1].endswith("400 0 0.0ms -")


def test_the_ring_is_bounded_in_hosts_line_length_and_message_size() -> None:
    recent = RecentLines(max_hosts=2)
    recent(line("a", 1))
    recent(line("b", 1))
    recent(line("c", 1))
    assert set(recent.rings) == {b"a", b"b"}
    recent(line("a", 2)[:60] + b"/" + b"x" * 9000 + b' HTTP/1.1" 200 0 1.0ms -')
    recent.watch(RequestsWatch("a", 10), now=0.0)
    assert all(len(text) <= MAX_LINE_LENGTH for _, text in recent.take(1.0)["a"])

    busy = RecentLines()
    for host in range(8):
        for n in range(MAX_RECENT_PER_HOST + 50):
            busy(line(f"h{host}", n))
        busy.watch(RequestsWatch(f"h{host}", 10), now=0.0)
    taken = busy.take(1.0)
    assert sum(len(v) for v in taken.values()) == MAX_RECENT_LINES
    assert all(len(v) <= MAX_RECENT_PER_HOST for v in taken.values())
    agentproto.parse_node_message(RecentRequests("edge-1", taken).to_message())  # within the bounds
    assert sum(len(v) for v in busy.take(2.0).values()) == 8 * MAX_RECENT_PER_HOST - MAX_RECENT_LINES
