"""Training examples (engine/training/data.py). PassKey beyond the attention window: every key sentence lies whole in
one of the N blocks just before the window of the question's last token, all N distances occur, and a sequence too
short for the layout is refused up front; with answer_anywhere answers start at every offset of a block. Recall: the
sequence ends with a repeat of the span after the sinks, out of the repeat's window, with loss on the repeat only.
Chat: conversations in the chat template, loss on what the assistant says, packed into sequences of the training
length. BatchSource mixes the kinds at their fractions, and a run without recall draws exactly the batches it drew
before recall existed."""

import json
import random

import pytest
import torch

from famserve.engine.build import load_model
from famserve.engine.config import FamConfig
from famserve.engine.training.data import (BatchSource, ChatExamples, PassKeyExamples, RecallExamples, TextWindows,
                                           chat_example, load_conversations)
from famserve.engine.training.passkey import ANSWER, IGNORE, TextPassKey

L, M = 16, 1


@pytest.fixture(scope="module")
def passkey(tiny_llama_dir) -> TextPassKey:
    return TextPassKey(load_model(tiny_llama_dir, FamConfig(block_size=L), mode="bswa").tokenizer)


def overhead(passkey: TextPassKey) -> int:
    """Tokens of an example that are not filler: intro, key sentence, question and answer."""
    return passkey.overhead_tokens("12345") + len(passkey.tokenizer.encode(ANSWER.format(key="12345")))


def key_span(passkey: TextPassKey, tokens: list[int], labels: list[int]) -> tuple[int, int, int]:
    """(first index of the key sentence, one past its last, index of the last prompt token) in one example."""
    last_prompt = next(i for i, label in enumerate(labels) if label != IGNORE)
    key = passkey.tokenizer.decode([label for label in labels if label != IGNORE]).strip().rstrip(".")
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


def test_answers_anywhere_start_at_every_offset_of_a_block_with_the_key_still_beyond_the_window(
        passkey: TextPassKey) -> None:
    seq_len = overhead(passkey) + (M + 3) * L + 5
    examples = PassKeyExamples(passkey, seq_len, block_size=L, memory_blocks=M, beyond_window_blocks=1,
                               answer_anywhere=True)
    rng, offsets = random.Random(2), set()
    for _ in range(200):
        tokens, labels = (t.tolist() for t in examples.sample(rng))
        assert len(tokens) == len(labels) == seq_len
        start, end, last_prompt = key_span(passkey, tokens, labels)
        assert end <= (last_prompt // L - M) * L  # still out of the question's window
        answer = [i for i, label in enumerate(labels) if label != IGNORE]
        assert answer == list(range(last_prompt, last_prompt + len(answer)))  # one labelled run: the answer
        assert [tokens[i + 1] for i in answer] == [labels[i] for i in answer]
        offsets.add((last_prompt + 1) % L)  # where the answer's first token sits in its block
    assert offsets == set(range(L))  # 0: the answer opens a fresh block


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


S = 2


@pytest.fixture(scope="module")
def text() -> TextWindows:
    return TextWindows(list(range(1000, 1600)), 64)  # distinct ids: a copy is found only where it was put


def test_recall_repeats_the_span_out_of_the_repeats_window(text: TextWindows) -> None:
    seq_len = (M + 1) * L + (L - S) + 7
    examples = RecallExamples(text, seq_len, block_size=L, memory_blocks=M, sink_tokens=S)
    tokens, labels = examples.sample(random.Random(0))
    span, start = L - S, seq_len - (L - S)
    assert tokens.shape == labels.shape == (seq_len,)
    assert torch.equal(tokens[start:], tokens[S:S + span])  # the repeat is the span after the sinks
    assert not set(tokens[:S].tolist()) & set(tokens[S:S + span].tolist())  # the sinks hold none of it
    assert (start // L - M) * L >= S + span  # the repeat's first labelled position cannot see the first copy
    labelled = (labels != IGNORE).nonzero().flatten().tolist()
    assert labelled == list(range(start, seq_len - 1))
    assert torch.equal(labels[start:-1], tokens[start + 1:])
    with pytest.raises(ValueError, match=f"recall examples need at least {(M + 1) * L + span} tokens"):
        RecallExamples(text, (M + 1) * L + span - 1, block_size=L, memory_blocks=M, sink_tokens=S)


def test_batches_mix_the_kinds_and_runs_without_recall_draw_as_before(passkey: TextPassKey, text: TextWindows) -> None:
    seq_len = overhead(passkey) + 4 * L
    text = TextWindows(text.ids.tolist(), seq_len)
    keys = PassKeyExamples(passkey, seq_len, block_size=L, memory_blocks=M)
    recall = RecallExamples(text, seq_len, block_size=L, memory_blocks=M, sink_tokens=S)
    mixed = BatchSource(1, text, keys, passkey_fraction=0.3, seed=5, recall=recall, recall_fraction=0.4)
    kinds = []
    for step in range(200):
        mixed.next_batch(step)
        kinds.append(mixed.last_kind)
    assert 40 <= kinds.count("passkey") <= 80 and 60 <= kinds.count("recall") <= 100
    without, before = (BatchSource(2, text, keys, passkey_fraction=0.5, seed=9, recall=recall, recall_fraction=0.0),
                       BatchSource(2, text, keys, passkey_fraction=0.5, seed=9))
    for step in range(6):
        assert all(torch.equal(a, b) for a, b in zip(without.next_batch(step), before.next_batch(step)))
    too_much = "passkey_fraction \\+ recall_fraction \\+ chat_fraction: must be <= 1, got 1.2"
    with pytest.raises(ValueError, match=too_much):
        BatchSource(1, text, keys, passkey_fraction=0.6, seed=0, recall=recall, recall_fraction=0.6)


CHAT = [[{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi, how are you"},
         {"role": "user", "content": "fine thanks"}, {"role": "assistant", "content": "good to hear"}],
        [{"role": "user", "content": "what is your name"}, {"role": "assistant", "content": "a tiny model"}]]


def test_chat_labels_are_what_the_assistant_says(passkey: TextPassKey) -> None:
    tokenizer = passkey.tokenizer
    tokens, labels = chat_example(tokenizer, CHAT[0])
    assert tokens == tokenizer.apply_chat_template(CHAT[0], add_generation_prompt=False)
    assert len(labels) == len(tokens) and labels[-1] == IGNORE
    assert all(label in (IGNORE, tokens[t + 1]) for t, label in enumerate(labels[:-1]))  # shifted by one
    said = tokenizer.decode([label for label in labels if label != IGNORE])
    assert said == "hi, how are you<|im_end|>\ngood to hear<|im_end|>\n"


def test_chat_examples_pack_conversations_into_the_training_length(passkey: TextPassKey) -> None:
    lengths = [len(chat_example(passkey.tokenizer, c)[0]) for c in CHAT]
    seq_len = sum(lengths) + 5  # more than both: at least three conversations end to end
    examples = ChatExamples(passkey.tokenizer, CHAT, seq_len)
    tokens, labels = examples.sample(random.Random(0))
    assert tokens.shape == labels.shape == (seq_len,)
    text = passkey.tokenizer.decode(tokens.tolist())
    assert text.count("<|im_start|>assistant") >= 3 - text.endswith("<|im_start|>assistant")
    with pytest.raises(ValueError, match="no conversation has an assistant turn"):
        ChatExamples(passkey.tokenizer, [[{"role": "user", "content": "anyone?"}]], seq_len)


def test_conversations_load_from_jsonl_and_a_bad_line_is_named(tmp_path) -> None:
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHAT) + "\n")
    assert load_conversations(path) == CHAT
    path.write_text(json.dumps({"messages": CHAT[1]}) + "\n" + json.dumps({"messages": [{"role": "bot"}]}) + "\n")
    with pytest.raises(ValueError, match="chat.jsonl:2: not a conversation"):
        load_conversations(path)


def test_batches_draw_chat_at_its_fraction(passkey: TextPassKey, text: TextWindows) -> None:
    seq_len = overhead(passkey) + 4 * L
    text = TextWindows(text.ids.tolist(), seq_len)
    keys = PassKeyExamples(passkey, seq_len, block_size=L, memory_blocks=M)
    chat = ChatExamples(passkey.tokenizer, CHAT, seq_len)
    mixed = BatchSource(1, text, keys, passkey_fraction=0.3, seed=5, chat=chat, chat_fraction=0.4)
    kinds = []
    for step in range(200):
        tokens, labels = mixed.next_batch(step)
        kinds.append(mixed.last_kind)
        assert tokens.shape == (1, seq_len)
    assert 40 <= kinds.count("passkey") <= 80 and 60 <= kinds.count("chat") <= 100
    no_text = BatchSource(1, None, keys, passkey_fraction=0.5, seed=5, chat=chat, chat_fraction=0.4)
    kinds = []
    for step in range(100):
        no_text.next_batch(step)
        kinds.append(no_text.last_kind)
    assert set(kinds) == {"passkey", "chat"} and 20 <= kinds.count("chat") <= 60
