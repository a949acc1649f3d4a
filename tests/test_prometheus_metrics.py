"""A node serves its counters to Prometheus: the collector's metrics, the /metrics
endpoint on the node's loop, and ``runproxy --metrics`` as a real process."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
import trustme
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxycore import config as core
from proxycore.metrics import metrics_registry, scrape_response, start_metrics_server
from proxycore.stats import LATENCY_BUCKETS, UNMATCHED, Stats
from tests.processes import Project, config, kill, listening_port
from tests.proxyharness import Upstream, bundle, free_port, read_response, route, running_node, tls_connect

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of a scrape, keyed by (name, sorted labels)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def scrape_stats(stats: Stats) -> str:
    return generate_latest(metrics_registry(stats)).decode()


def filled_stats() -> Stats:
    stats = Stats()
    stats.config_applied(12)
    a = stats.host("a")
    a.active_connections = 2
    a.total_connections = 5
    a.handshakes_ok = 4
    a.handshakes_failed["timeout"] = 1
    a.requests = 7
    for status in (200, 200, 204, 301, 404, 502, 504):
        a.response(status)
    a.bytes_in = 1000
    a.bytes_out = 5000
    a.upstream_errors["connect_refused"] = 2
    for seconds in (0.0005, 0.003, 0.004, 0.2, 60.0):
        a.latency(seconds)
    stats.host(UNMATCHED).handshakes_failed["unknown_sni"] = 3
    https = stats.listener("https")
    https.connections = 9
    https.rejected_connections = 1
    https.resumed_sessions = 4
    https.tls_versions.update({"TLSv1.3": 3, "TLSv1.2": 1})
    https.ciphers["TLS_AES_256_GCM_SHA384"] = 3
    return stats


# ---- the collector -------------------------------------------------------------------


def test_collector_reports_each_hosts_counters_with_prometheus_names() -> None:
    samples = parse(scrape_stats(filled_stats()))
    assert value(samples, "proxyadmin_connections_active", host="a") == 2
    assert value(samples, "proxyadmin_connections_total", host="a") == 5
    assert value(samples, "proxyadmin_tls_handshakes_total", host="a") == 4
    assert value(samples, "proxyadmin_tls_handshake_failures_total", host="a", reason="timeout") == 1
    assert value(samples, "proxyadmin_tls_handshake_failures_total", host="-", reason="unknown_sni") == 3
    assert value(samples, "proxyadmin_requests_total", host="a") == 7
    classes = {c: value(samples, "proxyadmin_responses_total", host="a", **{"class": c})
               for c in ("1xx", "2xx", "3xx", "4xx", "5xx")}
    assert classes == {"1xx": 0, "2xx": 3, "3xx": 1, "4xx": 1, "5xx": 2}
    assert value(samples, "proxyadmin_received_bytes_total", host="a") == 1000
    assert value(samples, "proxyadmin_sent_bytes_total", host="a") == 5000
    assert value(samples, "proxyadmin_upstream_errors_total", host="a", kind="connect_refused") == 2


def test_collector_reports_listeners_and_the_config_revision() -> None:
    samples = parse(scrape_stats(filled_stats()))
    assert value(samples, "proxyadmin_listener_connections_total", listener="https") == 9
    assert value(samples, "proxyadmin_listener_rejected_connections_total", listener="https") == 1
    assert value(samples, "proxyadmin_listener_tls_resumed_sessions_total", listener="https") == 4
    assert value(samples, "proxyadmin_listener_tls_versions_total", listener="https", version="TLSv1.3") == 3
    assert value(samples, "proxyadmin_listener_tls_versions_total", listener="https", version="TLSv1.2") == 1
    assert value(samples, "proxyadmin_listener_tls_ciphers_total", listener="https",
                 cipher="TLS_AES_256_GCM_SHA384") == 3
    assert value(samples, "proxyadmin_config_revision") == 12
    assert value(samples, "proxyadmin_config_rejected", revision="") == 0
    assert value(samples, "proxyadmin_start_time_seconds") > 0


def test_latency_histogram_buckets_are_cumulative_with_sum_and_count() -> None:
    text = scrape_stats(filled_stats())
    samples = parse(text)
    bounds = [*(str(b) for b in LATENCY_BUCKETS), "+Inf"]
    buckets = [value(samples, "proxyadmin_upstream_latency_seconds_bucket", host="a", le=le) for le in bounds]
    assert buckets == sorted(buckets), "each bucket counts everything at or below its bound"
    assert value(samples, "proxyadmin_upstream_latency_seconds_bucket", host="a", le="0.001") == 1
    assert value(samples, "proxyadmin_upstream_latency_seconds_bucket", host="a", le="0.0025") == 1
    assert value(samples, "proxyadmin_upstream_latency_seconds_bucket", host="a", le="0.005") == 3
    assert value(samples, "proxyadmin_upstream_latency_seconds_bucket", host="a", le="0.25") == 4
    assert value(samples, "proxyadmin_upstream_latency_seconds_bucket", host="a", le="10.0") == 4
    assert value(samples, "proxyadmin_upstream_latency_seconds_bucket", host="a", le="+Inf") == 5
    assert value(samples, "proxyadmin_upstream_latency_seconds_count", host="a") == 5
    assert value(samples, "proxyadmin_upstream_latency_seconds_sum", host="a") == pytest.approx(60.2075)
    assert "# TYPE proxyadmin_upstream_latency_seconds histogram" in text


def test_config_rejected_is_one_until_a_newer_revision_is_served() -> None:
    stats = Stats()
    stats.config_applied(3)
    stats.config_failed(4, "bad key")
    assert value(parse(scrape_stats(stats)), "proxyadmin_config_rejected", revision="4") == 1
    stats.config_failed(3, "a forced reload of the same revision failed")
    assert value(parse(scrape_stats(stats)), "proxyadmin_config_rejected", revision="3") == 1
    stats.config_applied(5)
    samples = parse(scrape_stats(stats))
    assert value(samples, "proxyadmin_config_rejected", revision="3") == 0
    assert value(samples, "proxyadmin_config_revision") == 5


def test_a_fresh_node_has_no_host_samples_but_a_valid_scrape() -> None:
    text = scrape_stats(Stats())
    samples = parse(text)
    assert not [key for key in samples if ("host", "a") in key[1]]
    assert "# TYPE proxyadmin_requests_total counter" in text
    assert value(samples, "proxyadmin_config_revision") == 0


# ---- the endpoint ----------------------------------------------------------------------


def test_endpoint_answers_get_and_head_on_metrics_only() -> None:
    registry = metrics_registry(filled_stats())
    ok = scrape_response(registry, b"GET /metrics HTTP/1.1")
    head, _, body = ok.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nContent-Type: text/plain; version=" in head
    assert f"\r\nContent-Length: {len(body)}\r\n".encode() in head
    assert b'proxyadmin_requests_total{host="a"} 7.0' in body
    assert scrape_response(registry, b"GET /metrics?x=1 HTTP/1.0").startswith(b"HTTP/1.1 200 ")
    assert scrape_response(registry, b"HEAD /metrics HTTP/1.1").endswith(b"\r\n\r\n")
    assert scrape_response(registry, b"GET / HTTP/1.1").startswith(b"HTTP/1.1 404 ")
    not_allowed = scrape_response(registry, b"POST /metrics HTTP/1.1")
    assert not_allowed.startswith(b"HTTP/1.1 405 ")
    assert b"\r\nAllow: GET, HEAD\r\n" in not_allowed
    assert scrape_response(registry, b"\x16\x03\x01 garbage").startswith(b"HTTP/1.1 400 ")


def test_endpoint_refuses_a_taken_port() -> None:
    async def start_twice() -> None:
        first = await start_metrics_server(Stats(), "127.0.0.1", 0)
        port = first.sockets[0].getsockname()[1]
        try:
            with pytest.raises(OSError):
                await start_metrics_server(Stats(), "127.0.0.1", port)
        finally:
            first.close()
            await first.wait_closed()

    asyncio.run(start_twice())


def test_node_serves_its_counters_at_metrics(ca: trustme.CA, upstream: Upstream) -> None:
    snap = core.Snapshot(revision=4, hosts=(route("a", ("a.example",), upstream.port, bundle(ca, "a.example")),))
    with running_node(snap) as node:
        sock = tls_connect(node.https_port, ca, "a.example")
        for _ in range(3):
            sock.sendall(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
            assert read_response(sock)[0] == 200
        sock.close()
        deadline = time.monotonic() + 5
        while node.stats()["hosts"]["a"]["active_connections"] and time.monotonic() < deadline:
            time.sleep(0.05)

        server = node.loop.run(start_metrics_server(node.node.stats, "127.0.0.1", 0))
        try:
            url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
            with urllib.request.urlopen(url + "/metrics", timeout=5) as response:  # noqa: S310 (loopback)
                content_type = response.headers["Content-Type"]
                text = response.read().decode()
            with pytest.raises(urllib.error.HTTPError) as not_found:
                urllib.request.urlopen(url + "/", timeout=5)  # noqa: S310 (loopback)
            assert not_found.value.code == 404
            with pytest.raises(urllib.error.HTTPError) as not_allowed:
                urllib.request.urlopen(url + "/metrics", data=b"x", timeout=5)  # noqa: S310 (loopback)
            assert not_allowed.value.code == 405
        finally:
            node.loop.call(server.close)

    assert content_type.startswith("text/plain; version=")
    assert 'proxyadmin_requests_total{host="a"} 3.0' in text
    assert 'proxyadmin_responses_total{class="2xx",host="a"} 3.0' in text
    samples = parse(text)
    assert value(samples, "proxyadmin_connections_total", host="a") == 1
    assert value(samples, "proxyadmin_connections_active", host="a") == 0
    assert value(samples, "proxyadmin_tls_handshakes_total", host="a") == 1
    assert value(samples, "proxyadmin_upstream_latency_seconds_count", host="a") == 3
    assert value(samples, "proxyadmin_listener_tls_versions_total", listener="https", version="TLSv1.3") == 1
    assert value(samples, "proxyadmin_config_revision") == 4


# ---- runproxy --metrics, as a process ---------------------------------------------------


@pytest.fixture
def metrics_node(project: Project, ca: trustme.CA, upstream: Upstream) -> Iterator[tuple[subprocess.Popen[str], int, int]]:
    project.import_config(config(ca, upstream.port, ["a"]))
    https, metrics = free_port(), free_port()
    proc = project.start("runproxy", "--https", f"127.0.0.1:{https}", "--http", "off",
                         "--no-access-log", "--metrics", f"127.0.0.1:{metrics}")
    yield proc, https, metrics
    kill(proc)


def scrape_when_up(port: int, proc: subprocess.Popen[str], deadline: float) -> str:
    while time.monotonic() < deadline:
        assert proc.poll() is None, "runproxy exited"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
                return response.read().decode()
        except OSError:
            time.sleep(0.1)
    raise AssertionError("/metrics did not answer in time")


def test_runproxy_serves_metrics_when_asked(
    ca: trustme.CA, metrics_node: tuple[subprocess.Popen[str], int, int],
) -> None:
    proc, https, metrics = metrics_node
    scrape_when_up(metrics, proc, time.monotonic() + 30)
    sock = tls_connect(https, ca, "a.example")
    try:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n")
        assert read_response(sock)[0] == 200
    finally:
        sock.close()
    deadline = time.monotonic() + 10
    while 'proxyadmin_responses_total{class="2xx",host="a"} 1.0' not in (text := scrape_when_up(
            metrics, proc, deadline)):
        assert time.monotonic() < deadline, text
        time.sleep(0.1)
    assert 'proxyadmin_requests_total{host="a"} 1.0' in text

    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    assert f"Prometheus metrics at http://127.0.0.1:{metrics}/metrics" in out
    assert "Traceback" not in out


def test_runproxy_refuses_a_bad_metrics_address(project: Project) -> None:
    stderr = project.refuses("runproxy", "--metrics", "9100")
    assert "--metrics must look like 127.0.0.1:8443, not '9100'" in stderr


def test_runproxy_says_when_the_metrics_port_is_taken(project: Project) -> None:
    with listening_port() as port:
        stderr = project.refuses("runproxy", "--https", f"127.0.0.1:{free_port()}", "--http", "off",
                                 "--metrics", f"127.0.0.1:{port}")
    assert f"Cannot listen on --metrics 127.0.0.1:{port}" in stderr


def test_up_passes_metrics_to_the_proxy_node_only_when_asked() -> None:
    from proxyadmin.management.commands.up import Command as Up

    with_metrics = Up().proxy_child("127.0.0.1:8443", "127.0.0.1:8080", "127.0.0.1:9100").argv
    assert with_metrics[-2:] == ["--metrics", "127.0.0.1:9100"]
    assert "--metrics" not in Up().proxy_child("127.0.0.1:8443", "127.0.0.1:8080").argv
