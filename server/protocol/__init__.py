"""The OpenAI wire protocol as pydantic models (requests validate and convert to engine types with
to_sampling_params; responses serialize exactly as OpenAI's), plus famserve's own small bodies."""

from .base import ErrorResponse, FamserveInfo, HealthResponse, ReadyResponse, Usage
from .chat import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                   ChatCompletionResponse, ChoiceLogprobs, DeltaMessage, TokenLogprob, TopLogprob)
from .completion import CompletionChoice, CompletionChunk, CompletionLogprobs, CompletionRequest, CompletionResponse
from .extras import (DetokenizeRequest, DetokenizeResponse, ModelCard, ModelList, TokenizeRequest,
                     TokenizeResponse)

__all__ = [
    "AssistantMessage", "ChatChoice", "ChatChunkChoice", "ChatCompletionChunk", "ChatCompletionRequest",
    "ChatCompletionResponse", "ChoiceLogprobs", "CompletionChoice", "CompletionChunk", "CompletionLogprobs",
    "CompletionRequest", "CompletionResponse", "DeltaMessage", "DetokenizeRequest", "DetokenizeResponse",
    "ErrorResponse", "FamserveInfo", "HealthResponse", "ModelCard", "ModelList", "ReadyResponse", "TokenLogprob",
    "TokenizeRequest", "TokenizeResponse", "TopLogprob", "Usage",
]
