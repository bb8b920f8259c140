"""PassKey training examples placed beyond the attention window (engine/training/data.py PassKeyExamples): every key
sentence lies whole in one of the N blocks just before the window of the question's last token, all N distances
occur, and a sequence too short for the layout is refused up front."""

import random

import pytest

from famserve.engine.build import load_model
from famserve.engine.config import FamConfig
from famserve.engine.training.data import PassKeyExamples
from famserve.engine.training.passkey import IGNORE, TextPassKey

L, M = 16, 1


@pytest.fixture(scope="module")
def passkey(tiny_llama_dir) -> TextPassKey:
    return TextPassKey(load_model(tiny_llama_dir, FamConfig(block_size=L), mode="bswa").tokenizer)


def overhead(passkey: TextPassKey) -> int:
    """Tokens of an example that are not filler: intro, key sentence, question and answer."""
    return passkey.overhead_tokens("12345") + len(passkey.tokenizer.encode(" 12345"))


def key_span(passkey: TextPassKey, tokens: list[int], labels: list[int]) -> tuple[int, int, int]:
    """(first index of the key sentence, one past its last, index of the last prompt token) in one example."""
    last_prompt = next(i for i, label in enumerate(labels) if label != IGNORE)
    key = passkey.tokenizer.decode(tokens[last_prompt + 1:]).strip()
    sentence = passkey._key_ids(key)
    start = next(i for i in range(len(tokens)) if tokens[i:i + len(sentence)] == sentence)
    return start, start + len(sentence), last_prompt


@pytest.mark.parametrize("gaps", [1, 3])
def test_every_key_lies_in_one_of_the_blocks_just_before_the_window(passkey: TextPassKey, gaps: int) -> None:
    seq_len = overhead(passkey) + (gaps + M + 2) * L + 5
    examples = PassKeyExamples(passkey, seq_len, block_size=L, memory_blocks=M, beyond_window_blocks=gaps)
    rng, seen = random.Random(1), set()
    for _ in range(60):
        tokens, labels = (t.tolist() for t in examples.sample(rng))
        assert len(tokens) == seq_len
        start, end, last_prompt = key_span(passkey, tokens, labels)
        window_start = (last_prompt // L - M) * L  # the first position BSWA's last prompt token attends to
        assert end <= window_start  # out of the window: only FAM can carry it
        gap = (window_start - (end - 1) + L - 1) // L  # blocks between the key's last token and the window
        assert 1 <= gap <= gaps
        seen.add(gap)
    assert seen == set(range(1, gaps + 1))


def test_the_paper_layout_puts_keys_inside_short_windows(passkey: TextPassKey) -> None:
    """The contrast: depth 0 half of the time, random otherwise, so many keys of a short sequence are in view."""
    memory_blocks = 3
    examples = PassKeyExamples(passkey, overhead(passkey) + 4 * L, block_size=L, memory_blocks=memory_blocks)
    rng = random.Random(1)
    inside = 0
    for _ in range(40):
        tokens, labels = (t.tolist() for t in examples.sample(rng))
        _, end, last_prompt = key_span(passkey, tokens, labels)
        inside += end > (last_prompt // L - memory_blocks) * L
    assert 3 <= inside <= 30


def test_a_sequence_too_short_for_the_layout_is_refused(passkey: TextPassKey) -> None:
    with pytest.raises(ValueError, match="leave no room for a key 3 blocks beyond the window"):
        PassKeyExamples(passkey, overhead(passkey) + 2 * L, block_size=L, memory_blocks=M, beyond_window_blocks=3)
    with pytest.raises(ValueError, match="beyond_window_blocks: must be >= 0"):
        PassKeyExamples(passkey, overhead(passkey) + 8 * L, block_size=L, memory_blocks=M, beyond_window_blocks=-1)
