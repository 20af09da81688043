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
def healthz() -> dict[str, str]:
    """The process answers."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(engine: EngineDep) -> JSONResponse:
    """200 while the batch worker runs (the model is loaded), else 503."""
    ready = engine.ready
    return JSONResponse({"ready": ready, "adapters": len(engine.adapters())}, status_code=200 if ready else 503)


@router.get("/metrics", dependencies=[Depends(require_exposed("metrics"))])
def metrics(engine: EngineDep) -> Response:
    """Prometheus text exposition of this server's metrics."""
    return Response(engine.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/stats", dependencies=[Depends(require_exposed("stats"))])
def stats(request: Request, engine: EngineDep) -> dict[str, Any]:
    """The metrics as JSON (counts, percentiles in ms, buckets, memory, shadow), plus the adapters (the fields
    `expose.adapter_fields` names, unless the admin asks) and rollouts."""
    snapshot = engine.metrics.snapshot()
    fields = adapter_fields(request)
    snapshot["loaded"] = [AdapterOut.of(a, fields).model_dump(exclude_unset=True) for a in engine.adapters()]
    snapshot["rollouts"] = {name: r.model_dump() for name, r in engine.traffic.rollouts.items()}
    return snapshot


@router.get("/dashboard", response_class=HTMLResponse)
def dashboard() -> HTMLResponse:
    """A single page charting /v1/stats live (no external scripts)."""
    page = resources.files("vislora.serve").joinpath("static/dashboard.html").read_text()
    return HTMLResponse(page)
