"""Thin route handlers, one module per resource; `get_service` is the dependency every engine-backed route takes."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request

from famserve.server.errors import NotReadyError
from famserve.server.generation import GenerationService
from famserve.server.protocol import ErrorResponse

# Documented error answers (every one has OpenAI's error body).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description} for status, description in (
        (400, "invalid request"), (401, "missing or wrong API key"), (404, "unknown model"),
        (413, "request body too large"), (429, "engine queue full; retry after Retry-After seconds"),
        (503, "model still loading, or the engine stopped"))
}
SSE_RESPONSE: dict[str, Any] = {"text/event-stream": {"schema": {"type": "string"}, "description": (
    "with stream=true: `data: {chunk}` events, then `data: [DONE]`")}}


def get_service(request: Request) -> GenerationService:
    """The app's GenerationService; 503 while the model loads or when the engine loop has stopped."""
    state = request.app.state
    service: GenerationService | None = state.service
    if service is None:
        if state.load_error is not None:
            raise NotReadyError("the model failed to load; see the server log", code="model_load_failed")
        raise NotReadyError("the model is still loading; retry shortly", code="model_loading")
    if not service.engine.is_alive:
        raise NotReadyError("the engine loop has stopped; see the server log", code="engine_stopped")
    return service


Service = Annotated[GenerationService, Depends(get_service)]  # a route parameter of this type gets the service
