"""GET /v1/routes (client), PUT and DELETE /v1/routes/{name} (admin): weighted splits and shadow adapters."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response

from vislora.serve.config import RolloutConfig
from vislora.serve.dependencies import EngineDep, require_admin, require_client
from vislora.serve.engine import check_name
from vislora.serve.routers.inference import ERRORS
from vislora.serve.schemas import RouteOut

router = APIRouter(prefix="/v1/routes", tags=["routes"], responses=ERRORS)


@router.get("", response_model=list[RouteOut], dependencies=[Depends(require_client)])
def list_routes(engine: EngineDep) -> list[RouteOut]:
    return [RouteOut(name=name, **rollout.model_dump()) for name, rollout in sorted(engine.traffic.routes.items())]


@router.put("/{name}", response_model=RouteOut, dependencies=[Depends(require_admin)])
def set_route(name: str, rollout: RolloutConfig, engine: EngineDep) -> RouteOut:
    """Create or replace a route, e.g. {"weights": {"v1": 0.9, "v2": 0.1}, "shadow": "v3", "shadow_fraction": 0.2}."""
    engine.set_route(check_name(name, "route"), rollout)
    return RouteOut(name=name, **rollout.model_dump())


@router.delete("/{name}", status_code=204, dependencies=[Depends(require_admin)])
def delete_route(name: str, engine: EngineDep) -> Response:
    engine.delete_route(name)
    return Response(status_code=204)
