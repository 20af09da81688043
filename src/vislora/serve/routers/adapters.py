"""GET /v1/adapters (client), POST /v1/adapters and DELETE /v1/adapters/{name} (admin): hot load and unload."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends, Request, Response
from starlette.concurrency import run_in_threadpool

from vislora.errors import Forbidden
from vislora.serve.dependencies import EngineDep, require_admin, require_client
from vislora.serve.engine import check_name
from vislora.serve.exposure import adapter_fields
from vislora.serve.routers.inference import ERRORS
from vislora.serve.schemas import AdapterOut, LoadAdapter
from vislora.serve.sources import REGISTRY

router = APIRouter(prefix="/v1/adapters", tags=["adapters"], responses=ERRORS)


@router.get("", response_model=list[AdapterOut], response_model_exclude_unset=True,
            dependencies=[Depends(require_client)])
def list_adapters(request: Request, engine: EngineDep) -> list[AdapterOut]:
    """The adapters requests can use now: every field for the admin, a client the fields of `expose`."""
    return [AdapterOut.of(record, adapter_fields(request)) for record in engine.adapters()]


@router.post("", response_model=AdapterOut, status_code=201, dependencies=[Depends(require_admin)])
async def load_adapter(body: LoadAdapter, request: Request, engine: EngineDep) -> AdapterOut:
    """Load an adapter directory from the server's disk, or registry:NAME@VERSION from its registry; requests can
    use it once this answers."""
    name = check_name(body.name)
    path = resolve_path(body.path, request.app.state.config.adapter_root)
    return AdapterOut.of(await run_in_threadpool(engine.load, name, path))


@router.delete("/{name}", status_code=204, dependencies=[Depends(require_admin)])
async def unload_adapter(name: str, engine: EngineDep) -> Response:
    """Unload: new requests for it get 404 at once; requests already admitted finish first."""
    await run_in_threadpool(engine.unload, check_name(name))
    return Response(status_code=204)


def resolve_path(path: str, root: str | None) -> str | Path:
    """The adapter path (registry references as they are); with a root, relative paths are read from it and
    nothing may lead outside it."""
    if path.startswith(REGISTRY):
        return path
    if root is None:
        return Path(path).expanduser()
    base = Path(root).expanduser().resolve()
    resolved = (base / path).resolve()
    if not resolved.is_relative_to(base):
        raise Forbidden(f"adapter path {path!r} leads outside the adapter root {str(base)!r}; load adapters from "
                        "inside it")
    return resolved
