"""Tool calling (OpenAI's `tools` and `tool_choice` on chat completions), the way llama.cpp's server does it for
chat templates that know no tools: the tools are described to the model in a system message, the reply is held by
structured output to one JSON object, either {"tool_calls": [{"name": ..., "arguments": {...}}]} or
{"response": "..."}, and that object is read back into OpenAI's message (tool_calls, or content). Earlier tool
calls and tool results in the conversation are rendered in the same JSON, so the model sees one consistent form."""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal

from pydantic import BaseModel, Field

from famserve.engine.structured import OutputFormat, json_schema_format

from .base import OpenAIBaseModel, OpenAIName

ANY_ARGUMENTS = {"type": "object"}
MAX_PARALLEL_CALLS = 16  # a bound on one reply's calls: a small model can repeat a call until max_tokens


class FunctionDefinition(OpenAIBaseModel):
    name: OpenAIName = Field(description="a-z, A-Z, 0-9, underscores and dashes, at most 64")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON schema of the arguments (default: any object)")
    strict: bool | None = Field(None, description="accepted; the arguments always follow the schema")


class ToolDefinition(OpenAIBaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(OpenAIBaseModel):
    name: str


class NamedToolChoice(OpenAIBaseModel):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="the arguments as JSON text")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ToolCallDelta(BaseModel):
    """A streamed tool call: famserve sends each call whole, in one delta."""

    index: int
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


def called_tools(tools: list[ToolDefinition], choice: ToolChoice | None) -> list[ToolDefinition]:
    """The tools the reply may call: none for "none", the named one for a named choice, else all of them."""
    if choice == "none" or not tools:
        return []
    if isinstance(choice, NamedToolChoice):
        return [t for t in tools if t.function.name == choice.function.name]
    return tools


def system_prompt(tools: list[ToolDefinition], must_call: bool) -> str:
    listing = json.dumps([{"name": t.function.name, "description": t.function.description or "",
                           "parameters": t.function.parameters or ANY_ARGUMENTS} for t in tools])
    answer = ("Reply with a JSON object that calls one or more of them: "
              '{"tool_calls": [{"name": <tool name>, "arguments": <arguments object>}]}.' if must_call else
              "Reply with a JSON object: either one that calls one or more of them, "
              '{"tool_calls": [{"name": <tool name>, "arguments": <arguments object>}]}, '
              'or, to answer without a tool, {"response": <your answer>}.')
    return f"You can use these tools:\n{listing}\n{answer}"


def reply_format(tools: list[ToolDefinition], must_call: bool, parallel: bool) -> OutputFormat:
    """The JSON the reply is held to: calls of the given tools (with their argument schemas; one call unless
    `parallel`, at most MAX_PARALLEL_CALLS), or, unless a call is required, a plain response."""
    call = {"anyOf": [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                       "properties": {"name": {"const": t.function.name},
                                      "arguments": t.function.parameters or ANY_ARGUMENTS}} for t in tools]}
    calls = {"type": "object", "additionalProperties": False, "required": ["tool_calls"],
             "properties": {"tool_calls": {"type": "array", "minItems": 1, "items": call,
                                           "maxItems": MAX_PARALLEL_CALLS if parallel else 1}}}
    if must_call:
        return json_schema_format(calls, "tools")
    response = {"type": "object", "additionalProperties": False, "required": ["response"],
                "properties": {"response": {"type": "string"}}}
    return json_schema_format({"anyOf": [calls, response]}, "tools")


def read_reply(text: str) -> tuple[str | None, list[ToolCall] | None]:
    """(content, tool calls) of a reply held to reply_format; a reply cut short (max_tokens) is returned as its
    text, no calls."""
    try:
        reply = json.loads(text)
    except json.JSONDecodeError:
        return text, None
    if isinstance(reply, dict) and isinstance(reply.get("tool_calls"), list):
        return None, [ToolCall(id=f"call_{uuid.uuid4().hex[:24]}",
                               function=FunctionCall(name=call["name"], arguments=json.dumps(call["arguments"])))
                      for call in reply["tool_calls"]]
    if isinstance(reply, dict) and isinstance(reply.get("response"), str):
        return reply["response"], None
    return text, None


def call_text(tool_calls: list[dict[str, Any]]) -> str:
    """An earlier assistant turn's tool calls as the JSON the model writes them in."""
    calls = []
    for call in tool_calls:
        function = call.get("function") or {}
        arguments = function.get("arguments") or "{}"
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        except json.JSONDecodeError:
            pass  # shown as the text the client sent
        calls.append({"name": function.get("name"), "arguments": arguments})
    return json.dumps({"tool_calls": calls})


def result_text(content: str, tool_call_id: str | None, names: dict[str, str]) -> str:
    """A tool message as the model reads it: which call it answers, and what the tool returned."""
    return json.dumps({"tool_result": {"name": names.get(tool_call_id or "", ""), "content": content}})
