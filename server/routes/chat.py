"""POST /v1/chat/completions: chat completions, plain or streamed."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from famserve.server.generation import ChoiceDelta, GenerationService, Job, TokenInfo
from famserve.server.protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk,
                                      ChatCompletionRequest, ChatCompletionResponse, ChoiceLogprobs, DeltaMessage,
                                      FamserveInfo, TokenLogprob, TopLogprob)
from famserve.server.protocol.sessions import SessionChatRequest
from famserve.server.protocol.tools import ToolCallDelta, read_reply
from famserve.server.streaming import cancel_on_disconnect, sse_response, start_stream

from . import ERROR_RESPONSES, SSE_RESPONSE, Service
from .sessions import get_turns

router = APIRouter(tags=["OpenAI"])


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
             responses={**ERROR_RESPONSES, 200: {"content": SSE_RESPONSE}})
async def create_chat_completion(body: ChatCompletionRequest, request: Request,
                                 service: Service) -> Response:
    """Answer a conversation with the model's chat template (OpenAI's chat completions API)."""
    if body.session_id is not None:  # famserve extension: the turn goes into a session
        turn = SessionChatRequest.model_validate(body.model_dump(exclude={"session_id"}, exclude_none=True))
        return await get_turns(request, service).chat(body.session_id, turn, request)
    job = await service.chat_job(body)
    if body.stream:
        deltas = await start_stream(request, service.stream(job))
        if body.calls_tools:  # a reply is known to be a tool call or an answer only once it is whole
            deltas = _whole_replies(deltas)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse_response(_chunks(job, service, deltas, include_usage, body.calls_tools))
    choices = await cancel_on_disconnect(request, service.collect(job))
    response = ChatCompletionResponse(
        id=job.id, created=job.created, model=service.model_name, usage=job.final_usage(),
        choices=[_choice(c, body.calls_tools, _logprobs(job, c)) for c in choices],
        famserve=FamserveInfo(mode=service.mode))
    return JSONResponse(response.model_dump(mode="json"))


def _choice(choice: ChoiceDelta, calls_tools: bool, logprobs: ChoiceLogprobs | None) -> ChatChoice:
    if not calls_tools:
        return ChatChoice(index=choice.index, message=AssistantMessage(content=choice.text), logprobs=logprobs,
                          finish_reason=choice.finish_reason)
    content, calls = read_reply(choice.text)
    return ChatChoice(index=choice.index, message=AssistantMessage(content=content, tool_calls=calls),
                      logprobs=logprobs, finish_reason="tool_calls" if calls else choice.finish_reason)


async def _whole_replies(deltas: AsyncIterator[ChoiceDelta]) -> AsyncIterator[ChoiceDelta]:
    """Each choice's deltas joined into one, sent when the choice finishes."""
    pending: dict[int, ChoiceDelta] = {}
    async for delta in deltas:
        whole = pending.setdefault(delta.index, ChoiceDelta(delta.index))
        whole.text += delta.text
        whole.tokens += delta.tokens
        if delta.finish_reason is not None:
            whole.finish_reason = delta.finish_reason
            yield pending.pop(delta.index)


async def _chunks(job: Job, service: GenerationService, deltas: AsyncIterator[ChoiceDelta],
                  include_usage: bool, calls_tools: bool = False) -> AsyncIterator[ChatCompletionChunk]:
    base = {"id": job.id, "created": job.created, "model": service.model_name}
    famserve: FamserveInfo | None = FamserveInfo(mode=service.mode)  # on the first chunk only
    for i in range(job.num_choices):  # each choice opens with the role, as OpenAI's streams do
        yield ChatCompletionChunk(**base, choices=[ChatChunkChoice(
            index=i, delta=DeltaMessage(role="assistant", content=""))], famserve=famserve)
        famserve = None
    async for delta in deltas:
        if calls_tools:  # one whole reply: its content or its calls, then the finish
            choice = _choice(delta, True, _logprobs(job, delta))
            calls = [ToolCallDelta(index=i, id=c.id, function=c.function)
                     for i, c in enumerate(choice.message.tool_calls or [])]
            yield ChatCompletionChunk(**base, choices=[ChatChunkChoice(
                index=delta.index, delta=DeltaMessage(content=choice.message.content, tool_calls=calls or None),
                logprobs=choice.logprobs)])
            yield ChatCompletionChunk(**base, choices=[ChatChunkChoice(
                index=delta.index, delta=DeltaMessage(), finish_reason=choice.finish_reason)])
            continue
        content = delta.text if delta.text or delta.finish_reason is None else None  # the last delta may be {}
        yield ChatCompletionChunk(**base, choices=[ChatChunkChoice(
            index=delta.index, delta=DeltaMessage(content=content), logprobs=_logprobs(job, delta),
            finish_reason=delta.finish_reason)])
    if include_usage:
        yield ChatCompletionChunk(**base, choices=[], usage=job.final_usage())


def _logprobs(job: Job, delta: ChoiceDelta) -> ChoiceLogprobs | None:
    if job.params.logprobs is None:
        return None
    return ChoiceLogprobs(content=[_token_logprob(t) for t in delta.tokens])


def _token_logprob(token: TokenInfo) -> TokenLogprob:
    return TokenLogprob(token=token.text, logprob=token.logprob, bytes=list(token.text.encode()),
                        top_logprobs=[TopLogprob(token=text, logprob=lp, bytes=list(text.encode()))
                                      for text, lp in token.top])
