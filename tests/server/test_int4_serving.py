"""int4 decode served end to end: `famserve serve --quantize int4` (a real server process) answers a greedy chat
exactly as `famserve generate --quantize int4` does, and differently from the bfloat16 weights it was rounded from."""

from __future__ import annotations

import subprocess
import sys

import httpx

from server_process import TINY_MODEL_NAME, tiny_server_args

QUESTION = "The quick brown fox jumps over the lazy dog. What is the capital of France?"
MAX_TOKENS = 24


def generate(model, *extra: str) -> str:
    out = subprocess.run([sys.executable, "-m", "famserve.server.cli", "generate", "--model", str(model), "--chat",
                          "--prompt", QUESTION, "--max-tokens", str(MAX_TOKENS), "--threads", "1", *extra],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.removesuffix("\n")


def test_int4_server_answers_as_famserve_generate_does(start_server, tiny_llama_dir):
    server = start_server(tiny_server_args(tiny_llama_dir, quantize="int4"))
    response = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
        "model": TINY_MODEL_NAME, "messages": [{"role": "user", "content": QUESTION}], "temperature": 0,
        "max_tokens": MAX_TOKENS})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["usage"]["completion_tokens"] > 1
    answer = body["choices"][0]["message"]["content"]
    assert answer == generate(tiny_llama_dir, "--quantize", "int4")
    assert answer != generate(tiny_llama_dir, "--dtype", "bfloat16")  # the rounding to 4 bits shows
