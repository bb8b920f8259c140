"""The error catalogue: malformed requests against the real server, each with its exact status and OpenAI error body
(type, param, code). A client mistake is never a 500 and never FastAPI's 422."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

MODEL = "tiny-llama"
USER = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
INVALID = "invalid_request_error"


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": USER, "max_tokens": 2, **fields}


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "hi", "max_tokens": 2, **fields}


def without(body: dict[str, Any], field: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != field}


C, X = "/v1/chat/completions", "/v1/completions"
# (id, path, JSON body, status, param, code); every body error here is an "invalid_request_error".
CASES: list[tuple[str, str, Any, int, str | None, str]] = [
    ("chat-no-model", C, without(chat(), "model"), 400, "model", "missing_required_parameter"),
    ("chat-no-messages", C, without(chat(), "messages"), 400, "messages", "missing_required_parameter"),
    ("chat-empty-messages", C, chat(messages=[]), 400, "messages", "invalid_value"),
    ("chat-messages-not-a-list", C, chat(messages="hi"), 400, "messages", "invalid_type"),
    ("chat-unknown-role", C, chat(messages=[{"role": "robot", "content": "x"}]), 400, "messages[0].role",
     "invalid_value"),
    ("chat-tool-message-without-call-id", C, chat(messages=[{"role": "tool", "content": "x"}]), 400,
     "messages[0].tool_call_id", "invalid_value"),
    ("chat-function-role", C, chat(messages=[{"role": "function", "content": "x", "name": "f"}]), 400,
     "messages[0].role", "unsupported_parameter"),
    ("chat-content-number", C, chat(messages=[{"role": "user", "content": 5}]), 400, "messages[0].content",
     "invalid_type"),
    ("chat-image-part", C, chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "http://x/y.png"}}]}]), 400, "messages[0].content[0].type", "unsupported_parameter"),
    ("chat-text-part-without-text", C, chat(messages=[{"role": "user", "content": [{"type": "text"}]}]), 400,
     "messages[0].content[0].text", "missing_required_parameter"),
    ("chat-assistant-tool-call-without-function", C, chat(messages=[*USER, {"role": "assistant", "tool_calls": [
        {"id": "1"}]}]), 400, "messages[1].tool_calls[0].function", "missing_required_parameter"),
    ("chat-user-tool-calls", C, chat(messages=[{"role": "user", "content": "x", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]), 400,
     "messages[0].tool_calls", "invalid_value"),
    ("chat-tool-name-with-a-space", C, chat(tools=[{"type": "function", "function": {"name": "get weather"}}]), 400,
     "tools[0].function.name", "invalid_value"),
    ("chat-two-tools-one-name", C, chat(tools=[TOOL, TOOL]), 400, "tools", "invalid_value"),
    ("chat-tool-choice-required-without-tools", C, chat(tool_choice="required"), 400, "tool_choice",
     "invalid_value"),
    ("chat-tool-choice-names-no-tool", C, chat(tools=[TOOL], tool_choice={"type": "function", "function": {
        "name": "other"}}), 400, "tool_choice", "invalid_value"),
    ("chat-tools-with-a-json-response-format", C, chat(tools=[TOOL], response_format={"type": "json_object"}), 400,
     "tools", "invalid_value"),
    ("chat-tool-parameters-that-do-not-compile", C, chat(tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "nonsense"}}}]), 400, "tools", "invalid_value"),
    ("chat-legacy-functions", C, chat(functions=[{"name": "f"}]), 400, "functions", "unsupported_parameter"),
    ("chat-response-format-unknown-type", C, chat(response_format={"type": "yaml"}), 400, "response_format.type",
     "invalid_value"),
    ("chat-json-schema-without-schema", C, chat(response_format={"type": "json_schema"}), 400, "response_format",
     "invalid_value"),
    ("chat-json-schema-bad-name", C, chat(response_format={"type": "json_schema", "json_schema": {
        "name": "a b", "schema": {}}}), 400, "response_format.json_schema.name", "invalid_value"),
    ("chat-json-schema-that-does-not-compile", C, chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "nonsense"}}}), 400, "response_format.json_schema.schema", "invalid_value"),
    ("chat-two-formats", C, chat(response_format={"type": "json_object"}, structured_outputs={"regex": "a"}), 400,
     "structured_outputs", "invalid_value"),
    ("completion-two-structured-outputs", X, completion(structured_outputs={"regex": "a", "choice": ["a"]}), 400,
     "structured_outputs", "invalid_value"),
    ("completion-bad-regex", X, completion(structured_outputs={"regex": "[a-"}), 400, "structured_outputs.regex",
     "invalid_value"),
    ("completion-bad-grammar", X, completion(structured_outputs={"grammar": "start: nowhere"}), 400,
     "structured_outputs.grammar", "invalid_value"),
    ("chat-top-logprobs-without-logprobs", C, chat(top_logprobs=2), 400, "top_logprobs", "invalid_value"),
    ("chat-top-logprobs-too-many", C, chat(logprobs=True, top_logprobs=21), 400, "top_logprobs", "invalid_value"),
    ("chat-temperature-too-high", C, chat(temperature=3), 400, "temperature", "invalid_value"),
    ("chat-temperature-not-a-number", C, chat(temperature="hot"), 400, "temperature", "invalid_type"),
    ("chat-n-zero", C, chat(n=0), 400, "n", "invalid_value"),
    ("chat-max-tokens-zero", C, chat(max_tokens=0), 400, "max_tokens", "invalid_value"),
    ("chat-max-tokens-over-cap", C, chat(max_tokens=129), 400, "max_tokens", "invalid_value"),
    ("chat-max-completion-tokens-over-cap", C, chat(max_completion_tokens=10_000), 400, "max_completion_tokens",
     "invalid_value"),
    ("chat-stream-options-without-stream", C, chat(stream_options={"include_usage": True}), 400, "stream_options",
     "invalid_value"),
    ("chat-too-many-stops", C, chat(stop=["a"] * 17), 400, "stop", "invalid_type"),
    ("chat-logit-bias-key-not-a-token-id", C, chat(logit_bias={"fifty": 10}), 400, "logit_bias", "invalid_value"),
    ("chat-logit-bias-too-strong", C, chat(logit_bias={"50": 101}), 400, "logit_bias", "invalid_value"),
    ("chat-logit-bias-not-a-number", C, chat(logit_bias={"50": "up"}), 400, "logit_bias", "invalid_type"),
    ("completion-logit-bias-outside-vocab", X, completion(logit_bias={"99999": 5}), 400, "logit_bias",
     "invalid_value"),
    ("chat-unknown-model", C, chat(model="gpt-4o"), 404, "model", "model_not_found"),
    ("completion-no-prompt", X, without(completion(), "prompt"), 400, "prompt", "missing_required_parameter"),
    ("completion-prompt-number", X, completion(prompt=5), 400, "prompt", "invalid_type"),
    ("completion-prompt-mixed-list", X, completion(prompt=["a", 1]), 400, "prompt", "invalid_type"),
    ("completion-prompt-empty-list", X, completion(prompt=[]), 400, "prompt", "invalid_value"),
    ("completion-prompt-empty-string", X, completion(prompt=""), 400, "prompt", "invalid_value"),
    ("completion-token-outside-vocab", X, completion(prompt=[1, 99_999]), 400, "prompt", "invalid_value"),
    ("completion-prompt-too-long", X, completion(prompt=[5] * 1025), 400, "prompt", "context_length_exceeded"),
    ("completion-echo-with-logprobs", X, completion(echo=True, logprobs=1), 400, "logprobs",
     "unsupported_parameter"),
    ("completion-best-of", X, completion(best_of=3), 400, "best_of", "unsupported_parameter"),
    ("completion-suffix", X, completion(suffix="end"), 400, "suffix", "unsupported_parameter"),
    ("completion-logprobs-too-many", X, completion(logprobs=21), 400, "logprobs", "invalid_value"),
    ("completion-top-p-zero", X, completion(top_p=0), 400, "top_p", "invalid_value"),
    ("completion-top-k-below-minus-one", X, completion(top_k=-2), 400, "top_k", "invalid_value"),
    ("completion-repetition-penalty-zero", X, completion(repetition_penalty=0), 400, "repetition_penalty",
     "invalid_value"),
    ("completion-presence-penalty-too-high", X, completion(presence_penalty=2.5), 400, "presence_penalty",
     "invalid_value"),
    ("completion-negative-stop-token-id", X, completion(stop_token_ids=[-1]), 400, "stop_token_ids[0]",
     "invalid_value"),
    ("completion-unknown-model", X, completion(model="nope"), 404, "model", "model_not_found"),
    ("body-is-a-list", C, [chat()], 400, None, "invalid_type"),
    ("tokenize-prompt-and-messages", "/tokenize", {"prompt": "a", "messages": USER}, 400, None, "invalid_value"),
    ("tokenize-unknown-model", "/tokenize", {"model": "nope", "prompt": "a"}, 404, "model", "model_not_found"),
    ("detokenize-outside-vocab", "/detokenize", {"tokens": [1, 100_000]}, 400, "tokens", "invalid_value"),
    ("detokenize-negative", "/detokenize", {"tokens": [-3]}, 400, "tokens[0]", "invalid_value"),
]


def assert_error(response: httpx.Response, status: int, param: str | None, code: str,
                 error_type: str = INVALID) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"], error["code"]) == (error_type, param, code)
    assert error["message"] and "Traceback" not in error["message"]
    return error


@pytest.mark.parametrize(("path", "body", "status", "param", "code"), [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_malformed_json_requests(http: httpx.Client, path: str, body: Any, status: int, param: str | None,
                                 code: str) -> None:
    error = assert_error(http.post(path, json=body), status, param, code)
    if param is not None:
        assert error["message"].startswith(f"{param}: ") or status == 404


RAW_CASES = [  # (id, method, path, content, headers, status, param, code)
    ("invalid-json", "POST", C, b'{"model": "tiny-llama", "messages": [', {"content-type": "application/json"},
     400, None, "invalid_json"),
    ("empty-body", "POST", C, b"", {"content-type": "application/json"}, 400, None, "missing_required_parameter"),
    ("not-json-content-type", "POST", C, json.dumps(chat()).encode(), {"content-type": "text/plain"}, 400, None,
     "invalid_type"),
    ("invalid-utf8", "POST", X, b'{"model": "tiny-llama", "prompt": "\xff\xfe"}',
     {"content-type": "application/json"}, 400, None, "invalid_body"),
    ("nan-temperature", "POST", C, b'{"model": "tiny-llama", "messages": [], "temperature": NaN}',
     {"content-type": "application/json"}, 400, "messages", "invalid_value"),
    ("unknown-route", "POST", "/v1/embeddings", b"{}", {"content-type": "application/json"}, 404, None,
     "unknown_url"),
    ("wrong-method", "GET", C, b"", {}, 405, None, "method_not_allowed"),
    ("body-too-large", "POST", C, b" " * 70_000, {"content-type": "application/json"}, 413, None,
     "request_too_large"),
]


@pytest.mark.parametrize(("method", "path", "content", "headers", "status", "param", "code"),
                         [case[1:] for case in RAW_CASES], ids=[case[0] for case in RAW_CASES])
def test_malformed_raw_requests(http: httpx.Client, method: str, path: str, content: bytes, headers: dict,
                                status: int, param: str | None, code: str) -> None:
    assert_error(http.request(method, path, content=content, headers=headers), status, param, code)


def test_body_too_large_without_content_length(http: httpx.Client, limits: dict[str, int]) -> None:
    def chunks():  # a generator body goes out chunked, without Content-Length: the middleware counts the bytes
        for _ in range(limits["max_body_bytes"] // 8192 + 2):
            yield b" " * 8192

    response = http.post(C, content=chunks(), headers={"content-type": "application/json"})
    assert_error(response, 413, None, "request_too_large")


def test_nan_temperature_alone_is_rejected(http: httpx.Client) -> None:
    content = b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}'
    response = http.post(C, content=content, headers={"content-type": "application/json"})
    assert_error(response, 400, "temperature", "invalid_value")


def test_unknown_fields_are_accepted(http: httpx.Client) -> None:
    body = chat(metadata={"k": "v"}, store=False, some_future_field=1,
                messages=[{"role": "user", "content": "hi", "weight": 1}])
    response = http.post(C, json=body)
    assert response.status_code == 200, response.text
