"""PassKey generators (engine/training/passkey.py): the miniature's token layout and labels, and the paper's text
prompt sized exactly in tokens, with the key where it should be and loss only on the answer."""

import random

import pytest
import torch

from famserve.engine.tokenizer import Tokenizer
from famserve.engine.training.passkey import (GRASS_FILLER, IGNORE, KEY_MARK, QUERY_MARK, START, TextPassKey,
                                              miniature_batch)


def test_miniature_layout_and_labels():
    tokens, labels = miniature_batch(5, 40, torch.Generator().manual_seed(0))
    assert tokens.shape == labels.shape == (5, 40)
    assert (tokens[:, 0] == START).all() and (tokens[:, 1] == KEY_MARK).all() and (tokens[:, 35] == QUERY_MARK).all()
    key = tokens[:, 2:6]
    assert (key < 10).all() and torch.equal(tokens[:, 36:], key)
    filler = tokens[:, 6:35]
    assert ((filler >= 10) & (filler < 26)).all()
    assert torch.equal(labels[:, 35:39], key)  # the position before each final digit predicts it
    assert (labels[:, :35] == IGNORE).all() and (labels[:, 39] == IGNORE).all()


def test_miniature_too_short_is_refused():
    with pytest.raises(ValueError, match="length: a miniature PassKey sequence needs at least 11 tokens"):
        miniature_batch(1, 10, torch.Generator())


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir) -> Tokenizer:
    return Tokenizer.from_hf_folder(tiny_llama_dir)


@pytest.mark.parametrize("num_tokens", [250, 401])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_text_prompt_has_the_exact_length_and_the_key(tokenizer, num_tokens, depth):
    task = TextPassKey(tokenizer)
    prompt = task.make(num_tokens, random.Random(0), depth)
    assert len(prompt.prompt_ids) == num_tokens and len(prompt.key) == 5
    text = tokenizer.decode(prompt.prompt_ids)
    assert text.startswith("There is an important info hidden")
    assert text.endswith(" What is the pass key? The pass key is")
    assert f" The pass key is {prompt.key}. Remember it. {prompt.key} is the pass key." in text
    assert "The grass is green." in text
    key_at = tokenizer.decode(prompt.prompt_ids[prompt.key_token_index:]).startswith(" The pass key is")
    assert key_at
    assert tokenizer.decode(prompt.answer_ids) == f" {prompt.key}."  # the period: where an answer stops


def test_text_prompt_with_real_filler(tokenizer):
    filler = tokenizer.encode("Feedback attention memory lets a transformer read long contexts. " * 40)
    prompt = TextPassKey(tokenizer, filler).make(260, random.Random(1))
    assert len(prompt.prompt_ids) == 260
    assert "Feedback attention" in tokenizer.decode(prompt.prompt_ids) and GRASS_FILLER.strip() not in \
        tokenizer.decode(prompt.prompt_ids)


def test_training_example_labels_only_the_answer(tokenizer):
    tokens, labels = TextPassKey(tokenizer).training_example(260, random.Random(2))
    assert len(tokens) == len(labels) == 260
    answer = [t for t in labels if t != IGNORE]
    assert tokens[-len(answer):] == answer  # labels at t are the tokens at t + 1: the answer at the end
    assert labels[-1] == IGNORE and labels[-len(answer) - 1] == answer[0]
    assert tokenizer.decode(tokens[:-len(answer)]).endswith("The pass key is")
    answer_text = tokenizer.decode(answer)
    assert answer_text.startswith(" ") and answer_text.endswith(".") and answer_text[1:-1].isdigit()
    assert len(answer_text[1:-1]) == 5


def test_text_prompt_too_short_is_refused(tokenizer):
    with pytest.raises(ValueError, match="num_tokens: a PassKey prompt needs at least"):
        TextPassKey(tokenizer).make(10, random.Random(0))
