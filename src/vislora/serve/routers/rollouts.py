"""GET /v1/rollouts (client), PUT and DELETE /v1/rollouts/{name} (admin): weighted splits and shadow adapters."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response

from vislora.serve.config import RolloutConfig
from vislora.serve.dependencies import EngineDep, require_admin, require_client
from vislora.serve.engine import check_name
from vislora.serve.routers.inference import ERRORS
from vislora.serve.schemas import RolloutOut

router = APIRouter(prefix="/v1/rollouts", tags=["rollouts"], responses=ERRORS)


@router.get("", response_model=list[RolloutOut], dependencies=[Depends(require_client)])
def list_rollouts(engine: EngineDep) -> list[RolloutOut]:
    return [RolloutOut(name=name, **rollout.model_dump()) for name, rollout in sorted(engine.traffic.rollouts.items())]


@router.put("/{name}", response_model=RolloutOut, dependencies=[Depends(require_admin)])
def set_rollout(name: str, rollout: RolloutConfig, engine: EngineDep) -> RolloutOut:
    """Create or replace a rollout, e.g. {"weights": {"v1": 0.9, "v2": 0.1}, "shadow": "v3", "shadow_fraction": 0.2}."""
    engine.set_rollout(check_name(name, "rollout"), rollout)
    return RolloutOut(name=name, **rollout.model_dump())


@router.delete("/{name}", status_code=204, dependencies=[Depends(require_admin)])
def delete_rollout(name: str, engine: EngineDep) -> Response:
    engine.delete_rollout(name)
    return Response(status_code=204)
