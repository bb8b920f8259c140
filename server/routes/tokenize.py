"""POST /tokenize and /detokenize, with vLLM's bodies: see what the server makes of a prompt or a chat."""

from __future__ import annotations

from fastapi import APIRouter

from famserve.server.protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse

from . import ERROR_RESPONSES, Service

router = APIRouter(tags=["famserve"])


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERROR_RESPONSES)
async def tokenize(body: TokenizeRequest, service: Service) -> TokenizeResponse:
    """Token ids of a prompt (as /v1/completions encodes it) or of messages (as /v1/chat/completions renders them)."""
    service.check_model(body.model)
    messages = None if body.messages is None else [m.for_template() for m in body.messages]
    tokens = await service.tokenize(body.prompt, messages, body.add_special_tokens, body.add_generation_prompt)
    return TokenizeResponse(count=len(tokens), max_model_len=service.settings.max_prompt_tokens, tokens=tokens)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERROR_RESPONSES)
async def detokenize(body: DetokenizeRequest,
                     service: Service) -> DetokenizeResponse:
    """The text of token ids (special tokens included)."""
    service.check_model(body.model)
    return DetokenizeResponse(prompt=service.detokenize(body.tokens))
