"""What the engine hands back: loaded-adapter records, one job's output, predictions and embeddings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vislora.data.attributes import AttributeSet
from vislora.errors import ServeError
from vislora.tasks.multilabel import attribute_scores, saved_attributes, saved_thresholds
from vislora.tasks.prompted import PROMPTED_TASK


@dataclass(frozen=True)
class Tagger:
    """How a multilabel adapter answers: its attributes and their saved thresholds [attributes]."""

    attributes: AttributeSet
    thresholds: torch.Tensor

    def tags(self, logits: torch.Tensor) -> tuple[Label, ...]:
        """The attributes whose score (sigmoid; softmax within single-choice groups) reaches its threshold, highest
        score first."""
        scores = attribute_scores(logits.double()[None], self.attributes)[0]  # (attributes,)
        above = [i for i in torch.argsort(scores, descending=True).tolist() if scores[i] >= self.thresholds[i]]
        return tuple(Label(self.attributes.names[i], i, float(scores[i]), float(self.thresholds[i])) for i in above)


def tagger_of(task: dict[str, Any] | None) -> Tagger | None:
    """The Tagger of a multilabel (or prompted_multilabel) adapter's task.json; None for other adapters."""
    if not task or task.get("task") not in ("multilabel", PROMPTED_TASK):
        return None
    return Tagger(saved_attributes(task), saved_thresholds(task).double())


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
    tagger: Tagger | None = None  # multilabel adapters: predictions are the attributes above their thresholds


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
    tagger: Tagger | None = None  # set for a multilabel adapter
    request_id: str = ""  # uuid4 hex that feedback names this answer by (vislora.serve.feedback)


@dataclass(frozen=True)
class Label:
    label: str
    index: int
    score: float  # softmax probability; multilabel: sigmoid (softmax within single-choice groups)
    threshold: float | None = None  # multilabel: the attribute's saved threshold


@dataclass(frozen=True)
class Prediction:
    adapter: str | None
    digest: str | None
    rollout: str | None  # the rollout the request named, if any
    labels: tuple[Label, ...]  # best first
    multilabel: bool = False  # labels are the attributes above their thresholds, not the top k classes
    request_id: str = ""  # what engine.feedback.give names this answer by


@dataclass(frozen=True)
class Embedding:
    adapter: str | None
    digest: str | None
    rollout: str | None  # the rollout the request named, if any
    vector: torch.Tensor  # (width,)
    request_id: str = ""  # what engine.feedback.give names this answer by


def top1(logits: torch.Tensor | None, classes: tuple[str, ...] | None) -> str | None:
    """The name of the highest-scoring class; None without class scores (texts, embeddings of a base whose head
    names no classes)."""
    if logits is None or classes is None:
        return None
    return classes[int(logits.argmax())]


def labels_of(output: Output, k: int) -> tuple[Label, ...]:
    """A multilabel adapter's attributes above their thresholds (every one, whatever `k`), else `top_k`."""
    if output.tagger is not None and output.logits is not None:
        return output.tagger.tags(output.logits)
    return top_k(output, k)


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
