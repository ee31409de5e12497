"""The gateway's Prometheus metrics, in a registry of its own (not the process-global default)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Seconds: a cached text answers in milliseconds, a large image batch on CPU in seconds.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("clip_gateway_requests", "Requests answered, by route and HTTP status.",
                                ["route", "status"], registry=self.registry)
        self.items = Counter("clip_gateway_items", "Items embedded in successful requests, by kind.",
                             ["kind"], registry=self.registry)
        self.latency = Histogram("clip_gateway_request_seconds", "Time from arrival to answer, by route.",
                                 ["route"], buckets=BUCKETS, registry=self.registry)
        self.in_flight = Gauge("clip_gateway_in_flight", "Requests being worked on now.", registry=self.registry)

    def done(self, route: str, status: int, seconds: float, items: dict[str, int] | None = None) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        for kind, n in (items or {}).items():
            if n:
                self.items.labels(kind).inc(n)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
