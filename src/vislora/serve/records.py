"""What the engine hands back: loaded-adapter records, one job's output, predictions and embeddings."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vislora.errors import ServeError


@dataclass(frozen=True)
class LoadedAdapter:
    """An adapter the engine serves."""

    name: str
    source: str  # as given: a directory or registry:NAME@VERSION
    path: str  # the folder loaded
    digest: str  # sha256 of its weights file, first 16 hex digits
    classes: tuple[str, ...]
    bytes: int  # its tensors: low-rank pairs, DoRA magnitudes, its own copies of saved modules (head)
    loaded_at: float  # unix time


@dataclass(frozen=True)
class Output:
    """One sample computed by the engine."""

    logits: torch.Tensor | None  # (classes,); None for texts, and for dual-encoder adapters without classes
    features: torch.Tensor  # (width,) a classifier's pooled backbone features (the head's input), or a dual
    # encoder's L2-normalised image or text embedding
    adapter: str | None
    digest: str | None
    rollout: str | None  # the rollout the request named, if any
    classes: tuple[str, ...] | None  # None: the base head predicts nothing meaningful
    queue_wait_s: float


@dataclass(frozen=True)
class Label:
    label: str
    index: int
    score: float  # softmax probability


@dataclass(frozen=True)
class Prediction:
    adapter: str | None
    digest: str | None
    rollout: str | None  # the rollout the request named, if any
    labels: tuple[Label, ...]  # best first


@dataclass(frozen=True)
class Embedding:
    adapter: str | None
    digest: str | None
    rollout: str | None  # the rollout the request named, if any
    vector: torch.Tensor  # (width,)


def top_k(output: Output, k: int) -> tuple[Label, ...]:
    """The k most probable classes of one output, best first."""
    if output.classes is None or output.logits is None:
        who = "the base model" if output.adapter is None else f"adapter {output.adapter!r}"
        raise ServeError(f"{who} computed no class scores for this input (a text, an adapter trained without class "
                         "labels, or a base head that names no classes); predict images with an adapter that has "
                         "classes, or embed instead")
    probs = torch.softmax(output.logits.double(), dim=-1)  # (classes,)
    scores, indices = probs.topk(min(k, probs.shape[0]))
    return tuple(Label(output.classes[i], i, float(s)) for s, i in zip(scores.tolist(), indices.tolist(), strict=True))
