"""Wire models of famserve's session API (an extension: persistent FAM streams that are appended to, chatted in,
forked, exported and imported)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from .base import OpenAIBaseModel, ResponseModel, TokenId, invalid
from .chat import ChatCompletionRequest
from .completion import CompletionRequest


class SessionCreateRequest(OpenAIBaseModel):
    system_prompt: str | None = Field(None, description="consumed at once through the chat template's system turn")
    metadata: dict[str, str] | None = Field(None, description="up to 16 string pairs kept with the session")

    @field_validator("metadata")
    @classmethod
    def _small_metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value and (len(value) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in value.items())):
            raise invalid("at most 16 pairs, keys up to 64 and values up to 512 characters")
        return value


class FamSettings(ResponseModel):
    mode: str
    block_size: int
    memory_blocks: int
    fam_length: int
    sink_tokens: int
    fam_after_window: bool = False  # fam mode: tokens read the FAM only once a block has left the window


class SessionInfo(ResponseModel):
    id: str
    object: Literal["session"] = "session"
    model: str
    created_at: int
    last_used_at: int
    tokens_processed: int = Field(description="tokens the stream has consumed, ever")
    state_bytes: int = Field(description="size of the session's state; it does not grow with tokens_processed")
    blocks: int = Field(description="complete blocks consumed")
    turns: int = Field(description="chat turns completed in this session")
    metadata: dict[str, str]
    fam: FamSettings


class SessionList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[SessionInfo]
    first_id: str | None
    last_id: str | None
    has_more: bool


class SessionDeleted(ResponseModel):
    id: str
    object: Literal["session.deleted"] = "session.deleted"
    deleted: bool = True


class AppendRequest(OpenAIBaseModel):
    """JSON form of an append; a text/plain body is the streaming form for large inputs."""

    text: str | None = Field(None, description="text to consume (tokenized without special tokens)")
    token_ids: list[TokenId] | None = Field(None, description="token ids to consume")
    stream: bool | None = Field(None, description="send progress as server-sent events")

    @field_validator("token_ids")
    @classmethod
    def _one_input(cls, value: list[int] | None, info) -> list[int] | None:
        if value is not None and info.data.get("text") is not None:
            raise invalid("give text or token_ids, not both")
        return value


class AppendResponse(ResponseModel):
    object: Literal["session.append"] = "session.append"
    tokens_appended: int
    session: SessionInfo


class SessionCompletionRequest(CompletionRequest):
    """A completion that continues the session's stream (the prompt is consumed after what the session holds)."""

    model: str | None = Field(None, description="optional; must name the served model when given")
    commit: bool = Field(True, description="keep the prompt and the generated tokens in the session; false runs on "
                                           "a throw-away fork and leaves the session as it was")


class SessionChatRequest(ChatCompletionRequest):
    """The new messages of a chat turn; the session already holds the earlier ones. The reply is committed."""

    model: str | None = Field(None, description="optional; must name the served model when given")
