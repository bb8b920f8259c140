"""/v1/sessions: famserve's persistent FAM streams — create, list, get, delete, append (JSON or a streamed text
body), completions and chat inside a session, fork, export and import. Handlers stay thin: SessionManager does
the state work, GenerationService the generation, SessionTurn (session_turns.py) the commit rules."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse

from famserve.server.generation import GenerationService
from famserve.server.protocol import ChatCompletionResponse, CompletionResponse
from famserve.server.protocol.sessions import (AppendRequest, AppendResponse, SessionChatRequest,
                                               SessionCompletionRequest, SessionCreateRequest, SessionDeleted,
                                               SessionInfo, SessionList)
from famserve.server.errors import APIError, to_api_error
from famserve.server.session_turns import SessionTurns, text_chunks
from famserve.server.sessions import owner_of

from . import ERROR_RESPONSES, SSE_RESPONSE, get_service

router = APIRouter(tags=["famserve sessions (extension)"])
RESPONSES = {**ERROR_RESPONSES, 404: {"description": "no such session for this API key"},
             409: {"description": "the session is busy with another request"}}


def get_turns(request: Request, service: GenerationService = Depends(get_service)) -> SessionTurns:
    return SessionTurns(request.app.state.sessions, service, owner(request))


def owner(request: Request) -> str:
    """Sessions belong to the API key of the request (the middleware has already checked it). A server without API
    keys authenticates no one, so every request is the same owner whatever key it sends (the openai client always
    sends one; curl usually none)."""
    settings = request.app.state.settings
    if not settings.api_keys and settings.api_key_file is None:
        return owner_of(None)
    header = request.headers.get("authorization", "")
    return owner_of(header[7:].strip() if header.lower().startswith("bearer ") else None)


@router.post("/v1/sessions", response_model=SessionInfo, responses=RESPONSES)
async def create_session(body: SessionCreateRequest, turns: SessionTurns = Depends(get_turns)) -> SessionInfo:
    """Start a stream, optionally with a system prompt consumed through the chat template."""
    record = await turns.manager.create(turns.owner, body.system_prompt, body.metadata)
    return turns.info(record)


@router.get("/v1/sessions", response_model=SessionList, responses=RESPONSES)
async def list_sessions(limit: int = Query(20, ge=1, le=100), after: str | None = Query(None),
                        turns: SessionTurns = Depends(get_turns)) -> SessionList:
    """The caller's sessions, oldest first; page with `after` (the last id of the previous page)."""
    records = turns.manager.list(turns.owner)
    if after is not None:
        ids = [r.id for r in records]
        records = records[ids.index(after) + 1:] if after in ids else []
    page = records[:limit]
    return SessionList(data=[turns.info(r) for r in page], first_id=page[0].id if page else None,
                       last_id=page[-1].id if page else None, has_more=len(records) > limit)


@router.get("/v1/sessions/{session_id}", response_model=SessionInfo, responses=RESPONSES)
async def get_session(session_id: str, turns: SessionTurns = Depends(get_turns)) -> SessionInfo:
    return turns.info(turns.manager.get(turns.owner, session_id))


@router.delete("/v1/sessions/{session_id}", response_model=SessionDeleted, responses=RESPONSES)
async def delete_session(session_id: str, turns: SessionTurns = Depends(get_turns)) -> SessionDeleted:
    await turns.manager.delete(turns.owner, session_id)
    return SessionDeleted(id=session_id)


@router.post("/v1/sessions/{session_id}/append", response_model=AppendResponse,
             responses={**RESPONSES, 200: {"content": SSE_RESPONSE}},
             openapi_extra={"requestBody": {"content": {
                 "application/json": {"schema": {"$ref": "#/components/schemas/AppendRequest"}},
                 "text/plain": {"schema": {"type": "string"}, "description": "raw text, streamed and consumed "
                                "block by block however large (up to max_upload_bytes)"}}}})
async def append(session_id: str, request: Request, stream: bool = Query(False),
                 turns: SessionTurns = Depends(get_turns)) -> Response:
    """Consume text or token ids, generating nothing. A text/plain body is read and consumed as it arrives."""
    turns.manager.get(turns.owner, session_id)  # 404 as a plain answer, before any progress stream starts
    if request.headers.get("content-type", "").startswith("text/plain"):
        chunks = text_chunks(request.stream(), turns.service.tokenizer)
    else:
        body = AppendRequest.model_validate(await _json(request))
        stream = stream or bool(body.stream)
        chunks = turns.token_chunks(body)
    progress = turns.append(session_id, chunks)
    if stream:
        return ProgressStream(_progress_events(progress))
    last = None
    async for last in progress:
        pass
    return JSONResponse(last.model_dump(mode="json"))


class ProgressStream(Response):
    """Server-sent events sent while the request body is still being read. sse-starlette's and Starlette's
    streaming responses listen for a disconnect by reading the request, which would steal the body's chunks; here
    the body reader itself sees the disconnect (and the ingest stops)."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str]) -> None:
        super().__init__(status_code=200, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]  # length unknown
        self.events = events

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        async for data in self.events:
            await send({"type": "http.response.body", "body": f"data: {data}\n\n".encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _progress_events(progress: AsyncIterator[AppendResponse]) -> AsyncIterator[str]:
    try:
        async for update in progress:
            yield update.model_dump_json()
    except Exception as exc:  # after the stream began: one error event
        yield json.dumps(to_api_error(exc).body())
    yield "[DONE]"


async def _json(request: Request) -> object:
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(f"body: not valid JSON ({e})", code="invalid_body") from None


@router.post("/v1/sessions/{session_id}/completions", response_model=CompletionResponse,
             responses={**RESPONSES, 200: {"content": SSE_RESPONSE}})
async def session_completion(session_id: str, body: SessionCompletionRequest, request: Request,
                             turns: SessionTurns = Depends(get_turns)) -> Response:
    """Continue the session's stream with a prompt; `commit` says whether the session keeps the result."""
    return await turns.completion(session_id, body, request)


@router.post("/v1/sessions/{session_id}/chat/completions", response_model=ChatCompletionResponse,
             responses={**RESPONSES, 200: {"content": SSE_RESPONSE}})
async def session_chat(session_id: str, body: SessionChatRequest, request: Request,
                       turns: SessionTurns = Depends(get_turns)) -> Response:
    """One chat turn: the new messages go through the chat template after the session's history, the reply is
    generated and committed."""
    return await turns.chat(session_id, body, request)


@router.post("/v1/sessions/{session_id}/fork", response_model=SessionInfo, responses=RESPONSES)
async def fork(session_id: str, turns: SessionTurns = Depends(get_turns)) -> SessionInfo:
    """A new session with a copy of this one's state (constant cost, whatever its history)."""
    return turns.info(await turns.manager.fork(turns.owner, session_id))


@router.get("/v1/sessions/{session_id}/state", responses={**RESPONSES, 200: {
    "content": {"application/octet-stream": {}}, "description": "a safetensors snapshot of the session"}})
async def export_state(session_id: str, turns: SessionTurns = Depends(get_turns)) -> Response:
    data = await turns.manager.export(turns.owner, session_id)
    return Response(data, media_type="application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="{session_id}.safetensors"'})


@router.post("/v1/sessions/import", response_model=SessionInfo, responses=RESPONSES,
             openapi_extra={"requestBody": {"content": {"application/octet-stream": {
                 "schema": {"type": "string", "format": "binary"}}}, "required": True}})
async def import_state(request: Request, turns: SessionTurns = Depends(get_turns)) -> SessionInfo:
    """A new session from a snapshot made by GET /v1/sessions/{id}/state (same model and attention config)."""
    return turns.info(await turns.manager.import_(turns.owner, await request.body()))

