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
from famserve.engine.training.passkey import PassKeyPrompt, TextPassKey


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
    outputs: list[dict] = field(default_factory=list)  # per trial: key, its index, generated text, scores
    digits_correct: float = 0.0  # key digits in place, summed over trials (a partial score a 0/N can hide)
    digits_written: int = 0  # digits of the first generated numbers, over trials
    digits_from_key: int = 0  # of those, digits that occur in their trial's key

    @property
    def accuracy(self) -> float:
        return self.correct / self.trials if self.trials else 0.0

    @property
    def digit_accuracy(self) -> float:
        """Share of key digits the first generated number has in their place (chance: about 1/10)."""
        return self.digits_correct / self.trials if self.trials else 0.0

    @property
    def from_key(self) -> float:
        """Share of the generated digits that occur in the key, in any place: a memory of which digits the key has
        even when their order is lost. Chance for 5 random digits: about 41% (1 - 0.9^5)."""
        return self.digits_from_key / self.digits_written if self.digits_written else 0.0

    def as_dict(self) -> dict:
        """The result as `eval passkey` and bench/quality.py write it to JSON."""
        return {"mode": self.mode, "num_tokens": self.num_tokens, "trials": self.trials, "correct": self.correct,
                "accuracy": self.accuracy, "digit_accuracy": self.digit_accuracy,
                "digits_written": self.digits_written, "from_key": self.from_key, "outputs": self.outputs}


def first_number(text: str) -> str | None:
    found = re.search(r"\d+", text)
    return found.group(0) if found else None


def digits_in_place(number: str | None, key: str) -> float:
    """Share of the key's digits that `number` has at the same position ("12395" for "12345": 0.8)."""
    return sum(a == b for a, b in zip(number or "", key)) / len(key)


def digits_from_key(number: str | None, key: str) -> int:
    """How many of `number`'s digits occur somewhere in the key ("55321" for "12345": 5; "67" for it: 0)."""
    return sum(digit in key for digit in number or "")


@torch.no_grad()
def passkey(model: FamModel, tokenizer: Tokenizer, lengths: Sequence[int], trials: int = 10, seed: int = 0,
            depth: float = 0.0, filler_ids: Sequence[int] | None = None, batch_size: int = 4,
            chunk_tokens: int = 512, beyond_window: int = 0) -> list[PassKeyResult]:
    """PassKey retrieval at each prompt length: `trials` prompts (fresh keys), greedy continuation; a trial is
    right when the first number generated equals the key. The key sits at `depth` of the filler or, with
    beyond_window N > 0, in the block N blocks before the question's attention window at the model's L and M
    (the layout of training's --passkey-beyond-window, at one distance). Streams of one batch are prefilled
    together."""
    if beyond_window < 0:
        raise ValueError(f"beyond_window: must be >= 0, got {beyond_window}")
    if beyond_window and depth:
        raise ValueError("depth: the key goes at a depth or beyond the window, not both")
    task = TextPassKey(tokenizer, filler_ids)
    runner = ModelRunner(model, max_step_tokens=chunk_tokens)
    fam = model.fam_config

    def make(length: int, rng: random.Random) -> PassKeyPrompt:
        if not beyond_window:
            return task.make(length, rng, depth)
        key = task.new_key(rng)
        starts = task.starts_beyond_window(length, task.key_tokens(key), beyond_window, fam.block_size,
                                           fam.memory_blocks)
        if not starts:
            raise ValueError(f"lengths: {length} tokens leave no room for a key {beyond_window} blocks beyond the "
                             f"window (L={fam.block_size}, M={fam.memory_blocks})")
        return task.make(length, rng, key=key, key_start=rng.choice(starts))

    results = []
    for length in lengths:
        rng = random.Random(f"{seed}-{length}")
        result = PassKeyResult(fam.describe(), length, trials, 0)
        for first in range(0, trials, batch_size):
            prompts = [make(length, rng) for _ in range(min(batch_size, trials - first))]
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
                number = first_number(text)
                digits = digits_in_place(number, prompt.key)
                result.correct += number == prompt.key
                result.digits_correct += digits
                result.digits_written += len(number or "")
                result.digits_from_key += digits_from_key(number, prompt.key)
                result.outputs.append({"key": prompt.key, "key_at": prompt.key_token_index, "generated": text,
                                       "correct": number == prompt.key, "digits": digits})
        results.append(result)
    return results


@dataclass
class RecallResult:
    mode: str
    num_tokens: int  # sequence length
    trials: int
    span: int  # tokens of the repeated span
    first_nll: float  # mean NLL of the span's tokens where they first appear (new text)
    repeat_nll: float  # mean NLL of the same tokens in the repeat, past the attention window
    control_nll: float  # the same, in the same sequences with the first copy replaced by other text

    @property
    def recalled(self) -> float:
        """Share of the repeat's loss the first copy saves: 0 = nothing remembered, 1 = all."""
        return 1.0 - self.repeat_nll / self.control_nll if self.control_nll else 0.0


@torch.no_grad()
def recall(model: FamModel, text_ids: Sequence[int], lengths: Sequence[int], trials: int = 8, seed: int = 0,
           batch_size: int = 4, chunk_tokens: int = 512) -> list[RecallResult]:
    """Recall of a text span repeated at the end of a sequence (data.RecallExamples at the model's L, M, S: the
    repeat's attention window holds no part of the first copy). Each sequence is read twice: as it is, and with
    the first copy replaced by another span (the control: nothing to remember, all else equal: position, mode,
    weights). The repeat's NLL against the control's is what memory bought: BSWA reaches the first copy only
    through its windows stacked layer over layer, so it recalls little; full attention copies it; FAM lies
    between, by how much it remembers. Only the spans' logits are ever materialised."""
    fam = model.fam_config
    runner = ModelRunner(model, max_step_tokens=chunk_tokens)
    results = []
    for length in lengths:
        examples = RecallExamples(TextWindows(text_ids, length), length, fam.block_size, fam.memory_blocks,
                                  fam.sink_tokens)
        first = slice(fam.sink_tokens, fam.sink_tokens + examples.span)
        rng = random.Random(f"{seed}-{length}")
        totals = {"first": 0.0, "repeat": 0.0, "control": 0.0}
        count = 0
        for done in range(0, trials, batch_size):
            batch, controls = [], []
            for _ in range(min(batch_size, trials - done)):
                tokens = examples.sample(rng)[0]
                control = tokens.clone()
                control[first] = examples.sample(rng)[0][first]  # another span where the first copy was
                batch.append(tokens)
                controls.append(control)
            both = torch.stack(batch + controls)
            states = [model.new_state() for _ in both]
            heads = runner.run(states, list(both[:, :first.stop]), all_logits=True)
            runner.run(states, list(both[:, first.stop:examples.repeat_start]))
            tails = runner.run(states, list(both[:, examples.repeat_start:]), all_logits=True)
            b = len(batch)
            for i, tokens in enumerate(batch):
                target = tokens[first.start + 1:first.stop].to(heads[i].device)  # the span after its first token
                for name, logits in (("first", heads[i][first.start:-1]), ("repeat", tails[i][:-1]),
                                     ("control", tails[b + i][:-1])):
                    totals[name] += float(fn.cross_entropy(logits.double(), target, reduction="sum"))
                count += target.numel()
        results.append(RecallResult(fam.describe(), length, trials, examples.span, totals["first"] / count,
                                    totals["repeat"] / count, totals["control"] / count))
    return results
