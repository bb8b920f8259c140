"""Server-sent events as OpenAI sends them (`data: {json}\\n\\n` per chunk, an error event if the stream fails after it
began, then `data: [DONE]\\n\\n`), and cancellation: a client that disconnects, mid-stream or while waiting for a
non-streamed answer, cancels its generation, which aborts the engine requests (generation.py)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel
from sse_starlette.sse import EventSourceResponse

from .errors import APIError, to_api_error

log = logging.getLogger(__name__)

T = TypeVar("T")
DONE = "[DONE]"
PING_INTERVAL_S = 15  # an SSE comment (": ping") after this long without data keeps proxies from closing the stream
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away first"; no client ever receives it


class ClientDisconnectedError(APIError):
    status_code = CLIENT_CLOSED_REQUEST


def sse_response(events: AsyncIterator[BaseModel]) -> EventSourceResponse:
    """Stream chunks as `data:` events. When the client disconnects, sse-starlette cancels the stream, and the
    cancellation runs the generators' cleanup, which aborts the engine requests."""
    return EventSourceResponse(_frames(events), sep="\n", ping=PING_INTERVAL_S,
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _frames(events: AsyncIterator[BaseModel]) -> AsyncIterator[str]:
    try:
        async with aclosing(events) as chunks:
            async for chunk in chunks:
                yield chunk.model_dump_json()
    except Exception as exc:  # the status line has been sent: the error becomes one event (CancelledError passes)
        error = to_api_error(exc)
        if not isinstance(exc, APIError) and error.status_code >= 500:
            log.exception("stream failed")
        yield json.dumps(error.body(), separators=(",", ":"))
    yield DONE


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work` unless the client disconnects first; then cancel it and raise ClientDisconnectedError."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.create_task(_disconnected(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnectedError("the client disconnected", code="client_disconnected")
    return task.result()


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so the next ASGI message can only be that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def start_stream(request: Request, items: AsyncIterator[T]) -> AsyncIterator[T]:
    """Wait for the first item before the response starts, so that a request the engine refuses (queue full, too
    long) gets a plain HTTP error status instead of a 200 stream holding an error event."""
    try:
        first = await cancel_on_disconnect(request, anext(items))
    except StopAsyncIteration:
        return _empty()
    return _prepend(first, items)


async def _prepend(first: T, rest: AsyncIterator[T]) -> AsyncIterator[T]:
    yield first
    async with aclosing(rest) as items:
        async for item in items:
            yield item


async def _empty() -> AsyncIterator:
    return
    yield
