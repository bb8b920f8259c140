"""Training batches for `famserve train`: random windows of tokenized text files (next-token loss everywhere), text
PassKey examples (loss on the key only), text recall examples (loss on a repeated span only) and conversations in
the model's chat template (loss on the assistant's turns only), mixed at fixed ratios, optionally text only for the
first steps.
Everything draws from one random.Random whose state goes into training checkpoints, so a resumed run sees the
batches it would have seen."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch

from famserve.engine.tokenizer import Tokenizer
from famserve.engine.training.passkey import IGNORE, TextPassKey

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
    FAM can bridge (a curriculum starts at N = 1 and grows).

    With answer_anywhere, each example ends its prompt at a random one of the last block_size positions (filler
    follows the answer, unlabelled), so answers are written at every offset of a block, and in a fresh block, as in
    serving; otherwise every answer ends the sequence, at one fixed offset."""

    def __init__(self, passkey: TextPassKey, seq_len: int, block_size: int = 0, memory_blocks: int = 0,
                 beyond_window_blocks: int = 0, answer_anywhere: bool = False):
        if beyond_window_blocks < 0:
            raise ValueError(f"beyond_window_blocks: must be >= 0, got {beyond_window_blocks}")
        if (beyond_window_blocks or answer_anywhere) and block_size <= 0:
            raise ValueError("beyond_window_blocks, answer_anywhere: need the block size")
        self.passkey, self.seq_len, self.answer_anywhere = passkey, seq_len, answer_anywhere
        self.block_size, self.memory_blocks, self.beyond_window_blocks = block_size, memory_blocks, beyond_window_blocks
        self._sample(random.Random(0), farthest=True)  # fails early (ValueError) when seq_len is too short

    def sample(self, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        return self._sample(rng)

    def _sample(self, rng: random.Random, farthest: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        trailing = 0
        if self.answer_anywhere:
            trailing = self.block_size - 1 if farthest else rng.randrange(self.block_size)
        if self.beyond_window_blocks:
            gap = self.beyond_window_blocks if farthest else rng.randint(1, self.beyond_window_blocks)
            tokens, labels = self.passkey.training_example(self.seq_len, rng,
                                                           place=lambda p, k: self._beyond_window(p, k, gap, rng),
                                                           trailing=trailing)
        else:
            depth = 0.0 if rng.random() < 0.5 else rng.random()
            tokens, labels = self.passkey.training_example(self.seq_len, rng, depth, trailing=trailing)
        return torch.tensor(tokens), torch.tensor(labels)

    def _beyond_window(self, prompt_tokens: int, key_tokens: int, gap: int, rng: random.Random) -> int:
        starts = self.passkey.starts_beyond_window(prompt_tokens, key_tokens, gap, self.block_size,
                                                   self.memory_blocks)
        if not starts:
            raise ValueError(f"seq_len: {self.seq_len} tokens leave no room for a key {gap} blocks beyond the "
                             f"window (L={self.block_size}, M={self.memory_blocks}); use longer sequences or fewer "
                             "--passkey-beyond-window blocks")
        return rng.choice(starts)


class RecallExamples:
    """Text recall examples, a dense training signal for memory: after the S sink tokens a span of text fills the
    rest of the first block, more text follows, and the sequence ends with the same span again, placed so that
    the repeat's attention window holds neither the first copy nor (the sinks being other text) any of it. Labels
    are on the repeat only, from its first token on (which predicts the second: nothing announces the first):
    BSWA can only read it as new text, a working FAM can recall it. Needs seq_len >= (M + 1) * L + L - S."""

    def __init__(self, text: TextWindows, seq_len: int, block_size: int, memory_blocks: int, sink_tokens: int):
        self.span = block_size - sink_tokens
        if self.span < 2:
            raise ValueError(f"recall: a block of {block_size} tokens leaves no span after {sink_tokens} sinks")
        self.repeat_start = seq_len - self.span
        need = (memory_blocks + 1) * block_size + self.span
        if seq_len < need:
            raise ValueError(f"seq_len: recall examples need at least {need} tokens at L={block_size}, "
                             f"M={memory_blocks}, S={sink_tokens} (the repeat's window must not reach the first copy)")
        self.text, self.seq_len, self.sink_tokens = text, seq_len, sink_tokens

    def sample(self, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        ids, head = self.text.ids, self.sink_tokens + self.span
        middle_len = self.repeat_start - head
        if ids.numel() < 2 * (head + middle_len):
            raise ValueError(f"--data: recall examples of {self.seq_len} tokens need text of at least "
                             f"{2 * (head + middle_len)} tokens, not {ids.numel()}")
        # The middle comes from elsewhere in the text: a window holding the span would let BSWA copy it.
        a = rng.randrange(ids.numel() - head - middle_len + 1)
        b = rng.randrange(ids.numel() - head - middle_len + 1)
        first_at, middle_at = (a, b + head) if b >= a else (a + middle_len, b)
        first = ids[first_at:first_at + head]  # sinks (other text), then the span
        tokens = torch.cat([first, ids[middle_at:middle_at + middle_len], first[self.sink_tokens:]])
        labels = torch.full_like(tokens, IGNORE)
        labels[self.repeat_start:-1] = tokens[self.repeat_start + 1:]
        return tokens, labels


def load_conversations(path: str | Path) -> list[list[dict[str, str]]]:
    """Conversations from a JSONL file, one {"messages": [{"role": "user"|"assistant", "content": ...}, ...]} per
    line (bench/chat_data.py writes one)."""
    conversations = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            messages = json.loads(line)["messages"]
            if not messages or any(m["role"] not in ("system", "user", "assistant") or not isinstance(m["content"], str)
                                   for m in messages):
                raise ValueError("roles must be system, user or assistant, contents strings")
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"chat data: {path}:{number}: not a conversation ({exc})") from exc
        conversations.append([{"role": m["role"], "content": m["content"]} for m in messages])
    if not conversations:
        raise ValueError(f"chat data: {path}: no conversations")
    return conversations


def chat_example(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]]) -> tuple[list[int], list[int]]:
    """One conversation in the model's chat template as tokens, with labels (shifted: the label at position t is
    the token at t+1) on the assistant turns only, each with its end-of-turn marker: what the model says, not what
    it reads. The template text is cut at each assistant turn and the pieces tokenized one by one."""
    tokens: list[int] = []
    said: list[bool] = []  # per token: written by the assistant
    done = ""  # the template text tokenized so far
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.render_chat(messages[:i], add_generation_prompt=True)
        turn = tokenizer.render_chat(messages[:i + 1], add_generation_prompt=False)
        if not (prompt.startswith(done) and turn.startswith(prompt)):
            raise ValueError("chat data: this model's chat template does not render a conversation's turns as "
                             "prefixes of each other")
        for text, by_assistant in ((prompt[len(done):], False), (turn[len(prompt):], True)):
            ids = tokenizer.encode(text)
            tokens += ids
            said += [by_assistant] * len(ids)
        done = turn
    labels = [token if by_assistant else IGNORE for token, by_assistant in zip(tokens[1:], said[1:])] + [IGNORE]
    return tokens, labels


class ChatExamples:
    """Conversations in the model's chat template, packed end to end (in random order) into sequences of exactly
    seq_len tokens, with loss on the assistant's turns. With distillation (--distill-weight) they hold the model to
    its own chat behaviour while other batches teach memory: PassKey and novels alone made the adapters answer
    questions with five-digit numbers and novel prose."""

    def __init__(self, tokenizer: Tokenizer, conversations: Sequence[Sequence[Mapping[str, str]]], seq_len: int):
        self.examples = [chat_example(tokenizer, c) for c in conversations]
        self.examples = [e for e in self.examples if any(label != IGNORE for label in e[1])]
        if not self.examples:
            raise ValueError("chat data: no conversation has an assistant turn")
        self.seq_len = seq_len

    def sample(self, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        tokens: list[int] = []
        labels: list[int] = []
        while len(tokens) < self.seq_len:
            more_tokens, more_labels = rng.choice(self.examples)
            tokens += more_tokens
            labels += more_labels
        return torch.tensor(tokens[:self.seq_len]), torch.tensor(labels[:self.seq_len])


class BatchSource:
    """Batches (tokens (B, T), labels (B, T)) from text windows, PassKey, recall and chat examples; each batch is
    PassKey with probability passkey_fraction, recall with probability recall_fraction, chat with probability
    chat_fraction, text otherwise, from step passkey_start_step on (a curriculum: text only before it).

    The batch of a step depends only on the random state and that step number (which a resumed run takes from its
    checkpoint), and the coin is drawn in the text-only steps too, so the first passkey_start_step batches are those
    of a text-only run with the same seed."""

    def __init__(self, batch_size: int, text: TextWindows | None, passkey: PassKeyExamples | None,
                 passkey_fraction: float, seed: int, passkey_start_step: int = 0,
                 recall: RecallExamples | None = None, recall_fraction: float = 0.0,
                 chat: ChatExamples | None = None, chat_fraction: float = 0.0):
        if text is None and passkey is None:
            raise ValueError("training data: give text files (--data) and/or --passkey")
        if passkey_start_step and (text is None or (passkey is None and recall is None)):
            raise ValueError("passkey_start_step: a curriculum needs both text (--data) and --passkey or recall")
        self.batch_size, self.text, self.passkey, self.recall, self.chat = batch_size, text, passkey, recall, chat
        self.recall_fraction = 0.0 if recall is None else recall_fraction
        self.chat_fraction = 0.0 if chat is None else chat_fraction
        # without text, PassKey fills every batch that is not chat
        self.passkey_fraction = (1.0 - self.chat_fraction if text is None
                                 else 0.0 if passkey is None else passkey_fraction)
        if self.passkey_fraction + self.recall_fraction + self.chat_fraction > 1.0:
            raise ValueError(f"passkey_fraction + recall_fraction + chat_fraction: must be <= 1, got "
                             f"{self.passkey_fraction + self.recall_fraction + self.chat_fraction}")
        self.passkey_start_step = passkey_start_step
        self.rng = random.Random(seed)
        self.last_kind = ""  # "text", "passkey", "recall" or "chat": what the last batch was

    def next_batch(self, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of 0-based training step `step`."""
        coin = self.rng.random()  # one coin for every kind: runs without recall or chat draw as before they existed
        self.last_kind = "text"
        if step >= self.passkey_start_step:
            if coin < self.passkey_fraction:
                self.last_kind = "passkey"
            elif coin < self.passkey_fraction + self.recall_fraction:
                self.last_kind = "recall"
            elif coin < self.passkey_fraction + self.recall_fraction + self.chat_fraction:
                self.last_kind = "chat"
        source = {"text": self.text, "passkey": self.passkey, "recall": self.recall, "chat": self.chat}[self.last_kind]
        pairs = [source.sample(self.rng) for _ in range(self.batch_size)]
        tokens = torch.stack([p[0] for p in pairs])
        labels = torch.stack([p[1] for p in pairs])
        return tokens, labels

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))

