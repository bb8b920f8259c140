"""BlockScheduler: the pure-Python policy deciding what runs in the next engine step (no torch here).

Every step decodes one token for each running stream that is generating, and spends a bounded prefill budget on
streams that still have input to consume. Policy (documented in docs/engine.md): prompts are served
shortest-remaining first, so a short chat's first token is not stuck behind a million-token ingest, while the oldest
prefilling stream always gets at least a quarter of the budget, so a long ingest is never starved. A waiting request
is admitted when a running slot is free and the state it needs fits in the state byte budget; one that does not fit
stays queued (in arrival order) until a running request finishes."""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Status(Enum):
    WAITING = "waiting"  # queued, holds no state slot yet
    PREFILL = "prefill"  # admitted, still consuming its input
    DECODE = "decode"  # generating one token per step
    FINISHED = "finished"


_arrival = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One request as the scheduler sees it: how much input is left and whether it generates."""

    request_id: str
    prompt_ids: list[int]
    max_new_tokens: int  # 0 = consume the input only (session append)
    status: Status = Status.WAITING
    num_prefilled: int = 0  # prompt tokens already consumed
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    arrival: int = field(default_factory=lambda: next(_arrival))
    state_nbytes: int = 0  # bytes of the state the engine allocates at admission; 0 when it brings its own (sessions)
    payload: Any = None  # the engine's per-request data (state, sampling state, output queue); opaque here

    @property
    def num_prompt_left(self) -> int:
        return len(self.prompt_ids) - self.num_prefilled

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)


@dataclass
class ScheduledWork:
    """What one step runs: (sequence, tokens to feed) pairs; a decode item feeds 1 token."""

    items: list[tuple[Sequence, int]]
    admitted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.items)


class BlockScheduler:
    def __init__(self, max_running: int, max_waiting: int, prefill_budget_tokens: int,
                 state_budget_bytes: int | None = None):
        self.max_running = max_running  # streams holding a running slot at once
        self.max_waiting = max_waiting  # queued requests beyond which submissions are refused
        self.prefill_budget_tokens = prefill_budget_tokens  # input tokens consumed per step, over all streams
        self.state_budget_bytes = state_budget_bytes  # bytes of states allocated for running streams; None = no limit
        self.state_bytes_in_use = 0  # sum of state_nbytes over the running streams
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def _fits(self, state_nbytes: int) -> bool:
        return self.state_budget_bytes is None or self.state_bytes_in_use + state_nbytes <= self.state_budget_bytes

    def free_slots(self, state_nbytes: int) -> int:
        """How many more streams needing `state_nbytes` each could run now: free slots, bounded by the budget."""
        slots = max(self.max_running - len(self.running), 0)
        if state_nbytes and self.state_budget_bytes is not None:
            slots = min(slots, max(self.state_budget_bytes - self.state_bytes_in_use, 0) // state_nbytes)
        return slots

    def has_room(self, state_nbytes: int = 0) -> bool:
        """Whether one more request may queue: it will take a free running slot at the next step, or wait."""
        return len(self.waiting) < self.max_waiting + self.free_slots(state_nbytes)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledWork:
        admitted = self._admit()
        items = [(s, 1) for s in self.running if s.status is Status.DECODE]
        items += self._share_prefill([s for s in self.running if s.status is Status.PREFILL])
        return ScheduledWork(items, admitted)

    def _admit(self) -> list[Sequence]:
        """Move waiting requests to running, in arrival order, while slots are free; one whose state does not fit
        the budget keeps its place (a request bringing its own state may pass it)."""
        admitted: list[Sequence] = []
        kept: deque[Sequence] = deque()
        while self.waiting and len(self.running) < self.max_running:
            seq = self.waiting.popleft()
            if not self._fits(seq.state_nbytes):
                kept.append(seq)
                continue
            seq.status = Status.PREFILL if seq.num_prompt_left else Status.DECODE
            self.state_bytes_in_use += seq.state_nbytes
            self.running.append(seq)
            admitted.append(seq)
        kept.extend(self.waiting)
        self.waiting = kept
        return admitted

    def _share_prefill(self, prefilling: list[Sequence]) -> list[tuple[Sequence, int]]:
        if not prefilling:
            return []
        budget = self.prefill_budget_tokens
        grants: dict[int, int] = {}
        oldest = min(prefilling, key=lambda s: s.arrival)
        grants[id(oldest)] = min(oldest.num_prompt_left, max(1, budget // 4))
        budget -= grants[id(oldest)]
        for seq in sorted(prefilling, key=lambda s: (s.num_prompt_left, s.arrival)):
            if budget <= 0:
                break
            extra = min(seq.num_prompt_left - grants.get(id(seq), 0), budget)
            if extra > 0:
                grants[id(seq)] = grants.get(id(seq), 0) + extra
                budget -= extra
        return [(s, grants[id(s)]) for s in prefilling if grants.get(id(s))]

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark a sequence done and release its place; safe to call for waiting or running ones."""
        seq.status, seq.finish_reason = Status.FINISHED, reason
        if seq in self.running:
            self.running.remove(seq)
            self.state_bytes_in_use -= seq.state_nbytes
        elif seq in self.waiting:
            self.waiting.remove(seq)
