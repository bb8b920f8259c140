"""POST /v1/responses: a text-only subset of OpenAI's Responses API. A conversation is a famserve session, so
`previous_response_id` continues the server-side state instead of re-sending the history."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from .base import OpenAIBaseModel, ResponseModel, Temperature, TopP, invalid, unsupported
from .chat import ChatMessage


class ResponsesRequest(OpenAIBaseModel):
    model: str = Field(description="the served model's name")
    input: str | list[ChatMessage] = Field(description="text, or a list of messages (text content only)")
    instructions: str | None = Field(None, description="a system message for a new conversation")
    max_output_tokens: int | None = Field(None, ge=1)
    metadata: dict[str, str] | None = None
    previous_response_id: str | None = Field(None, description="continue the conversation that response ended")
    store: bool | None = Field(None, description="responses are always stored (they are session turns)")
    stream: bool | None = Field(None, description="not supported: must be absent or false")
    temperature: Temperature = None
    tools: list[dict[str, Any]] | None = Field(None, description="not supported: must be absent or empty")
    top_p: TopP = None
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        if not value:
            raise invalid("must not be empty")
        return value

    @field_validator("stream")
    @classmethod
    def _no_stream(cls, value: bool | None) -> bool | None:
        if value:
            raise unsupported("streaming responses are not supported yet; use /v1/chat/completions with stream")
        return value

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, value: list | None) -> list | None:
        if value:
            raise unsupported("tools are not supported by this server")
        return value

    def messages(self) -> list[dict[str, str]]:
        if isinstance(self.input, str):
            return [{"role": "user", "content": self.input}]
        return [m.for_template() for m in self.input]


class OutputText(ResponseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list = Field(default_factory=list)


class OutputMessage(ResponseModel):
    type: Literal["message"] = "message"
    id: str
    status: Literal["completed", "incomplete"] = "completed"
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class ResponsesUsage(ResponseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: dict[str, int] = Field(default_factory=lambda: {"cached_tokens": 0})
    output_tokens_details: dict[str, int] = Field(default_factory=lambda: {"reasoning_tokens": 0})


class ResponseObject(ResponseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["completed", "incomplete"]
    error: None = None
    incomplete_details: dict[str, str] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[OutputMessage]
    parallel_tool_calls: bool = False
    previous_response_id: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    tool_choice: str = "none"
    tools: list = Field(default_factory=list)
    truncation: str = "disabled"
    store: bool = True
    metadata: dict[str, str] = Field(default_factory=dict)
    usage: ResponsesUsage
    session_id: str = Field(description="famserve: the session holding this conversation")
