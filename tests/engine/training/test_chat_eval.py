"""`famserve eval chat` (engine/training/chat_eval.py, cli.py): the verdict rule, the three prompt layouts (the
recall fact at the start of a long message, the question at its end), greedy answers equal to a plain one-stream
greedy loop whatever the batching, and the command's table and JSON."""

import argparse
import json

import pytest

from famserve.engine.build import load_model
from famserve.engine.config import FamConfig
from famserve.engine.runner import ModelRunner
from famserve.engine.training import chat_eval as ce
from famserve.engine.training.cli import add_eval_parser

FAM = FamConfig(block_size=32, memory_blocks=1, fam_length=4, sink_tokens=2)


@pytest.mark.parametrize("expect,max_words,answer,passed", [
    (("Paris",), None, "The capital of France is Paris.", True),
    (("Paris",), None, "the capital is PARIS", True),  # case does not matter
    (("Paris",), None, "Parisian cafés are famous.", False),  # whole words only
    (("4", "four"), None, "2 + 2 = 4", True),
    (("4", "four"), None, "It has four legs.", True),
    (("4", "four"), None, "It is 14.", False),  # a number is not part of a longer one
    (("4", "four"), None, "About 4.5 of them.", False),
    (("4", "four"), None, "It is -4 degrees.", False),
    (("0",), None, "Water freezes at -18.0 degrees.", False),
    (("carbon dioxide", "CO2"), None, "Plants absorb CO2.", True),
    (("green",), 1, "Green.", True),
    (("green",), 1, "The answer is green.", False),  # too many words
    (("2", "two"), 5, "A bicycle has 2 wheels.", True),
    (("2", "two"), 5, "A bicycle has exactly 2 wheels.", False),
])
def test_judge(expect, max_words, answer, passed):
    verdict, reason = ce.judge(ce.ChatCase("x", "?", expect, max_words), answer)
    assert verdict is passed
    assert ("contains" in reason and "more than" not in reason) is passed


def test_the_fixed_set_cannot_be_passed_without_reading_the_fact():
    assert len(ce.SHORT_CASES) >= 20 and len(ce.RECALL_CASES) >= 8
    assert len({c.id for c in ce.SHORT_CASES + ce.RECALL_CASES}) == len(ce.SHORT_CASES) + len(ce.RECALL_CASES)
    document = "\n\n".join(ce.DOCUMENT)
    for case in ce.RECALL_CASES:
        assert case.fact and case.answer_prefix
        prompt = " ".join([document, ce.RECALL_INTRO, ce.RECALL_QUESTION, case.question, case.answer_prefix])
        assert not ce.judge(case, prompt)[0], case.id  # the answer is only in the fact
        assert ce.judge(case, case.fact)[0], case.id


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_model(tiny_llama_dir, FAM, mode="fam")


def test_prompt_layouts(tiny):
    tokenizer = tiny.tokenizer
    document = ce.document_text(tokenizer, 300)
    assert len(tokenizer.encode(document)) >= 300 and document.startswith(ce.DOCUMENT[0])
    assert ce.document_text(tokenizer, 20) == ce.DOCUMENT[0]
    case = ce.RECALL_CASES[0]

    assert ce.case_messages(case, "short", document) == [{"role": "user", "content": case.question}]
    first, reply, question = ce.case_messages(case, "document", document)
    assert (first["role"], reply["role"], question["role"]) == ("user", "assistant", "user")
    assert first["content"].endswith(document) and question["content"] == case.question

    [recall] = ce.case_messages(case, "recall", document)
    text = recall["content"]
    assert text.startswith(case.fact) and text.endswith(case.question)
    assert text.index(case.fact) < text.index(document) < text.index(case.question)
    ids = ce.prompt_ids(tokenizer, [recall], case)
    assert ids[-len(tokenizer.encode(case.answer_prefix)):] == tokenizer.encode(case.answer_prefix)
    assert tokenizer.decode(ids).startswith(tokenizer.render_chat([recall]))
    with pytest.raises(ValueError, match="chat set"):
        ce.case_messages(case, "long", document)


def plain_greedy(model, tokenizer, prompt: list[int], max_new_tokens: int) -> str:
    runner, state, out = ModelRunner(model), model.new_state(), []
    eos = set(model.config.eos_token_ids) | set(tokenizer.eos_token_ids)
    logits = runner.run([state], [prompt])[0].reshape(-1)
    while len(out) < max_new_tokens:
        token = int(logits.argmax())
        if token in eos:
            break
        out.append(token)
        logits = runner.decode([state], [token]).reshape(-1)
    return tokenizer.decode(out, skip_special_tokens=True).strip()


def test_greedy_answers_equal_a_plain_greedy_loop_whatever_the_batching(tiny):
    model, tokenizer = tiny.model, tiny.tokenizer
    document = ce.document_text(tokenizer, 100)
    prompts = [ce.prompt_ids(tokenizer, ce.case_messages(c, s, document), c)
               for c, s in [(ce.SHORT_CASES[0], "short"), (ce.RECALL_CASES[0], "recall"),
                            (ce.SHORT_CASES[1], "document"), (ce.SHORT_CASES[2], "short"),
                            (ce.RECALL_CASES[1], "recall")]]
    want = [plain_greedy(model, tokenizer, p, 12) for p in prompts]
    assert ce.greedy_answers(model, tokenizer, prompts, 12, batch_size=1) == want
    assert ce.greedy_answers(model, tokenizer, prompts, 12, batch_size=3, chunk_tokens=50) == want
    # The document set's prompts share the long first message: it is read once, and the answers stay the same.
    same_start = [ce.prompt_ids(tokenizer, ce.case_messages(c, "document", document), c) for c in ce.SHORT_CASES[:4]]
    assert ce.shared_prefix_length(same_start) > len(tokenizer.encode(document))
    want = [plain_greedy(model, tokenizer, p, 12) for p in same_start]
    assert ce.greedy_answers(model, tokenizer, same_start, 12, batch_size=3) == want


@pytest.mark.parametrize("prompts,shared", [([[1, 2, 3], [1, 2, 4]], 2), ([[1, 2], [1, 2, 3]], 1), ([[7, 8, 9]], 2),
                                            ([[5], [5]], 0), ([[1, 2], [3, 2]], 0), ([], 0)])
def test_shared_prefix_leaves_every_prompt_a_token(prompts, shared):
    assert ce.shared_prefix_length(prompts) == shared


def test_chat_eval_judges_what_the_model_answered(tiny):
    """Cases built from the model's own (random) answers: expecting what it said passes, expecting what it never
    said fails, and a word limit one below the answer's length fails it."""
    model, tokenizer = tiny.model, tiny.tokenizer
    probe = ce.chat_eval(model, tokenizer, ["short"], max_new_tokens=12, cases={"short": ce.SHORT_CASES[:2]})[0]
    said = [a.answer for a in probe.answers]
    assert all(said)
    words = ce.count_words(said[1])
    cases = [ce.ChatCase("said", ce.SHORT_CASES[0].question, (said[0],)),
             ce.ChatCase("not-said", ce.SHORT_CASES[1].question, ("zebrafinch",)),
             ce.ChatCase("said-short-enough", ce.SHORT_CASES[1].question, (said[1],), max_words=words),
             ce.ChatCase("said-too-long", ce.SHORT_CASES[1].question, (said[1],), max_words=words - 1)]
    [result] = ce.chat_eval(model, tokenizer, ["short"], max_new_tokens=12, cases={"short": cases})
    assert [a.answer for a in result.answers] == [said[0], said[1], said[1], said[1]]
    assert [a.passed for a in result.answers] == [True, False, True, False]
    assert "more than" in result.answers[3].reason
    assert (result.passed, result.total, result.mode, result.set) == (2, 4, "fam (L=32 M=1 F=4 S=2)", "short")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="famserve")
    add_eval_parser(p.add_subparsers(dest="command", required=True))
    return p


def test_eval_chat_command_prints_a_table_and_writes_every_answer(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "chat.json"
    args = parser().parse_args(["eval", "chat", "--model", str(tiny_llama_dir), "--mode", "bswa,fam",
                                "--block-size", "32", "--memory-blocks", "1", "--fam-length", "4", "--sink-tokens",
                                "2", "--document-tokens", "120", "--max-new-tokens", "6", "--out", str(out)])
    assert args.func(args) == 0
    payload = json.loads(out.read_text())
    assert payload["task"] == "chat" and payload["max_new_tokens"] == 6
    assert payload["document"] == ce.document_text(load_model(tiny_llama_dir).tokenizer, 120)
    results = payload["results"]
    modes = ("bswa (L=32 M=1 S=2)", "fam (L=32 M=1 F=4 S=2)")
    assert [(r["mode"], r["set"]) for r in results] == [(m, s) for m in modes for s in ("short", "document", "recall")]
    printed = capsys.readouterr().out
    cases = {c.id: c for c in ce.SHORT_CASES + ce.RECALL_CASES}
    for r in results:
        assert r["total"] == len(ce.RECALL_CASES if r["set"] == "recall" else ce.SHORT_CASES) == len(r["answers"])
        assert r["passed"] == sum(a["passed"] for a in r["answers"])
        assert f"{r['passed']}/{r['total']}" in printed
        for a in r["answers"]:
            assert (a["passed"], a["reason"]) == ce.judge(cases[a["id"]], a["answer"])
            assert a["messages"][-1]["content"].endswith(cases[a["id"]].question)
            if r["set"] != "short":  # the long text is written once, at the top
                assert "{DOCUMENT}" in a["messages"][0]["content"]
                assert a["prompt_tokens"] > 120
    recall = next(r for r in results if r["set"] == "recall")["answers"][0]
    assert recall["messages"][0]["content"].startswith(ce.RECALL_CASES[0].fact)
    assert recall["answer_prefix"] == ce.RECALL_CASES[0].answer_prefix


def test_eval_chat_command_refuses_an_unknown_set(tiny_llama_dir, tmp_path, capsys):
    args = parser().parse_args(["eval", "chat", "--model", str(tiny_llama_dir), "--sets", "short,long",
                                "--out", str(tmp_path / "x.json")])
    assert args.func(args) == 2
    assert "error: --sets: long not one of short, document, recall" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
