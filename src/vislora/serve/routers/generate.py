"""POST /v1/generate: text from one image (multipart file or base64 JSON) and a prompt, under an adapter or rollout
(generative bases). `stream: true` answers as server-sent events: a `token` event per new token, then `done` with
the whole answer (or `error`)."""

from __future__ import annotations

import asyncio
import json
import queue
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from vislora.errors import ServeError, VisloraError
from vislora.serve.dependencies import EngineDep, require_client
from vislora.serve.generate import Generated, GenerativeEngine, TokenStream
from vislora.serve.routers.inference import ERRORS, answer_within, body_doc, read_body
from vislora.serve.schemas import GenerateJSON, GenerateResponse

POLL_S = 0.25  # how often a stream waiting for its next token checks whether its request failed or timed out

router = APIRouter(prefix="/v1", tags=["generate"], dependencies=[Depends(require_client)], responses=ERRORS)


@router.post("/generate", response_model=GenerateResponse,
             responses={200: {"content": {"text/event-stream": {"description": "With stream: true."}}}},
             openapi_extra=body_doc(GenerateJSON))
async def generate(request: Request, engine: EngineDep) -> Any:
    """The text a generative VLM writes about one image for a prompt, under its adapter (or a rollout's draw).
    Requests arriving together are generated in one batched call, each prompt with its own adapter."""
    if not isinstance(engine, GenerativeEngine):
        raise ServeError(f"this server's base ({engine.base.spec}) is a {engine.base.kind}, not a generative VLM: "
                         "POST /v1/generate needs a generative base (base.kind: generative); use /v1/predict")
    data, body = await read_body(request, GenerateJSON)
    pixels = await run_in_threadpool(engine.preprocess, data)
    stream = engine.token_stream() if body.stream else None
    future = engine.submit_generate(pixels, body.prompt, body.adapter, max_new_tokens=body.max_new_tokens,
                                    temperature=body.temperature, seed=body.seed, stream=stream)
    timeout = request.app.state.config.limits.request_timeout_s
    if stream is None:
        return response_of(await answer_within(future, timeout, engine))
    return StreamingResponse(events(stream, future, timeout), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def response_of(answer: Generated) -> GenerateResponse:
    return GenerateResponse(adapter=answer.adapter, digest=answer.digest, rollout=answer.rollout, text=answer.text,
                            tokens=answer.tokens, prompt_tokens=answer.prompt_tokens, seconds=answer.seconds,
                            tokens_per_s=answer.tokens_per_s, finish_reason=answer.finish_reason,
                            batch_size=answer.batch_size)


async def events(stream: TokenStream, future: Future[Generated], timeout: float) -> AsyncIterator[str]:
    """Server-sent events of one streamed request: `token` ({"token": id, "text": what it adds}) per new token,
    then `done` (the GenerateResponse), or `error` ({"detail", "kind"}) if it failed or timed out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            item = await run_in_threadpool(stream.get, POLL_S)
        except queue.Empty:
            if future.done():  # failed before generating (the stream ends only once generation started)
                break
            if time.monotonic() > deadline:
                future.cancel()  # dropped if it has not started
                yield sse("error", {"detail": f"the request was not computed within {timeout:g} s "
                                              "(limits.request_timeout_s)", "kind": "timeout"})
                return
            continue
        if item is None:
            break
        yield sse("token", {"token": item[0], "text": item[1]})
    try:
        answer = await asyncio.wait_for(asyncio.wrap_future(future), max(deadline - time.monotonic(), POLL_S))
    except TimeoutError:
        yield sse("error", {"detail": f"the request was not answered within {timeout:g} s (limits.request_timeout_s)",
                            "kind": "timeout"})
        return
    except VisloraError as exc:
        yield sse("error", {"detail": str(exc), "kind": getattr(exc, "kind", type(exc).__name__)})
        return
    except Exception as exc:
        yield sse("error", {"detail": f"internal error ({type(exc).__name__}); see the server log", "kind": "internal"})
        return
    yield sse("done", response_of(answer).model_dump())


def sse(event: str, data: dict[str, Any]) -> str:
    """One server-sent event."""
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"

