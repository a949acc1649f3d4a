"""The counters a node keeps, read as a plain dict: per host and per listener."""

from __future__ import annotations

import ssl
import time

import pytest
import trustme

from proxycore import config as core
from proxycore.stats import LATENCY_BUCKETS, Stats
from tests.proxyharness import Upstream, bundle, read_response, route, running_node, tls_connect


def test_stats_count_connections_requests_statuses_bytes_and_latency(
    ca: trustme.CA, upstream: Upstream
) -> None:
    snap = core.Snapshot(revision=7, hosts=(
        route("a", ("a.example",), upstream.port, bundle(ca, "a.example"), max_body_size=10),
    ), strict_sni=True)
    with running_node(snap) as node:
        sock = tls_connect(node.https_port, ca, "a.example")
        sent = 0
        for _ in range(3):
            request = b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n"
            sock.sendall(request)
            sent += len(request)
            assert read_response(sock)[0] == 200
        sock.sendall(b"POST / HTTP/1.1\r\nHost: a.example\r\nContent-Length: 11\r\n\r\n")
        assert read_response(sock)[0] == 413
        sock.close()
        with pytest.raises(ssl.SSLError):
            tls_connect(node.https_port, ca, "nobody.example")
        deadline = time.monotonic() + 5
        while node.stats()["hosts"]["a"]["active_connections"] and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = node.stats()
    host = stats["hosts"]["a"]
    assert host["active_connections"] == 0
    assert host["total_connections"] == 1
    assert host["handshakes_ok"] == 1
    assert host["requests"] == 4
    assert host["responses"] == {"1xx": 0, "2xx": 3, "3xx": 0, "4xx": 1, "5xx": 0}
    assert host["bytes_in"] > sent
    assert host["bytes_out"] > 3 * 200
    assert sum(host["latency"]["counts"]) == 3  # upstream latency of the proxied requests
    assert host["latency"]["buckets"] == list(LATENCY_BUCKETS)
    assert stats["hosts"]["-"]["handshakes_failed"] == {"unknown_sni": 1}
    listener = stats["listeners"]["https"]
    assert listener["tls_versions"] == {"TLSv1.3": 1}
    assert sum(listener["ciphers"].values()) == 1
    assert stats["config_revision"] == 7
    assert stats["config_rejected"] is None


def test_latency_lands_in_the_right_bucket() -> None:
    stats = Stats()
    host = stats.host("h")
    host.latency(0.0005)
    host.latency(0.003)
    host.latency(60)
    counts = host.as_dict()["latency"]["counts"]
    assert counts[0] == 1
    assert counts[LATENCY_BUCKETS.index(0.005)] == 1
    assert counts[-1] == 1
    host.response(204)
    host.response(599)
    assert host.as_dict()["responses"]["2xx"] == 1
    assert host.as_dict()["responses"]["5xx"] == 1
