"""POST /v1/completions: legacy text completions, plain or streamed."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from famserve.server.generation import ChoiceDelta, GenerationService, Job, TokenInfo
from famserve.server.protocol import (CompletionChoice, CompletionChunk, CompletionLogprobs, CompletionRequest,
                                      CompletionResponse, FamserveInfo)
from famserve.server.streaming import cancel_on_disconnect, sse_response, start_stream

from . import ERROR_RESPONSES, SSE_RESPONSE, Service

router = APIRouter(tags=["OpenAI"])


@router.post("/v1/completions", response_model=CompletionResponse,
             responses={**ERROR_RESPONSES, 200: {"content": SSE_RESPONSE}})
async def create_completion(body: CompletionRequest, request: Request,
                            service: Service) -> Response:
    """Complete one or more prompts (OpenAI's legacy completions API)."""
    job = await service.completion_job(body)
    if body.stream:
        deltas = await start_stream(request, service.stream(job))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse_response(_chunks(job, service, deltas, include_usage))
    choices = await cancel_on_disconnect(request, service.collect(job))
    response = CompletionResponse(
        id=job.id, created=job.created, model=service.model_name, usage=job.final_usage(),
        choices=[_choice(job, c, _echo(job, c.index), len(_echo(job, c.index))) for c in choices],
        famserve=FamserveInfo(mode=service.mode))
    return JSONResponse(response.model_dump(mode="json"))


async def _chunks(job: Job, service: GenerationService, deltas: AsyncIterator[ChoiceDelta],
                  include_usage: bool) -> AsyncIterator[CompletionChunk]:
    base = {"id": job.id, "created": job.created, "model": service.model_name}
    famserve: FamserveInfo | None = FamserveInfo(mode=service.mode)  # on the first chunk only
    echoed = [False] * job.num_choices
    text_offsets = [0] * job.num_choices  # where each choice's next token starts in its text (legacy logprobs)
    async for delta in deltas:
        i = delta.index
        prefix = "" if echoed[i] else _echo(job, i)
        echoed[i] = True
        text_offsets[i] += len(prefix)
        choice = _choice(job, delta, prefix, text_offsets[i])
        text_offsets[i] += sum(len(token.text) for token in delta.tokens)
        yield CompletionChunk(**base, choices=[choice], famserve=famserve)
        famserve = None
    if include_usage:
        yield CompletionChunk(**base, choices=[], usage=job.final_usage())


def _echo(job: Job, index: int) -> str:
    return job.echo[index // job.n] if job.echo else ""


def _choice(job: Job, delta: ChoiceDelta, prefix: str, text_offset: int) -> CompletionChoice:
    """A choice of `delta`'s text after `prefix` (the echoed prompt); its first token starts at text_offset."""
    logprobs = None
    if job.params.logprobs is not None:
        logprobs = _legacy_logprobs(delta.tokens, text_offset)
    return CompletionChoice(index=delta.index, text=prefix + delta.text, logprobs=logprobs,
                            finish_reason=delta.finish_reason)


def _legacy_logprobs(tokens: list[TokenInfo], text_offset: int) -> CompletionLogprobs:
    logprobs = CompletionLogprobs()
    for token in tokens:
        logprobs.tokens.append(token.text)
        logprobs.token_logprobs.append(token.logprob)
        top: dict[str, float] = {}
        for text, logprob in token.top:  # most likely first; tokens that decode alike keep the best logprob
            top.setdefault(text, logprob)
        logprobs.top_logprobs.append(top)
        logprobs.text_offset.append(text_offset)
        text_offset += len(token.text)
    return logprobs
