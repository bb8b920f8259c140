"""`famserve eval` (engine/training/evaluate.py, cli.py): streamed perplexity equals the all-at-once computation for
any piece sizes; PassKey evaluation scores the first generated number; both commands print a table and write JSON."""

import argparse
import json
import math

import pytest
import torch

from famserve.engine.build import load_model
from famserve.engine.config import FamConfig
from famserve.engine.training.cli import add_eval_parser, add_train_parser
from famserve.engine.training.evaluate import first_number, passkey, perplexity
from famserve.engine.training.sequence import sequence_logits


@pytest.mark.parametrize("mode", ["bswa", "fam", "full"])
def test_streamed_perplexity_equals_all_at_once(tiny_llama_dir, mode):
    fam = FamConfig(block_size=16, memory_blocks=1, fam_length=4, sink_tokens=2, full_context_tokens=256)
    model = load_model(tiny_llama_dir, fam, mode=mode).model
    tokens = torch.randint(0, 320, (150,), generator=torch.Generator().manual_seed(0))
    pieces = [tokens[:7].tolist(), tokens[7:70].tolist(), tokens[70:].tolist()]  # cut anywhere

    got = perplexity(model, pieces, chunk_tokens=40)
    logits = sequence_logits(model, model.fam_config, tokens[None])[0]
    want = torch.nn.functional.cross_entropy(logits[:-1].double(), tokens[1:]).item()
    assert got.num_tokens == 149
    assert got.nll == pytest.approx(want, abs=1e-5)
    assert got.perplexity == pytest.approx(math.exp(want), rel=1e-5)
    assert perplexity(model, pieces, chunk_tokens=40, max_tokens=50).num_tokens == 49


@pytest.mark.parametrize("text,number", [(" 12345. Remember", "12345"), ("no digits", None), ("\n 7 8", "7")])
def test_first_number(text, number):
    assert first_number(text) == number


def test_passkey_eval_runs_through_the_engine(tiny_llama_dir):
    loaded = load_model(tiny_llama_dir, FamConfig(block_size=64, memory_blocks=1, sink_tokens=2), mode="bswa")
    results = passkey(loaded.model, loaded.tokenizer, [260, 300], trials=3, seed=1, batch_size=2)
    assert [(r.num_tokens, r.trials, len(r.outputs)) for r in results] == [(260, 3, 3), (300, 3, 3)]
    for r in results:
        assert r.correct == sum(o["correct"] for o in r.outputs) and 0.0 <= r.accuracy <= 1.0
        assert all(len(o["key"]) == 5 for o in r.outputs)
    again = passkey(loaded.model, loaded.tokenizer, [260], trials=3, seed=1, batch_size=3)  # other batching
    assert again[0].outputs == results[0].outputs


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="famserve")
    sub = p.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    add_eval_parser(sub)
    return p


def test_eval_perplexity_command_prints_and_writes_json(tiny_llama_dir, tmp_path, capsys):
    text = tmp_path / "doc.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n" * 12)
    out = tmp_path / "ppl.json"
    args = parser().parse_args(["eval", "perplexity", "--model", str(tiny_llama_dir), "--text", str(text),
                                "--mode", "bswa,full", "--block-size", "32", "--memory-blocks", "1",
                                "--sink-tokens", "2", "--chunk-tokens", "50", "--out", str(out)])
    assert args.func(args) == 0
    payload = json.loads(out.read_text())
    modes = [r["mode"] for r in payload["results"]]
    assert modes == ["bswa (L=32 M=1 S=2)", "full (causal attention, up to 8192 tokens)"]
    assert all(r["num_tokens"] == payload["results"][0]["num_tokens"] > 100 for r in payload["results"])
    assert "Perplexity" in capsys.readouterr().out


def test_eval_passkey_command_writes_json(tiny_llama_dir, tmp_path):
    out = tmp_path / "pk.json"
    args = parser().parse_args(["eval", "passkey", "--model", str(tiny_llama_dir), "--lengths", "260",
                                "--trials", "2", "--block-size", "64", "--memory-blocks", "1", "--out", str(out)])
    assert args.func(args) == 0
    result = json.loads(out.read_text())["results"][0]
    assert (result["mode"], result["num_tokens"], result["trials"]) == ("bswa (L=64 M=1 S=4)", 260, 2)


def test_train_command_writes_an_adapter(tiny_llama_dir, tmp_path):
    adapter = tmp_path / "a.safetensors"
    args = parser().parse_args(["train", "--model", str(tiny_llama_dir), "--passkey", "--steps", "2",
                                "--seq-len", "200", "--block-size", "32", "--memory-blocks", "1", "--fam-length",
                                "4", "--lora-rank", "2", "--lora-targets", "q_proj,v_proj", "--out", str(adapter)])
    assert args.func(args) == 0
    assert adapter.is_file() and (tmp_path / "a.train.pt").is_file()


def test_train_command_reports_a_bad_value(tiny_llama_dir, tmp_path, capsys):
    args = parser().parse_args(["train", "--model", str(tiny_llama_dir), "--passkey", "--rsp-prob", "2",
                                "--out", str(tmp_path / "a.safetensors")])
    assert args.func(args) == 2
    assert "error: rsp_prob: must be in 0..1, got 2.0" in capsys.readouterr().err
