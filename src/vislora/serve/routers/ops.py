"""Operations: /healthz, /readyz, /metrics (Prometheus), /v1/stats (JSON for the dashboard), /dashboard. Who may
read /metrics and /v1/stats is the serve config's `expose` section."""

from __future__ import annotations

from importlib import resources
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from vislora.serve.dependencies import EngineDep, require_exposed
from vislora.serve.exposure import adapter_fields
from vislora.serve.schemas import AdapterOut

router = APIRouter(tags=["operations"])


@router.get("/healthz")
def healthz(engine: EngineDep) -> dict[str, Any]:
    """Liveness, always 200 while the process answers: `status` ok, or degraded with `reasons` (each naming the
    measured value, the threshold and its config key) and every judged check (see vislora.serve.health)."""
    return engine.health.judge().as_dict()


@router.get("/readyz")
def readyz(engine: EngineDep) -> JSONResponse:
    """200 while the engine serves (batch worker running, not closing), else 503 with the reason."""
    reason = engine.not_serving()
    body: dict[str, Any] = {"ready": reason is None, "adapters": len(engine.adapters())}
    if reason is not None:
        body["reason"] = reason
    return JSONResponse(body, status_code=200 if reason is None else 503)


@router.get("/metrics", dependencies=[Depends(require_exposed("metrics"))])
def metrics(engine: EngineDep) -> Response:
    """Prometheus text exposition of this server's metrics."""
    return Response(engine.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/stats", dependencies=[Depends(require_exposed("stats"))])
def stats(request: Request, engine: EngineDep) -> dict[str, Any]:
    """The metrics as JSON (counts, percentiles in ms, buckets, memory, shadow, drift against the base, feedback),
    plus the adapters (the fields `expose.adapter_fields` names, unless the admin asks), rollouts and health
    verdict."""
    snapshot = engine.metrics.snapshot()
    fields = adapter_fields(request)
    snapshot["loaded"] = [AdapterOut.of(a, fields).model_dump(exclude_unset=True) for a in engine.adapters()]
    snapshot["rollouts"] = {name: r.model_dump() for name, r in engine.traffic.rollouts.items()}
    snapshot["health"] = engine.health.judge().as_dict()
    return snapshot


@router.get("/dashboard", response_class=HTMLResponse)
def dashboard() -> HTMLResponse:
    """A single page charting /v1/stats live (no external scripts)."""
    page = resources.files("vislora.serve").joinpath("static/dashboard.html").read_text()
    return HTMLResponse(page)
