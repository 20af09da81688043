"""POST /v1/search: the nearest images of a served index to one image (multipart file or base64 JSON, as /v1/predict
takes it) or one text, embedded by the engine with the request's adapter, batched with the other requests.

The server's indexes are the serve config's `indexes: {name: folder}` (written by `vislora index build`), loaded on
first use and reloaded when their index.json changes (a rebuild). A query is refused (409) unless the adapter that
embeds it is the version the index was built with: its files' sha256, hashed as the registry hashes them (for
registry:NAME@VERSION adapters, the hashes the registry recorded), against the index header.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from vislora.errors import Conflict, ServeError, StaleIndex, UnknownAdapter, UnknownIndex
from vislora.registry import Registry
from vislora.search import AdapterIdentity, Index, check_identity, check_modality, load_index
from vislora.search.index import HEADER
from vislora.serve.dependencies import EngineDep, require_client
from vislora.serve.engine import Engine
from vislora.serve.exposure import PRIVATE_PATHS
from vislora.serve.routers.inference import ERRORS, body_doc, compute, read_body
from vislora.serve.schemas import HitOut, SearchJSON, SearchResponse
from vislora.serve.sources import REGISTRY

router = APIRouter(prefix="/v1", tags=["search"], dependencies=[Depends(require_client)],
                   responses={**ERRORS, 404: {**ERRORS[404], "description": "Unknown adapter, rollout or index"},
                              409: {**ERRORS[400], "description": "The index was built with another adapter version"}})
_STATE_LOCK = threading.Lock()
DEFAULT_K = 10


class SearchState:
    """The server's indexes (loaded on first use, reloaded when rebuilt) and the identities of its adapters."""

    def __init__(self, paths: dict[str, str]) -> None:
        self.paths = dict(paths)
        self._lock = threading.Lock()
        self._indexes: dict[str, tuple[Any, Index]] = {}  # name -> (index.json stat, index)
        self._identities: dict[tuple[str, float, str], AdapterIdentity] = {}  # (name, loaded_at, path) -> identity

    def index(self, name: str | None) -> tuple[str, Index]:
        if not self.paths:
            raise UnknownIndex("this server has no search indexes: add `indexes: {NAME: INDEX_FOLDER}` (folders "
                               "written by `vislora index build`) to the serve config")
        if name is None:
            if len(self.paths) != 1:
                raise ServeError(f"name the index to search: `index` is one of {sorted(self.paths)}")
            name = next(iter(self.paths))
        if name not in self.paths:
            raise UnknownIndex(f"no index {name!r} on this server (indexes: {sorted(self.paths)})")
        path = Path(self.paths[name])
        with self._lock:
            signature = _signature(path)
            cached = self._indexes.get(name)
            if cached is None or cached[0] != signature or signature is None:
                cached = (signature, load_index(path))  # IndexFileError (400) says what is wrong and to rebuild
                self._indexes[name] = cached
            return name, cached[1]

    def identity(self, engine: Engine, name: str | None) -> AdapterIdentity | None:
        """The identity of served adapter `name` (None: the base model), hashed once per load."""
        if name is None:
            return None
        record = next((a for a in engine.adapters() if a.name == name), None)
        if record is None:
            raise UnknownAdapter(f"adapter {name!r} is not loaded")
        key = (record.name, record.loaded_at, record.path)
        with self._lock:
            known = self._identities.get(key)
        if known is not None:
            return known
        folder = Path(record.path)
        if not record.path:
            raise ServeError(f"adapter {name!r} was put on the model in memory, not loaded from a folder: it has no "
                             "files to check against the index")
        if record.source.startswith(REGISTRY) and engine.registry is not None:
            version = Registry(engine.registry).get(folder.parent.name, folder.name)
            identity = AdapterIdentity.of_files(version.files, f"{REGISTRY}{version.name}@{version.version}")
        else:
            identity = AdapterIdentity.of_folder(folder)
        with self._lock:
            self._identities[key] = identity
        return identity


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = (path / HEADER).stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def search_state(request: Request) -> SearchState:
    state = getattr(request.app.state, "search", None)
    if state is None:
        with _STATE_LOCK:
            state = getattr(request.app.state, "search", None)
            if state is None:
                state = request.app.state.search = SearchState(request.app.state.config.indexes)
    return state


@router.post("/search", response_model=SearchResponse, openapi_extra=body_doc(SearchJSON))
async def search(request: Request, engine: EngineDep) -> SearchResponse:
    """The k nearest images of an index to an image or a text (dual-encoder indexes), embedded with the request's
    adapter: the adapter version the index was built with, or none for an index of base-model embeddings."""
    data, body = await read_body(request, SearchJSON)
    config = request.app.state.config
    limit = config.limits.max_search_k
    k = min(DEFAULT_K, limit) if body.k is None else body.k
    if k > limit:
        raise ServeError(f"k={k} is above the server's limit of {limit} (limits.max_search_k)")
    state = search_state(request)
    name, index = await run_in_threadpool(state.index, body.index)
    setattr(request.state, PRIVATE_PATHS, index_paths(name, index))
    modality = "text" if body.text is not None else "image"
    check_modality(index, modality)
    if body.adapter not in engine.traffic.rollouts:  # a plain adapter (or none): checked before any compute
        await run_in_threadpool(_check, state, engine, index, name, body.adapter)
    timeout = config.limits.request_timeout_s
    output = await compute(engine, body.text if body.text is not None else data, body.adapter, timeout,
                           text=body.text is not None)
    identity = await run_in_threadpool(_check, state, engine, index, name, output.adapter)  # a rollout's draw
    hits = await run_in_threadpool(index.hits, output.features, k)
    return SearchResponse(adapter=output.adapter, digest=output.digest, rollout=output.rollout, index=name,
                          adapter_sha256=identity.sha256 if identity else None,
                          hits=[HitOut(**hit.to_dict()) for hit in hits[0]])


def index_paths(name: str, index: Index) -> dict[str, str]:
    """{path: what it is} for the server paths an index records (its folder, the images it was built from, the
    adapter folder it was built with), left out of what clients read."""
    built = (index.adapter or {}).get("label", "")
    named = {"<the adapter it was built with>": "" if built.startswith(REGISTRY) else built,
             "<the images it was built from>": index.header.get("data", ""), f"<index {name}>": str(index.path or "")}
    return {path: label for label, path in named.items() if path.strip("/")}


def _check(state: SearchState, engine: Engine, index: Index, name: str, adapter: str | None
           ) -> AdapterIdentity | None:
    identity = state.identity(engine, adapter)
    try:
        check_identity(index, identity, base_spec=engine.base.spec if identity is None else None,
                       using=f" (adapter {adapter!r} on this server)" if adapter else " (no adapter named)")
    except StaleIndex as exc:
        raise Conflict(f"index {name!r}: {exc}") from None
    return identity
