"""POST /v1/chat/completions: messages, the request, the response and the stream chunk, fields in the order of the
OpenAI API reference, famserve's vLLM-like extensions last. Tool calling and images are refused with a clear 400
rather than silently ignored."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, Discriminator, Field, Tag, ValidationInfo, field_validator

from famserve.engine.sampling import MAX_LOGPROBS, SamplingParams

from .base import (FamserveInfo, IgnoreEos, MinP, N, OpenAIBaseModel, Penalty, RepetitionPenalty,
                   ResponseModel, Seed, StopSequences, StopTokenIds, StreamOptions, Temperature, TopK, TopP, Usage,
                   User, check_logit_bias, check_stream_options, invalid, sampling_params, unsupported)
from .structured import ResponseFormat, StructuredOutputs, output_format

NO_TOOLS = "tool calling is not supported by this server"


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
    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="developer is treated as system; tool messages are not supported")
    content: MessageContent | None = Field(None, description="a string or a list of text parts")
    name: str | None = Field(None, description="accepted and ignored")
    tool_calls: list[dict[str, Any]] | None = Field(None, description="not supported: must be absent or empty")

    @field_validator("role", mode="before")
    @classmethod
    def _no_tool_role(cls, value: Any) -> Any:
        if value in ("tool", "function"):
            raise unsupported(f"{value} messages are not supported: {NO_TOOLS}")
        return value

    @field_validator("tool_calls")
    @classmethod
    def _no_tool_calls(cls, value: list | None) -> list | None:
        if value:
            raise unsupported(NO_TOOLS)
        return value

    def for_template(self) -> dict[str, str]:
        """The message as a chat template expects it: plain text content, developer as system."""
        text = "".join(p.text for p in self.content) if isinstance(self.content, list) else self.content or ""
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(OpenAIBaseModel):
    messages: list[ChatMessage] = Field(min_length=1, description="the conversation so far")
    model: str = Field(description="the served model's name, as /v1/models lists it")
    frequency_penalty: Penalty = None
    function_call: Any = Field(None, description="not supported: must be absent, null or 'none'")
    functions: list[dict[str, Any]] | None = Field(None, description="not supported: must be absent or empty")
    logit_bias: dict[str, float] | None = Field(None, description="token id (as a string) -> bias in [-100, 100], "
                                                                  "added to the logits before sampling")
    logprobs: bool | None = Field(None, description="return the logprob of each generated token")
    max_completion_tokens: int | None = Field(None, ge=1, description="new tokens at most (wins over max_tokens); "
                                                                      "default: the server's max_tokens_cap")
    max_tokens: int | None = Field(None, ge=1, description="deprecated name of max_completion_tokens")
    n: N = None
    presence_penalty: Penalty = None
    response_format: ResponseFormat | None = None
    seed: Seed = None
    stop: StopSequences = Field(None, description="up to 16 strings that end the text (not included in it)")
    stream: bool | None = Field(None, description="send the reply as server-sent events as it is generated")
    stream_options: StreamOptions | None = None
    temperature: Temperature = None
    tool_choice: Any = Field(None, description="not supported: must be absent, null, 'none' or 'auto'")
    tools: list[dict[str, Any]] | None = Field(None, description="not supported: must be absent or empty")
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

    @field_validator("functions", "tools")
    @classmethod
    def _no_tools(cls, value: list | None) -> list | None:
        if value:
            raise unsupported(NO_TOOLS)
        return value

    @field_validator("function_call", "tool_choice")
    @classmethod
    def _no_tool_choice(cls, value: Any) -> Any:
        if value not in (None, "none", "auto"):
            raise unsupported(NO_TOOLS)
        return value

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
                               output_format=output_format(self.response_format, self.structured_outputs))

    def template_messages(self) -> list[dict[str, str]]:
        return [message.for_template() for message in self.messages]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


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

    _omit_if_none: ClassVar[frozenset[str]] = frozenset({"role", "content"})

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


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
