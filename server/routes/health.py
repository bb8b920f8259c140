"""Operational routes: GET /health (liveness, always 200 and never behind an API key), GET /ready (503 until the
model is loaded and the engine loop runs, and again once a graceful shutdown begins, when app.DrainMiddleware answers
for it; also open) and GET /metrics (Prometheus text format; behind the API key unless settings.metrics_open)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from famserve.server.errors import APIError, api_error_response
from famserve.server.protocol import ErrorResponse, FamserveInfo, HealthResponse, ReadyResponse

from . import get_service

router = APIRouter(tags=["operations"])


@router.get("/health", response_model=HealthResponse)
async def health() -> HealthResponse:
    """The process answers HTTP (it may still be loading the model)."""
    return HealthResponse()


@router.get("/ready", response_model=ReadyResponse,
            responses={503: {"model": ErrorResponse,
                             "description": "loading, failed, engine stopped, or shutting down"}})
async def ready(request: Request) -> Response:
    """The model is loaded and the engine loop is alive: requests will be served."""
    try:
        service = get_service(request)
    except APIError as exc:
        return api_error_response(exc)
    body = ReadyResponse(model=service.model_name, famserve=FamserveInfo(mode=service.mode))
    return Response(body.model_dump_json(), media_type="application/json")


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                             "description": "Prometheus text exposition format"}})
async def metrics(request: Request) -> Response:
    """Request, latency and token metrics, and the engine's queue gauges (see docs/server.md for the table)."""
    metrics = request.app.state.metrics
    return Response(metrics.render(), media_type=metrics.content_type)
