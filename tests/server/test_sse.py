"""The raw bytes of a stream: `data: {json}\n\n` events exactly as OpenAI sends them, the role first, the usage chunk
last when asked for, then `data: [DONE]\n\n`."""

from __future__ import annotations

import json
from typing import Any

import httpx

MODEL = "tiny-llama"


def stream_events(http: httpx.Client, path: str, body: dict[str, Any]) -> tuple[httpx.Response, list[bytes]]:
    with http.stream("POST", path, json={**body, "stream": True}) as response:
        raw = response.read()
    assert raw.endswith(b"\n\n")
    return response, raw[:-2].split(b"\n\n")


def check_framing(response: httpx.Response, events: list[bytes]) -> list[dict[str, Any]]:
    """Every event is one `data: ` line; the last is [DONE]; the others are JSON objects. Returns them parsed."""
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert events[-1] == b"data: [DONE]"
    chunks = []
    for event in events[:-1]:
        assert event.startswith(b"data: {") and event.count(b"\n") == 0 and b"\r" not in event
        chunks.append(json.loads(event[len(b"data: "):].decode("utf-8")))
    return chunks


def test_chat_stream_bytes(http: httpx.Client) -> None:
    response, events = stream_events(http, "/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "Bonjour, ça va ? 日本"}], "max_tokens": 7,
        "ignore_eos": True, "stream_options": {"include_usage": True}})
    chunks = check_framing(response, events)
    first, *content, last_choice, usage = chunks
    assert first["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None}]
    assert first["object"] == "chat.completion.chunk"
    assert first["famserve"]["mode"].startswith("bswa")
    for chunk in content:
        [choice] = chunk["choices"]
        assert set(choice["delta"]) == {"content"} and choice["finish_reason"] is None
    assert last_choice["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 7
    assert all("usage" not in chunk for chunk in chunks[:-1])
    assert len({(c["id"], c["created"], c["model"]) for c in chunks}) == 1


def test_completion_stream_bytes(http: httpx.Client) -> None:
    response, events = stream_events(http, "/v1/completions", {
        "model": MODEL, "prompt": "Once upon a time", "max_tokens": 5, "ignore_eos": True, "n": 2})
    chunks = check_framing(response, events)
    assert all(c["object"] == "text_completion" and len(c["choices"]) == 1 for c in chunks)
    finished = [c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"] == "length"]
    assert sorted(finished) == [0, 1]
    assert all("usage" not in c for c in chunks)  # not asked for


def test_stream_content_never_splits_a_character(http: httpx.Client) -> None:
    """Each delta is whole characters: joined, they equal the non-streamed text (a split character would show as
    U+FFFD in two deltas but as the character in the full text)."""
    body = {"model": MODEL, "prompt": "€ £ ü 日本語 🙂", "max_tokens": 48, "temperature": 0,
            "ignore_eos": True}
    full = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    _, events = stream_events(http, "/v1/completions", body)
    pieces = [json.loads(e[6:])["choices"][0]["text"] for e in events[:-1]]
    assert "".join(pieces) == full
