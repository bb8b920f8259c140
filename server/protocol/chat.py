"""POST /v1/chat/completions: messages, the request, the response and the stream chunk, fields in the order of the
OpenAI API reference, famserve's vLLM-like extensions last. Tools work as protocol/tools.py describes; images and
the legacy `functions` are refused with a clear 400 rather than silently ignored."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, Discriminator, Field, Tag, ValidationInfo, field_validator, model_validator

from famserve.engine.sampling import MAX_LOGPROBS, SamplingParams
from famserve.engine.structured import OutputFormat

from .base import (FamserveInfo, IgnoreEos, MinP, N, OpenAIBaseModel, Penalty, RepetitionPenalty,
                   ResponseModel, Seed, StopSequences, StopTokenIds, StreamOptions, Temperature, TopK, TopP, Usage,
                   User, check_logit_bias, check_stream_options, invalid, sampling_params, unsupported)
from .structured import ResponseFormat, StructuredOutputs, output_format
from .tools import (ToolCall, ToolCallDelta, ToolChoice, ToolDefinition, call_text, called_tools, reply_format,
                    result_text, system_prompt)

NO_FUNCTIONS = "the legacy functions/function_call are not supported: use tools/tool_choice"


class ContentPart(OpenAIBaseModel):
    type: Literal["text"] = Field(description="only text parts are supported")
    text: str

    @field_validator("type", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        if isinstance(value, str) and value != "text":
            raise unsupported(f"content parts of type {value!r} are not supported (only 'text')")
        return value


def _content_kind(value: Any) -> str | None:
    return "Text" if isinstance(value, str) else "Parts" if isinstance(value, list) else None


# Validated as one branch, picked by the value's JSON type, so an error names the part at fault.
MessageContent = Annotated[
    Annotated[str, Tag("Text")] | Annotated[list[ContentPart], Tag("Parts")],
    Discriminator(_content_kind, custom_error_type="invalid_type",
                  custom_error_message="must be a string or a list of text parts"),
]


class ChatMessage(OpenAIBaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(
        description="developer is treated as system")
    content: MessageContent | None = Field(None, description="a string or a list of text parts")
    name: str | None = Field(None, description="accepted and ignored")
    tool_calls: list[ToolCall] | None = Field(None, description="an assistant turn's tool calls")
    tool_call_id: str | None = Field(None, description="a tool message: the call it answers")

    @field_validator("role", mode="before")
    @classmethod
    def _no_function_role(cls, value: Any) -> Any:
        if value == "function":
            raise unsupported(NO_FUNCTIONS)
        return value

    @model_validator(mode="after")
    def _tool_fields_where_they_belong(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise invalid("tool_calls: only assistant messages make tool calls")
        if self.role == "tool" and not self.tool_call_id:
            raise invalid("tool_call_id: a tool message names the call it answers")
        return self

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.content) if isinstance(self.content, list) else self.content or ""

    def for_template(self) -> dict[str, str]:
        """The message as a chat template expects it: plain text content, developer as system."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text}


class ChatCompletionRequest(OpenAIBaseModel):
    messages: list[ChatMessage] = Field(min_length=1, description="the conversation so far")
    model: str = Field(description="the served model's name, as /v1/models lists it")
    frequency_penalty: Penalty = None
    function_call: Any = Field(None, description="legacy, not supported: must be absent, null or 'none'")
    functions: list[dict[str, Any]] | None = Field(None, description="legacy, not supported: use tools")
    logit_bias: dict[str, float] | None = Field(None, description="token id (as a string) -> bias in [-100, 100], "
                                                                  "added to the logits before sampling")
    logprobs: bool | None = Field(None, description="return the logprob of each generated token")
    max_completion_tokens: int | None = Field(None, ge=1, description="new tokens at most (wins over max_tokens); "
                                                                      "default: the server's max_tokens_cap")
    max_tokens: int | None = Field(None, ge=1, description="deprecated name of max_completion_tokens")
    n: N = None
    parallel_tool_calls: bool | None = Field(None, description="let one reply call several tools (default true)")
    presence_penalty: Penalty = None
    response_format: ResponseFormat | None = None
    seed: Seed = None
    stop: StopSequences = Field(None, description="up to 16 strings that end the text (not included in it)")
    stream: bool | None = Field(None, description="send the reply as server-sent events as it is generated")
    stream_options: StreamOptions | None = None
    temperature: Temperature = None
    tool_choice: ToolChoice | None = Field(None, description="none, auto (default with tools), required, or "
                                                            "{\"type\": \"function\", \"function\": {\"name\": ...}}")
    tools: list[ToolDefinition] | None = Field(None, description="functions the model may call")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                     description="with logprobs, also return this many most likely tokens per position")
    top_p: TopP = None
    user: User = None
    # --- extensions (vLLM)
    top_k: TopK = None
    min_p: MinP = None
    repetition_penalty: RepetitionPenalty = None
    stop_token_ids: StopTokenIds = None
    ignore_eos: IgnoreEos = None
    structured_outputs: StructuredOutputs | None = Field(None, description="extension: json, regex, choice or "
                                                                           "grammar the reply must follow")
    # --- extension (famserve)
    session_id: str | None = Field(None, description="famserve: continue this session (its history stays on the "
                                                     "server; send only the new messages; the reply is committed)")

    @field_validator("functions")
    @classmethod
    def _no_functions(cls, value: list | None) -> list | None:
        if value:
            raise unsupported(NO_FUNCTIONS)
        return value

    @field_validator("function_call")
    @classmethod
    def _no_function_call(cls, value: Any) -> Any:
        if value not in (None, "none", "auto"):
            raise unsupported(NO_FUNCTIONS)
        return value

    @model_validator(mode="after")
    def _tool_choice_names_a_tool(self) -> ChatCompletionRequest:
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise invalid("tools: two tools have the same name")
        choice = self.tool_choice
        if choice is not None and choice not in ("none", "auto") and not names:
            raise invalid("tool_choice: there are no tools to call")
        if choice is not None and not isinstance(choice, str) and choice.function.name not in names:
            raise invalid(f"tool_choice: no tool is named {choice.function.name!r}")
        if self.calls_tools and (self.structured_outputs is not None or (
                self.response_format is not None and self.response_format.type != "text")):
            raise invalid("tools: a reply that may call tools has its own format; drop response_format or "
                          "structured_outputs, or set tool_choice to none")
        return self

    @property
    def callable_tools(self) -> list[ToolDefinition]:
        """The tools this reply may call (tool_choice applied)."""
        return called_tools(self.tools or [], self.tool_choice)

    @property
    def calls_tools(self) -> bool:
        """Whether the reply is held to the tool-call format (tools given and tool_choice is not none)."""
        return bool(self.callable_tools)

    @property
    def _must_call(self) -> bool:
        """tool_choice required or named: the reply calls a tool, it cannot answer in words."""
        return self.tool_choice not in (None, "auto", "none")

    _logit_bias = field_validator("logit_bias")(check_logit_bias)

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        return check_stream_options(value, info.data.get("stream"))

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise invalid("only allowed when logprobs is true")
        return value

    def to_sampling_params(self, max_tokens_cap: int) -> SamplingParams:
        field = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        return sampling_params(self, max_tokens=self.max_completion_tokens or self.max_tokens,
                               max_tokens_field=field, default_max_tokens=max_tokens_cap,
                               max_tokens_cap=max_tokens_cap,
                               logprobs=(self.top_logprobs or 0) if self.logprobs else None,
                               output_format=self._tool_format() or output_format(self.response_format,
                                                                                  self.structured_outputs))

    def _tool_format(self) -> OutputFormat | None:
        tools = self.callable_tools
        if not tools:
            return None
        named = self._must_call and self.tool_choice != "required"  # OpenAI: the named function, called once
        return reply_format(tools, self._must_call, self.parallel_tool_calls is not False and not named)

    def template_messages(self) -> list[dict[str, str]]:
        """The conversation for the chat template: earlier tool calls and tool results in the JSON the model writes
        (as user turns, which every template renders), and, when the reply may call tools, their description in the
        system message."""
        names = {call.id: call.function.name for m in self.messages for call in m.tool_calls or []}
        out = []
        for m in self.messages:
            if m.tool_calls:
                out.append({"role": "assistant", "content": call_text([c.model_dump() for c in m.tool_calls])})
            elif m.role == "tool":
                out.append({"role": "user", "content": result_text(m.text, m.tool_call_id, names)})
            else:
                out.append(m.for_template())
        tools = self.callable_tools
        if tools:
            prompt = system_prompt(tools, self._must_call)
            if out[0]["role"] == "system":
                out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}"}
            else:
                out.insert(0, {"role": "system", "content": prompt})
        return out


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(ResponseModel):
    _omit_if_none: ClassVar[frozenset[str]] = frozenset({"tool_calls"})

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


FinishReason = Literal["stop", "length", "tool_calls"]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionResponse(ResponseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    famserve: FamserveInfo


class DeltaMessage(ResponseModel):
    """What a chunk adds: the role in a choice's first chunk, then content; empty ({}) in the last."""

    _omit_if_none: ClassVar[frozenset[str]] = frozenset({"role", "content", "tool_calls"})

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(ResponseModel):
    """One server-sent event of a streamed chat completion; the usage chunk has no choices."""

    _omit_if_none: ClassVar[frozenset[str]] = frozenset({"usage", "famserve"})

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    famserve: FamserveInfo | None = None
