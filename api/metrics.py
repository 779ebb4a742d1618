"""Prometheus metrics on a per-app registry (several apps in one process never collide)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    """The service's metrics: requests and latencies per endpoint, batch sizes, index size."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "ivl_http_requests_total",
            "HTTP requests",
            ["method", "endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "ivl_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "ivl_encoder_batch_size",
            "Items per encoder call",
            ["kind"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.index_size = Gauge("ivl_index_size", "Vectors in the served index", registry=self.registry)
        self.index_reloads = Counter(
            "ivl_index_reloads_total", "Index reloads", ["result"], registry=self.registry
        )

    def observe_batch(self, kind: str, size: int) -> None:
        """Record one encoder call of ``size`` items."""
        self.batch_size.labels(kind=kind).observe(size)


def route_template(scope: Scope) -> str:
    """The matched route's path template (``/images/{image_id}``), so labels stay low-cardinality."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class MetricsMiddleware:
    """Pure ASGI middleware timing every HTTP request (streams included, until the last byte)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            endpoint = route_template(scope)
            method = scope.get("method", "")
            self.metrics.requests.labels(method=method, endpoint=endpoint, status=str(status)).inc()
            self.metrics.latency.labels(method=method, endpoint=endpoint).observe(time.perf_counter() - start)
