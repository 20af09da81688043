"""POST /v1/predict and /v1/embed: one image (multipart file or base64 JSON), or for embed on a dual encoder one
text, and an adapter or rollout name. Each answer carries a request id (JSON `request_id`, header X-Request-Id)
that POST /v1/feedback names it by."""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from dataclasses import asdict
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from vislora.errors import ServeError, Timeout, UnsupportedMedia
from vislora.serve.dependencies import EngineDep, require_client
from vislora.serve.engine import Engine
from vislora.serve.images import decode_base64
from vislora.serve.records import Output, labels_of
from vislora.serve.schemas import EmbedJSON, EmbedResponse, ErrorOut, LabelOut, PredictJSON, PredictResponse

Body = TypeVar("Body", bound=BaseModel)
Answer = TypeVar("Answer")
ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorOut, "description": text} for code, text in (
    (400, "Malformed image or request"), (401, "Missing or wrong bearer token"), (404, "Unknown adapter or rollout"),
    (413, "Body above limits.max_upload_bytes"), (415, "Neither JSON nor a form"), (503, "Queue full"),
    (504, "Not computed within limits.request_timeout_s"))}

router = APIRouter(prefix="/v1", tags=["inference"], dependencies=[Depends(require_client)], responses=ERRORS)


def body_doc(schema: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI request body: the JSON schema, and the same fields as multipart with `image` a file."""
    json_schema = schema.model_json_schema()
    form = {**json_schema, "properties": {**json_schema["properties"], "image": {"type": "string",
                                                                                "format": "binary"}}}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": json_schema},
                                                          "multipart/form-data": {"schema": form}}}}


@router.post("/predict", response_model=PredictResponse, openapi_extra=body_doc(PredictJSON))
async def predict(request: Request, response: Response, engine: EngineDep) -> PredictResponse:
    """Top-k labels and softmax scores of one image under its adapter (or a rollout's draw); a multilabel adapter
    answers with every attribute whose score reaches its saved threshold (`multilabel: true`)."""
    data, body = await read_body(request, PredictJSON)
    k = body.top_k or request.app.state.config.top_k
    limit = request.app.state.config.limits.max_top_k
    if k > limit:
        raise ServeError(f"top_k={k} is above the server's limit of {limit} (limits.max_top_k)")
    engine.check_predicts(body.adapter)
    output = await compute(engine, data, body.adapter, request.app.state.config.limits.request_timeout_s)
    response.headers["X-Request-Id"] = output.request_id
    return PredictResponse(adapter=output.adapter, digest=output.digest, rollout=output.rollout,
                           request_id=output.request_id,
                           labels=[LabelOut(**asdict(label)) for label in labels_of(output, k)],
                           multilabel=output.tagger is not None)


@router.post("/embed", response_model=EmbedResponse, openapi_extra=body_doc(EmbedJSON))
async def embed(request: Request, response: Response, engine: EngineDep) -> EmbedResponse:
    """The embedding of an image, or of a text (dual-encoder bases), under its adapter (or a rollout's draw):
    a classifier's pooled backbone features, a dual encoder's L2-normalised joint-space embedding."""
    data, body = await read_body(request, EmbedJSON)
    timeout = request.app.state.config.limits.request_timeout_s
    if body.text is not None:
        output = await compute(engine, body.text, body.adapter, timeout, text=True)
    else:
        output = await compute(engine, data, body.adapter, timeout)
    response.headers["X-Request-Id"] = output.request_id
    return EmbedResponse(adapter=output.adapter, digest=output.digest, rollout=output.rollout,
                         request_id=output.request_id, embedding=output.features.tolist(), dim=output.features.shape[0])


async def compute(engine: Engine, data: bytes | str, adapter: str | None, timeout: float, text: bool = False
                  ) -> Output:
    """Decode and preprocess (an image's bytes, or a text if `text`) off the event loop, then wait (at most
    `timeout` s) for the batch that computes it."""
    if text:
        future = engine.submit_text(await run_in_threadpool(engine.preprocess_text, data), adapter)
    else:
        future = engine.submit(await run_in_threadpool(engine.preprocess, data), adapter)
    return await answer_within(future, timeout, engine)


async def answer_within(future: Future[Answer], timeout: float, engine: Engine) -> Answer:
    """The result of a queued job; Timeout (504) when it is not computed within `timeout` s."""
    try:  # on timeout the job is cancelled: dropped if its batch has not started
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
    except TimeoutError:
        raise Timeout(f"the request was not computed within {timeout:g} s (limits.request_timeout_s); the server "
                      f"is overloaded or stalled (queue depth {engine.queue_depth})") from None


async def read_body(request: Request, schema: type[Body]) -> tuple[bytes | None, Body]:
    """(image bytes, validated fields) from a JSON body (base64 image) or a multipart form (image file); the
    bytes are None when the body holds a text instead (embed)."""
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media == "application/json":
        try:
            fields = await request.json()
        except ValueError as exc:
            raise ServeError(f"the body is not valid JSON ({exc})") from None
        body = _validate(schema, fields)
        return (decode_base64(body.image) if body.image is not None else None), body
    if media in ("multipart/form-data", "application/x-www-form-urlencoded"):  # the latter: fields only (text)
        async with request.form(max_files=1, max_fields=8) as form:
            upload = form.get("image")
            texts = "text" in schema.model_fields
            if isinstance(upload, str) or (upload is None and not (texts and form.get("text"))):
                raise ServeError("the multipart form needs the image as a file field named 'image' "
                                 "(curl -F image=@cat.png)" + (", or a text field 'text'" if texts else ""))
            data = await upload.read() if upload is not None else None
            fields = {k: v for k, v in form.items() if k != "image" and v != ""}
        return data, _validate(schema, {**fields, **({"image": ""} if data is not None else {})})
    raise UnsupportedMedia(f"content type {media or 'none'!r} is not accepted: send multipart/form-data with an "
                           "'image' file (or a 'text' field to embed), or application/json with a base64 'image' "
                           "(or a 'text')")


def _validate(schema: type[Body], fields: Any) -> Body:
    try:
        return schema.model_validate(fields)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors())
        raise ServeError(f"invalid request: {problems}") from None
