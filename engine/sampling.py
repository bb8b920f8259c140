"""Sampling: SamplingParams (what a request asks for), SamplingState (what a request carries from step to step: its
random generator, the token statistics its penalties need and, for structured output, its place in the format) and
Sampler, which turns a batch of logits into one token per row. A row's token depends only on its own logits, params,
generator and format, never on the rest of the batch."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .structured import OutputFormat, TokenMatcher

MAX_LOGPROBS = 20  # OpenAI's cap on top_logprobs
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for a logit bias: -100 bans a token, +100 all but forces it
GREEDY_TEMPERATURE = 1e-5  # temperatures below this decode greedily (dividing by them overflows float32)


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{name}: {message}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens. Field meanings follow vLLM and the OpenAI API."""

    max_tokens: int = 16  # new tokens to generate at most
    temperature: float = 1.0  # softmax temperature; below GREEDY_TEMPERATURE (e.g. 0) = greedy
    top_p: float = 1.0  # nucleus: keep the most likely tokens whose mass reaches top_p; 1 = off
    top_k: int = 0  # keep the k most likely tokens; 0 or -1 = off
    min_p: float = 0.0  # drop tokens less likely than min_p * (probability of the most likely); 0 = off
    repetition_penalty: float = 1.0  # HF/vLLM: on prompt + generated tokens, divide positive logits, multiply negative
    presence_penalty: float = 0.0  # OpenAI: logit -= presence_penalty if the token was generated before
    frequency_penalty: float = 0.0  # OpenAI: logit -= frequency_penalty * times the token was generated before
    seed: int | None = None  # same seed, same tokens, whatever else is in the batch; None = a fresh random seed
    stop_token_ids: tuple[int, ...] = ()  # generation ends after any of these (checked by the caller)
    ignore_eos: bool = False  # keep generating past the model's EOS tokens (checked by the caller)
    logprobs: int | None = None  # None = none; k = the chosen token's logprob and the k most likely (0..MAX_LOGPROBS)
    logit_bias: tuple[tuple[int, float], ...] = ()  # OpenAI: (token id, bias) pairs added to the logits first
    output_format: OutputFormat | None = None  # structured output: only tokens that keep to it are ever chosen

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "logit_bias", tuple((t, b) for t, b in self.logit_bias))
        _require(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens",
                 f"must be an integer >= 1, got {self.max_tokens!r}")
        _require(math.isfinite(self.temperature) and self.temperature >= 0, "temperature",
                 f"must be finite and >= 0, got {self.temperature!r}")
        _require(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p!r}")
        _require(_is_int(self.top_k) and self.top_k >= -1, "top_k",
                 f"must be an integer >= -1 (0 or -1 = off), got {self.top_k!r}")
        _require(0 <= self.min_p <= 1, "min_p", f"must be in [0, 1], got {self.min_p!r}")
        _require(math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty",
                 f"must be finite and > 0, got {self.repetition_penalty!r}")
        _require(-2 <= self.presence_penalty <= 2, "presence_penalty",
                 f"must be in [-2, 2], got {self.presence_penalty!r}")
        _require(-2 <= self.frequency_penalty <= 2, "frequency_penalty",
                 f"must be in [-2, 2], got {self.frequency_penalty!r}")
        _require(self.seed is None or _is_int(self.seed), "seed", f"must be an integer or None, got {self.seed!r}")
        _require(all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
                 f"must be non-negative integers, got {self.stop_token_ids!r}")
        _require(self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
                 "logprobs", f"must be None or an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        for token_id, bias in self.logit_bias:
            _require(_is_int(token_id) and token_id >= 0, "logit_bias",
                     f"keys must be non-negative token ids, got {token_id!r}")
            _require(isinstance(bias, (int, float)) and -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS, "logit_bias",
                     f"biases must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {bias!r} for token {token_id}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


class SamplingState:
    """One request's sampling state, created once by the caller and kept for the request's life.

    Holds a generator on the logits' device, seeded from params.seed and advanced only when this request samples,
    and, only when a penalty needs them, per-token statistics updated in place by observe():
    `output_counts` (V,) int32, times each token was generated; `seen` (V,) bool, token in the prompt or generated.
    With a logit bias, `logit_bias` (V,) float32 holds it densely (zero for the tokens it does not name). With an
    output format, `matcher` (made by the caller from params.output_format) follows the tokens observed.
    """

    def __init__(self, params: SamplingParams, vocab_size: int, prompt_ids: Sequence[int] | torch.Tensor = (),
                 device: torch.device | str = "cpu", matcher: TokenMatcher | None = None) -> None:
        _require((matcher is None) == (params.output_format is None), "matcher",
                 "give one exactly when params.output_format is set")
        self.params = params
        self.matcher = matcher
        self.vocab_size = vocab_size
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.generator = torch.Generator(device=device)
        self.device = device  # where the logits this state samples from must live
        if params.seed is None:
            self.generator.seed()  # non-deterministic
        else:
            self.generator.manual_seed(params.seed % 2**64)
        self.output_counts: torch.Tensor | None = None
        self.seen: torch.Tensor | None = None
        self.logit_bias: torch.Tensor | None = None
        if params.logit_bias:
            ids = [t for t, _ in params.logit_bias]
            _require(max(ids) < vocab_size, "logit_bias",
                     f"token id {max(ids)} is outside the vocabulary (0..{vocab_size - 1})")
            self.logit_bias = torch.zeros(vocab_size, dtype=torch.float32)
            self.logit_bias[torch.tensor(ids)] = torch.tensor([b for _, b in params.logit_bias], dtype=torch.float32)
            self.logit_bias = self.logit_bias.to(device)
        if params.presence_penalty != 0 or params.frequency_penalty != 0:
            self.output_counts = torch.zeros(vocab_size, dtype=torch.int32, device=device)
        if params.repetition_penalty != 1:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            ids = torch.as_tensor(prompt_ids, dtype=torch.long).flatten()
            if ids.numel():
                lo, hi = int(ids.min()), int(ids.max())
                _require(0 <= lo and hi < vocab_size, "prompt_ids",
                         f"token ids must be in [0, {vocab_size}), got min {lo} max {hi}")
                self.seen[ids.to(device)] = True

    def observe(self, token_id: int) -> None:
        """Record a generated token the caller keeps; call once per token, in order."""
        if self.output_counts is not None:
            self.output_counts[token_id] += 1
        if self.seen is not None:
            self.seen[token_id] = True
        if self.matcher is not None:
            self.matcher.consume(token_id)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """HF/vLLM repetition penalty: on seen tokens, positive logits are divided by the penalty, the others multiplied.
    logits (B, V) float; seen (B, V) bool; penalty (B,). Returns a new tensor."""
    p = penalty[:, None]  # (B, 1)
    return torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits)


def apply_presence_frequency_penalty(logits: torch.Tensor, output_counts: torch.Tensor, presence: torch.Tensor,
                                     frequency: torch.Tensor) -> torch.Tensor:
    """OpenAI penalties: logit -= presence * (count > 0) + frequency * count, over generated tokens.
    logits (B, V) float; output_counts (B, V) int; presence, frequency (B,). Returns a new tensor."""
    counts = output_counts.to(logits.dtype)
    return logits - presence[:, None] * (counts > 0) - frequency[:, None] * counts


def filter_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor | None = None,
                  top_p: torch.Tensor | None = None, min_p: torch.Tensor | None = None) -> torch.Tensor:
    """Divide each row by its temperature, then set to -inf the tokens that top-k, top-p and min-p remove, in that
    order (HF's). logits (B, V) float; temperature (B,) > 0; top_k (B,) int, <= 0 = off; top_p (B,) in (0, 1];
    min_p (B,) in [0, 1]; None = off for every row. The most likely token always survives; top-k keeps ties with
    the k-th logit. Returns a new tensor."""
    x = logits / temperature[:, None]  # (B, V)
    vocab_size = x.shape[-1]
    if top_k is not None or top_p is not None:
        sorted_x, order = x.sort(dim=-1, descending=True, stable=True)  # (B, V) each; stable = ties by token id
        remove = torch.zeros_like(sorted_x, dtype=torch.bool)  # (B, V), in sorted order
        if top_k is not None:
            k = torch.where(top_k > 0, top_k.clamp(max=vocab_size), vocab_size).to(torch.long)  # (B,)
            remove = sorted_x < sorted_x.gather(1, (k - 1)[:, None])
        if top_p is not None:
            probs = sorted_x.masked_fill(remove, -math.inf).softmax(dim=-1)
            mass_above = probs.cumsum(dim=-1) - probs  # (B, V): mass of the tokens ranked above each one
            remove |= (mass_above >= top_p[:, None]) & (top_p[:, None] < 1)
        x = x.masked_fill(torch.empty_like(remove).scatter_(1, order, remove), -math.inf)
    if min_p is not None:
        probs = x.softmax(dim=-1)
        x = x.masked_fill(probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True), -math.inf)
    return x


def draw(logits: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One token per row from softmax(logits), row i drawing only from generators[i]: the exponential race
    argmax(p / q), q ~ Exp(1) (the Gumbel-max trick; unlike torch.multinomial it needs no host sync).
    logits (B, V) float; returns (B,) int64."""
    probs = logits.softmax(dim=-1)  # (B, V)
    q = torch.empty_like(probs)
    for row, generator in zip(q, generators, strict=True):
        row.exponential_(generator=generator)
    return (probs / q.clamp_min_(torch.finfo(q.dtype).tiny)).argmax(dim=-1)


@dataclass
class SampleOutput:
    """One token per row. Logprobs are log_softmax of the raw model logits (before penalties, temperature and
    filtering), as the OpenAI API reports them; they are filled for every row when any row asks for them."""

    token_ids: list[int]
    logprobs: list[float] | None  # the chosen token's logprob, per row
    top_logprobs: list[list[tuple[int, float]]] | None  # per row, its params.logprobs most likely (id, logprob)


class Sampler:
    """Picks one token per row of a batch of logits: logit bias, penalties, the output format's mask, then argmax
    for greedy rows, and for the others temperature, top-k, top-p, min-p and a draw from the row's own generator."""

    def __init__(self, vocab_size: int) -> None:
        _require(vocab_size > 0, "vocab_size", f"must be positive, got {vocab_size}")
        self.vocab_size = vocab_size  # the tokenizer's; logits columns past it (padding) are never sampled

    def sample(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> SampleOutput:
        """logits (B, V') with V' >= vocab_size, any float dtype; states[i] belongs to row i. Advances the generators
        of sampled rows. Does not observe the chosen tokens: the caller calls states[i].observe() for those it keeps."""
        self._check(logits, states)
        x = logits[:, :self.vocab_size].to(torch.float32, copy=True)  # (B, V)
        params = [s.params for s in states]
        wants_logprobs = any(p.logprobs is not None for p in params)
        raw_logprobs = torch.log_softmax(x, dim=-1) if wants_logprobs else None
        x = self._adjust(x, states)
        tokens = torch.empty(len(states), dtype=torch.long, device=x.device)
        is_greedy = [p.is_greedy for p in params]
        greedy = [i for i, g in enumerate(is_greedy) if g]
        if greedy:
            rows = self._index(greedy, x.device)
            tokens[rows] = x[rows].argmax(dim=-1)  # first maximum: ties go to the lowest id
        sampled = [i for i, g in enumerate(is_greedy) if not g]
        if sampled:
            rows = self._index(sampled, x.device)
            filtered = filter_logits(x[rows], **self._filter_args([params[i] for i in sampled], x.device))
            tokens[rows] = draw(filtered, [states[i].generator for i in sampled])
        token_ids = tokens.tolist()
        if raw_logprobs is None:
            return SampleOutput(token_ids, None, None)
        return SampleOutput(token_ids, *self._logprobs(raw_logprobs, tokens, params))

    def _check(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> None:
        _require(logits.dim() == 2 and logits.shape[0] == len(states), "logits",
                 f"expected shape ({len(states)}, >= {self.vocab_size}), got {tuple(logits.shape)}")
        _require(logits.shape[1] >= self.vocab_size, "logits",
                 f"has {logits.shape[1]} columns, fewer than vocab_size={self.vocab_size}")
        if any(s.vocab_size != self.vocab_size or s.device != logits.device for s in states):
            bad = next(s for s in states if s.vocab_size != self.vocab_size or s.device != logits.device)
            raise ValueError(f"states: a state built for vocab_size={bad.vocab_size} on {bad.device}, "
                             f"sampler has vocab_size={self.vocab_size} and logits on {logits.device}")

    @staticmethod
    def _index(rows: list[int], device: torch.device) -> torch.Tensor | slice:
        """Row selector: a slice (a view, no gather copy) when the rows are a prefix of the batch, e.g. all of it."""
        return slice(0, len(rows)) if rows[-1] == len(rows) - 1 else torch.tensor(rows, device=device)

    @staticmethod
    def _adjust(x: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
        biased = [i for i, s in enumerate(states) if s.logit_bias is not None]
        if biased:  # first, as vLLM does: the bias is part of what the model "said", penalties act on the sum
            rows = torch.tensor(biased, device=x.device)
            x[rows] += torch.stack([states[i].logit_bias for i in biased])  # (R, V)
        rep = [i for i, s in enumerate(states) if s.seen is not None]
        if rep:
            rows = torch.tensor(rep, device=x.device)
            penalty = torch.tensor([states[i].params.repetition_penalty for i in rep], device=x.device)
            seen = torch.stack([states[i].seen for i in rep])  # (R, V)
            x[rows] = apply_repetition_penalty(x[rows], seen, penalty)
        pf = [i for i, s in enumerate(states) if s.output_counts is not None]
        if pf:
            rows = torch.tensor(pf, device=x.device)
            presence = torch.tensor([states[i].params.presence_penalty for i in pf], device=x.device)
            frequency = torch.tensor([states[i].params.frequency_penalty for i in pf], device=x.device)
            counts = torch.stack([states[i].output_counts for i in pf])  # (R, V)
            x[rows] = apply_presence_frequency_penalty(x[rows], counts, presence, frequency)
        formatted = [i for i, s in enumerate(states) if s.matcher is not None]
        if formatted:  # last: no bias or penalty may bring back a token the format rules out
            rows = torch.tensor(formatted, device=x.device)
            allowed = torch.stack([states[i].matcher.allowed() for i in formatted]).to(x.device)  # (R, V)
            x[rows] = x[rows].masked_fill(~allowed, -math.inf)
        return x

    @staticmethod
    def _filter_args(params: list[SamplingParams], device: torch.device) -> dict[str, torch.Tensor | None]:
        """Per-row filter tensors for filter_logits; a filter no row uses is None (skipped)."""
        def column(values: list, dtype: torch.dtype, active: bool) -> torch.Tensor | None:
            return torch.tensor(values, dtype=dtype, device=device) if active else None

        return {
            "temperature": column([p.temperature for p in params], torch.float32, True),
            "top_k": column([p.top_k for p in params], torch.long, any(p.top_k > 0 for p in params)),
            "top_p": column([p.top_p for p in params], torch.float32, any(p.top_p < 1 for p in params)),
            "min_p": column([p.min_p for p in params], torch.float32, any(p.min_p > 0 for p in params)),
        }

    @staticmethod
    def _logprobs(raw_logprobs: torch.Tensor, tokens: torch.Tensor, params: list[SamplingParams],
                  ) -> tuple[list[float], list[list[tuple[int, float]]]]:
        chosen = raw_logprobs.gather(1, tokens[:, None]).squeeze(1).tolist()  # (B,)
        num_top = [p.logprobs or 0 for p in params]
        if max(num_top) == 0:
            return chosen, [[] for _ in params]
        values, ids = raw_logprobs.topk(max(num_top), dim=-1)  # (B, K) each
        values, ids = values.tolist(), ids.tolist()
        return chosen, [list(zip(ids[i][:k], values[i][:k])) for i, k in enumerate(num_top)]
