"""Scale-out on Ray Serve: every replica is one vislora Engine, and requests are placed by adapter.

Each replica of the `AdapterReplica` deployment builds the engine the ServeConfig describes (`build_engine`, no
adapter loaded yet) and keeps the engine's mixed-adapter micro-batching: its handlers are async and submit to the
engine, so the concurrent requests Ray hands one replica (up to `max_ongoing_requests`) share forward passes
whatever their adapters. Requests are placed with Ray Serve's model multiplexing: the ingress names a request's
adapter as its multiplexed model id, Ray prefers a replica that holds that adapter, and a replica lacking it
loads it (`serve.multiplexed`) from the config's `adapters` (a directory or registry:NAME@VERSION) or, for any
other name, from the registry (`registry:NAME`, its promoted version); past `max_adapters` the least recently
used adapter is evicted, which unloads it from the engine. Replicas keep nothing of their own: any replica can
serve any adapter, so a deployment grows by adding replicas.

The ingress answers POST /v1/predict and /v1/embed as the direct server does (same bodies, same JSON), plus
/healthz, /readyz and GET /v1/replicas (each replica's adapters, loads and batches as it last reported them).
Each answer names its replica (header x-vislora-replica) and whether the adapter had to be loaded for it
(x-vislora-cold: 1).

    import ray
    from vislora.serve import ServeConfig
    from vislora.serve.ray import run
    ray.init()
    run(ServeConfig.load("serve.yaml"), replicas=2)      # POST http://127.0.0.1:8000/v1/predict

Ray is imported only here, when used (`pip install 'vislora[ray]'`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from vislora.errors import Busy, ConfigError, ServeError, Timeout, UnknownAdapter, VisloraError
from vislora.registry import Registry
from vislora.serve.app import error_answer, error_status, http_answer, validation_answer
from vislora.serve.config import ServeConfig
from vislora.serve.dependencies import Tokens, require_client
from vislora.serve.engine import Engine, check_name
from vislora.serve.factory import build_engine
from vislora.serve.limits import BodyLimit
from vislora.serve.records import Output, labels_of
from vislora.serve.routers.inference import body_doc, read_body
from vislora.serve.schemas import EmbedJSON, EmbedResponse, LabelOut, PredictJSON, PredictResponse
from vislora.serve.sources import REGISTRY, open_source
from vislora.version import __version__

logger = logging.getLogger(__name__)

APP_NAME = "vislora"
RAY_HINT = "pip install 'vislora[ray]'"


def import_serve() -> ModuleType:
    """`ray.serve`, or a ConfigError naming the install command."""
    try:
        from ray import serve
    except ImportError as exc:
        raise ConfigError(f"serving on Ray needs Ray Serve, which is not installed ({exc}); install it with "
                          f"{RAY_HINT}") from None
    return serve


@dataclass(frozen=True)
class ReplicaNote:
    """What a replica reports with each answer."""

    replica: str  # Ray's unique id of the replica
    cold: bool  # the request's adapter was not on this replica when the request arrived: it was loaded for it
    adapters: tuple[str, ...]  # the adapters the replica holds after answering
    loads: int  # adapters loaded by this replica so far
    batches: int  # forward passes of its engine so far
    samples: int  # samples (shadow copies included) in those passes


class Resident:
    """An adapter held in one replica's engine for as long as Ray's multiplexer keeps it: evicting it (least
    recently used beyond max_adapters) calls `__del__`, which unloads it once its in-flight requests are answered."""

    def __init__(self, engine: Engine, name: str) -> None:
        self.engine: Engine | None = engine
        self.name = name

    def unload(self) -> None:
        engine, self.engine = self.engine, None  # the multiplexer, then the garbage collector may both call this
        if engine is None:
            return
        try:
            engine.unload(self.name)
        except (UnknownAdapter, Busy) as exc:  # Busy: it stays loaded and the next load of the name adopts it
            logger.warning("evicting adapter %r: %s", self.name, exc)

    def __del__(self) -> None:
        self.unload()


class AdapterReplica:
    """One Ray Serve replica: one Engine; adapters are loaded on demand through `serve.multiplexed`."""

    def __init__(self, config: ServeConfig, max_adapters: int = 16, base_seed: int | None = None) -> None:
        serve = import_serve()
        if base_seed is not None:
            torch.manual_seed(base_seed)  # a randomly initialised base: every replica draws the same weights
        self.config = config
        self.engine = build_engine(config, preload=False)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.loads = 0
        self._model_id: Callable[[], str] = serve.get_multiplexed_model_id

        async def load_adapter(name: str) -> Resident:  # a function: the multiplexer keeps its state on it
            return await self._load(name)

        self._resident = serve.multiplexed(max_num_models_per_replica=max_adapters)(load_adapter)

    async def predict(self, data: bytes, k: int) -> tuple[PredictResponse, ReplicaNote]:
        """Top-k labels of one image (its file's bytes) under the request's adapter (the multiplexed model id)."""
        name = self._model_id() or None
        self.engine.check_predicts(name)
        pixels = await run_in_threadpool(self.engine.preprocess, data)
        output, note = await self._compute(name, lambda: self.engine.submit(pixels, name))
        labels = [LabelOut(**asdict(label)) for label in labels_of(output, k)]
        return PredictResponse(adapter=output.adapter, digest=output.digest, rollout=output.rollout, labels=labels,
                               multilabel=output.tagger is not None), note

    async def embed(self, data: bytes | None, text: str | None) -> tuple[EmbedResponse, ReplicaNote]:
        """The embedding of an image (its file's bytes) or, on a dual encoder, of a text."""
        name = self._model_id() or None
        if text is not None:
            tokens = await run_in_threadpool(self.engine.preprocess_text, text)
            output, note = await self._compute(name, lambda: self.engine.submit_text(tokens, name))
        else:
            pixels = await run_in_threadpool(self.engine.preprocess, data)
            output, note = await self._compute(name, lambda: self.engine.submit(pixels, name))
        return EmbedResponse(adapter=output.adapter, digest=output.digest, rollout=output.rollout,
                             embedding=output.features.tolist(), dim=output.features.shape[0]), note

    def ready(self) -> bool:
        return self.engine.ready

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()

    async def _compute(self, name: str | None, submit: Callable[[], Future[Output]]) -> tuple[Output, ReplicaNote]:
        """Make the adapter resident, submit, wait for the batch. Preprocessing is done before: between a resident
        adapter's lookup and the submit nothing yields, so no eviction can slip in between."""
        cold = name is not None and name not in self._names()
        if name is not None:
            await self._resident(name)
        future = submit()
        timeout = self.config.limits.request_timeout_s
        try:  # on timeout the job is cancelled: dropped if its batch has not started
            output = await asyncio.wait_for(asyncio.wrap_future(future), timeout)
        except TimeoutError:
            raise Timeout(f"the request was not computed within {timeout:g} s (limits.request_timeout_s); the "
                          f"replica is overloaded or stalled (queue depth {self.engine.queue_depth})") from None
        return output, self._note(cold)

    async def _load(self, name: str) -> Resident:
        if name not in self._names():  # else it stayed loaded after an eviction timed out: adopt it
            await asyncio.to_thread(self.engine.load, name, self.source(name))
            self.loads += 1
        return Resident(self.engine, name)

    def source(self, name: str) -> str:
        """Where adapter `name` is read from: the config's `adapters`, else the registry's promoted version."""
        if name in self.config.adapters:
            return self.config.adapters[name]
        known = sorted(self.config.adapters)
        if self.config.registry is None:
            raise UnknownAdapter(f"no adapter {name!r} on this deployment (its config's adapters: {known}); add it "
                                 "to `adapters`, or set `registry:` to serve every registered adapter by its name")
        registered = Registry(self.config.registry).names()
        if name not in registered:
            raise UnknownAdapter(f"no adapter {name!r} on this deployment (its config's adapters: {known}; in the "
                                 f"registry: {registered}); add it with `vislora registry add {name} RUN/adapter`")
        return f"{REGISTRY}{name}"

    def _names(self) -> set[str]:
        return {adapter.name for adapter in self.engine.adapters()}

    def _note(self, cold: bool) -> ReplicaNote:
        counts = {sample.name: sample.value for metric in self.engine.metrics.batch_size.collect()
                  for sample in metric.samples}
        return ReplicaNote(self.replica, cold, tuple(sorted(self._names())), self.loads,
                           int(counts.get("vislora_batch_size_count", 0)), int(counts.get("vislora_batch_size_sum", 0)))


class Ingress:
    """The HTTP front: the direct server's predict/embed API, each request handed to a replica chosen by its
    adapter (Ray's multiplexed model id)."""

    def __init__(self, replicas: Any, config: ServeConfig) -> None:
        self.replicas = replicas  # the AdapterReplica deployment's handle
        self.config = config
        self.notes: dict[str, ReplicaNote] = {}  # replica -> what it last reported

    def __serve_build_asgi_app__(self) -> FastAPI:
        return ingress_app(self)

    async def call(self, method: str, adapter: str | None, response: Response, *args: Any) -> Any:
        """`method` of a replica holding `adapter` (or any replica for the base model), its answer returned and its
        note kept; a VisloraError raised in the replica is raised here as it was."""
        from ray.exceptions import RayTaskError

        handle = self.replicas if adapter is None else self.replicas.options(multiplexed_model_id=check_name(adapter))
        try:
            answer, note = await getattr(handle, method).remote(*args)
        except RayTaskError as exc:
            if isinstance(exc.cause, VisloraError):
                raise exc.cause from None
            raise
        self.notes[note.replica] = note
        response.headers["x-vislora-replica"] = note.replica
        response.headers["x-vislora-cold"] = str(int(note.cold))
        return answer


def ingress_app(ingress: Ingress) -> FastAPI:
    """The FastAPI app of the ingress: the same paths, bodies, answers and error JSON as `create_app`'s."""
    config = ingress.config
    app = FastAPI(title="vislora serve on Ray", version=__version__,
                  description="One base model, many adapters, over Ray Serve replicas: requests are placed by "
                              "adapter and micro-batched across adapters inside each replica.")
    app.state.config = config
    app.state.tokens = Tokens(config.auth.admin(), config.auth.client())
    app.add_middleware(BodyLimit, max_bytes=config.limits.max_upload_bytes)
    client = [Depends(require_client)]

    @app.post("/v1/predict", response_model=PredictResponse, dependencies=client,
              openapi_extra=body_doc(PredictJSON))
    async def predict(request: Request, response: Response) -> PredictResponse:
        data, body = await read_body(request, PredictJSON)
        k = body.top_k or config.top_k
        if k > config.limits.max_top_k:
            raise ServeError(f"top_k={k} is above the server's limit of {config.limits.max_top_k} "
                             "(limits.max_top_k)")
        return await ingress.call("predict", body.adapter, response, data, k)

    @app.post("/v1/embed", response_model=EmbedResponse, dependencies=client, openapi_extra=body_doc(EmbedJSON))
    async def embed(request: Request, response: Response) -> EmbedResponse:
        data, body = await read_body(request, EmbedJSON)
        return await ingress.call("embed", body.adapter, response, data, body.text)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """200 once a replica answers with its batch worker running, else 503."""
        try:
            ready = await asyncio.wait_for(ingress.replicas.ready.remote(), 10)
        except Exception:  # no replica reachable: not ready, whatever the reason
            logger.exception("readiness check failed")
            ready = False
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @app.get("/v1/replicas", dependencies=client)
    def replicas() -> dict[str, Any]:
        """Each replica's adapters, loads and batches, as it reported them with its last answer to this ingress."""
        return {replica: asdict(note) for replica, note in sorted(ingress.notes.items())}

    app.add_exception_handler(VisloraError, _error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    return app


async def _error(_request: Request, exc: Exception) -> JSONResponse:
    return error_answer(*error_status(exc), str(exc))


async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    return validation_answer(exc)


async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return http_answer(exc)


def build_app(config: ServeConfig, replicas: int = 1, *, max_adapters: int = 16, replica_cpus: float = 1.0,
              max_ongoing_requests: int | None = None, base_seed: int | None = None) -> Any:
    """The Ray Serve application (for `serve.run`): the ingress over `replicas` AdapterReplica replicas, each
    holding at most `max_adapters` adapters and taking `max_ongoing_requests` concurrent requests (default: two
    batches' worth, so one batch fills while the other computes). `base_seed` seeds torch before each replica
    builds its base (a randomly initialised base must be the same draw everywhere)."""
    serve = import_serve()
    if config.rollouts:
        raise ConfigError(f"rollouts ({sorted(config.rollouts)}) are not served on Ray: a rollout draws among "
                          "adapters inside one engine, and Ray places requests by adapter; serve them with "
                          "`vislora serve` without --ray, or send each adapter's share from the client")
    for what, value in (("replicas", replicas), ("max_adapters", max_adapters)):
        if value < 1:
            raise ConfigError(f"{what} must be at least 1, got {value}")
    config = portable(config)
    for reference in config.adapters.values():  # refused here once, not in every replica
        open_source(reference, config.registry)
    ongoing = max_ongoing_requests or 2 * config.batching.max_batch_size
    replica = serve.deployment(AdapterReplica, name="AdapterReplica", num_replicas=replicas,
                               max_ongoing_requests=ongoing, ray_actor_options={"num_cpus": replica_cpus})
    front = serve.deployment(serve.ingress()(Ingress), name="Ingress", max_ongoing_requests=ongoing * replicas,
                             ray_actor_options={"num_cpus": 0})
    return front.bind(replica.bind(config, max_adapters, base_seed), config)


def run(config: ServeConfig, replicas: int = 1, *, blocking: bool = False, **options: Any) -> Any:
    """Deploy `build_app(config, replicas, **options)` on the Ray cluster this process is connected to (or a
    local one Ray starts), its HTTP proxy on config.host:config.port; returns the ingress's handle, or with
    `blocking` serves until interrupted."""
    serve = import_serve()
    app = build_app(config, replicas, **options)
    serve.start(http_options={"host": config.host, "port": config.port})
    return serve.run(app, name=APP_NAME, route_prefix="/", blocking=blocking)


def app_builder(args: dict[str, str]) -> Any:
    """The application from a serve config YAML, for Ray's own tools: `serve run vislora.serve.ray:app_builder
    config=serve.yaml replicas=2 max_adapters=16`, or `import_path` + `args` in a Ray Serve config file (KubeRay's
    RayService). There Ray's http_options set the address, not the config's host and port."""
    unknown = sorted(set(args) - {"config", "replicas", "max_adapters", "base_seed"})
    if unknown or "config" not in args:
        raise ConfigError(f"app_builder takes config=PATH (required), replicas=N, max_adapters=N and base_seed=N, "
                          f"got {sorted(args)}; example: serve run vislora.serve.ray:app_builder config=serve.yaml "
                          "replicas=2")
    seed = args.get("base_seed")
    return build_app(ServeConfig.load(args["config"]), int(args.get("replicas", 1)),
                     max_adapters=int(args.get("max_adapters", 16)), base_seed=None if seed is None else int(seed))


def portable(config: ServeConfig) -> ServeConfig:
    """The config with adapter folders and the registry as absolute paths: replicas may run in other folders."""
    adapters = {name: ref if ref.startswith(REGISTRY) else str(Path(ref).expanduser().resolve())
                for name, ref in config.adapters.items()}
    registry = str(Path(config.registry).expanduser().resolve()) if config.registry else None
    return config.model_copy(update={"adapters": adapters, "registry": registry})
