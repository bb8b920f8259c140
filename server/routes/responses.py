"""POST /v1/responses: OpenAI's Responses API (text subset) on top of sessions: a response is a committed chat turn,
and previous_response_id continues the session that holds the conversation, so no history is re-sent."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from famserve.server.errors import APIError
from famserve.server.protocol.responses import (OutputMessage, OutputText, ResponseObject, ResponsesRequest,
                                                ResponsesUsage)
from famserve.server.protocol.sessions import SessionChatRequest
from famserve.server.session_turns import SessionTurns

from . import ERROR_RESPONSES
from .sessions import get_turns

router = APIRouter(tags=["OpenAI"])


def response_id(session_id: str, turn: int) -> str:
    return f"resp_{session_id.removeprefix('sess_')}_{turn}"


def parse_response_id(value: str) -> tuple[str, int]:
    token, _, turn = value.removeprefix("resp_").rpartition("_")
    if not value.startswith("resp_") or not token or not turn.isdigit():
        raise APIError(f"previous_response_id: {value!r} is not a response id of this server",
                       code="invalid_value", param="previous_response_id")
    return "sess_" + token, int(turn)


@router.post("/v1/responses", response_model=ResponseObject,
             responses={**ERROR_RESPONSES, 409: {"description": "previous_response_id is not the latest turn"}})
async def create_response(body: ResponsesRequest, request: Request,
                          turns: SessionTurns = Depends(get_turns)) -> Response:
    """Generate a reply to `input`, continuing the conversation of previous_response_id when given."""
    turns.service.check_model(body.model)
    messages = body.messages()
    if body.previous_response_id is None:
        record = await turns.manager.create(turns.owner, body.instructions, body.metadata)
    else:
        session_id, turn = parse_response_id(body.previous_response_id)
        record = turns.manager.get(turns.owner, session_id)
        if record.turns != turn:  # the state of an older turn is gone: it was continued in place
            raise APIError(f"previous_response_id: {body.previous_response_id} is not the latest response of its "
                           "conversation; only the latest can be continued", code="response_not_latest",
                           param="previous_response_id", status_code=409)
        if body.instructions:
            messages = [{"role": "system", "content": body.instructions}, *messages]
    chat = SessionChatRequest(model=body.model, messages=messages, max_tokens=body.max_output_tokens,
                              temperature=body.temperature, top_p=body.top_p)

    def respond(job, choices) -> ResponseObject:
        choice = choices[0]
        turn = turns.manager.get(turns.owner, record.id).turns
        incomplete = choice.finish_reason == "length"
        usage = job.final_usage()
        return ResponseObject(
            id=response_id(record.id, turn), created_at=job.created, model=turns.service.model_name,
            status="incomplete" if incomplete else "completed",
            incomplete_details={"reason": "max_output_tokens"} if incomplete else None,
            instructions=body.instructions, max_output_tokens=body.max_output_tokens,
            previous_response_id=body.previous_response_id, temperature=body.temperature, top_p=body.top_p,
            metadata=record.metadata, session_id=record.id,
            output=[OutputMessage(id=f"msg_{job.id.removeprefix('chatcmpl-')}",
                                  status="incomplete" if incomplete else "completed",
                                  content=[OutputText(text=choice.text)])],
            usage=ResponsesUsage(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens,
                                 total_tokens=usage.total_tokens))

    return await turns.chat(record.id, chat, request, respond=respond)



