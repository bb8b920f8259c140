"""`famserve generate` as a user runs it: a real subprocess, text on stdout, speed and state size on stderr."""

import json
import subprocess
import sys

import pytest

from famserve.engine.loader import resolve_model_path


def famserve(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "famserve.server.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_generate_on_the_tiny_model(tiny_llama_dir):
    out = famserve("generate", "--model", str(tiny_llama_dir), "--prompt", "hello there", "--max-tokens", "5",
                   "--block-size", "8", "--memory-blocks", "1", "--threads", "1")
    assert out.returncode == 0, out.stderr
    assert "mode bswa (L=8 M=1 S=4), cpu float32, 1 CPU threads" in out.stderr  # --dtype auto on the CPU: float32
    assert "tok/s" in out.stderr and "state" in out.stderr


def test_generate_with_int4_decode(tiny_llama_dir):
    args = ("generate", "--model", str(tiny_llama_dir), "--prompt", "hello there", "--max-tokens", "5",
            "--block-size", "8", "--memory-blocks", "1", "--threads", "1", "--quantize", "int4")
    out = famserve(*args)
    assert out.returncode == 0, out.stderr
    assert "cpu bfloat16, int4 decode, 1 CPU threads" in out.stderr  # --dtype auto with int4: bfloat16
    wrong = famserve(*args, "--dtype", "float32")
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    assert wrong.stderr.startswith("error: quantize: int4 weights run in bfloat16")


def test_generate_holds_the_output_to_a_json_schema(tiny_llama_dir, tmp_path):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["n"], "additionalProperties": False}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    out = famserve("generate", "--model", str(tiny_llama_dir), "--prompt", "hello", "--max-tokens", "30",
                   "--json-schema", str(tmp_path / "schema.json"), "--block-size", "8", "--memory-blocks", "1")
    assert out.returncode == 0, out.stderr
    assert set(json.loads(out.stdout)) == {"n"}
    (tmp_path / "bad.json").write_text('{"type": "nonsense"}')
    bad = famserve("generate", "--model", str(tiny_llama_dir), "--prompt", "x", "--json-schema",
                   str(tmp_path / "bad.json"))
    assert bad.returncode == 2 and bad.stderr.startswith("error: --json-schema: ") and "Traceback" not in bad.stderr


def test_generate_reports_a_missing_model_clearly(tmp_path):
    out = famserve("generate", "--model", str(tmp_path / "nope"), "--prompt", "x")
    assert out.returncode == 2
    assert "nope" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.model
def test_default_model_answers_the_capital_question():
    out = famserve("generate", "--model", "smollm2-135m", "--chat", "--prompt", "What is the capital of France?",
                   "--max-tokens", "30")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    assert "mode bswa (L=1024 M=3 S=4)" in out.stderr


@pytest.mark.model
def test_fam_mode_on_the_default_model_uses_the_shipped_adapter_at_its_shape():
    out = famserve("generate", "--model", "smollm2-135m", "--chat", "--prompt", "What is the capital of France?",
                   "--max-tokens", "20", "--mode", "fam")
    assert out.returncode == 0, out.stderr
    assert "mode fam (L=64 M=0 F=8 S=4; FAM read after the window)" in out.stderr
    assert "without a trained FAM adapter" not in out.stderr
    assert "Paris" in out.stdout


@pytest.mark.model
@pytest.mark.parametrize("how", ["by-path", "fam-adapter-none"])
def test_fam_mode_without_adapter_runs_and_warns(how):
    # famserve ships adapters for aliases only: by its path, or with --fam-adapter none, the model has none
    model, extra = ((str(resolve_model_path("smollm2-135m")), []) if how == "by-path"
                    else ("smollm2-135m", ["--fam-adapter", "none"]))
    out = famserve("generate", "--model", model, "--chat", "--prompt", "What is the capital of France?",
                   "--max-tokens", "10", "--mode", "fam", *extra)
    assert out.returncode == 0, out.stderr
    assert "without a trained FAM adapter" in out.stderr and "mode fam (L=1024 M=3 F=64 S=4)" in out.stderr
