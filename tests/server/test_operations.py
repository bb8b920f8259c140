"""The operational routes on the shared tiny server: /health, /ready, /metrics, /tokenize, /detokenize and the
OpenAPI document."""

from __future__ import annotations

import re

import httpx

MODEL = "tiny-llama"


def test_health_and_ready(http: httpx.Client) -> None:
    assert http.get("/health").json() == {"status": "ok"}
    ready = http.get("/ready")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "model": MODEL, "famserve": {"mode": "bswa (L=1024 M=3 S=4)"}}


def metric(text: str, name: str, labels: str = "", default: float | None = None) -> float:
    """A sample's value; `default` for a labelled series that has not been seen yet (a counter before its first
    increment is absent, not 0)."""
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    if match is None and default is not None:
        return default
    assert match, f"{name}{labels} not in /metrics"
    return float(match.group(1))


def test_metrics_count_requests_tokens_and_latency(http: httpx.Client) -> None:
    before = http.get("/metrics").text
    http.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 4, "ignore_eos": True})
    http.post("/v1/completions", json={"model": MODEL, "prompt": 5})
    http.get("/no/such/route")
    response = http.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    after = response.text
    ok = '{route="/v1/completions",status="200"}'
    assert metric(after, "famserve_requests_total", ok) == metric(before, "famserve_requests_total", ok, 0) + 1
    assert metric(after, "famserve_requests_total", '{route="/v1/completions",status="400"}') >= 1
    assert metric(after, "famserve_requests_total", '{route="unmatched",status="404"}') >= 1
    assert (metric(after, "famserve_generation_tokens_total") - metric(before, "famserve_generation_tokens_total")
            == 4)
    assert metric(after, "famserve_prompt_tokens_total") > metric(before, "famserve_prompt_tokens_total")
    assert metric(after, "famserve_time_to_first_token_seconds_count") >= 1
    assert metric(after, "famserve_inter_token_latency_seconds_count") >= 3
    assert metric(after, "famserve_request_duration_seconds_count", '{route="/v1/completions"}') >= 2
    assert metric(after, "famserve_num_requests_running") == 0
    assert metric(after, "famserve_num_requests_waiting") == 0
    assert ":" not in "".join(re.findall(r"^(famserve\w*)", after, re.MULTILINE))


def test_tokenize_and_detokenize_round_trip(http: httpx.Client, limits: dict[str, int]) -> None:
    tokens = http.post("/tokenize", json={"prompt": "Hello world"}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0
    assert tokens["max_model_len"] == limits["max_prompt_tokens"]
    assert http.post("/detokenize", json={"tokens": tokens["tokens"]}).json() == {"prompt": "Hello world"}


def test_tokenize_messages_matches_the_chat_prompt(http: httpx.Client) -> None:
    messages = [{"role": "user", "content": "What is FAM?"}]
    tokens = http.post("/tokenize", json={"messages": messages}).json()["tokens"]
    text = http.post("/detokenize", json={"tokens": tokens}).json()["prompt"]
    assert text == "<|im_start|>user\nWhat is FAM?<|im_end|>\n<|im_start|>assistant\n"
    chat = http.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 1}).json()
    assert chat["usage"]["prompt_tokens"] == len(tokens)


def test_openapi_describes_every_route_and_body(http: httpx.Client) -> None:
    spec = http.get("/openapi.json").json()
    paths = spec["paths"]
    expected = {"/v1/completions": "post", "/v1/chat/completions": "post", "/v1/models": "get",
                "/v1/models/{model}": "get", "/tokenize": "post", "/detokenize": "post", "/health": "get",
                "/ready": "get", "/metrics": "get", "/v1/responses": "post", "/v1/sessions": "post",
                "/v1/sessions/{session_id}": "get", "/v1/sessions/{session_id}/append": "post",
                "/v1/sessions/{session_id}/completions": "post", "/v1/sessions/{session_id}/chat/completions": "post",
                "/v1/sessions/{session_id}/fork": "post", "/v1/sessions/{session_id}/state": "get",
                "/v1/sessions/import": "post"}
    assert set(paths) == set(expected)
    for path, method in expected.items():
        assert "200" in paths[path][method]["responses"], path
    schemas = spec["components"]["schemas"]
    for name in ("CompletionRequest", "ChatCompletionRequest", "CompletionResponse", "ChatCompletionResponse",
                 "ChatMessage", "ContentPart", "ErrorResponse", "TokenizeRequest", "DetokenizeRequest"):
        assert name in schemas, name
    chat = schemas["ChatCompletionRequest"]["properties"]
    assert list(chat)[:2] == ["messages", "model"]  # the reference's order
    assert list(chat)[-7:] == ["top_k", "min_p", "repetition_penalty", "stop_token_ids", "ignore_eos",
                               "structured_outputs", "session_id"]
    assert chat["top_k"]["description"].startswith("extension")
    assert set(paths["/v1/chat/completions"]["post"]["responses"]) >= {"200", "400", "404", "429", "503"}
