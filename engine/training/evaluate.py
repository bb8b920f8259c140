"""`famserve eval`: PassKey retrieval (paper D.1 prompts, greedy answer), perplexity of long text and recall of a
text span repeated past the attention window, all through the streaming engine (ModelRunner), so they measure
exactly what the server computes, for any model, mode and adapter, in memory that does not grow with the text."""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as fn

from famserve.engine.model import FamModel
from famserve.engine.runner import ModelRunner
from famserve.engine.tokenizer import Tokenizer
from famserve.engine.training.data import RecallExamples, TextWindows
from famserve.engine.training.passkey import TextPassKey


@dataclass
class PerplexityResult:
    mode: str  # FamConfig.describe() of the model evaluated
    num_tokens: int  # tokens predicted (all but the first)
    nll: float  # mean negative log-likelihood, nats per token
    seconds: float
    num_correct: int = 0  # predictions whose argmax is the next token

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)

    @property
    def accuracy(self) -> float:
        """Next-token accuracy: the share of predicted positions whose argmax is the next token."""
        return self.num_correct / self.num_tokens if self.num_tokens else 0.0


def _rechunk(pieces: Iterable[Sequence[int]], chunk_tokens: int, max_tokens: int | None) -> Iterator[list[int]]:
    """Re-cut a stream of token pieces into chunks of chunk_tokens (the last may be shorter), stopping at
    max_tokens."""
    buffer: list[int] = []
    seen = 0
    for piece in pieces:
        for token in piece:
            if max_tokens is not None and seen >= max_tokens:
                break
            buffer.append(token)
            seen += 1
            if len(buffer) == chunk_tokens:
                yield buffer
                buffer = []
    if buffer:
        yield buffer


@torch.no_grad()
def perplexity(model: FamModel, pieces: Iterable[Sequence[int]], chunk_tokens: int = 512,
               max_tokens: int | None = None) -> PerplexityResult:
    """Perplexity and next-token accuracy of one token stream (given as pieces of any size) read by one engine
    stream, chunk by chunk: only one chunk's logits exist at a time, and the state has its constant size, whatever
    the length."""
    runner, state = ModelRunner(model, max_step_tokens=chunk_tokens), model.new_state()
    started, total, count, correct = time.perf_counter(), 0.0, 0, 0
    previous = None  # the last logits row (1, V) of the previous chunk
    for chunk in _rechunk(pieces, chunk_tokens, max_tokens):
        ids = torch.tensor(chunk, dtype=torch.int64)
        logits = runner.prefill(state, [ids], all_logits=True)  # (t, V)
        predicted = logits[:-1] if previous is None else torch.cat([previous, logits[:-1]])
        targets = (ids[1:] if previous is None else ids).to(logits.device)
        total += float(fn.cross_entropy(predicted.double(), targets, reduction="sum"))
        correct += int((predicted.argmax(-1) == targets).sum())
        count += targets.numel()
        previous = logits[-1:]
    if count == 0:
        raise ValueError("text: fewer than 2 tokens to evaluate")
    return PerplexityResult(model.fam_config.describe(), count, total / count, time.perf_counter() - started, correct)


@dataclass
class PassKeyResult:
    mode: str
    num_tokens: int  # prompt length
    trials: int
    correct: int
    outputs: list[dict] = field(default_factory=list)  # per trial: key and generated text

    @property
    def accuracy(self) -> float:
        return self.correct / self.trials if self.trials else 0.0


def first_number(text: str) -> str | None:
    found = re.search(r"\d+", text)
    return found.group(0) if found else None


@torch.no_grad()
def passkey(model: FamModel, tokenizer: Tokenizer, lengths: Sequence[int], trials: int = 10, seed: int = 0,
            depth: float = 0.0, filler_ids: Sequence[int] | None = None, batch_size: int = 4,
            chunk_tokens: int = 512) -> list[PassKeyResult]:
    """PassKey retrieval at each prompt length: `trials` prompts (fresh keys), greedy continuation; a trial is
    right when the first number generated equals the key. Streams of one batch are prefilled together."""
    task = TextPassKey(tokenizer, filler_ids)
    runner = ModelRunner(model, max_step_tokens=chunk_tokens)
    results = []
    for length in lengths:
        rng = random.Random(f"{seed}-{length}")
        result = PassKeyResult(model.fam_config.describe(), length, trials, 0)
        for first in range(0, trials, batch_size):
            prompts = [task.make(length, rng, depth) for _ in range(min(batch_size, trials - first))]
            states = [model.new_state() for _ in prompts]
            logits = torch.cat(runner.run(states, [p.prompt_ids for p in prompts]))  # (b, V)
            generated: list[list[int]] = [[] for _ in prompts]
            for _ in range(max(len(p.answer_ids) for p in prompts) + 1):
                tokens = logits.argmax(-1).tolist()
                for out, token in zip(generated, tokens):
                    out.append(token)
                logits = runner.decode(states, tokens)
            for prompt, out in zip(prompts, generated):
                text = tokenizer.decode(out, skip_special_tokens=True)
                ok = first_number(text) == prompt.key
                result.correct += ok
                result.outputs.append({"key": prompt.key, "generated": text, "correct": ok})
        results.append(result)
    return results


@dataclass
class RecallResult:
    mode: str
    num_tokens: int  # sequence length
    trials: int
    span: int  # tokens of the repeated span
    first_nll: float  # mean NLL of the span's tokens where they first appear (new text: memory cannot help)
    repeat_nll: float  # mean NLL of the same tokens in the repeat, past the attention window (only memory helps)

    @property
    def recalled(self) -> float:
        """Share of the first reading's loss the repeat saves: 0 = no memory of the span, 1 = recalled exactly."""
        return 1.0 - self.repeat_nll / self.first_nll if self.first_nll else 0.0


@torch.no_grad()
def recall(model: FamModel, text_ids: Sequence[int], lengths: Sequence[int], trials: int = 8, seed: int = 0,
           batch_size: int = 4, chunk_tokens: int = 512) -> list[RecallResult]:
    """Recall of a text span repeated at the end of a sequence (data.RecallExamples at the model's L, M, S: the
    repeat's attention window holds no part of the first copy): the NLL of the span's tokens where they first
    appear and where they repeat. BSWA reads the repeat as new text; full attention copies it; FAM lies between,
    by how much it remembers. Only the two spans' logits are ever materialised."""
    fam = model.fam_config
    runner = ModelRunner(model, max_step_tokens=chunk_tokens)
    results = []
    for length in lengths:
        examples = RecallExamples(TextWindows(text_ids, length), length, fam.block_size, fam.memory_blocks,
                                  fam.sink_tokens)
        first = slice(fam.sink_tokens, fam.sink_tokens + examples.span)
        rng = random.Random(f"{seed}-{length}")
        first_total = repeat_total = 0.0
        count = 0
        for done in range(0, trials, batch_size):
            batch = torch.stack([examples.sample(rng)[0] for _ in range(min(batch_size, trials - done))])
            states = [model.new_state() for _ in batch]
            heads = runner.run(states, list(batch[:, :first.stop]), all_logits=True)
            runner.run(states, list(batch[:, first.stop:examples.repeat_start]))
            tails = runner.run(states, list(batch[:, examples.repeat_start:]), all_logits=True)
            targets = batch[:, first.start + 1:first.stop]  # the span's tokens after its first, in both copies
            for head, tail, target in zip(heads, tails, targets):
                target = target.to(head.device)
                first_total += float(fn.cross_entropy(head[first.start:-1].double(), target, reduction="sum"))
                repeat_total += float(fn.cross_entropy(tail[:-1].double(), target, reduction="sum"))
                count += target.numel()
        results.append(RecallResult(fam.describe(), length, trials, examples.span, first_total / count,
                                    repeat_total / count))
    return results
