"""bench/chat_data.py's question sources and self-answers: chitchat questions filtered by form, the chat evaluation's
own questions kept out of training data, and each question answered with the model's own greedy continuation."""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import chat_data  # noqa: E402

from famserve.engine.build import load_model  # noqa: E402
from famserve.engine.config import EngineConfig, FamConfig  # noqa: E402
from famserve.engine.training.chat_eval import SHORT_CASES, greedy_answers  # noqa: E402


def chitchat(*texts: str) -> dict:
    return {"c1": {"messages": [[{"text": t, "sender": "a", "timestamp": ""} for t in texts]]}}


def test_chitchat_questions_are_distinct_questions_of_four_to_25_words():
    data = chitchat("Hello", "How are you doing today?", "How are you doing today?", "why?", "I like dogs.",
                    "Do you " + "really " * 30 + "like it?", "What did you eat for lunch?")
    got = chat_data.chitchat_questions(data, 10, random.Random(0))
    assert sorted(got) == ["How are you doing today?", "What did you eat for lunch?"]
    assert len(chat_data.chitchat_questions(data, 1, random.Random(0))) == 1


def test_the_chat_evaluations_questions_stay_out_of_training_data():
    evaluated = SHORT_CASES[0].question
    got = chat_data.unevaluated(["  Who are you? ", evaluated.upper(), "Who are you?", f" {evaluated}", "", "Why?"])
    assert got == ["Who are you?", "Why?"]


def test_number_questions_are_distinct_and_none_counts_what_the_evaluation_counts():
    got = chat_data.number_questions(120, random.Random(0))
    assert len(got) == len(set(got)) == 120
    counting = [q for q in got if q.startswith("How many")]
    assert len(counting) == len(chat_data.COUNTED)  # every counting question first, arithmetic for the rest
    assert {"What is 7 times 8?", "What is 12 divided by 4?"} & set(chat_data.number_questions(2000, random.Random(0)))
    assert not [q for q in chat_data.number_questions(2000, random.Random(0))
                if "minus" in q and int(q.split()[2]) <= int(q.split()[4].rstrip("?"))]  # no negative answers
    subjects = ("dog", "hand", "finger", "triangle", "week", "bicycle")
    assert not [q for q in counting if any(s in q for s in subjects)]
    evaluated = {c.question for c in SHORT_CASES}
    everything = chat_data.number_questions(2000, random.Random(0))
    assert evaluated & set(everything) == {"What is 2 + 2?", "What is 3 times 3?"}  # drawn, then dropped:
    assert not evaluated & set(chat_data.unevaluated(everything))


def test_self_answers_are_the_models_own_greedy_answers(tiny_llama_dir):
    questions = ["What is AI?", "Tell me a joke", "How many legs does a spider have?"]
    rows = chat_data.self_answers(str(tiny_llama_dir), questions, batch_size=2)
    lm = load_model(str(tiny_llama_dir), FamConfig(mode="full", full_context_tokens=512), "full",
                    EngineConfig(device="cpu"))
    prompts = [lm.tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
    want = greedy_answers(lm.model, lm.tokenizer, prompts, max_new_tokens=64, batch_size=3)
    assert [r["messages"][0] for r in rows] == [{"role": "user", "content": q} for q, a in zip(questions, want) if a]
    assert [r["messages"][1]["content"] for r in rows] == [a for a in want if a]
    assert rows and all(r["messages"][1]["role"] == "assistant" for r in rows)
