"""GET /v1/models and /v1/models/{model}: the one model this server serves."""

from __future__ import annotations

from fastapi import APIRouter, Request

from famserve.server.generation import GenerationService
from famserve.server.protocol import ModelCard, ModelList
from famserve.server.protocol.extras import ModelFamserveInfo

from . import ERROR_RESPONSES, Service

router = APIRouter(tags=["OpenAI"])


def _card(request: Request, service: GenerationService) -> ModelCard:
    return ModelCard(id=service.model_name, created=request.app.state.started_at,
                     famserve=ModelFamserveInfo(mode=service.mode, fam_adapter=service.fam_adapter))


@router.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
async def list_models(request: Request, service: Service) -> ModelList:
    """The served model, under the name clients pass as `model`."""
    return ModelList(data=[_card(request, service)])


@router.get("/v1/models/{model}", response_model=ModelCard, responses=ERROR_RESPONSES)
async def retrieve_model(model: str, request: Request,
                         service: Service) -> ModelCard:
    """The served model if `model` names it, else 404."""
    service.check_model(model)
    return _card(request, service)
