"""Prometheus ``/metrics`` for a proxy node: the ``Stats`` counters in the text format.

Nothing here runs on the proxy's hot path. ``StatsCollector`` reads the node's
``Stats`` only when Prometheus scrapes, and ``start_metrics_server`` answers the
scrape on the node's own event loop -- the loop that owns ``Stats`` -- so the
counters are read between callbacks and need no lock. The server is a few lines
over ``asyncio.start_server``: one ``GET /metrics`` per connection, then close.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from proxycore.stats import LATENCY_BUCKETS, Stats

METRICS_PATH = b"/metrics"
MAX_REQUEST_HEAD = 8192  # a scrape is one short request line and a few headers
READ_TIMEOUT = 10.0  # a client that sends no request in time is dropped

# The histogram's ``le`` labels, computed once: Go's float formatting, as Prometheus writes them.
_BUCKET_BOUNDS = (*(floatToGoString(b) for b in LATENCY_BUCKETS), "+Inf")


class StatsCollector:
    """A prometheus-client custom collector over one node's ``Stats``.

    Called by ``CollectorRegistry.collect()`` at scrape time; builds fresh metric
    families from the counters each time.
    """

    def __init__(self, stats: Stats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        yield from self.host_metrics()
        yield from self.listener_metrics()
        yield from self.config_metrics()

    def host_metrics(self) -> Iterator[Metric]:
        host = ["host"]
        active = GaugeMetricFamily("proxyadmin_connections_active",
                                   "Client connections open now.", labels=host)
        connections = CounterMetricFamily("proxyadmin_connections",
                                          "Client connections accepted.", labels=host)
        handshakes = CounterMetricFamily("proxyadmin_tls_handshakes",
                                         "TLS handshakes completed.", labels=host)
        failures = CounterMetricFamily(
            "proxyadmin_tls_handshake_failures",
            "Connections that failed before or during the TLS handshake, by reason.",
            labels=["host", "reason"])
        requests = CounterMetricFamily("proxyadmin_requests", "HTTP requests received.", labels=host)
        responses = CounterMetricFamily("proxyadmin_responses", "HTTP responses sent, by status class.",
                                        labels=["host", "class"])
        received = CounterMetricFamily("proxyadmin_received_bytes", "Bytes received from clients.",
                                       labels=host)
        sent = CounterMetricFamily("proxyadmin_sent_bytes", "Bytes sent to clients.", labels=host)
        upstream_errors = CounterMetricFamily("proxyadmin_upstream_errors",
                                              "Failed upstream exchanges, by kind.", labels=["host", "kind"])
        latency = HistogramMetricFamily(
            "proxyadmin_upstream_latency_seconds",
            "Time from a request's head to the end of the upstream's response.", labels=host)
        refused = CounterMetricFamily(
            "proxyadmin_access_refused",
            "Requests or connections the host's access list or rate limit refused: "
            "denied (403, or before the TLS handshake), unauthorized (401), rate_limited "
            "(429, or a connection over the per-client limit).", labels=["host", "reason"])

        # Traffic that matched no host is reported as host="-".
        for name, s in self.stats.hosts.items():
            active.add_metric([name], s.active_connections)
            connections.add_metric([name], s.total_connections)
            handshakes.add_metric([name], s.handshakes_ok)
            for reason, n in s.handshakes_failed.items():
                failures.add_metric([name, reason], n)
            requests.add_metric([name], s.requests)
            for status_class, n in enumerate(s.responses):
                if status_class:  # index 0 would be a status below 100: never sent
                    responses.add_metric([name, f"{status_class}xx"], n)
            received.add_metric([name], s.bytes_in)
            sent.add_metric([name], s.bytes_out)
            for kind, n in s.upstream_errors.items():
                upstream_errors.add_metric([name, kind], n)
            latency.add_metric([name], cumulative_buckets(s.latency_buckets), s.latency_sum)
            for reason, n in (("denied", s.denied), ("unauthorized", s.unauthorized),
                              ("rate_limited", s.rate_limited)):
                if n:
                    refused.add_metric([name, reason], n)
        yield from (active, connections, handshakes, failures, requests, responses,
                    received, sent, upstream_errors, latency, refused)

    def listener_metrics(self) -> Iterator[Metric]:
        connections = CounterMetricFamily("proxyadmin_listener_connections",
                                          "Connections accepted by the listener.", labels=["listener"])
        rejected = CounterMetricFamily("proxyadmin_listener_rejected_connections",
                                       "Connections refused over the connection limit.", labels=["listener"])
        resumed = CounterMetricFamily("proxyadmin_listener_tls_resumed_sessions",
                                      "TLS handshakes that resumed a session.", labels=["listener"])
        versions = CounterMetricFamily("proxyadmin_listener_tls_versions",
                                       "TLS handshakes completed, by protocol version.",
                                       labels=["listener", "version"])
        ciphers = CounterMetricFamily("proxyadmin_listener_tls_ciphers",
                                      "TLS handshakes completed, by cipher suite.",
                                      labels=["listener", "cipher"])
        for name, s in self.stats.listeners.items():
            connections.add_metric([name], s.connections)
            rejected.add_metric([name], s.rejected_connections)
            resumed.add_metric([name], s.resumed_sessions)
            for version, n in s.tls_versions.items():
                versions.add_metric([name, version], n)
            for cipher, n in s.ciphers.items():
                ciphers.add_metric([name, cipher], n)
        yield from (connections, rejected, resumed, versions, ciphers)

    def config_metrics(self) -> Iterator[Metric]:
        stats = self.stats
        yield GaugeMetricFamily("proxyadmin_config_revision", "Config revision being served.",
                                value=stats.config_revision)
        # Stats keeps the last rejection even after a later revision is applied, so a
        # rejection is current only while no newer revision has been served. The series
        # keeps its revision label and drops to 0 once superseded, which resolves alerts.
        rejected = GaugeMetricFamily(
            "proxyadmin_config_rejected",
            "1 while the last config reload was rejected (the node serves its previous revision).",
            labels=["revision"])
        if stats.config_rejected is None:
            rejected.add_metric([""], 0)
        else:
            revision = stats.config_rejected[0]
            rejected.add_metric([str(revision)], 1 if revision >= stats.config_revision else 0)
        yield rejected
        yield GaugeMetricFamily("proxyadmin_start_time_seconds",
                                "Start time of the node since the Unix epoch.", value=stats.started_at)
        workers = stats.workers or {"count": 1, "restarts": 0}
        yield GaugeMetricFamily("proxyadmin_workers", "Worker processes serving the listeners.",
                                value=workers["count"])
        yield CounterMetricFamily("proxyadmin_worker_restarts",
                                  "Worker processes that died and were started again.",
                                  value=workers["restarts"])


def cumulative_buckets(counts: list[int]) -> list[tuple[str, float]]:
    """Per-bucket counts (last one: above every bound) as Prometheus' cumulative ``le`` buckets."""
    buckets = []
    total = 0
    for bound, n in zip(_BUCKET_BOUNDS, counts, strict=True):
        total += n
        buckets.append((bound, float(total)))
    return buckets


def metrics_registry(stats: Stats) -> CollectorRegistry:
    """A registry of its own (not prometheus-client's global one) holding only this node's counters."""
    registry = CollectorRegistry()
    registry.register(StatsCollector(stats))
    return registry


# ---- the /metrics endpoint ------------------------------------------------------------


def scrape_response(registry: CollectorRegistry, request_line: bytes) -> bytes:
    """The whole HTTP/1.1 response to one request line; the connection closes after it."""
    parts = request_line.split()
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return _response(400, "Bad Request", b"bad request\n")
    method, target, _ = parts
    if target.partition(b"?")[0] != METRICS_PATH:
        return _response(404, "Not Found", b"not found; metrics are at /metrics\n")
    if method not in (b"GET", b"HEAD"):
        return _response(405, "Method Not Allowed", b"method not allowed\n", [("Allow", "GET, HEAD")])
    body = generate_latest(registry)
    return _response(200, "OK", body, [("Content-Type", CONTENT_TYPE_LATEST)], head_only=method == b"HEAD")


def _response(
    status: int, reason: str, body: bytes, headers: list[tuple[str, str]] | None = None,
    *, head_only: bool = False,
) -> bytes:
    fields = [*(headers or [("Content-Type", "text/plain; charset=utf-8")]),
              ("Content-Length", str(len(body))), ("Connection", "close")]
    head = f"HTTP/1.1 {status} {reason}\r\n" + "".join(f"{n}: {v}\r\n" for n, v in fields) + "\r\n"
    return head.encode("latin-1") + (b"" if head_only else body)


async def start_metrics_server(stats: Stats, host: str, port: int) -> asyncio.Server:
    """Serve ``GET /metrics`` on ``host:port`` from the running loop, which must own ``stats``.

    Raises ``OSError`` when the address cannot be bound. Close the returned server to stop.
    """
    registry = metrics_registry(stats)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
            writer.write(scrape_response(registry, head.partition(b"\r\n")[0]))
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            pass  # the client went away, sent garbage or too much, or nothing at all: just close
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    return await asyncio.start_server(answer, host, port, limit=MAX_REQUEST_HEAD)
