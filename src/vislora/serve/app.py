"""The FastAPI application: assembles the routers, the body limit, error answers and request metrics."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vislora.errors import ServeError, TooLarge, VisloraError
from vislora.serve.config import ServeConfig
from vislora.serve.dependencies import Tokens
from vislora.serve.engine import Engine
from vislora.serve.exposure import detail_for
from vislora.serve.limits import BodyLimit
from vislora.serve.routers import adapters, feedback, generate, inference, ops, rollouts, search
from vislora.version import __version__

logger = logging.getLogger(__name__)

TIMED = ("/v1/predict", "/v1/embed", "/v1/search", "/v1/generate")


def create_app(engine: Engine, config: ServeConfig | None = None, close_engine: bool = True) -> FastAPI:
    """The HTTP API over `engine`; `config` gives tokens, limits and defaults (its base/adapters are not read:
    the engine already holds them). The engine is closed when the app shuts down if `close_engine`."""
    config = config or ServeConfig.parse({"base": engine.base.model_dump()})

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        if close_engine:
            engine.close()

    app = FastAPI(title="vislora serve", version=__version__, lifespan=lifespan,
                  description="One base model, many adapters: per-request adapter choice, mixed-adapter "
                              "micro-batches, hot load/unload, rollouts (weighted traffic splits) with shadow "
                              "adapters.")
    app.state.engine, app.state.config = engine, config
    app.state.tokens = Tokens(config.auth.admin(), config.auth.client())
    for module in (inference, generate, search, adapters, rollouts, feedback, ops):
        app.include_router(module.router)
    metrics = engine.metrics
    app.add_middleware(BodyLimit, max_bytes=config.limits.max_upload_bytes,
                       on_reject=lambda: metrics.errors.labels(TooLarge.kind).inc())

    @app.middleware("http")
    async def count(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = engine.health.clock()  # the monitor's clock: latencies and its window share one time source
        try:
            response = await call_next(request)
        except Exception as exc:  # answered here: Starlette's outermost handler would re-raise and uvicorn then
            response = await _internal_error(request, exc)  # drops the connection (a keep-alive client's next call)
        _counted(request, response.status_code, started)
        return response

    def _counted(request: Request, status: int, started: float) -> None:
        """Count one answer; an inference request's latency and outcome also go to the health monitor."""
        path = getattr(request.scope.get("route"), "path", "unmatched")
        metrics.requests.labels(path, str(status)).inc()
        if path in TIMED:
            seconds = engine.health.clock() - started
            metrics.latency.labels(path.rpartition("/")[2]).observe(seconds)
            engine.health.record_request(seconds, failed=status >= 500)

    app.add_exception_handler(ServeError, _serve_error)
    app.add_exception_handler(VisloraError, _serve_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    return app


def error_status(exc: Exception) -> tuple[int, str]:
    """HTTP status and kind of a vislora error: a ServeError's own, else 400 (bad input)."""
    return (exc.status, exc.kind) if isinstance(exc, ServeError) else (400, type(exc).__name__)


def error_answer(status: int, kind: str, detail: str) -> JSONResponse:
    """The JSON error body every front end answers with ({"detail", "kind"}; a 401 names the Bearer scheme)."""
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"detail": detail, "kind": kind}, status_code=status, headers=headers)


def validation_answer(exc: RequestValidationError) -> JSONResponse:
    """422 naming every invalid field of a request."""
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
    return error_answer(422, "invalid_request", f"invalid request: {problems}")


def http_answer(exc: StarletteHTTPException) -> JSONResponse:
    """Errors FastAPI/Starlette raise themselves (no such path, too many files in a form, ...)."""
    return JSONResponse({"detail": str(exc.detail), "kind": f"http_{exc.status_code}"}, status_code=exc.status_code,
                        headers=exc.headers)


async def _serve_error(request: Request, exc: Exception) -> JSONResponse:
    status, kind = error_status(exc)
    request.app.state.engine.metrics.errors.labels(kind).inc()
    return error_answer(status, kind, detail_for(request, str(exc)))


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    request.app.state.engine.metrics.errors.labels("invalid_request").inc()
    return validation_answer(exc)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    request.app.state.engine.metrics.errors.labels(f"http_{exc.status_code}").inc()
    return http_answer(exc)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    request.app.state.engine.metrics.errors.labels("internal").inc()
    return JSONResponse({"detail": f"internal error ({type(exc).__name__}); see the server log", "kind": "internal"},
                        status_code=500)
