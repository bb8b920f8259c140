"""Training batches for `famserve train`: random windows of tokenized text files (next-token loss everywhere) and
text PassKey examples (loss on the key only), mixed at a fixed ratio, optionally text only for the first steps.
Everything draws from one random.Random whose state goes into training checkpoints, so a resumed run sees the
batches it would have seen."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from famserve.engine.tokenizer import Tokenizer
from famserve.engine.training.passkey import TextPassKey

READ_CHARS = 1 << 20  # text is tokenized in pieces of about this many characters, cut at line ends


def iter_text_tokens(paths: Sequence[str | Path], tokenizer: Tokenizer) -> Iterator[list[int]]:
    """Token ids of text files, piece by piece (an unbounded file never sits in memory whole). Pieces are cut
    at line ends, so only the tokenization across a cut may differ from tokenizing the whole file; files are
    separated by the model's first end-of-sequence token when it has one."""
    for i, path in enumerate(paths):
        if i and tokenizer.eos_token_ids:
            yield [tokenizer.eos_token_ids[0]]
        with open(path, encoding="utf-8", errors="replace") as f:
            while True:
                piece = f.read(READ_CHARS)
                if not piece:
                    break
                piece += f.readline()  # finish the line so the cut falls at a line end
                yield tokenizer.encode(piece)


class TextWindows:
    """Random windows of seq_len + 1 tokens from a token corpus: inputs are the first seq_len, labels the next
    token of each position."""

    def __init__(self, token_ids: Sequence[int], seq_len: int):
        if len(token_ids) < seq_len + 1:
            raise ValueError(f"--data: the text files hold {len(token_ids)} tokens, fewer than seq_len + 1 = "
                             f"{seq_len + 1}")
        self.ids = torch.tensor(token_ids, dtype=torch.int64)
        self.seq_len = seq_len

    def sample(self, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        start = rng.randrange(self.ids.numel() - self.seq_len)
        window = self.ids[start:start + self.seq_len + 1]
        return window[:-1], window[1:]


class PassKeyExamples:
    """Text PassKey training examples of exactly seq_len tokens. In the paper's layout the key sits at depth 0 half
    of the time and at a random depth otherwise, so short sequences often have it inside the question's attention
    window. With beyond_window_blocks N > 0 every key sits in one of the N blocks just before the window of the
    question's last token (block_size L, memory_blocks M): out of BSWA's sight, the shortest distances that only
    FAM can bridge (a curriculum starts at N = 1 and grows)."""

    def __init__(self, passkey: TextPassKey, seq_len: int, block_size: int = 0, memory_blocks: int = 0,
                 beyond_window_blocks: int = 0):
        if beyond_window_blocks < 0:
            raise ValueError(f"beyond_window_blocks: must be >= 0, got {beyond_window_blocks}")
        if beyond_window_blocks and block_size <= 0:
            raise ValueError("beyond_window_blocks: needs the block size")
        self.passkey, self.seq_len = passkey, seq_len
        self.block_size, self.memory_blocks, self.beyond_window_blocks = block_size, memory_blocks, beyond_window_blocks
        self._sample(random.Random(0), farthest=True)  # fails early (ValueError) when seq_len is too short

    def sample(self, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        return self._sample(rng)

    def _sample(self, rng: random.Random, farthest: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if self.beyond_window_blocks:
            gap = self.beyond_window_blocks if farthest else rng.randint(1, self.beyond_window_blocks)
            tokens, labels = self.passkey.training_example(self.seq_len, rng,
                                                           place=lambda p, k: self._beyond_window(p, k, gap, rng))
        else:
            depth = 0.0 if rng.random() < 0.5 else rng.random()
            tokens, labels = self.passkey.training_example(self.seq_len, rng, depth)
        return torch.tensor(tokens), torch.tensor(labels)

    def key_starts(self, prompt_tokens: int, key_tokens: int, gap: int) -> range:
        """Where a key sentence of key_tokens may start so that it ends inside the block `gap` blocks before the
        window of the last prompt token (empty when the prompt is too short for that gap)."""
        size = self.block_size
        window_start = ((prompt_tokens - 1) // size - self.memory_blocks) * size
        block_end = window_start - (gap - 1) * size  # the key's last token comes before this index
        latest = min(block_end, prompt_tokens - len(self.passkey.question_ids)) - key_tokens
        earliest = max(len(self.passkey.intro_ids), min(block_end - size, latest))
        return range(earliest, latest + 1)

    def _beyond_window(self, prompt_tokens: int, key_tokens: int, gap: int, rng: random.Random) -> int:
        starts = self.key_starts(prompt_tokens, key_tokens, gap)
        if not starts:
            raise ValueError(f"seq_len: {self.seq_len} tokens leave no room for a key {gap} blocks beyond the "
                             f"window (L={self.block_size}, M={self.memory_blocks}); use longer sequences or fewer "
                             "--passkey-beyond-window blocks")
        return rng.choice(starts)


class BatchSource:
    """Batches (tokens (B, T), labels (B, T)) from text windows and/or PassKey examples; with both, each batch is
    PassKey with probability passkey_fraction, from step passkey_start_step on (a curriculum: text only before it).

    The batch of a step depends only on the random state and that step number (which a resumed run takes from its
    checkpoint), and the coin is drawn in the text-only steps too, so the first passkey_start_step batches are those
    of a text-only run with the same seed."""

    def __init__(self, batch_size: int, text: TextWindows | None, passkey: PassKeyExamples | None,
                 passkey_fraction: float, seed: int, passkey_start_step: int = 0):
        if text is None and passkey is None:
            raise ValueError("training data: give text files (--data) and/or --passkey")
        if passkey_start_step and (text is None or passkey is None):
            raise ValueError("passkey_start_step: a curriculum needs both text (--data) and --passkey")
        self.batch_size, self.text, self.passkey = batch_size, text, passkey
        self.passkey_fraction = 1.0 if text is None else (0.0 if passkey is None else passkey_fraction)
        self.passkey_start_step = passkey_start_step
        self.rng = random.Random(seed)
        self.last_kind = ""  # "text" or "passkey": what the last batch was

    def next_batch(self, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of 0-based training step `step`."""
        coin = self.rng.random()
        use_passkey = step >= self.passkey_start_step and coin < self.passkey_fraction
        source = self.passkey if use_passkey else self.text
        self.last_kind = "passkey" if use_passkey else "text"
        pairs = [source.sample(self.rng) for _ in range(self.batch_size)]
        tokens = torch.stack([p[0] for p in pairs])
        labels = torch.stack([p[1] for p in pairs])
        return tokens, labels

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))

