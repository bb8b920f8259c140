"""A trained FAM adapter served end to end, as a user does it: `famserve train` writes an adapter for the tiny model,
`famserve serve --fam-adapter` serves it (a real server process) in FAM mode, the chat answer equals
`famserve generate --fam-adapter`'s greedy output, and /v1/models and the startup log name the adapter. An adapter of
another base model, or a missing adapter file, makes `famserve serve` exit non-zero with a one-line reason."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from famserve.server.app import load_model_from_settings
from famserve.server.settings import Settings
from server_process import TINY_MODEL_NAME, ServerProcess, tiny_server_args
from tiny_models import make_tiny_model, save_tiny_folder

WINDOW = {"block_size": "32", "memory_blocks": "1", "sink_tokens": "2"}  # L, M, S of training and serving
MODE = "fam (L=32 M=1 F=4 S=2)"  # F comes from the adapter (the serving default is 64)
# About 180 prompt tokens with the chat template: more than four blocks of 32, so the FAM is updated before the answer.
QUESTION = "The quick brown fox jumps over the lazy dog. " * 5 + "What is the capital of France?"
MAX_TOKENS = 16


def famserve(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "famserve.server.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def window_flags() -> list[str]:
    return [item for name, value in WINDOW.items() for item in (f"--{name.replace('_', '-')}", value)]


@pytest.fixture(scope="module")
def adapter(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter for the tiny model, written by the real `famserve train` (a few steps, seconds). A high learning
    rate moves the LoRA weights far enough from zero to change the greedy answer."""
    out = tmp_path_factory.mktemp("adapter") / "tiny-fam.safetensors"
    run = famserve("train", "--model", str(tiny_llama_dir), "--passkey", "--steps", "4", "--seq-len", "192",
                   *window_flags(), "--fam-length", "4", "--lora-rank", "2", "--lr", "0.05", "--warmup-steps", "1",
                   "--checkpoint-every", "0", "--threads", "1", "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert out.is_file()
    return out


@pytest.fixture(scope="module")
def adapter_server(start_server, tiny_llama_dir: Path, adapter: Path) -> ServerProcess:
    return start_server(tiny_server_args(tiny_llama_dir, mode="fam", fam_adapter=adapter, **WINDOW))


def chat(server: ServerProcess) -> dict:
    response = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
        "model": TINY_MODEL_NAME, "messages": [{"role": "user", "content": QUESTION}],
        "temperature": 0, "max_tokens": MAX_TOKENS})
    assert response.status_code == 200, response.text
    return response.json()


def generate(model: Path, *extra: str, window: bool = True) -> subprocess.CompletedProcess:
    """`famserve generate` of QUESTION; window=False leaves L, M and S to their defaults (an adapter's own)."""
    out = famserve("generate", "--model", str(model), "--chat", "--prompt", QUESTION, "--max-tokens",
                   str(MAX_TOKENS), *(window_flags() if window else []), *extra)
    assert out.returncode == 0, out.stderr
    return out


def test_served_adapter_answers_as_famserve_generate_does(adapter_server, tiny_llama_dir, adapter):
    body = chat(adapter_server)
    answer = body["choices"][0]["message"]["content"]
    assert body["famserve"]["mode"] == MODE
    assert body["usage"]["prompt_tokens"] > 4 * 32
    assert body["usage"]["completion_tokens"] > 0

    local = generate(tiny_llama_dir, "--fam-adapter", str(adapter))
    assert f"mode {MODE}" in local.stderr
    assert local.stdout == answer + "\n"  # generate ends its output with a newline
    # The adapter is what makes this answer: the same FAM without it (untrained prompt, base weights) differs.
    untrained = generate(tiny_llama_dir, "--mode", "fam", "--fam-length", "4")
    assert untrained.stdout != local.stdout


def test_an_adapter_brings_its_window_when_none_is_given(tiny_llama_dir, adapter):
    with_flags = generate(tiny_llama_dir, "--fam-adapter", str(adapter))
    out = generate(tiny_llama_dir, "--fam-adapter", str(adapter), window=False)  # no --block-size, ... flags
    assert f"mode {MODE}" in out.stderr and "trained with" not in out.stderr
    assert out.stdout == with_flags.stdout
    settings = Settings(model=str(tiny_llama_dir), fam_adapter=adapter)  # serve: the same defaults
    assert load_model_from_settings(settings).model.fam_config.describe() == MODE
    bigger = Settings(model=str(tiny_llama_dir), fam_adapter=adapter, block_size=64)  # a given value wins
    assert load_model_from_settings(bigger).model.fam_config.describe() == "fam (L=64 M=1 F=4 S=2)"


def test_models_and_startup_log_name_the_adapter(adapter_server, adapter):
    card = httpx.get(f"{adapter_server.url}/v1/models", timeout=30).json()["data"][0]
    assert card["id"] == TINY_MODEL_NAME
    assert card["famserve"] == {"mode": MODE, "fam_adapter": adapter.name}
    assert httpx.get(f"{adapter_server.url}/v1/models/{TINY_MODEL_NAME}", timeout=30).json() == card
    assert f"attention mode {MODE}, FAM adapter {adapter}" in adapter_server.log_text()


def test_models_say_no_adapter_when_none_is_loaded(http):
    card = http.get("/v1/models").json()["data"][0]
    assert card["famserve"]["fam_adapter"] is None


def failed_start(start_server, args: list[str]) -> tuple[int, str]:
    server = start_server(args, wait=False)
    try:
        code = server.process.wait(timeout=180)
    except subprocess.TimeoutExpired:
        server.stop()
        pytest.fail(f"the server kept running:\n{server.log_text()}")
    return code, server.log_text()


def test_an_adapter_of_another_base_model_is_refused(start_server, adapter, tmp_path):
    other = save_tiny_folder(make_tiny_model(intermediate_size=96), tmp_path / "other-llama")  # another shape
    code, log = failed_start(start_server, tiny_server_args(other, fam_adapter=adapter, **WINDOW))
    assert code != 0
    assert "cannot load the model: FAM adapter was trained for" in log
    assert "a different architecture" in log and f"(adapter file {adapter})" in log
    assert "Traceback" not in log


def test_a_missing_adapter_file_is_refused(start_server, tiny_llama_dir, tmp_path):
    missing = tmp_path / "no-such-adapter.safetensors"
    code, log = failed_start(start_server, tiny_server_args(tiny_llama_dir, fam_adapter=missing))
    assert code != 0
    assert f"famserve serve: fam_adapter: {missing}: FAM adapter file not found" in log  # at parse time
    assert "Traceback" not in log


def test_an_adapter_trained_to_read_the_fam_after_the_window_is_served_so(start_server, tiny_llama_dir, tmp_path):
    """`famserve train --fam-after-window` writes an adapter that the server, told nothing more, runs with the FAM
    read after the window: a short chat inside the window gets the base model's BSWA answer (the adapter's LoRA
    waits for the window), a long one the adapter's own, and a session says how its stream reads the FAM."""
    late = tmp_path / "late.safetensors"
    run = famserve("train", "--model", str(tiny_llama_dir), "--passkey", "--steps", "4", "--seq-len", "192",
                   *window_flags(), "--fam-length", "4", "--lora-rank", "2", "--lr", "0.05", "--warmup-steps", "1",
                   "--checkpoint-every", "0", "--threads", "1", "--fam-after-window", "--out", str(late))
    assert run.returncode == 0, run.stderr
    server = start_server(tiny_server_args(tiny_llama_dir, mode="fam", fam_adapter=late))
    mode = "fam (L=32 M=1 F=4 S=2; FAM read after the window)"

    def ask(question: str, max_tokens: int) -> dict:
        response = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
            "model": TINY_MODEL_NAME, "messages": [{"role": "user", "content": question}], "temperature": 0,
            "max_tokens": max_tokens})
        assert response.status_code == 200, response.text
        return response.json()

    short = ask("Hi", 8)  # the chat template's prompt and 8 tokens: inside the first 2 blocks of 32
    assert short["famserve"]["mode"] == mode
    assert short["usage"]["prompt_tokens"] + short["usage"]["completion_tokens"] <= 64
    bswa = famserve("generate", "--model", str(tiny_llama_dir), "--chat", "--prompt", "Hi", "--max-tokens", "8",
                    "--mode", "bswa", *window_flags())
    assert bswa.returncode == 0, bswa.stderr
    assert bswa.stdout == short["choices"][0]["message"]["content"] + "\n"

    long = ask(QUESTION, MAX_TOKENS)  # past the window: the adapter's answer, as generate computes it
    local = generate(tiny_llama_dir, "--fam-adapter", str(late), window=False)
    assert f"mode {mode}" in local.stderr
    assert local.stdout == long["choices"][0]["message"]["content"] + "\n"
    session = httpx.post(f"{server.url}/v1/sessions", timeout=60, json={}).json()
    assert session["fam"] == {"mode": "fam", "block_size": 32, "memory_blocks": 1, "fam_length": 4, "sink_tokens": 2,
                              "fam_after_window": True}
