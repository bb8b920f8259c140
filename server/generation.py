"""The one place that turns an OpenAI request into engine calls: prompts are tokenized (or the chat template applied)
and checked, SamplingParams built, one engine request submitted per choice, the tokens detokenized incrementally and
cut at stop strings, and usage and latency recorded. Routes only format what comes out: a stream of ChoiceDeltas."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field

from famserve.engine.build import LoadedModel
from famserve.engine.engine import AsyncEngine, GenerationRequest, RequestOutput
from famserve.engine.sampling import SamplingParams
from famserve.engine.state import FamState
from famserve.engine.tokenizer import IncrementalDetokenizer, StopStringMatcher

from .errors import APIError, EngineFailureError, NotFoundError, RequestTimeoutError
from .metrics import Metrics
from .protocol import ChatCompletionRequest, CompletionRequest, Usage
from .settings import Settings

log = logging.getLogger(__name__)


@dataclass
class TokenInfo:
    """A generated token with its logprobs, for responses that asked for them."""

    token_id: int
    text: str  # this token decoded on its own
    logprob: float
    top: list[tuple[str, float]]  # the most likely tokens at this position, as (text, logprob)


@dataclass
class ChoiceDelta:
    """What one choice added since its previous delta; the last one carries its finish_reason."""

    index: int
    text: str = ""
    tokens: list[TokenInfo] = field(default_factory=list)  # filled only when logprobs were asked for
    finish_reason: str | None = None  # "stop" or "length" on a choice's last delta
    token_ids: list[int] = field(default_factory=list)  # every id the engine generated, even one that ended the text


@dataclass
class Job:
    """A validated request ready to run: each prompt generates n choices, numbered prompt_index * n + i."""

    id: str  # the response id, e.g. "chatcmpl-..."
    prompts: list[list[int]]
    params: SamplingParams
    n: int
    stops: list[str]
    usage: Usage  # prompt tokens at the start, completion tokens added as they come
    echo: list[str] | None = None  # completions with echo: each prompt's text, prepended to its choices
    state: FamState | None = None  # continue this stream in place (sessions; one choice); None = a fresh state
    created: int = field(default_factory=lambda: int(time.time()))
    started_s: float = field(default_factory=time.perf_counter)  # perf_counter when the request arrived

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.n

    def final_usage(self) -> Usage:
        usage = self.usage
        return Usage(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                     total_tokens=usage.prompt_tokens + usage.completion_tokens)


class GenerationService:
    """Owns the model's tokenizer and the AsyncEngine on behalf of the routes."""

    def __init__(self, engine: AsyncEngine, loaded: LoadedModel, eos_token_ids: set[int], settings: Settings,
                 metrics: Metrics) -> None:
        self.engine = engine
        self.tokenizer = loaded.tokenizer
        self.model_name = settings.served_model_name or loaded.model_id
        self.mode = loaded.model.fam_config.describe()
        self.fam_adapter = settings.fam_adapter.name if settings.fam_adapter else None  # file name, for /v1/models
        self.vocab_size = loaded.model.config.vocab_size
        self.eos_token_ids = frozenset(eos_token_ids)
        self.settings = settings
        self.metrics = metrics
        self._token_texts: dict[int, str] = {}

    # --- requests -> jobs

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise NotFoundError(f"model {name!r} is not served here (this server serves {self.model_name!r})",
                                code="model_not_found", param="model")

    async def completion_job(self, request: CompletionRequest) -> Job:
        started_s = time.perf_counter()
        self.check_model(request.model)
        prompt = request.prompt
        texts = [prompt] if isinstance(prompt, str) else prompt if isinstance(prompt[0], str) else None
        if texts is not None:
            prompts = await asyncio.to_thread(lambda: [self.tokenizer.encode(t, add_special_tokens=True)
                                                       for t in texts])
        else:
            prompts = [list(prompt)] if isinstance(prompt[0], int) else [list(p) for p in prompt]
        for ids in prompts:
            self._check_prompt(ids, "prompt")
        job = self._job("cmpl", prompts, request, started_s)
        if request.echo:
            job.echo = texts or [self.tokenizer.decode(ids) for ids in prompts]
        return job

    async def chat_job(self, request: ChatCompletionRequest) -> Job:
        started_s = time.perf_counter()
        self.check_model(request.model)
        ids = await asyncio.to_thread(self.tokenizer.apply_chat_template, request.template_messages())
        self._check_prompt(ids, "messages")
        return self._job("chatcmpl", [ids], request, started_s)

    def session_job(self, prefix: str, request: CompletionRequest | ChatCompletionRequest, ids: list[int],
                    param: str = "messages") -> Job:
        """A job over already-tokenized prompt ids (the caller sets job.state to continue a stream)."""
        self.check_model(request.model)
        self._check_prompt(ids, param)
        return self._job(prefix, [ids], request, time.perf_counter())

    def _job(self, prefix: str, prompts: list[list[int]], request: CompletionRequest | ChatCompletionRequest,
             started_s: float) -> Job:
        try:
            params = request.to_sampling_params(self.settings.max_tokens_cap)
        except ValueError as exc:
            raise APIError.from_message(str(exc)) from None
        stop = request.stop
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        usage = Usage(prompt_tokens=sum(len(p) for p in prompts))
        return Job(f"{prefix}-{uuid.uuid4().hex}", prompts, params, request.n or 1, stops, usage,
                   started_s=started_s)

    def _check_prompt(self, ids: Sequence[int], param: str) -> None:
        if not ids:
            raise APIError(f"{param}: must contain at least one token", code="invalid_value", param=param)
        if len(ids) > self.settings.max_prompt_tokens:
            raise APIError(f"{param}: {len(ids)} tokens, more than this server accepts in one prompt "
                           f"({self.settings.max_prompt_tokens})", code="context_length_exceeded", param=param)
        self._check_token_ids(ids, param)

    def _check_token_ids(self, ids: Sequence[int], param: str) -> None:
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise APIError(f"{param}: token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})",
                           code="invalid_value", param=param)

    # --- tokenize / detokenize

    async def tokenize(self, prompt: str | None, messages: list[dict[str, str]] | None,
                       add_special_tokens: bool | None, add_generation_prompt: bool) -> list[int]:
        if messages is not None:
            return await asyncio.to_thread(self.tokenizer.apply_chat_template, messages, add_generation_prompt)
        special = True if add_special_tokens is None else add_special_tokens
        return await asyncio.to_thread(self.tokenizer.encode, prompt or "", special)

    def detokenize(self, ids: list[int]) -> str:
        self._check_token_ids(ids, "tokens")
        return self.tokenizer.decode(ids)

    # --- running

    async def collect(self, job: Job) -> list[ChoiceDelta]:
        """Run a job to the end; one ChoiceDelta per choice, by index, holding its whole text and tokens."""
        results = [ChoiceDelta(i) for i in range(job.num_choices)]
        async with aclosing(self.stream(job)) as deltas:
            async for delta in deltas:
                result = results[delta.index]
                result.text += delta.text
                result.tokens += delta.tokens
                result.token_ids += delta.token_ids
                result.finish_reason = delta.finish_reason or result.finish_reason
        return results

    async def stream(self, job: Job) -> AsyncIterator[ChoiceDelta]:
        """The deltas of all of a job's choices as they come. Leaving early, a client disconnect (cancellation) or
        request_timeout_s aborts every engine request still running."""
        if job.state is not None and job.num_choices != 1:
            raise APIError("a job that continues a stream has exactly one choice", code="invalid_value", param="n")
        queue: asyncio.Queue[ChoiceDelta | BaseException | None] = asyncio.Queue()

        async def pump(index: int, prompt_ids: list[int], params: SamplingParams) -> None:
            try:
                async with aclosing(self._run_choice(job, index, prompt_ids, params)) as deltas:
                    async for delta in deltas:
                        queue.put_nowait(delta)
                queue.put_nowait(None)
            except Exception as exc:  # handed to the consumer, which raises it
                queue.put_nowait(exc)

        tasks = []
        for p, prompt_ids in enumerate(job.prompts):
            for i in range(job.n):
                params = job.params
                if params.seed is not None and i:
                    params = dataclasses.replace(params, seed=params.seed + i)
                tasks.append(asyncio.create_task(pump(p * job.n + i, prompt_ids, params)))
        timeout_s = self.settings.request_timeout_s
        try:
            running = len(tasks)
            while running:
                if timeout_s is None:
                    item = await queue.get()
                else:
                    left_s = job.started_s + timeout_s - time.perf_counter()
                    try:
                        item = await asyncio.wait_for(queue.get(), max(left_s, 0))
                    except TimeoutError:
                        raise RequestTimeoutError(f"the request ran longer than this server's limit of "
                                                  f"{timeout_s:g} s", code="request_timeout") from None
                if item is None:
                    running -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _run_choice(self, job: Job, index: int, prompt_ids: list[int],
                          params: SamplingParams) -> AsyncIterator[ChoiceDelta]:
        request_id = f"{job.id}-{index}"
        detokenizer = IncrementalDetokenizer(self.tokenizer, prefix_ids=prompt_ids)
        stops = StopStringMatcher(job.stops)
        last_token_s: float | None = None
        finished = False
        try:
            request = GenerationRequest(request_id, prompt_ids, params, state=job.state)
            async with aclosing(self.engine.generate(request)) as outputs:
                # ids of tokens that added no text yet (half a character): they ride on the next delta
                held: list[int] = []
                async for out in outputs:
                    if out.finished:
                        finished = True
                        last = self._last_delta(index, out.finish_reason, out.error, detokenizer, stops)
                        last.token_ids = held + last.token_ids
                        yield last
                        return
                    last_token_s = self._count(job, len(prompt_ids), len(out.token_ids), last_token_s)
                    delta = self._delta(index, out, params, detokenizer, stops)
                    delta.token_ids = held + delta.token_ids
                    if delta.finish_reason is not None:  # a stop string: leaving aborts the engine request
                        yield delta
                        return
                    if delta.text or delta.tokens:
                        held = []
                        yield delta
                    else:
                        held = delta.token_ids
        finally:
            if not finished:  # also covers a cancellation before the engine had accepted the request
                self.engine.abort(request_id)

    def _count(self, job: Job, num_prompt_tokens: int, num_new_tokens: int, last_token_s: float | None) -> float:
        """Usage and metrics for new tokens of one choice; returns their arrival time."""
        now_s = time.perf_counter()
        if last_token_s is None:
            self.metrics.time_to_first_token.observe(now_s - job.started_s)
            self.metrics.prompt_tokens.inc(num_prompt_tokens)
        else:
            self.metrics.inter_token_latency.observe(now_s - last_token_s)
        self.metrics.generation_tokens.inc(num_new_tokens)
        job.usage.completion_tokens += num_new_tokens
        return now_s

    def _delta(self, index: int, out: RequestOutput, params: SamplingParams, detokenizer: IncrementalDetokenizer,
               stops: StopStringMatcher) -> ChoiceDelta:
        delta = ChoiceDelta(index, token_ids=list(out.token_ids))
        top_rows = out.top_logprobs or [[] for _ in out.token_ids]
        for k, token in enumerate(out.token_ids):
            if token in params.stop_token_ids or (token in self.eos_token_ids and not params.ignore_eos):
                continue  # the token that ends generation is not part of the text (nor of its logprobs)
            text, stopped = stops.push(detokenizer.push(token))
            delta.text += text
            if out.logprobs is not None and params.logprobs is not None:
                top = [(self.token_text(t), lp) for t, lp in top_rows[k]]
                delta.tokens.append(TokenInfo(token, self.token_text(token), out.logprobs[k], top))
            if stopped:
                delta.finish_reason = "stop"
                break
        return delta

    @staticmethod
    def _last_delta(index: int, reason: str | None, error: str | None, detokenizer: IncrementalDetokenizer,
                    stops: StopStringMatcher) -> ChoiceDelta:
        if reason not in ("stop", "length"):
            log.error("engine ended a request with %s: %s", reason, error)
            raise EngineFailureError(f"generation failed ({reason}{': ' + error if error else ''})",
                                     code="engine_error")
        text, stopped = stops.push(detokenizer.flush())
        if not stopped:
            text += stops.flush()
        return ChoiceDelta(index, text, finish_reason="stop" if stopped else reason)

    def token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id])
        return text
