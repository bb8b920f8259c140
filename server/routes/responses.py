"""POST /v1/responses: OpenAI's Responses API (text subset) on top of sessions: a response is a committed chat turn,
and previous_response_id continues the session that holds the conversation, so no history is re-sent. With
`stream: true` the answer is OpenAI's semantic event stream (response.created ... response.completed)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from fastapi import APIRouter, Depends, Request, Response
from sse_starlette.sse import EventSourceResponse

from famserve.server.errors import APIError, to_api_error
from famserve.server.generation import ChoiceDelta, Job
from famserve.server.protocol.responses import (ContentPartEvent, OutputItemEvent, OutputMessage, OutputText,
                                                OutputTextDeltaEvent, OutputTextDoneEvent, ResponseError,
                                                ResponseLifecycleEvent, ResponseObject, ResponsesRequest,
                                                ResponsesUsage, ResponseStatus, ResponseStreamEvent)
from famserve.server.protocol.sessions import SessionChatRequest
from famserve.server.protocol.structured import ResponseText
from famserve.server.session_turns import Answer, SessionTurns
from famserve.server.sessions import SessionNotFoundError
from famserve.server.store import SessionRecord
from famserve.server.streaming import PING_INTERVAL_S

from . import ERROR_RESPONSES
from .sessions import get_turns

log = logging.getLogger(__name__)
router = APIRouter(tags=["OpenAI"])
STREAM_RESPONSE = {"text/event-stream": {"schema": {"type": "string"}, "description": (
    "with stream=true: `event: <type>` and `data: {event}` per event, from response.created to response.completed "
    "(or response.incomplete, or response.failed after an error)")}}


def response_id(session_id: str, turn: int) -> str:
    return f"resp_{session_id.removeprefix('sess_')}_{turn}"


def parse_response_id(value: str) -> tuple[str, int]:
    token, _, turn = value.removeprefix("resp_").rpartition("_")
    if not value.startswith("resp_") or not token or not turn.isdigit():
        raise APIError(f"previous_response_id: {value!r} is not a response id of this server",
                       code="invalid_value", param="previous_response_id")
    return "sess_" + token, int(turn)


def previous_not_found(value: str) -> APIError:
    return APIError(f"Previous response with id {value!r} not found.", code="previous_response_not_found",
                    param="previous_response_id")


@router.post("/v1/responses", response_model=ResponseObject,
             responses={**ERROR_RESPONSES, 200: {"content": STREAM_RESPONSE},
                        409: {"description": "previous_response_id is not the latest response of its conversation"}})
async def create_response(body: ResponsesRequest, request: Request,
                          turns: SessionTurns = Depends(get_turns)) -> Response:
    """Generate a reply to `input`, continuing the conversation of previous_response_id when given."""
    turns.service.check_model(body.model)
    messages = body.messages()
    if body.previous_response_id is None:
        record, turn = await turns.manager.create(turns.owner, body.instructions, body.metadata), 0
    else:
        session_id, turn = parse_response_id(body.previous_response_id)
        try:
            record = turns.manager.get(turns.owner, session_id)
        except SessionNotFoundError:
            raise previous_not_found(body.previous_response_id) from None
        if body.instructions:
            messages = [{"role": "system", "content": body.instructions}, *messages]
    chat = SessionChatRequest(model=body.model, messages=messages, max_tokens=body.max_output_tokens,
                              temperature=body.temperature, top_p=body.top_p, stop=body.stop,
                              stream=body.stream,
                              response_format=body.text.format.response_format() if body.text else None)
    shape = ResponseShape(body, record, response_id(record.id, turn + 1), turns.service.model_name, turn)
    return await turns.chat(record.id, chat, request, Answer(whole=shape.whole, stream=shape.stream,
                                                             check=shape.check_latest))


@dataclass
class ResponseShape:
    """Turns one chat turn's generation into Responses API bodies and events."""

    body: ResponsesRequest
    record: SessionRecord
    id: str  # the id this response will have: its conversation's session and the turn it commits
    model: str
    turns_before: int  # turns the session must hold when this one starts (it continues the latest only)

    def check_latest(self, held: SessionRecord) -> None:
        previous = self.body.previous_response_id
        if previous is not None and held.turns < self.turns_before:
            raise previous_not_found(previous)
        if held.turns != self.turns_before:  # the state of an older turn is gone: it was continued in place
            raise APIError(f"previous_response_id: {previous} is not the latest response of its conversation; "
                           "only the latest can be continued", code="response_not_latest",
                           param="previous_response_id", status_code=409)

    def response(self, job: Job, status: ResponseStatus, output: list[OutputMessage],
                 error: ResponseError | None = None) -> ResponseObject:
        body, finished = self.body, status in ("completed", "incomplete")
        usage = job.final_usage()
        return ResponseObject(
            id=self.id, created_at=job.created, model=self.model, status=status, error=error,
            incomplete_details={"reason": "max_output_tokens"} if status == "incomplete" else None,
            instructions=body.instructions, max_output_tokens=body.max_output_tokens,
            previous_response_id=body.previous_response_id, temperature=body.temperature, top_p=body.top_p,
            metadata=self.record.metadata, session_id=self.record.id, output=output,
            text=(body.text or ResponseText()).model_dump(mode="json", by_alias=True, exclude_none=True),
            usage=ResponsesUsage(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens,
                                 total_tokens=usage.total_tokens) if finished else None)

    def whole(self, job: Job, choices: list[ChoiceDelta]) -> ResponseObject:
        choice = choices[0]
        status = _status(choice.finish_reason)
        message = OutputMessage(id=_message_id(job), status=status, content=[OutputText(text=choice.text)])
        return self.response(job, status, [message])

    def stream(self, job: Job, deltas: AsyncIterator[ChoiceDelta]) -> Response:
        return EventSourceResponse(self._frames(job, self.events(job, deltas)), sep="\n", ping=PING_INTERVAL_S,
                                   headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def events(self, job: Job, deltas: AsyncIterator[ChoiceDelta]) -> AsyncIterator[ResponseStreamEvent]:
        item_id = _message_id(job)
        yield ResponseLifecycleEvent(type="response.created", response=self.response(job, "in_progress", []))
        yield ResponseLifecycleEvent(type="response.in_progress", response=self.response(job, "in_progress", []))
        yield OutputItemEvent(type="response.output_item.added",
                              item=OutputMessage(id=item_id, status="in_progress", content=[]))
        yield ContentPartEvent(type="response.content_part.added", item_id=item_id, part=OutputText(text=""))
        text, finish_reason = "", None
        async with aclosing(deltas) as pieces:
            async for delta in pieces:  # the turn is committed, and the session released, when these end
                if delta.text:
                    text += delta.text
                    yield OutputTextDeltaEvent(item_id=item_id, delta=delta.text)
                finish_reason = delta.finish_reason or finish_reason
        status = _status(finish_reason)
        part = OutputText(text=text)
        message = OutputMessage(id=item_id, status=status, content=[part])
        yield OutputTextDoneEvent(item_id=item_id, text=text)
        yield ContentPartEvent(type="response.content_part.done", item_id=item_id, part=part)
        yield OutputItemEvent(type="response.output_item.done", item=message)
        yield ResponseLifecycleEvent(type=f"response.{status}", response=self.response(job, status, [message]))

    async def _frames(self, job: Job, events: AsyncIterator[ResponseStreamEvent]) -> AsyncIterator[dict]:
        """Numbered `event:`/`data:` frames. An error once the stream has begun ends it with response.failed (the
        turn is not committed)."""
        sequence_number = 0
        try:
            async with aclosing(events) as stream:
                async for event in stream:
                    event.sequence_number = sequence_number
                    sequence_number += 1
                    yield {"event": event.type, "data": event.model_dump_json()}
        except Exception as exc:  # CancelledError (a disconnect) passes
            error = to_api_error(exc)
            if not isinstance(exc, APIError) and error.status_code >= 500:
                log.exception("response stream failed")
            failed = ResponseLifecycleEvent(type="response.failed", sequence_number=sequence_number,
                                            response=self.response(job, "failed", [], ResponseError(
                                                code=error.code or "server_error", message=error.message)))
            yield {"event": failed.type, "data": failed.model_dump_json()}


def _status(finish_reason: str | None) -> ResponseStatus:
    return "incomplete" if finish_reason == "length" else "completed"


def _message_id(job: Job) -> str:
    return f"msg_{job.id.removeprefix('chatcmpl-')}"
