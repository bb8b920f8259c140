"""The official `openai` client against the real server (tiny random model): completions and chat, sync, async and
streaming, plus the OpenAI features the server promises (n, seed, stop, logprobs, logit_bias, structured output,
echo, usage)."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Literal

import jsonschema
import openai
import pydantic
import pytest

MODEL = "tiny-llama"  # the tiny model folder's name, which the server uses as the model id
MESSAGES = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "What is FAM?"}]


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].owned_by == "famserve"
    assert client.models.retrieve(MODEL).id == MODEL


def test_completion(client: openai.OpenAI) -> None:
    response = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=5, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert response.object == "text_completion"
    assert response.id.startswith("cmpl-")
    assert response.model == MODEL
    [choice] = response.choices
    assert choice.index == 0
    assert choice.finish_reason == "length"
    assert response.usage.completion_tokens == 5
    assert response.usage.prompt_tokens > 0
    assert response.usage.total_tokens == response.usage.prompt_tokens + 5
    assert response.model_extra["famserve"]["mode"] == "bswa (L=1024 M=3 S=4)"


def test_chat_completion(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0,
                                              extra_body={"ignore_eos": True})
    assert response.object == "chat.completion"
    assert response.id.startswith("chatcmpl-")
    [choice] = response.choices
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason == "length"
    assert response.usage.completion_tokens == 6


def test_greedy_is_deterministic_and_streaming_gives_the_same_text(client: openai.OpenAI) -> None:
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    plain = client.chat.completions.create(**kwargs).choices[0].message.content
    again = client.chat.completions.create(**kwargs).choices[0].message.content
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in
                       client.chat.completions.create(**kwargs, stream=True) if chunk.choices)
    assert plain == again == streamed


@pytest.mark.parametrize("prompt", ["héllo wörld, 日本語 — ok", "plain ascii text"])
def test_streamed_completion_text_equals_the_plain_one(client: openai.OpenAI, prompt: str) -> None:
    kwargs = dict(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    plain = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain
    assert chunks[-1].choices[0].finish_reason == "length"


def test_streaming_chat_chunks(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:-1])
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 8
    assert len({c.id for c in chunks}) == 1


def test_seed_reproduces_sampling_and_n_gives_distinct_choices(client: openai.OpenAI) -> None:
    kwargs = dict(model=MODEL, prompt="Hello", max_tokens=12, temperature=1.0, seed=1234, n=3,
                  extra_body={"ignore_eos": True})
    first = client.completions.create(**kwargs)
    second = client.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert len({c.text for c in first.choices}) == 3  # choice i samples with seed + i
    assert first.usage.completion_tokens == 36


def test_several_prompts_each_get_n_choices(client: openai.OpenAI) -> None:
    response = client.completions.create(model=MODEL, prompt=["Hello", "World"], max_tokens=2, n=2,
                                         extra_body={"ignore_eos": True})
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    assert response.usage.completion_tokens == 8


def test_stop_string_is_found_and_not_included(client: openai.OpenAI) -> None:
    kwargs = dict(model=MODEL, prompt="Hello there", max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kwargs).choices[0].text
    stop = full[5:8]  # cut inside the text; may span token boundaries
    assert len(stop) == 3
    expected = full[:full.index(stop)]
    for stream in (False, True):
        if stream:
            chunks = list(client.completions.create(**kwargs, stop=[stop], stream=True))
            text = "".join(c.choices[0].text for c in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            choice = client.completions.create(**kwargs, stop=stop).choices[0]
            text, finish = choice.text, choice.finish_reason
        assert (text, finish) == (expected, "stop")


def test_legacy_completion_logprobs(client: openai.OpenAI) -> None:
    choice = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, logprobs=3, temperature=0,
                                       extra_body={"ignore_eos": True}).choices[0]
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 4
    assert logprobs.text_offset[0] == 0
    assert "".join(logprobs.tokens) == choice.text
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert logprob <= 0
        assert 1 <= len(top) <= 3
        assert top[token] == pytest.approx(logprob, abs=1e-6)  # greedy: the chosen token is the most likely


def test_chat_logprobs(client: openai.OpenAI) -> None:
    choice = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, logprobs=True,
                                            top_logprobs=2, extra_body={"ignore_eos": True}).choices[0]
    content = choice.logprobs.content
    assert len(content) == 3
    for entry in content:
        assert entry.logprob <= 0
        assert entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 2


def test_logit_bias_bans_a_token_and_forces_another(client: openai.OpenAI, http) -> None:
    kwargs = dict(model=MODEL, prompt="Hello", max_tokens=6, temperature=0, logprobs=1,
                  extra_body={"ignore_eos": True})
    greedy = client.completions.create(**kwargs).choices[0].logprobs.tokens
    # A generated token whose text tokenizes back to that one token gives its id.
    token, token_id = next((text, ids[0]) for text in greedy if text.isascii()
                           for ids in [http.post("/tokenize", json={"prompt": text, "add_special_tokens": False})
                                       .json()["tokens"]] if len(ids) == 1)
    banned = client.completions.create(**kwargs, logit_bias={str(token_id): -100}).choices[0].logprobs.tokens
    assert token not in banned and banned != greedy
    forced = client.completions.create(**kwargs, logit_bias={str(token_id): 100}).choices[0].logprobs.tokens
    assert forced == [token] * 6  # every step: +100 outweighs any logit of this model
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0.8, seed=3,
                                          logit_bias={str(token_id): 100}, extra_body={"ignore_eos": True})
    assert chat.choices[0].message.content == token * 4  # sampled rows too


class Verdict(pydantic.BaseModel):
    colour: Literal["red", "green", "blue"]
    ok: bool
    score: int = pydantic.Field(ge=0, le=9)


def test_structured_output_through_the_clients_parse_helper(client: openai.OpenAI) -> None:
    """The SDK sends Verdict as a strict json_schema response_format and parses the reply back into it."""
    for seed in range(3):
        response = client.chat.completions.parse(model=MODEL, messages=MESSAGES, response_format=Verdict,
                                                 max_completion_tokens=64, temperature=1.0, seed=seed)
        assert response.choices[0].finish_reason == "stop"
        assert isinstance(response.choices[0].message.parsed, Verdict)


def test_json_schema_reply_streams_the_same_text(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"items": {"type": "array", "maxItems": 3,
                                                         "items": {"type": "integer", "minimum": 0, "maximum": 50}}},
              "required": ["items"], "additionalProperties": False}
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=40, temperature=0,
                  response_format={"type": "json_schema", "json_schema": {"name": "numbers", "schema": schema}})
    plain = client.chat.completions.create(**kwargs).choices[0].message.content
    jsonschema.validate(json.loads(plain), schema)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in
                       client.chat.completions.create(**kwargs, stream=True) if chunk.choices)
    assert streamed == plain


def test_json_object_mode_and_vllms_structured_outputs(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=40, seed=3,
                                           response_format={"type": "json_object"})
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content), dict)
    choices = ["positive", "negative", "neutral"]
    picked = client.completions.create(model=MODEL, prompt="Sentiment:", max_tokens=10, n=4, seed=1,
                                       extra_body={"structured_outputs": {"choice": choices}})
    assert all(c.text in choices and c.finish_reason == "stop" for c in picked.choices)
    dated = client.completions.create(model=MODEL, prompt="Date:", max_tokens=20, temperature=0,
                                      extra_body={"structured_outputs": {"regex": r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"}})
    assert re.fullmatch(r"20[0-9]{2}-[01][0-9]-[0-3][0-9]", dated.choices[0].text)


WEATHER = {"type": "function", "function": {"name": "w", "description": "the weather in a city", "parameters": {
    "type": "object", "required": ["c"], "additionalProperties": False,
    "properties": {"c": {"enum": ["Rome", "Oslo"]}}}}}
CLOCK = {"type": "function", "function": {"name": "t", "description": "the time", "parameters": {
    "type": "object", "properties": {}, "additionalProperties": False}}}


def test_tool_choice_required_gives_tool_calls_with_valid_arguments(client: openai.OpenAI) -> None:
    for seed in range(3):
        response = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[WEATHER, CLOCK],
                                                  tool_choice="required", seed=seed, parallel_tool_calls=False)
        choice = response.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        [call] = choice.message.tool_calls  # parallel_tool_calls=False: exactly one
        assert call.id.startswith("call_") and call.type == "function"
        arguments = json.loads(call.function.arguments)
        assert (call.function.name, arguments) in [("t", {}), ("w", {"c": "Rome"}), ("w", {"c": "Oslo"})]


def test_a_named_tool_is_the_one_called_and_streaming_sends_the_call_whole(client: openai.OpenAI) -> None:
    kwargs = dict(model=MODEL, messages=MESSAGES, tools=[WEATHER, CLOCK], temperature=0,
                  tool_choice={"type": "function", "function": {"name": "w"}})
    plain = client.chat.completions.create(**kwargs).choices[0]
    assert plain.finish_reason == "tool_calls" and {c.function.name for c in plain.message.tool_calls} == {"w"}
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    calls = [c for chunk in chunks for choice in chunk.choices for c in choice.delta.tool_calls or []]
    assert [(c.function.name, c.function.arguments) for c in calls] == \
        [(c.function.name, c.function.arguments) for c in plain.message.tool_calls]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_conversation_with_tool_results_continues(client: openai.OpenAI) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "w", "arguments": '{"c": "Rome"}'}}
    messages = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    auto = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], max_tokens=64, seed=1)
    choice = auto.choices[0]  # auto: a call or an answer, never both
    assert choice.finish_reason in ("tool_calls", "stop")
    assert (choice.message.tool_calls is None) != (choice.message.content is None)
    none = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="none",
                                          max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    assert none.choices[0].finish_reason == "length" and none.choices[0].message.tool_calls is None


def test_echo_prepends_the_prompt(client: openai.OpenAI) -> None:
    choice = client.completions.create(model=MODEL, prompt="Echo me", max_tokens=3, echo=True,
                                       extra_body={"ignore_eos": True}).choices[0]
    assert choice.text.startswith("Echo me")
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="Echo me", max_tokens=3, echo=True, stream=True, extra_body={"ignore_eos": True}))
    assert streamed.startswith("Echo me")


def test_chat_content_parts_render_like_a_string(client: openai.OpenAI) -> None:
    parts = [{"type": "text", "text": "What is "}, {"type": "text", "text": "FAM?"}]
    kwargs = dict(model=MODEL, max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    as_parts = client.chat.completions.create(messages=[{"role": "user", "content": parts}], **kwargs)
    as_string = client.chat.completions.create(messages=[{"role": "user", "content": "What is FAM?"}], **kwargs)
    assert as_parts.choices[0].message.content == as_string.choices[0].message.content
    assert as_parts.usage.prompt_tokens == as_string.usage.prompt_tokens


def test_max_completion_tokens_is_honoured(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=3,
                                              extra_body={"ignore_eos": True})
    assert response.usage.completion_tokens == 3


def test_chat_defaults_to_the_servers_max_tokens_cap(client: openai.OpenAI, limits: dict[str, int]) -> None:
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, extra_body={"ignore_eos": True})
    assert response.usage.completion_tokens == limits["max_tokens_cap"]


def test_stop_token_ids_end_generation(client: openai.OpenAI, http) -> None:
    kwargs = dict(model=MODEL, prompt="Hello", max_tokens=30, temperature=0, logprobs=1)
    full = client.completions.create(**kwargs, extra_body={"ignore_eos": True}).choices[0].logprobs.tokens
    # A generated token whose text tokenizes back to that one token gives its id.
    position, stop_id = next((i, ids[0]) for i, text in enumerate(full) if i >= 2 and text.isascii()
                             for ids in [http.post("/tokenize", json={"prompt": text, "add_special_tokens": False})
                                         .json()["tokens"]] if len(ids) == 1)
    stopped = client.completions.create(**kwargs, extra_body={"ignore_eos": True, "stop_token_ids": [stop_id]})
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].logprobs.tokens == full[:len(stopped.choices[0].logprobs.tokens)]
    assert len(stopped.choices[0].logprobs.tokens) <= position  # the stop token itself is not in the output


def test_async_client_concurrent_requests(base_url: str) -> None:
    asyncio.run(_concurrent_requests(openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0,
                                                        timeout=60)))


async def _concurrent_requests(async_client: openai.AsyncOpenAI) -> None:
    async def one(i: int) -> str:
        response = await async_client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Question {i}"}], max_tokens=5, temperature=0,
            extra_body={"ignore_eos": True})
        return response.choices[0].message.content

    async def streamed(i: int) -> str:
        stream = await async_client.completions.create(model=MODEL, prompt=f"Prompt {i}", max_tokens=5,
                                                       temperature=0, stream=True, extra_body={"ignore_eos": True})
        return "".join([c.choices[0].text async for c in stream])

    results = await asyncio.gather(*(one(i) for i in range(4)), *(streamed(i) for i in range(4)))
    assert len(results) == 8
    alone = await one(2)
    assert results[2] == alone  # batching with others does not change a greedy answer
    await async_client.close()
