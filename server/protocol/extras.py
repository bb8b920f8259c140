"""Bodies of the routes beyond completions and chat: /v1/models, and /tokenize and /detokenize (as vLLM has them)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

from .base import FamserveInfo, OpenAIBaseModel, TokenId, invalid
from .chat import ChatMessage


class ModelFamserveInfo(FamserveInfo):
    """famserve extension on a model card: the attention mode and the FAM adapter merged into the weights."""

    fam_adapter: str | None = Field(None, description="file name of the trained FAM adapter merged into the model "
                                                       "(--fam-adapter); null when none is loaded")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "famserve"
    famserve: ModelFamserveInfo


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(OpenAIBaseModel):
    """Either a prompt (tokenized as /v1/completions would) or messages (rendered with the chat template)."""

    model: str | None = Field(None, description="optional; when given, must be the served model")
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_generation_prompt: bool = Field(True, description="messages only: end with the assistant's turn opener")
    add_special_tokens: bool | None = Field(None, description="prompt only: add the tokenizer's special tokens "
                                                              "(such as BOS); default true")

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise invalid("give exactly one of prompt and messages")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int = Field(description="the most prompt tokens this server accepts in one prompt")
    tokens: list[int]


class DetokenizeRequest(OpenAIBaseModel):
    model: str | None = Field(None, description="optional; when given, must be the served model")
    tokens: list[TokenId]


class DetokenizeResponse(BaseModel):
    prompt: str
