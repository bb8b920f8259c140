"""Synthetic PassKey data (FAM-SPEC.md): (a) the miniature token-level task ("A miniature that works") for models
trained from scratch, and (b) the text prompt of the paper (D.1) for pretrained models, sized in tokens of a given
tokenizer, with filler from real text or the standard grass/sky sentences."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from famserve.engine.tokenizer import Tokenizer

IGNORE = -100  # label of a position that carries no loss

# --- (a) the miniature: 10 digits, 16 filler tokens, 3 markers --------------------------------------------------

NUM_DIGITS = 10  # token ids 0..9 are the digits
NUM_FILLER = 16  # token ids 10..25 are filler
START, KEY_MARK, QUERY_MARK = 26, 27, 28  # sequence start, "the pass key is", "what is the pass key?"
MINIATURE_VOCAB = 29
KEY_LENGTH = 4  # digits in a key
MIN_MINIATURE_LENGTH = 2 + 2 * KEY_LENGTH + 1  # START KEY k1..k4 QUERY k1..k4, no filler


def miniature_batch(batch_size: int, length: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch_size` sequences of exactly `length` tokens: START KEY k1 k2 k3 k4 <filler...> QUERY k1 k2 k3 k4.
    Returns token ids (B, T) and labels (B, T): at the position before each final key digit, that digit (the
    model predicts it from what came before); IGNORE elsewhere. Chance accuracy per digit is 1/10."""
    if length < MIN_MINIATURE_LENGTH:
        raise ValueError(f"length: a miniature PassKey sequence needs at least {MIN_MINIATURE_LENGTH} tokens")
    key = torch.randint(0, NUM_DIGITS, (batch_size, KEY_LENGTH), generator=generator)
    filler = NUM_DIGITS + torch.randint(0, NUM_FILLER, (batch_size, length - MIN_MINIATURE_LENGTH),
                                        generator=generator)
    column = lambda token: torch.full((batch_size, 1), token, dtype=torch.int64)  # noqa: E731
    tokens = torch.cat([column(START), column(KEY_MARK), key, filler, column(QUERY_MARK), key], dim=1)  # (B, T)
    labels = torch.full_like(tokens, IGNORE)
    labels[:, length - KEY_LENGTH - 1:length - 1] = key
    return tokens, labels


# --- (b) the text PassKey prompt of the paper (D.1) ---------------------------------------------------------------

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
         "I will quiz you about the important information there.")
KEY_SENTENCE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
ANSWER = " {key}."  # the key as the key sentence wrote it: the period teaches a trained model where to stop
GRASS_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


@dataclass
class PassKeyPrompt:
    prompt_ids: list[int]  # intro + key sentence + filler + question, exactly the requested token count
    answer_ids: list[int]  # ANSWER: the key as the model should continue (" 12345.")
    key: str
    key_token_index: int  # where the key sentence starts in prompt_ids (the key's depth)


class TextPassKey:
    """Builds paper-style PassKey prompts for one tokenizer. Filler comes from `filler_ids` (tokens of real text,
    read at a random offset) or, without it, from the repeated grass/sky sentences."""

    def __init__(self, tokenizer: Tokenizer, filler_ids: Sequence[int] | None = None, key_digits: int = 5):
        if key_digits <= 0:
            raise ValueError(f"key_digits: must be positive, got {key_digits}")
        self.tokenizer, self.key_digits = tokenizer, key_digits
        self.intro_ids = tokenizer.encode(INTRO)
        self.question_ids = tokenizer.encode(QUESTION)
        self.filler_ids = list(filler_ids) if filler_ids else None
        self._grass_ids = tokenizer.encode(GRASS_FILLER)

    def overhead_tokens(self, key: str = "0") -> int:
        """Prompt tokens that are not filler (they depend slightly on the key's digits)."""
        return len(self.intro_ids) + len(self._key_ids(key)) + len(self.question_ids)

    def _key_ids(self, key: str) -> list[int]:
        return self.tokenizer.encode(KEY_SENTENCE.format(key=key))

    def _filler(self, count: int, rng: random.Random) -> list[int]:
        source = self.filler_ids or self._grass_ids
        if self.filler_ids and len(source) > count:
            start = rng.randrange(len(source) - count)
            return source[start:start + count]
        repeats = -(-count // len(source))
        return (source * repeats)[:count]

    def key_tokens(self, key: str) -> int:
        """Tokens of the key sentence for this key."""
        return len(self._key_ids(key))

    def new_key(self, rng: random.Random) -> str:
        return str(rng.randrange(10 ** (self.key_digits - 1), 10 ** self.key_digits))

    def make(self, num_tokens: int, rng: random.Random, depth: float = 0.0, key: str | None = None,
             key_start: int | None = None) -> PassKeyPrompt:
        """A prompt of exactly `num_tokens` tokens; the key sentence sits after the intro and `depth` (0..1) of the
        filler (0: right after the intro, as in the paper), or at token index `key_start` when given."""
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth: must be in 0..1, got {depth}")
        key = key or self.new_key(rng)
        key_ids = self._key_ids(key)
        filler_count = num_tokens - len(self.intro_ids) - len(key_ids) - len(self.question_ids)
        if filler_count < 0:
            raise ValueError(f"num_tokens: a PassKey prompt needs at least {num_tokens - filler_count} tokens")
        filler = self._filler(filler_count, rng)
        before = round(depth * filler_count) if key_start is None else key_start - len(self.intro_ids)
        if not 0 <= before <= filler_count:
            raise ValueError(f"key_start: must be in {len(self.intro_ids)}..{len(self.intro_ids) + filler_count}, "
                             f"got {key_start}")
        prompt = self.intro_ids + filler[:before] + key_ids + filler[before:] + self.question_ids
        return PassKeyPrompt(prompt, self.tokenizer.encode(ANSWER.format(key=key)), key, len(self.intro_ids) + before)

    def starts_beyond_window(self, prompt_tokens: int, key_tokens: int, gap: int, block_size: int,
                             memory_blocks: int) -> range:
        """Where a key sentence of key_tokens may start so that it ends inside the block `gap` blocks before the
        attention window (block_size L, memory_blocks M) of the last prompt token: out of BSWA's sight, so only a
        memory can carry it. Empty when the prompt is too short for that gap."""
        window_start = ((prompt_tokens - 1) // block_size - memory_blocks) * block_size
        block_end = window_start - (gap - 1) * block_size  # the key's last token comes before this index
        latest = min(block_end, prompt_tokens - len(self.question_ids)) - key_tokens
        earliest = max(len(self.intro_ids), min(block_end - block_size, latest))
        return range(earliest, latest + 1)

    def training_example(self, num_tokens: int, rng: random.Random, depth: float = 0.0,
                         place: Callable[[int, int], int] | None = None,
                         trailing: int = 0) -> tuple[list[int], list[int]]:
        """Tokens (exactly num_tokens: prompt + answer + `trailing` tokens of filler) and labels (the answer tokens
        only, the closing period included, shifted: the label at position t is the token at t+1).
        `place(prompt_tokens, key_sentence_tokens)`, when given, picks the key sentence's start instead of `depth`.
        Trailing filler moves the answer earlier in the sequence (and in its block) without changing its loss: it
        comes after the answer, which a causal model cannot see."""
        key = self.new_key(rng)
        prompt_tokens = num_tokens - trailing - len(self.tokenizer.encode(ANSWER.format(key=key)))
        key_start = None if place is None else place(prompt_tokens, self.key_tokens(key))
        example = self.make(prompt_tokens, rng, depth, key, key_start)
        tokens = example.prompt_ids + example.answer_ids
        labels = [IGNORE] * len(tokens)
        start = len(example.prompt_ids)
        for i, token in enumerate(example.answer_ids):
            labels[start - 1 + i] = token
        if trailing:  # (no filler drawn otherwise: runs without it keep their random stream)
            tokens, labels = tokens + self._filler(trailing, rng), labels + [IGNORE] * trailing
        return tokens, labels
