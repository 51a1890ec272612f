"""GET /v1/models and /v1/models/{id}: the served models in OpenAI's list shape."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from inferhub.server.responses import ModelCard, ModelList
from inferhub.server.state import ServerState, StateDep, authenticate

router = APIRouter(prefix="/v1", dependencies=[Depends(authenticate)], tags=["models"])


def _card(state: ServerState, name: str) -> ModelCard:
    engine = state.engine_for(name)
    return ModelCard(id=name, created=state.started_at, max_model_len=engine.max_model_len)


@router.get("/models")
async def list_models(state: StateDep) -> ModelList:
    return ModelList(data=[_card(state, name) for name in state.engines])


@router.get("/models/{model_id:path}")
async def retrieve_model(model_id: str, state: StateDep) -> ModelCard:
    return _card(state, model_id)
