"""Pieces shared by the OpenAI wire models: the request base (accepts and logs unknown fields), the response base
(omits some fields when empty, as OpenAI does), usage, errors, and the validators behind readable 400s."""

from __future__ import annotations

import logging
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WrapValidator, model_validator, \
    model_serializer
from pydantic_core import PydanticCustomError

from famserve.engine.sampling import MAX_LOGIT_BIAS, SamplingParams
from famserve.engine.structured import OutputFormat

log = logging.getLogger(__name__)

MAX_STOP_SEQUENCES = 16  # OpenAI documents 4; clients such as LangChain sometimes send more
MAX_N = 128  # OpenAI's cap on n


class OpenAIBaseModel(BaseModel):
    """Base of every request body. Unknown fields are accepted (clients send newer OpenAI fields) and their names,
    never their values, are logged."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    @model_validator(mode="wrap")
    @classmethod
    def _log_unknown_fields(cls, data: Any, handler: Any) -> Any:
        result = handler(data)
        if result.model_extra:
            log.info("%s: ignoring unknown fields %s", cls.__name__, ", ".join(sorted(result.model_extra)))
        return result


class ResponseModel(BaseModel):
    """Base of every response body; fields named in _omit_if_none are left out when None (OpenAI's `usage` in a
    stream chunk, an empty delta's `role`), the others are always present, null or not."""

    _omit_if_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit_empty(self, handler: Any) -> Any:
        data = handler(self)
        for name in self._omit_if_none:
            if data.get(name) is None:
                data.pop(name, None)
        return data


def unsupported(message: str) -> PydanticCustomError:
    """A validation error answered as 400 with code "unsupported_parameter"."""
    return PydanticCustomError("unsupported_parameter", message)


def invalid(message: str) -> PydanticCustomError:
    """A validation error answered as 400 with code "invalid_value"."""
    return PydanticCustomError("invalid_value", message)


def one_of(description: str) -> WrapValidator:
    """Replaces pydantic's one-error-per-union-branch report with one readable message."""

    def validate(value: Any, handler: Any) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("invalid_type", "must be {description}", {"description": description}) from None

    return WrapValidator(validate)


TokenId = Annotated[int, Field(ge=0)]
# OpenAI's rule for the names of functions and of JSON schemas: a-z, A-Z, 0-9, underscores and dashes, at most 64.
OpenAIName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
StopSequences = Annotated[
    str | Annotated[list[str], Field(max_length=MAX_STOP_SEQUENCES)] | None,
    one_of(f"a string or a list of at most {MAX_STOP_SEQUENCES} strings"),
]


# Sampling fields both request kinds share, with OpenAI's documented ranges (the extensions follow vLLM).
Temperature = Annotated[float | None, Field(ge=0, le=2, description="0 = greedy; default 1")]
TopP = Annotated[float | None, Field(gt=0, le=1, description="nucleus sampling mass; default 1 (off)")]
Penalty = Annotated[float | None, Field(ge=-2, le=2, description="default 0")]
Seed = Annotated[int | None, Field(description="same seed, same tokens; choice i of n uses seed + i")]
N = Annotated[int | None, Field(ge=1, le=MAX_N, description="choices to generate for each prompt; default 1")]
User = Annotated[str | None, Field(description="an end-user id; accepted and ignored")]
TopK = Annotated[int | None, Field(ge=-1, description="extension: keep the k most likely tokens; 0 or -1 = off")]
MinP = Annotated[float | None, Field(ge=0, le=1, description="extension: drop tokens less likely than min_p times "
                                                             "the most likely one; 0 = off")]
RepetitionPenalty = Annotated[float | None, Field(gt=0, description="extension: > 1 discourages tokens of the prompt "
                                                                    "and output (HF/vLLM); 1 = off")]
StopTokenIds = Annotated[list[TokenId] | None, Field(description="extension: token ids that end generation, "
                                                                  "like an EOS (not included in the text)")]
IgnoreEos = Annotated[bool | None, Field(description="extension: keep generating past the model's EOS tokens")]


class StreamOptions(OpenAIBaseModel):
    include_usage: bool | None = Field(
        None, description="send a last chunk, before [DONE], whose `usage` covers the whole request")


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class FamserveInfo(BaseModel):
    """famserve extension on responses: how the model attends, e.g. "bswa (L=1024 M=3 S=4)"."""

    mode: str


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyResponse(BaseModel):
    status: Literal["ready"] = "ready"
    model: str
    famserve: FamserveInfo


def check_stream_options(value: StreamOptions | None, stream: bool | None) -> StreamOptions | None:
    if value is not None and not stream:
        raise invalid("only allowed when stream is true")
    return value


def check_logit_bias(value: dict[str, float] | None) -> dict[str, float] | None:
    """OpenAI's map of token ids (as strings: JSON keys) to biases in [-100, 100]; whether an id is in the
    vocabulary is the engine's check."""
    for key, bias in (value or {}).items():
        if not (key.isascii() and key.isdigit()):
            raise invalid(f"keys must be token ids (non-negative integers as strings), got {key!r}")
        if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
            raise invalid(f"biases must be in [-100, 100], got {bias} for token {key}")
    return value


def sampling_params(request: Any, *, max_tokens: int | None, max_tokens_field: str, default_max_tokens: int,
                    max_tokens_cap: int, logprobs: int | None, output_format: OutputFormat | None) -> SamplingParams:
    """The engine's SamplingParams from the sampling fields both request kinds share; ValueError("field: ...") for
    a value the engine refuses (the server answers 400 naming the field)."""
    max_tokens = default_max_tokens if max_tokens is None else max_tokens
    if max_tokens > max_tokens_cap:
        raise ValueError(f"{max_tokens_field}: {max_tokens} is more than this server allows ({max_tokens_cap})")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=_default(request.temperature, 1.0),
        top_p=_default(request.top_p, 1.0),
        top_k=_default(request.top_k, 0),
        min_p=_default(request.min_p, 0.0),
        repetition_penalty=_default(request.repetition_penalty, 1.0),
        presence_penalty=_default(request.presence_penalty, 0.0),
        frequency_penalty=_default(request.frequency_penalty, 0.0),
        seed=request.seed,
        stop_token_ids=tuple(request.stop_token_ids or ()),
        ignore_eos=bool(request.ignore_eos),
        logprobs=logprobs,
        logit_bias=tuple((int(key), float(bias)) for key, bias in (request.logit_bias or {}).items()),
        output_format=output_format,
    )


def _default(value: Any, default: Any) -> Any:
    return default if value is None else value
