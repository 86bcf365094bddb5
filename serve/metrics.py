"""Prometheus metrics of one server (a registry of its own, so several apps in one process,
as in the tests, do not collide): request latency by route and status, queries per batch,
requests waiting, requests refused."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds: a query on the demo gallery takes a few ms; a large exhaustive batch, seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "scan_request_seconds",
            "Time from a request's arrival to its response",
            ["route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch = Histogram(
            "scan_batch_queries",
            "Queries scored together in one retriever call",
            ["kind"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue = Gauge(
            "scan_queue_depth", "Requests waiting to be batched", ["kind"], registry=self.registry
        )
        self.refused = Counter(
            "scan_requests_refused",
            "Requests refused before any work (queue full, body too large)",
            ["reason"],
            registry=self.registry,
        )

    def observer(self, kind: str):
        """What a batcher calls with each batch's query count and the queue depth after it."""

        def observe(queries: int, depth: int) -> None:
            self.batch.labels(kind).observe(queries)
            self.queue.labels(kind).set(depth)

        return observe

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
