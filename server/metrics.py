"""Prometheus metrics of one app (its own CollectorRegistry, so several apps can live in one process): requests by
route and status with their latency, filled by an ASGI middleware; time to first token, inter-token latency and token
counts, filled by generation.py; the engine's own numbers (queue, batch sizes, queue time, states and their byte
budget, FAM updates), read from its EngineStats at scrape time; and the sessions' (hot states and their budget,
loads, replayed tokens, evictions, snapshots), read from the SessionManager at scrape time."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from famserve.engine.stats import EngineStats, Histogram as StatsHistogram

from .sessions import SessionStats

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_TOKEN_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)
UNMATCHED_ROUTE = "unmatched"  # the route label of requests to paths the app does not serve (bounded labels)

# (metric name, help, EngineStats field): the engine's numbers, exported as they are.
_ENGINE_GAUGES = (
    ("famserve_num_requests_running", "requests holding an engine slot (prefilling or decoding)", "num_running"),
    ("famserve_num_requests_waiting", "requests queued for an engine slot", "num_waiting"),
    ("famserve_states_resident", "request states held by running requests (session states not included)",
     "num_states_resident"),
    ("famserve_states_resident_bytes", "bytes of the request states held by running requests",
     "states_resident_bytes"),
    ("famserve_states_pooled_bytes", "bytes of released request states kept for reuse (within the budget)",
     "states_pooled_bytes"),
    ("famserve_states_budget_bytes", "byte budget for request states (--state-memory-bytes)", "state_budget_bytes"),
    ("famserve_states_capacity_left", "more request states that fit in the budget now", "state_capacity_left"),
    ("famserve_state_bytes", "bytes of one stream's state (fixed by the model and attention config)", "state_nbytes"),
)
_ENGINE_COUNTERS = (
    ("famserve_engine_steps_total", "engine steps that ran the model", "steps_total"),
    ("famserve_prefill_tokens_total", "input tokens the engine consumed (prompts and session appends)",
     "prefill_tokens_total"),
    ("famserve_decode_tokens_total", "tokens the engine generated", "decode_tokens_total"),
    ("famserve_fam_updates_total", "FAM memory updates (one per completed block per stream, fam mode)",
     "fam_updates_total"),
    ("famserve_preemptions_total", "running requests sent back to the queue (states are fixed-size: none)",
     "preemptions_total"),
    ("famserve_cuda_graph_captures_total", "engine steps captured as CUDA graphs, one per decode batch or "
     "prefilling stream (CUDA)", "cuda_graph_captures_total"),
    ("famserve_cuda_graph_replays_total", "engine steps replayed from CUDA graphs (decode steps, whole prompt blocks)",
     "cuda_graph_replays_total"),
)
_ENGINE_HISTOGRAMS = (
    ("famserve_batch_size", "streams in one engine step", "batch_size"),
    ("famserve_request_queue_time_seconds", "time from submission to an engine slot, per admitted request",
     "queue_time_s"),
)
# The sessions' numbers (SessionManager.stats()).
_SESSION_GAUGES = (
    ("famserve_sessions_hot", "sessions whose state is held in memory", "num_hot"),
    ("famserve_sessions_hot_bytes", "bytes of the session states held in memory", "hot_bytes"),
    ("famserve_sessions_budget_bytes", "byte budget for session states in memory (--session-memory-bytes)",
     "budget_bytes"),
)
_SESSION_COUNTERS = (
    ("famserve_session_loads_total", "session states rebuilt from the store (cold, or changed by another replica)",
     "loads_total"),
    ("famserve_session_replayed_tokens_total", "log tokens prefilled again to rebuild session states",
     "replayed_tokens_total"),
    ("famserve_session_evictions_total", "idle session states dropped from memory to stay within the budget",
     "evictions_total"),
    ("famserve_session_snapshots_total", "session states written to the store", "snapshots_total"),
)


class StatsCollector(Collector):
    """Gauges, counters and histograms read from a stats object when Prometheus scrapes; (metric name, help,
    attribute) tables say which. Families have no samples while there are no stats yet (the model loads)."""

    def __init__(self, stats: Callable[[], Any | None], gauges: Sequence[tuple[str, str, str]],
                 counters: Sequence[tuple[str, str, str]], histograms: Sequence[tuple[str, str, str]] = ()) -> None:
        self._stats = stats
        self._gauges, self._counters, self._histograms = gauges, counters, histograms

    def collect(self) -> Iterable[Metric]:
        stats = self._stats()
        for name, documentation, attribute in self._gauges:
            gauge = GaugeMetricFamily(name, documentation)
            if stats is not None:
                gauge.add_metric([], getattr(stats, attribute))
            yield gauge
        for name, documentation, attribute in self._counters:
            counter = CounterMetricFamily(name, documentation)
            if stats is not None:
                counter.add_metric([], getattr(stats, attribute))
            yield counter
        for name, documentation, attribute in self._histograms:
            histogram = HistogramMetricFamily(name, documentation)
            if stats is not None:
                hist: StatsHistogram = getattr(stats, attribute)
                cumulative = hist.cumulative()  # read once: the engine thread may observe meanwhile
                histogram.add_metric([], [(_le(bound), n) for bound, n in cumulative], sum_value=hist.sum)
            yield histogram


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


class Metrics:
    """The metrics of one app; `render()` is the body of GET /metrics."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine_stats: Callable[[], EngineStats | None],
                 session_stats: Callable[[], SessionStats | None]) -> None:
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
        r.register(StatsCollector(engine_stats, _ENGINE_GAUGES, _ENGINE_COUNTERS, _ENGINE_HISTOGRAMS))
        r.register(StatsCollector(session_stats, _SESSION_GAUGES, _SESSION_COUNTERS))

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
