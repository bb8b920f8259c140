"""Prometheus metrics of one app (its own CollectorRegistry, so several apps can live in one process): requests by
route and status with their latency, filled by an ASGI middleware; time to first token, inter-token latency and token
counts, filled by generation.py; and gauges read from the engine's stats at scrape time."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from famserve.engine.engine import EngineStats

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_TOKEN_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)
UNMATCHED_ROUTE = "unmatched"  # the route label of requests to paths the app does not serve (bounded labels)


class EngineCollector(Collector):
    """Gauges of the engine's queue, read when Prometheus scrapes (nothing while the model loads)."""

    def __init__(self, stats: Callable[[], EngineStats | None]) -> None:
        self._stats = stats

    def collect(self) -> Iterable[GaugeMetricFamily]:
        stats = self._stats()
        running = GaugeMetricFamily("famserve_num_requests_running", "requests the engine is decoding")
        waiting = GaugeMetricFamily("famserve_num_requests_waiting", "requests queued for an engine slot")
        if stats is not None:
            running.add_metric([], stats.num_running)
            waiting.add_metric([], stats.num_waiting)
        return [running, waiting]


class Metrics:
    """The metrics of one app; `render()` is the body of GET /metrics."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine_stats: Callable[[], EngineStats | None]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("famserve_requests_total", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=r)
        self.request_duration = Histogram("famserve_request_duration_seconds",
                                          "time from a request's arrival to its last response byte, by route",
                                          ["route"], buckets=_LATENCY_BUCKETS_S, registry=r)
        self.time_to_first_token = Histogram("famserve_time_to_first_token_seconds",
                                             "time from a request's arrival to its first generated token",
                                             buckets=_LATENCY_BUCKETS_S, registry=r)
        self.inter_token_latency = Histogram("famserve_inter_token_latency_seconds",
                                             "time between two generated tokens of one choice",
                                             buckets=_TOKEN_LATENCY_BUCKETS_S, registry=r)
        self.prompt_tokens = Counter("famserve_prompt_tokens_total", "prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("famserve_generation_tokens_total", "tokens generated", registry=r)
        r.register(EngineCollector(engine_stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts every HTTP request by route template and status and times it to its last byte (streams included)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, known_paths: set[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.known_paths = known_paths  # the app's route templates: the only values the route label takes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started_s = time.perf_counter()
        status = 500  # what the client sees if the app fails before answering

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = self._route(scope)
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.request_duration.labels(route).observe(time.perf_counter() - started_s)

    def _route(self, scope: Scope) -> str:
        """The matched route's template ("/v1/models/{model}"), or the path when a middleware answered before
        routing (a 401 on /v1/completions), or "unmatched"."""
        matched = getattr(scope.get("route"), "path", None)
        if matched in self.known_paths:
            return matched
        return scope["path"] if scope["path"] in self.known_paths else UNMATCHED_ROUTE
