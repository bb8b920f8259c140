"""POST /v1/responses: a text-only subset of OpenAI's Responses API. A conversation is a famserve session, so
`previous_response_id` continues the server-side state instead of re-sending the history."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from .base import OpenAIBaseModel, ResponseModel, StopSequences, Temperature, TopP, invalid, unsupported
from .chat import ChatMessage
from .structured import ResponseText


class ResponsesRequest(OpenAIBaseModel):
    model: str = Field(description="the served model's name")
    input: str | list[ChatMessage] = Field(description="text, or a list of messages (text content only)")
    instructions: str | None = Field(None, description="a system message for a new conversation")
    max_output_tokens: int | None = Field(None, ge=1)
    metadata: dict[str, str] | None = None
    previous_response_id: str | None = Field(None, description="continue the conversation that response ended")
    store: bool | None = Field(None, description="responses are always stored (they are session turns)")
    stream: bool | None = Field(None, description="send the response as server-sent events as it is generated")
    temperature: Temperature = None
    text: ResponseText | None = Field(None, description="text.format: text, json_object or json_schema output")
    tools: list[dict[str, Any]] | None = Field(None, description="not supported: must be absent or empty")
    top_p: TopP = None
    user: str | None = None
    # --- extension (famserve, as in chat completions)
    stop: StopSequences = Field(None, description="famserve: up to 16 strings that end the text (not included in "
                                                  "it); the response is then completed")

    @field_validator("input")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        if not value:
            raise invalid("must not be empty")
        if isinstance(value, list) and any(m.role == "tool" or m.tool_calls for m in value):
            raise unsupported("tool calls and tool messages are not supported in the Responses API")
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
    logprobs: list = Field(default_factory=list)


class OutputMessage(ResponseModel):
    type: Literal["message"] = "message"
    id: str
    status: Literal["in_progress", "completed", "incomplete"] = "completed"
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class ResponsesUsage(ResponseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: dict[str, int] = Field(default_factory=lambda: {"cached_tokens": 0})
    output_tokens_details: dict[str, int] = Field(default_factory=lambda: {"reasoning_tokens": 0})


class ResponseError(ResponseModel):
    code: str
    message: str


ResponseStatus = Literal["in_progress", "completed", "incomplete", "failed"]


class ResponseObject(ResponseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: ResponseStatus
    error: ResponseError | None = None
    incomplete_details: dict[str, str] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[OutputMessage]
    parallel_tool_calls: bool = False
    previous_response_id: str | None = None
    temperature: float | None = None
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}},
                                 description="the request's text options, as given")
    top_p: float | None = None
    tool_choice: str = "none"
    tools: list = Field(default_factory=list)
    truncation: str = "disabled"
    store: bool = True
    metadata: dict[str, str] = Field(default_factory=dict)
    usage: ResponsesUsage | None = Field(None, description="null until the response has finished")
    session_id: str = Field(description="famserve: the session holding this conversation")


# --- streaming: `event: <type>` + `data: <event>` per event; sequence_number counts from 0 over one response

class ResponseStreamEvent(ResponseModel):
    type: str
    sequence_number: int = Field(0, description="set as the event is sent")


class ResponseLifecycleEvent(ResponseStreamEvent):
    """The response as it stands: created and in_progress first, then one of completed, incomplete or failed."""

    type: Literal["response.created", "response.in_progress", "response.completed", "response.incomplete",
                  "response.failed"]
    response: ResponseObject


class OutputItemEvent(ResponseStreamEvent):
    type: Literal["response.output_item.added", "response.output_item.done"]
    output_index: int = 0
    item: OutputMessage


class ContentPartEvent(ResponseStreamEvent):
    type: Literal["response.content_part.added", "response.content_part.done"]
    item_id: str
    output_index: int = 0
    content_index: int = 0
    part: OutputText


class _OutputTextEvent(ResponseStreamEvent):
    """Fields every output-text event carries: where the text goes, and (empty) logprobs."""

    item_id: str
    output_index: int = 0
    content_index: int = 0
    logprobs: list = Field(default_factory=list)


class OutputTextDeltaEvent(_OutputTextEvent):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    delta: str


class OutputTextDoneEvent(_OutputTextEvent):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    text: str
