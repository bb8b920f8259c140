"""Tool calling's protocol (server/protocol/tools.py, without a server): how a conversation with tools, earlier
calls and tool results reaches the chat template, and how a reply held to the tool format reads back."""

from __future__ import annotations

import json

import pytest

from famserve.server.protocol.chat import ChatCompletionRequest
from famserve.server.protocol.tools import read_reply

WEATHER = {"type": "function", "function": {
    "name": "weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CALL = {"id": "call_7", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Rome"}'}}
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Rome?"},
                {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "call_7", "content": "sunny, 24 C"}]


def request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": CONVERSATION, **fields})


def test_tools_calls_and_results_are_rendered_in_the_json_the_model_writes():
    messages = request(tools=[WEATHER]).template_messages()
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0]["content"].startswith("Be brief.\n\nYou can use these tools:\n")
    assert '"name": "weather"' in messages[0]["content"] and '{"response": <your answer>}' in messages[0]["content"]
    assert json.loads(messages[2]["content"]) == {"tool_calls": [{"name": "weather", "arguments": {"city": "Rome"}}]}
    assert json.loads(messages[3]["content"]) == {"tool_result": {"name": "weather", "content": "sunny, 24 C"}}


@pytest.mark.parametrize("tool_choice, described, format_kind", [
    (None, True, "json"), ("auto", True, "json"), ("required", True, "json"),
    ({"type": "function", "function": {"name": "weather"}}, True, "json"), ("none", False, None)])
def test_tool_choice_decides_the_description_and_the_format(tool_choice, described, format_kind):
    body = request(tools=[WEATHER], tool_choice=tool_choice)
    assert ("You can use these tools" in body.template_messages()[0]["content"]) is described
    output_format = body.to_sampling_params(64).output_format
    assert (output_format.kind if output_format else None) == format_kind
    if tool_choice == "required":  # no plain answer: the schema has no "response" branch
        assert '"response"' not in output_format.spec and '"maxItems": 16' in output_format.spec
    if isinstance(tool_choice, dict):
        assert '"maxItems": 1' in output_format.spec and '"const": "weather"' in output_format.spec


def test_without_tools_the_history_is_still_rendered_and_nothing_is_held():
    body = request()
    assert body.to_sampling_params(64).output_format is None and not body.calls_tools
    assert body.template_messages()[0] == {"role": "system", "content": "Be brief."}


@pytest.mark.parametrize("text, content, calls", [
    ('{"tool_calls": [{"name": "weather", "arguments": {"city": "Oslo"}}]}', None,
     [("weather", '{"city": "Oslo"}')]),
    ('{"response": "It is sunny."}', "It is sunny.", None),
    ('{"tool_calls": [{"name": "wea', '{"tool_calls": [{"name": "wea', None),  # cut by max_tokens: the text
])
def test_a_reply_reads_back_as_calls_or_content(text, content, calls):
    got_content, got_calls = read_reply(text)
    assert got_content == content
    assert (None if got_calls is None else [(c.function.name, c.function.arguments) for c in got_calls]) == calls
    assert got_calls is None or all(c.id.startswith("call_") and len(c.id) == 29 for c in got_calls)
