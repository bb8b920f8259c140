"""Every benchmark script in bench/ runs end to end on the tiny model, as a user runs it (its command line, in its
own process), and writes the JSON its docs describe. Numbers are not checked (they are what the scripts measure);
what is checked is that each script finishes, measures what it was asked for, and keeps its invariants: one
script, bench/train_step.py, had stopped running after a refactor and another, bench/fairness.py, could loop
forever, and nothing noticed."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WINDOW = ["--block-size", "16", "--memory-blocks", "1", "--sink-tokens", "2"]  # a few blocks of the tiny model


def run_script(script: str, *args: str, timeout: float = 180) -> str:
    done = subprocess.run([sys.executable, f"bench/{script}", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def speed_json(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("speed") / "engine_speed.json"
    run_script("engine_speed.py", "--model", str(tiny_llama_dir), "--systems", "bswa,fam,hf", "--contexts", "64,128",
               "--repeats", "2", "--decode-tokens", "2", *WINDOW, "--fam-length", "4", "--no-roofline",
               "--no-isolate", "--plot-dir", "", "--threads", "1", "--out", str(out))
    return out


@pytest.fixture(scope="module")
def quality_json(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("quality")
    (folder / "texts").mkdir()
    (folder / "texts/book.txt").write_text("It was a bright cold day in April, and the clocks were striking. " * 40)
    out = folder / "quality.json"
    # The tiny tokenizer writes about a token per character: a PassKey prompt needs some 170 tokens.
    run_script("quality.py", "--model", str(tiny_llama_dir), "--modes", "bswa,full", "--texts-dir",
               str(folder / "texts"), "--books", "book", "--max-tokens", "300", "--passkey-lengths", "256",
               "--passkey-trials", "2", *WINDOW, "--full-context", "512", "--plot-dir", "", "--threads", "1",
               "--out", str(out))
    return out


def test_engine_speed_measures_every_system_and_context(speed_json):
    payload = json.loads(speed_json.read_text())
    assert payload["complete"]
    rows = {(r["system"], r["context_tokens"]): r for r in payload["results"]}
    assert set(rows) == {(s, c) for s in ("bswa", "fam", "hf") for c in (64, 128)}
    for row in rows.values():
        assert row["runs"] == 2 and row["prefill_tok_s"]["median"] > 0 and row["decode_tok_s"]["median"] > 0
    for system in ("bswa", "fam"):  # constant-size state: the product's promise, in the benchmark's own numbers
        assert rows[system, 64]["state_nbytes"] == rows[system, 128]["state_nbytes"]
    assert rows["hf", 128]["state_nbytes"] == 2 * rows["hf", 64]["state_nbytes"]  # HF's cache grows with context
    ratios = {(r["system"], r["context_tokens"]): r for r in payload["ratios"]}
    assert "prefill_time_vs_bswa" in ratios["fam", 128] and "prefill_vs_hf" in ratios["bswa", 128]


def test_quality_scores_the_book_and_passkey_for_each_mode(quality_json):
    payload = json.loads(quality_json.read_text())
    assert payload["complete"]
    assert {r["label"] for r in payload["perplexity"]} == {"bswa", "full"}
    for row in payload["perplexity"]:
        assert row["num_tokens"] > 0 and math.isfinite(row["perplexity"]) and row["perplexity"] > 1
    assert {(r["label"], r["num_tokens"], r["trials"]) for r in payload["passkey"]} == {("bswa", 256, 2),
                                                                                     ("full", 256, 2)}


def test_quality_refuses_a_passkey_length_too_short_in_words(tiny_llama_dir, tmp_path):
    done = subprocess.run([sys.executable, "bench/quality.py", "--model", str(tiny_llama_dir), "--modes", "bswa",
                           "--skip-perplexity", "--passkey-lengths", "40", "--passkey-trials", "1", *WINDOW,
                           "--plot-dir", "", "--threads", "1", "--out", str(tmp_path / "q.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0 and "--passkey-lengths:" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "q.json").exists()


def test_markdown_tables_come_from_the_json(speed_json, quality_json):
    out = run_script("markdown.py", str(speed_json), str(quality_json))
    assert "| famserve BSWA |" in out and "| HF transformers |" in out and "| bswa |" in out


def test_markdown_quality_summary_gathers_every_mode_of_several_runs(quality_json, tmp_path):
    """One grid from several bench/quality.py files: a mode at another window is another row, a cell measured
    twice shows the run with more trials, and only whole books count as perplexity over a book."""
    first = json.loads(quality_json.read_text())  # bswa and full at L=16 M=1; the book's first 300 tokens
    more = json.loads(quality_json.read_text())
    more["args"]["max_tokens"] = None
    more["passkey"] = [{**r, "trials": 4, "correct": 3} for r in more["passkey"] if r["label"] == "bswa"]
    wider = json.loads(quality_json.read_text())
    wider["window"]["block_size"] = 32
    wider["passkey"] = [{**r, "num_tokens": 2048} for r in wider["passkey"] if r["label"] == "bswa"]
    wider["perplexity"] = []
    paths = []
    for name, payload in (("first", first), ("more", more), ("wider", wider)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(payload))
    out = run_script("markdown.py", "--quality-summary", "summary", *map(str, paths))
    passkey, perplexity = out.split("over whole books")
    lines = {line.split(" | ")[0]: line for line in passkey.splitlines() if line.startswith("| ")}
    assert lines["| bswa (L=16 M=1)"].startswith("| bswa (L=16 M=1) | 3/4 | not run | more (CPU, float32)")
    assert lines["| bswa (L=32 M=1)"].startswith(f"| bswa (L=32 M=1) | not run | {cell(first, 'bswa')} | wider (CPU, "
                                                  "float32)")
    assert lines["| full (512 context)"].startswith(f"| full (512 context) | {cell(first, 'full')} | beyond its "
                                                    "context")
    ppl = [line for line in perplexity.splitlines() if line.startswith("| bswa")]
    assert len(ppl) == 1 and ppl[0].endswith("| more (CPU, float32) |")  # the first file scored 300 tokens only


def cell(payload: dict, label: str) -> str:
    r = next(r for r in payload["passkey"] if r["label"] == label)
    return f"{r['correct']}/{r['trials']}"


def test_plots_are_written(speed_json, quality_json, tmp_path):
    run_script("plot.py", str(speed_json), str(quality_json), "--out-dir", str(tmp_path))
    assert {p.name for p in tmp_path.glob("*.png")} == {"bench_speed.png", "bench_memory.png", "bench_passkey.png",
                                                       "bench_perplexity.png"}


def test_throughput_measures_each_stream_count(tiny_llama_dir, tmp_path):
    out = tmp_path / "throughput.json"
    run_script("throughput.py", "--model", str(tiny_llama_dir), "--streams", "1,3", "--decode-tokens", "3",
               "--prompt-tokens", "8", "--threads", "1", "--out", str(out))
    results = json.loads(out.read_text())["results"]
    assert [r["streams"] for r in results] == [1, 3]
    assert results[1]["states_bytes"] == 3 * results[0]["states_bytes"] and all(r["decode_tok_s"] > 0 for r in results)
    table = run_script("markdown.py", str(out))
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| streams")]
    assert [row.split(" | ")[0] for row in rows] == ["| 1", "| 3"] and "| 1.00 |" in rows[0]


def test_fairness_finishes_when_the_ingest_ends_before_every_chat_started(tiny_llama_dir, tmp_path):
    out = tmp_path / "fairness.json"
    # 256 tokens fit one step's prefill budget: the ingest is over before the second chat is due.
    run_script("fairness.py", "--model", str(tiny_llama_dir), "--ingest-tokens", "256", "--chats", "3",
               "--chat-prompt-tokens", "4", "--chat-tokens", "2", "--threads", "1", "--out", str(out), timeout=60)
    payload = json.loads(out.read_text())
    assert payload["idle"]["chats"] == 3 and 1 <= payload["during_ingest"]["chats"] < 3
    assert payload["ingest_alone"]["ingest_tok_s"] > 0


def test_structured_output_runs_every_format(tiny_llama_dir, tmp_path):
    out = tmp_path / "structured.json"
    run_script("structured_output.py", "--model", str(tiny_llama_dir), "--streams", "1", "--decode-tokens", "4",
               "--repeats", "1", "--threads", "1", "--out", str(out))
    payload = json.loads(out.read_text())
    assert {r["format"] for r in payload["results"]} == {"free text", "regex", "json schema"}


def test_train_step_variants_compute_the_same_first_loss(tiny_llama_dir, tmp_path):
    out = tmp_path / "train_step.json"
    run_script("train_step.py", "--model", str(tiny_llama_dir), "--configs", "16,1,4,2,64", "--rounds", "1",
               "--variants", "current,unmerged", "--out", str(out))
    rows = json.loads(out.read_text())["results"]
    assert [r["variant"] for r in rows] == ["current", "unmerged"]
    assert rows[0]["first_loss"] == pytest.approx(rows[1]["first_loss"], rel=1e-5)


def test_profile_step_counts_operators_of_each_step_kind(tmp_path):
    out = tmp_path / "profile.json"
    run_script("profile_step.py", "--context", "16", "--prefill-chunk", "8", "--steps", "1", "--threads", "1",
               "--out", str(out))
    rows = json.loads(out.read_text())["results"]
    assert {(r["mode"], r["step"]) for r in rows} == {(m, s) for m in ("bswa", "fam") for s in ("decode", "prefill")}
    assert all(r["operators"] > 0 and r["top"] for r in rows)


def test_server_concurrency_streams_from_a_real_famserve_server(tiny_llama_dir, tmp_path):
    out, text = tmp_path / "concurrency.json", tmp_path / "text.txt"
    text.write_text("A long and quiet afternoon by the river. " * 50)
    run_script("server_concurrency.py", "--model", str(tiny_llama_dir), "--systems", "famserve", "--streams", "1,2",
               "--repeats", "1", "--prompt-tokens", "8", "--max-tokens", "4", "--text", str(text), "--plot", "",
               "--out", str(out))
    rows = json.loads(out.read_text())["results"]
    assert [(r["system"], r["streams"], r["complete"]) for r in rows] == [("famserve", 1, True), ("famserve", 2, True)]


def test_engine_speed_targets_across_contexts_need_two_contexts():
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import engine_speed

    def row(system: str, context: int, decode: float) -> dict:
        return {"system": system, "context_tokens": context, "decode_tok_s": {"median": decode},
                "prefill_tok_s": {"median": 100.0}, "state_nbytes": 1000, "rss_bytes": 2000}

    one = {t["target"]: t for t in engine_speed.targets([row("bswa", 65536, 10.0), row("fam", 65536, 9.0)])}
    assert one["bswa: decode tok/s at 65536 >= 0.9x at 65536"]["value"] is None  # not a self-comparison
    assert one["fam: state bytes at 65536 == at 65536"]["met"] is None
    two = {t["target"]: t for t in engine_speed.targets([row("bswa", 1024, 10.0), row("bswa", 65536, 8.0)])}
    assert two["bswa: decode tok/s at 65536 >= 0.9x at 1024"]["value"] == 0.8
    assert two["bswa: decode tok/s at 65536 >= 0.9x at 1024"]["met"] is False
    assert two["bswa: state bytes at 65536 == at 1024"]["met"] is True


@pytest.fixture
def late_adapter(tiny_llama_dir: Path, tmp_path: Path) -> Path:
    """An adapter of the tiny model trained with the FAM read after the window (random weights)."""
    import torch

    from famserve.engine.adapter import FamAdapter
    from famserve.engine.build import load_model
    from famserve.engine.config import FamConfig

    model = load_model(tiny_llama_dir, FamConfig(mode="bswa")).model
    g = torch.Generator().manual_seed(0)
    lora = {name: (torch.randn(2, m.in_features, generator=g) * 0.1, torch.randn(m.out_features, 2, generator=g) * 0.1)
            for name, m in model.named_modules() if name.endswith(("q_proj", "down_proj"))}
    adapter = tmp_path / "late.safetensors"
    FamAdapter(torch.randn(4, model.config.hidden_size, generator=g), model.config.fingerprint(), "tiny", 16, 1, 2,
               lora, 1.0, fam_after_window=True).save(adapter)
    return adapter


def test_quality_serves_an_adapter_as_it_was_trained(tiny_llama_dir, late_adapter, tmp_path):
    """--fam-adapter with an adapter trained with the FAM read after the window: the fam-adapter mode runs so."""
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts/book.txt").write_text("It was a bright cold day in April, and the clocks were striking. " * 10)
    out = run_script("quality.py", "--model", str(tiny_llama_dir), "--modes", "fam-adapter", "--fam-adapter",
                     str(late_adapter), "--texts-dir", str(tmp_path / "texts"), "--books", "book", "--max-tokens",
                     "100", "--skip-passkey", "--plot-dir", "", "--threads", "1", "--out", str(tmp_path / "q.json"))
    assert "fam-adapter: fam (L=16 M=1 F=4 S=2; FAM read after the window)" in out


def test_engine_speed_times_an_adapter_as_it_is_served(tiny_llama_dir, late_adapter, tmp_path):
    """The FAM read after the window runs the adapter's LoRA unmerged, a cost the speed benchmark must include."""
    run_script("engine_speed.py", "--model", str(tiny_llama_dir), "--systems", "fam", "--contexts", "64",
               "--repeats", "1", "--decode-tokens", "2", *WINDOW, "--fam-adapter", str(late_adapter), "--no-roofline",
               "--no-isolate", "--plot-dir", "", "--threads", "1", "--out", str(tmp_path / "speed.json"))
    (row,) = json.loads((tmp_path / "speed.json").read_text())["results"]
    assert row["description"] == "famserve fam (L=16 M=1 F=4 S=2; FAM read after the window)"


def test_engine_speed_and_throughput_run_int4_decode(tiny_llama_dir, tmp_path):
    run_script("engine_speed.py", "--model", str(tiny_llama_dir), "--systems", "bswa,bswa-int4", "--contexts", "64",
               "--repeats", "1", "--decode-tokens", "2", *WINDOW, "--dtype", "bfloat16", "--no-roofline",
               "--no-isolate", "--plot-dir", "", "--threads", "1", "--out", str(tmp_path / "speed.json"))
    rows = {r["system"]: r for r in json.loads((tmp_path / "speed.json").read_text())["results"]}
    assert rows["bswa-int4"]["description"] == rows["bswa"]["description"] + ", int4 decode"
    assert rows["bswa-int4"]["state_nbytes"] == rows["bswa"]["state_nbytes"]
    refused = subprocess.run([sys.executable, "bench/engine_speed.py", "--systems", "bswa-int4"], cwd=ROOT,
                             capture_output=True, text=True)  # float32, the script's default dtype
    assert refused.returncode == 2 and "int4 weights run on the CPU in bfloat16" in refused.stderr
    run_script("throughput.py", "--model", str(tiny_llama_dir), "--streams", "1,2", "--decode-tokens", "3",
               "--prompt-tokens", "8", "--threads", "1", "--dtype", "bfloat16", "--quantize", "int4",
               "--out", str(tmp_path / "throughput.json"))
    assert json.loads((tmp_path / "throughput.json").read_text())["model"].endswith(", int4 decode")
