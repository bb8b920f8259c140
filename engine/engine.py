"""LLMEngine: requests in, tokens out. `step()` is the whole architecture: the scheduler picks the work, the runner
runs it in one batched forward pass, the sampler picks the next tokens, and finished requests release their state
(kept for reuse; states held stay under a byte budget). AsyncEngine runs that loop on one dedicated thread and hands
each request's outputs to asyncio through a queue."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import torch

from .config import CUDA_STATE_MEMORY_FRACTION, DEFAULT_CPU_STATE_MEMORY_BYTES, EngineConfig
from .errors import ContextLengthError, FamserveError, InvalidRequestError, QueueFullError
from .model import FamModel
from .runner import ModelRunner
from .sampling import Sampler, SamplingParams, SamplingState
from .scheduler import BlockScheduler, Sequence as SchedSequence, Status
from .state import FamState
from .stats import EngineStats
from .structured import GrammarCompiler, TokenMatcher

log = logging.getLogger(__name__)


@dataclass
class GenerationRequest:
    """What a caller submits. With `state` the request continues that stream in place (a session); otherwise it
    runs on a fresh state that is released when it finishes."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    state: FamState | None = None
    prefill_only: bool = False  # consume the prompt, generate nothing (session append)
    submitted_s: float = field(default_factory=time.monotonic)  # when it was made; its queue time counts from here
    matcher: TokenMatcher | None = None  # params.output_format compiled ahead (AsyncEngine does it off the loop)


@dataclass
class RequestOutput:
    """One increment of a request's result. The last one has finished=True and a finish_reason:
    "stop" (EOS or a stop token), "length" (max_tokens), "abort", "prefilled" (prefill_only) or "error"."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)  # new tokens since the previous output
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    finished: bool = False
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    error: str | None = None


@dataclass
class _Payload:
    request: GenerationRequest
    emit: Callable[[RequestOutput], None]
    state: FamState | None = None
    sampling: SamplingState | None = None
    matcher: TokenMatcher | None = None  # structured output: made when the request is added (a bad format fails it)


def default_state_memory_bytes(device: torch.device) -> int:
    """The state byte budget when none is configured (see EngineConfig.state_memory_bytes)."""
    if device.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(device)
        return int(free_bytes * CUDA_STATE_MEMORY_FRACTION)
    return DEFAULT_CPU_STATE_MEMORY_BYTES


class LLMEngine:
    """Limits: `max_running` streams per step, `max_waiting` queued beyond those that could start (QueueFullError),
    `prefill_budget_tokens` input tokens per step, and `state_memory_bytes` of request states held (running and kept
    for reuse; None: default_state_memory_bytes). Counters and gauges are in `stats`. Requests with an output
    format need `grammar` (the model's tokenizer, compiled for structured output)."""

    def __init__(self, model: FamModel, eos_token_ids: Sequence[int], max_running: int = 32,
                 max_waiting: int = 256, prefill_budget_tokens: int = 512, state_memory_bytes: int | None = None,
                 grammar: GrammarCompiler | None = None, cuda_graphs: bool = True):
        self.model = model
        self.grammar = grammar
        self.state_nbytes = model.state_nbytes  # of every fresh request's state
        budget = default_state_memory_bytes(model.device) if state_memory_bytes is None else state_memory_bytes
        if budget < self.state_nbytes:
            raise ValueError(f"state_memory_bytes: {budget} bytes hold no state of this model and attention config "
                             f"({self.state_nbytes} bytes each)")
        self.runner = ModelRunner(model, max_step_tokens=prefill_budget_tokens, cuda_graphs=cuda_graphs)
        self.sampler = Sampler(model.config.vocab_size)
        self.scheduler = BlockScheduler(max_running, max_waiting, prefill_budget_tokens, state_budget_bytes=budget)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.stats = EngineStats(state_nbytes=self.state_nbytes, state_budget_bytes=budget)
        self._by_id: dict[str, SchedSequence] = {}
        self._free_states: list[FamState] = []  # released fresh-request states, reused to avoid page faults
        self.refresh_stats()

    @classmethod
    def from_config(cls, model: FamModel, eos_token_ids: Sequence[int], config: EngineConfig,
                    grammar: GrammarCompiler | None = None) -> LLMEngine:
        return cls(model, eos_token_ids, max_running=config.max_running, max_waiting=config.max_waiting,
                   prefill_budget_tokens=config.prefill_tokens, state_memory_bytes=config.state_memory_bytes,
                   grammar=grammar, cuda_graphs=config.cuda_graphs)

    def add(self, request: GenerationRequest, emit: Callable[[RequestOutput], None]) -> None:
        if request.request_id in self._by_id:
            raise InvalidRequestError(f"request id {request.request_id!r} is already running")
        if not request.prompt_ids and (request.state is None or not request.prefill_only):
            raise InvalidRequestError("the prompt must contain at least one token")
        vocab_size = self.model.config.vocab_size
        bad = [t for t in request.prompt_ids if not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")
        bad = [t for t, _ in request.params.logit_bias if t >= vocab_size]
        if bad:
            raise InvalidRequestError(f"logit_bias: token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")
        capacity = self.model.fam_config.max_tokens
        start = request.state.num_tokens if request.state is not None else 0
        need = start + len(request.prompt_ids) + (0 if request.prefill_only else request.params.max_tokens - 1)
        if capacity is not None and need > capacity:
            raise ContextLengthError(f"full attention holds {capacity} tokens; this request needs {need} "
                                     "(use fam or bswa mode for unbounded streams)")
        state_nbytes = 0 if request.state is not None else self.state_nbytes
        if not self.scheduler.has_room(state_nbytes):
            raise QueueFullError(f"{len(self.scheduler.waiting)} requests are already waiting")
        matcher = request.matcher
        if request.params.output_format is not None and not request.prefill_only and matcher is None:
            matcher = self.compile_format(request.params)
        seq = SchedSequence(request.request_id, list(request.prompt_ids),
                            0 if request.prefill_only else request.params.max_tokens,
                            state_nbytes=state_nbytes, payload=_Payload(request, emit, matcher=matcher))
        self._by_id[request.request_id] = seq
        self.scheduler.add(seq)

    def compile_format(self, params: SamplingParams) -> TokenMatcher:
        """A fresh matcher for params.output_format; InvalidRequestError naming the field if it does not compile."""
        if self.grammar is None:
            raise InvalidRequestError(f"{params.output_format.param}: this engine has no tokenizer to compile output "
                                      "formats with")
        return self.grammar.matcher(params.output_format)

    def abort(self, request_id: str) -> None:
        seq = self._by_id.get(request_id)
        if seq is not None:
            self._finish(seq, "abort")

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> None:
        """Admit what fits, run one batched forward pass, sample, release what finished; then refresh the gauges."""
        self._step()
        self.refresh_stats()

    def _step(self) -> None:
        work = self.scheduler.schedule()
        for seq in work.admitted:
            self._admit(seq)
        if work.admitted:  # before the first token goes out: a client that has it sees the slot taken
            self.refresh_stats()
        if not work.items:
            return
        states, inputs = [], []
        for seq, n in work.items:
            states.append(seq.payload.state)
            if seq.status is Status.PREFILL:
                inputs.append(seq.prompt_ids[seq.num_prefilled:seq.num_prefilled + n])
            else:
                inputs.append(seq.output_ids[-1:])
        updates_before = sum(s.num_fam_updates for s in states)
        try:
            logits = self.runner.run(states, inputs)
            self.stats.fam_updates_total += sum(s.num_fam_updates for s in states) - updates_before
            self.stats.steps_total += 1
            self.stats.batch_size.observe(len(work.items))
            self._postprocess(work.items, logits)
        except Exception as e:  # one bad batch must not kill the loop; its requests fail, others go on
            log.exception("engine step failed")
            for seq, _ in work.items:
                self._finish(seq, "error", error=f"internal engine error: {type(e).__name__}")

    def _admit(self, seq: SchedSequence) -> None:
        p: _Payload = seq.payload
        self.stats.queue_time_s.observe(max(time.monotonic() - p.request.submitted_s, 0.0))
        if p.request.state is not None:
            p.state = p.request.state
        elif self._free_states:
            p.state = self._free_states.pop()
            self.model.reset_state(p.state)
        else:
            p.state = self.model.new_state()
        if not p.request.prefill_only:
            p.sampling = SamplingState(p.request.params, self.model.config.vocab_size, seq.prompt_ids,
                                       device=self.model.device, matcher=p.matcher)
        if seq.status is Status.DECODE and not p.request.prefill_only:  # nothing to prefill: cannot happen
            raise InvalidRequestError("nothing to generate from")

    def _postprocess(self, items: list[tuple[SchedSequence, int]], logits: list[torch.Tensor]) -> None:
        to_sample: list[tuple[SchedSequence, torch.Tensor]] = []
        for (seq, n), lg in zip(items, logits):
            if seq.status is Status.PREFILL:
                seq.num_prefilled += n
                self.stats.prefill_tokens_total += n
                if seq.num_prompt_left:
                    continue
                if seq.max_new_tokens == 0:
                    self._finish(seq, "prefilled")
                    continue
                seq.status = Status.DECODE
            to_sample.append((seq, lg))
        if not to_sample:
            return
        out = self.sampler.sample(torch.cat([lg for _, lg in to_sample]), [s.payload.sampling for s, _ in to_sample])
        for i, (seq, _) in enumerate(to_sample):
            token = out.token_ids[i]
            seq.output_ids.append(token)
            seq.payload.sampling.observe(token)
            self.stats.decode_tokens_total += 1
            params = seq.payload.request.params
            reason = None
            if token in params.stop_token_ids or (token in self.eos_token_ids and not params.ignore_eos):
                reason = "stop"
            elif seq.payload.matcher is not None and seq.payload.matcher.done:  # the format is complete
                reason = "stop"
            elif len(seq.output_ids) >= seq.max_new_tokens:
                reason = "length"
            seq.payload.emit(RequestOutput(
                seq.request_id, [token],
                logprobs=None if out.logprobs is None else [out.logprobs[i]],
                top_logprobs=None if out.top_logprobs is None else [out.top_logprobs[i]],
                num_prompt_tokens=seq.num_prompt_tokens, num_output_tokens=len(seq.output_ids)))
            if reason:
                self._finish(seq, reason)

    def _finish(self, seq: SchedSequence, reason: str, error: str | None = None) -> None:
        if self._by_id.pop(seq.request_id, None) is None:
            return
        self.scheduler.finish(seq, reason)
        p: _Payload = seq.payload
        if p.request.state is None and p.state is not None:
            self._free_states.append(p.state)
        self.refresh_stats()  # before the last output: a client that has its answer sees the slot free
        p.emit(RequestOutput(seq.request_id, finished=True, finish_reason=reason, error=error,
                             num_prompt_tokens=seq.num_prompt_tokens, num_output_tokens=len(seq.output_ids)))

    def refresh_stats(self) -> EngineStats:
        """Bring the gauges of `stats` up to date (the engine thread calls it after every step)."""
        stats, scheduler = self.stats, self.scheduler
        stats.num_waiting = len(scheduler.waiting)
        stats.num_running = len(scheduler.running)
        stats.states_resident_bytes = scheduler.state_bytes_in_use
        stats.num_states_resident = scheduler.state_bytes_in_use // self.state_nbytes
        stats.states_pooled_bytes = len(self._free_states) * self.state_nbytes
        stats.state_capacity_left = (stats.state_budget_bytes - scheduler.state_bytes_in_use) // self.state_nbytes
        if self.runner.graphs is not None:
            stats.cuda_graph_captures_total = self.runner.graphs.captures
            stats.cuda_graph_replays_total = self.runner.graphs.replays
        return stats


class AsyncEngine:
    """Owns the engine thread. Submissions and aborts cross into it through a queue; outputs come back to the
    submitting event loop through a per-request asyncio.Queue."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._inbox: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.last_step_time = 0.0  # monotonic time the loop last went round (readiness)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="famserve-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self._stopping.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its outputs; leaving the iterator early (client gone, cancellation) aborts it."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
        accepted: asyncio.Future[BaseException | None] = loop.create_future()

        def deliver(fn, *args) -> None:
            try:
                loop.call_soon_threadsafe(fn, *args)
            except RuntimeError:  # the caller's event loop is gone: nobody is listening any more
                self.abort(request.request_id)

        def emit(out: RequestOutput) -> None:
            deliver(outputs.put_nowait, out)

        def answer(error: BaseException | None) -> None:
            deliver(lambda: accepted.done() or accepted.set_result(error))

        finished = False
        if request.params.output_format is not None and request.matcher is None and not request.prefill_only:
            # Compiled here, in a worker thread: a large schema must not stall every other stream's steps.
            request.matcher = await asyncio.to_thread(self.engine.compile_format, request.params)
        try:
            self._inbox.put(("add", request, emit, answer))
            error = await accepted  # the engine thread answers between two steps
            if error is not None:
                finished = True
                raise error
            while True:
                out = await outputs.get()
                yield out
                if out.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request.request_id)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self.last_step_time = time.monotonic()
            block = not self.engine.has_work()
            try:
                msg = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            except queue.Empty:
                msg = False
            while msg:
                self._handle(msg)
                try:
                    msg = self._inbox.get_nowait()
                except queue.Empty:
                    msg = None
            if msg is None and self._stopping.is_set():
                break
            if self.engine.has_work():
                try:
                    self.engine.step()
                except Exception:  # the loop must outlive any one step; step() already failed its requests
                    log.exception("engine step raised")
            self.engine.refresh_stats()

    def _handle(self, msg) -> None:
        if msg[0] == "add":
            _, request, emit, answer = msg
            try:
                self.engine.add(request, emit)
            except FamserveError as e:
                answer(e)
            except Exception as e:  # a bug fails its own request (a 500), never the loop every stream needs
                log.exception("engine add failed")
                answer(e)
            else:
                answer(None)
        elif msg[0] == "abort":
            self.engine.abort(msg[1])
