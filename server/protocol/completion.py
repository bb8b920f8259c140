"""POST /v1/completions: the request, the response and the stream chunk, fields in the order of the OpenAI API
reference (legacy completions), famserve's vLLM-like extensions last."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator

from famserve.engine.sampling import MAX_LOGPROBS, SamplingParams

from .base import (FamserveInfo, IgnoreEos, MinP, N, OpenAIBaseModel, Penalty, RepetitionPenalty,
                   ResponseModel, Seed, StopSequences, StopTokenIds, StreamOptions, Temperature, TokenId, TopK, TopP,
                   Usage, User, check_logit_bias, check_stream_options, invalid, one_of, sampling_params,
                   unsupported)
from .structured import ResponseFormat, StructuredOutputs, output_format

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for legacy completions

Prompt = Annotated[
    str | list[str] | list[TokenId] | list[list[TokenId]],
    Field(description="a string, a list of strings, a list of token ids, or a list of lists of token ids "
                      "(each string or list is one prompt)"),
    one_of("a string, a list of strings, a list of token ids, or a list of lists of token ids"),
]


class CompletionRequest(OpenAIBaseModel):
    model: str = Field(description="the served model's name, as /v1/models lists it")
    prompt: Prompt
    best_of: int | None = Field(None, ge=1, description="only best_of = n (or unset) is supported")
    echo: bool | None = Field(None, description="prepend the prompt to each choice's text")
    frequency_penalty: Penalty = None
    logit_bias: dict[str, float] | None = Field(None, description="token id (as a string) -> bias in [-100, 100], "
                                                                  "added to the logits before sampling")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                 description="return the chosen token's logprob and this many most likely ones")
    max_tokens: int | None = Field(None, ge=1, description="new tokens at most; default 16")
    n: N = None
    presence_penalty: Penalty = None
    response_format: ResponseFormat | None = Field(None, description="extension (as on chat): json_object or "
                                                                     "json_schema output")
    seed: Seed = None
    stop: StopSequences = Field(None, description="up to 16 strings that end the text (not included in it)")
    stream: bool | None = Field(None, description="send the text as server-sent events as it is generated")
    stream_options: StreamOptions | None = None
    suffix: str | None = Field(None, description="not supported: must be absent or null")
    temperature: Temperature = None
    top_p: TopP = None
    user: User = None
    # --- extensions (vLLM)
    top_k: TopK = None
    min_p: MinP = None
    repetition_penalty: RepetitionPenalty = None
    stop_token_ids: StopTokenIds = None
    ignore_eos: IgnoreEos = None
    structured_outputs: StructuredOutputs | None = Field(None, description="extension: json, regex, choice or "
                                                                           "grammar the text must follow")

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, value: object) -> object:
        if isinstance(value, list) and (not value or any(isinstance(p, list) and not p for p in value)):
            raise invalid("must not be empty")
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and value != (info.data.get("n") or 1):
            raise unsupported("best_of other than n is not supported")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_prompt_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("echo"):
            raise unsupported("logprobs with echo (prompt logprobs) is not supported")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise unsupported("suffix (insertion) is not supported")
        return value

    _logit_bias = field_validator("logit_bias")(check_logit_bias)

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        return check_stream_options(value, info.data.get("stream"))

    def to_sampling_params(self, max_tokens_cap: int) -> SamplingParams:
        return sampling_params(self, max_tokens=self.max_tokens, max_tokens_field="max_tokens",
                               default_max_tokens=min(COMPLETIONS_DEFAULT_MAX_TOKENS, max_tokens_cap),
                               max_tokens_cap=max_tokens_cap, logprobs=self.logprobs,
                               output_format=output_format(self.response_format, self.structured_outputs))


class CompletionLogprobs(BaseModel):
    """The legacy logprobs format: parallel lists, one entry per generated token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(ResponseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    famserve: FamserveInfo


class CompletionChunk(ResponseModel):
    """One server-sent event of a streamed completion; the usage chunk has no choices."""

    _omit_if_none: ClassVar[frozenset[str]] = frozenset({"usage", "famserve"})

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    famserve: FamserveInfo | None = None
