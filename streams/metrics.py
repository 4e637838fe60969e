"""Every Prometheus metric of the service, in one registry served at ``GET /metrics``.

Ingest metrics change once per batch, view metrics are read when scraped, and HTTP metrics are
plain counters turned into Prometheus families only when scraped: nothing here adds a lock
or a round trip per message or per request.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BOUNDS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_BATCH_BOUNDS: Final = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000)


def reason_class(reason: str) -> str:
    """A small, fixed set of label values for dead-letter reasons."""
    if reason.startswith("not valid JSON"):
        return "json"
    if reason.startswith("not valid UTF-8"):
        return "utf8"
    if reason.startswith("message is "):
        return "size"
    if reason.startswith("refused by PostgreSQL"):
        return "database"
    if "U+0000" in reason:
        return "nul"
    return "schema"


class RouteMeter:
    """One route's requests by status, and its latency histogram."""

    __slots__ = ("buckets", "seconds", "statuses")

    def __init__(self) -> None:
        self.statuses: dict[int, int] = {}
        self.buckets = [0] * (len(_LATENCY_BOUNDS) + 1)
        self.seconds = 0.0

    def observe(self, status: int, seconds: float) -> None:
        """Count one answered request (called on the event loop only, hence no lock)."""
        statuses = self.statuses
        statuses[status] = statuses.get(status, 0) + 1
        self.buckets[bisect.bisect_left(_LATENCY_BOUNDS, seconds)] += 1
        self.seconds += seconds


class HttpMetrics(Collector):
    """Requests by route and status, and latency by route, counted without locks."""

    def __init__(self) -> None:
        self._routes: dict[str, RouteMeter] = {}

    def meter(self, route: str) -> RouteMeter:
        """Where the requests of ``route`` are counted: a hot route holds on to it."""
        meter = self._routes.get(route)
        if meter is None:
            meter = self._routes[route] = RouteMeter()
        return meter

    def observe(self, route: str, status: int, seconds: float) -> None:
        """Count one answered request of ``route``."""
        self.meter(route).observe(status, seconds)

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        requests = CounterMetricFamily(
            "orders_http_requests", "HTTP requests answered", labels=["route", "status"]
        )
        latency = HistogramMetricFamily(
            "orders_http_request_seconds", "HTTP request latency", labels=["route"]
        )
        for route, meter in sorted(self._routes.items()):
            for status, count in sorted(meter.statuses.items()):
                requests.add_metric([route, str(status)], count)
            cumulative, running = [], 0
            for bound, count in zip((*_LATENCY_BOUNDS, float("inf")), meter.buckets, strict=True):
                running += count
                cumulative.append((str(bound) if bound != float("inf") else "+Inf", running))
            latency.add_metric([route], cumulative, meter.seconds)
        yield requests
        yield latency


class Metrics:
    """The service's metrics; one instance per app, with its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.messages = Counter(
            "orders_messages_received", "Messages handed to the agent", registry=registry
        )
        self.stored = Counter(
            "orders_stored", "Orders appended to orders_events", registry=registry
        )
        self.duplicates = Counter(
            "orders_duplicates", "Orders whose order_uid was already in the log", registry=registry
        )
        self.conflicts = Counter(
            "orders_conflicting_duplicates",
            "Duplicates whose payload differs from the stored one",
            registry=registry,
        )
        self.dead_lettered = Counter(
            "orders_dead_lettered",
            "Messages kept in orders_dead_letters, by reason class",
            ["reason"],
            registry=registry,
        )
        self.batches = Counter("orders_batches_committed", "Committed batches", registry=registry)
        self.batch_size = Histogram(
            "orders_batch_size", "Messages per batch", buckets=_BATCH_BOUNDS, registry=registry
        )
        self.commit_seconds = Histogram(
            "orders_batch_commit_seconds",
            "Time from taking a batch to its commit, retries included",
            buckets=_LATENCY_BOUNDS,
            registry=registry,
        )
        self.database_retries = Counter(
            "orders_database_retries",
            "Batch writes retried after a database error",
            registry=registry,
        )
        self.consumer_redelivered = Gauge(
            "orders_nats_consumer_redelivered",
            "Messages the consumer has delivered more than once and not yet acked (polled)",
            registry=registry,
        )
        self.nats_connected = Gauge(
            "orders_nats_connected", "1 while connected to NATS", registry=registry
        )
        self.nats_reconnects = Counter(
            "orders_nats_reconnects", "Reconnections to NATS", registry=registry
        )
        self.consumer_pending = Gauge(
            "orders_nats_consumer_pending",
            "Messages in the stream not yet delivered to the consumer (polled)",
            registry=registry,
        )
        self.consumer_ack_pending = Gauge(
            "orders_nats_consumer_ack_pending",
            "Messages delivered and not yet acked (polled)",
            registry=registry,
        )
        self.view_orders = Gauge("orders_view_orders", "Orders in the view", registry=registry)
        self.view_last_seq = Gauge(
            "orders_view_last_seq", "Last event seq projected into the view", registry=registry
        )
        self.restore_seconds = Gauge(
            "orders_view_restore_seconds", "Duration of the boot replay", registry=registry
        )
        self.restore_rate = Gauge(
            "orders_view_restore_events_per_second", "Rate of the boot replay", registry=registry
        )
        self.http = HttpMetrics()
        registry.register(self.http)

    def watch_view(self, size: Callable[[], float], last_seq: Callable[[], float]) -> None:
        """Read the view's size and position when scraped, never on the hot path."""
        self.view_orders.set_function(size)
        self.view_last_seq.set_function(last_seq)
