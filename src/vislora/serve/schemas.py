"""HTTP request and response bodies (pydantic), shared by the routers and the OpenAPI schema."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from vislora.serve.config import ADAPTER_FIELDS, RolloutConfig
from vislora.serve.records import LoadedAdapter

ADAPTER_FIELD = ("An adapter or rollout name; omit for the base model. A rollout draws one of its adapters by "
                 "weight; the response names the adapter that answered.")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PredictJSON(_Body):
    """A predict request as JSON (multipart/form-data takes the same fields, `image` as a file)."""

    image: str = Field(..., description="The image file's bytes, base64-encoded (a data: URL prefix is allowed).")
    adapter: str | None = Field(None, description=ADAPTER_FIELD)
    top_k: int | None = Field(None, ge=1, description="Labels to return; default: the server's top_k.")


class EmbedJSON(_Body):
    """An embed request as JSON (multipart/form-data takes the same fields, `image` as a file): an image, or a
    text for dual-encoder bases."""

    image: str | None = Field(None, description="The image file's bytes, base64-encoded (a data: URL prefix is "
                              "allowed).")
    text: str | None = Field(None, description="Dual encoders (CLIP, SigLIP, ...): a text to embed instead of an "
                             "image, into the same space.")
    adapter: str | None = Field(None, description=ADAPTER_FIELD)

    @model_validator(mode="after")
    def _one_input(self) -> EmbedJSON:
        if (self.image is None) == (self.text is None):
            raise ValueError("give exactly one of image and text")
        return self


class GenerateJSON(_Body):
    """A generate request as JSON (multipart/form-data takes the same fields, `image` as a file)."""

    image: str = Field(..., description="The image file's bytes, base64-encoded (a data: URL prefix is allowed).")
    prompt: str | None = Field(None, description="The question or instruction; omit it for a captioning adapter "
                               "(its task.json prompt is used).")
    adapter: str | None = Field(None, description=ADAPTER_FIELD)
    max_new_tokens: int | None = Field(None, ge=1, description="Most tokens to generate (at most the server's "
                                       "generate.max_new_tokens); default generate.default_max_new_tokens.")
    temperature: float = Field(0.0, ge=0, description="0: greedy (deterministic); above 0: sampling at that "
                               "temperature.")
    seed: int | None = Field(None, description="Sampling: draw from this seed (the request then runs alone, so the "
                             "same seed gives the same text).")
    stream: bool = Field(False, description="Answer as server-sent events, one `token` event per new token, then a "
                         "`done` event with the whole answer; a streamed request runs alone (not batched).")


class SearchJSON(_Body):
    """A search request as JSON (multipart/form-data takes the same fields, `image` as a file): an image, or a text
    for indexes of dual-encoder embeddings."""

    image: str | None = Field(None, description="The query image's bytes, base64-encoded (a data: URL prefix is "
                              "allowed).")
    text: str | None = Field(None, description="A text to search with (indexes built by a dual encoder).")
    index: str | None = Field(None, description="The index to search (the serve config's `indexes`); optional "
                              "when the server has one.")
    adapter: str | None = Field(None, description="The adapter that embeds the query: the one the index was built "
                                "with (checked by its files' sha256); omit for an index of base-model embeddings.")
    k: int | None = Field(None, ge=1, description="Hits to return (at most limits.max_search_k); default 10, or the "
                          "limit if it is lower.")

    @model_validator(mode="after")
    def _one_input(self) -> SearchJSON:
        if (self.image is None) == (self.text is None):
            raise ValueError("give exactly one of image and text")
        return self


class LabelOut(BaseModel):
    label: str
    index: int
    score: float = Field(..., description="Softmax probability; multilabel adapters: sigmoid (softmax within "
                         "single-choice groups).")
    threshold: float | None = Field(None, description="Multilabel adapters: the attribute's saved threshold.")


class Served(BaseModel):
    adapter: str | None = Field(..., description="The adapter that computed the answer (None: the base model).")
    digest: str | None = Field(..., description="sha256 (16 hex) of that adapter's weights file.")
    rollout: str | None = Field(..., description="The rollout the request named, if any.")
    request_id: str | None = Field(None, description="uuid4 hex naming this answer for POST /v1/feedback (also the "
                                   "X-Request-Id header).")


class PredictResponse(Served):
    labels: list[LabelOut] = Field(..., description="Most probable first: the top_k classes, or for a multilabel "
                                   "adapter every attribute whose score reaches its threshold.")
    multilabel: bool = Field(False, description="True when the labels are a multilabel adapter's attributes.")


class EmbedResponse(Served):
    embedding: list[float] = Field(..., description="Classifier bases: pooled backbone features (the head's "
                                   "input). Dual encoders: the L2-normalised image or text embedding in their "
                                   "joint space.")
    dim: int


class GenerateResponse(Served):
    text: str = Field(..., description="The generated answer (special tokens removed, stripped).")
    tokens: int = Field(..., description="New tokens generated, the end-of-answer token included.")
    prompt_tokens: int = Field(..., description="Tokens of the prompt, the image's tokens included.")
    seconds: float = Field(..., description="From queued to answered, in the engine.")
    tokens_per_s: float = Field(..., description="tokens / seconds.")
    finish_reason: str = Field(..., description="stop: the model ended its answer; length: max_new_tokens reached.")
    batch_size: int = Field(..., description="Requests generated together in one call (this one included).")


class HitOut(BaseModel):
    rank: int = Field(..., description="1 = nearest.")
    row: int = Field(..., description="Row of the index.")
    score: float = Field(..., description="Cosine similarity of the query and the image.")
    path: str
    label: str | None
    labels: list[str] | None = Field(None, description="Multi-label data: every label of the image.")
    metadata: dict[str, Any]


class SearchResponse(Served):
    index: str
    adapter_sha256: str | None = Field(..., description="sha256 of the files of the adapter that embedded the "
                                       "query (and the index); None for the base model.")
    hits: list[HitOut] = Field(..., description="Nearest first.")


class AdapterOut(BaseModel):
    """A loaded adapter. The admin sees every field; a client only those the serve config's
    `expose.adapter_fields` names (not `source` and `path` by default: they name server folders)."""

    name: str
    source: str | None = Field(None, description="As given: a directory, or registry:NAME@VERSION.")
    path: str | None = Field(None, description="The folder loaded, on the server's disk.")
    digest: str | None = Field(None, description="sha256 (16 hex) of the adapter's weights file.")
    classes: list[str] | None = None
    bytes: int | None = Field(None, description="Bytes of the adapter's tensors (what loading it adds to memory).")
    loaded_at: float | None = None

    @classmethod
    def of(cls, record: LoadedAdapter, fields: Iterable[str] = ADAPTER_FIELDS) -> AdapterOut:
        """The record's `fields` (the others are left unset: dump with exclude_unset to leave them out)."""
        values = {"name": record.name, "source": record.source, "path": record.path, "digest": record.digest,
                  "classes": list(record.classes), "bytes": record.bytes, "loaded_at": record.loaded_at}
        return cls(**{field: values[field] for field in ("name", *fields)})


class LoadAdapter(_Body):
    name: str = Field(..., description="1-64 letters, digits, '_' or '-', starting with a letter.")
    path: str = Field(..., description="Adapter directory on the server (inside adapter_root if one is set), or "
                      "registry:NAME[@VERSION] from the server's registry (VERSION: a number, latest, promoted).")


class RolloutOut(RolloutConfig):
    name: str


class FeedbackJSON(_Body):
    """Feedback on one answer: its true label, whether it was clicked, or both; each answer takes feedback once."""

    request_id: str = Field(..., min_length=1, max_length=64, description="The answer's request_id.")
    label: str | None = Field(None, description="The true class, by name (one of the answering adapter's classes).")
    click: bool | None = Field(None, description="Whether the user clicked (acted on) the answer.")

    @model_validator(mode="after")
    def _something(self) -> FeedbackJSON:
        if self.label is None and self.click is None:
            raise ValueError("give a label (the true class), a click (true/false), or both")
        return self


class FeedbackOut(BaseModel):
    request_id: str
    adapter: str | None = Field(..., description="The adapter that answered (None: the base model).")
    rollout: str | None
    label: str | None
    correct: bool | None = Field(..., description="The answer's top-1 label equals `label`.")
    click: bool | None
    shadow: str | None = Field(..., description="The rollout's shadow, if it ran on this request (@base: the base "
                               "model).")
    shadow_correct: bool | None = Field(..., description="The shadow's top-1 label equals `label`.")


class ErrorOut(BaseModel):
    detail: str
    kind: str
