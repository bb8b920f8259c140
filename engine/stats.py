"""EngineStats: what the engine counts about itself, as plain numbers (no Prometheus here; server/metrics.py exports
them). Every field is written by the engine thread only and read by whoever asks, without locks: a reader may see
one step's counters half updated, never a torn number."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # streams in one engine step
QUEUE_TIME_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


@dataclass
class Histogram:
    """Cumulative counts of observations by upper bound, as Prometheus wants them (le = bound; the last bucket,
    count, is +Inf)."""

    bounds: tuple[float, ...]  # upper bounds, increasing
    bucket_counts: list[int] = field(default_factory=list)  # observations <= bounds[i] and > bounds[i - 1]
    count: int = 0  # all observations
    sum: float = 0.0  # of all observations

    def __post_init__(self) -> None:
        if list(self.bounds) != sorted(set(self.bounds)):
            raise ValueError(f"bounds: must increase strictly, got {self.bounds}")
        self.bucket_counts = self.bucket_counts or [0] * len(self.bounds)

    def observe(self, value: float) -> None:
        self.count += 1  # first: a reader taking the buckets, then the count, never sees buckets above the count
        self.sum += value
        i = bisect.bisect_left(self.bounds, value)
        if i < len(self.bounds):
            self.bucket_counts[i] += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= it) for every bound, then (inf, count)."""
        out, total = [], 0
        for bound, n in zip(self.bounds, self.bucket_counts):
            total += n
            out.append((float(bound), total))
        return out + [(float("inf"), self.count)]


@dataclass
class EngineStats:
    """Counters (`_total`, only grow), gauges (now) and histograms of one engine."""

    # --- gauges, refreshed after every step
    num_waiting: int = 0  # requests queued for an engine slot
    num_running: int = 0  # requests holding a slot (prefilling or decoding)
    num_states_resident: int = 0  # engine-allocated states held by running requests (session states not included)
    states_resident_bytes: int = 0  # their bytes
    states_pooled_bytes: int = 0  # released states kept for reuse; resident + pooled never exceed the budget
    state_nbytes: int = 0  # bytes of one stream's state (fixed by the model and the attention config)
    state_budget_bytes: int = 0  # the byte budget for engine-allocated states
    state_capacity_left: int = 0  # more states that fit in the budget now

    # --- counters
    steps_total: int = 0  # engine steps that ran the model
    prefill_tokens_total: int = 0  # input tokens consumed (prompts and session appends)
    decode_tokens_total: int = 0  # tokens generated
    fam_updates_total: int = 0  # FAM memory updates (one per completed block per stream, in fam mode)
    preemptions_total: int = 0  # running requests sent back to the queue; states are fixed-size, so never so far
    cuda_graph_captures_total: int = 0  # steps captured as CUDA graphs (per decode batch or prefilling stream; CUDA)
    cuda_graph_replays_total: int = 0  # steps replayed from a captured graph (decode steps, whole prompt blocks)

    # --- histograms
    batch_size: Histogram = field(default_factory=lambda: Histogram(BATCH_SIZE_BUCKETS))  # streams per step
    queue_time_s: Histogram = field(default_factory=lambda: Histogram(QUEUE_TIME_BUCKETS_S))  # submission to slot
