"""Running a classifier twice over the same images: with its adapters, and as the base model (adapters off).

"Base" is the backbone without its adapters; by default it keeps the trained head (a classifier's own head would
be untrained), so the difference is what the adapters add. The pooled features of both runs feed embedding drift.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from vislora.devices import Placement
from vislora.errors import ConfigError
from vislora.evaluate.comparison import Outputs
from vislora.model import AdaptedModel

BaseHead = Literal["trained", "original"]


@dataclass
class Collected:
    """Both models' outputs on the same readable images, their labels [N], rows {index, metadata}, and the
    indices of images skipped as corrupt."""

    base: Outputs
    adapted: Outputs
    labels: torch.Tensor
    rows: list[dict[str, Any]]
    skipped: list[int]


def classifier_parts(classifier: nn.Module) -> tuple[Callable[[torch.Tensor], torch.Tensor], nn.Module]:
    """(images -> pooled features [N, D], head) of a vislora classifier or a timm model with its own head."""
    if hasattr(classifier, "features") and hasattr(classifier, "head"):
        return classifier.features, classifier.head
    if hasattr(classifier, "forward_features") and hasattr(classifier, "get_classifier"):  # timm
        return (lambda x: classifier.forward_head(classifier.forward_features(x), pre_logits=True),
                classifier.get_classifier())
    raise ConfigError(f"cannot split a {type(classifier).__name__} into features and a head; before/after "
                      "evaluation needs a classifier built by vislora (build_classifier) or a timm model")


@torch.no_grad()
def collect(model: AdaptedModel, batches: Iterable[dict[str, Any]], base_head: BaseHead = "trained",
            placement: Placement | None = None) -> Collected:
    """Base and adapted outputs, labels and per-image rows {index, metadata} over `batches` of images; with a
    `placement` the images go to its device and dtype (the model must be placed there already), and the outputs come
    back float32 on the CPU either way.

    Each batch runs twice: with the adapters, then inside `model.disabled()`. base_head="trained" keeps the
    adapter's trained head for the base model; "original" uses the base model's own head.
    """
    if base_head not in ("trained", "original"):
        raise ConfigError(f"base_head must be 'trained' or 'original', got {base_head!r}")
    features, head = classifier_parts(model.base_model)
    was_training = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("base", "base_emb", "adapted", "adapted_emb", "labels")}
    rows: list[dict[str, Any]] = []
    skipped: list[int] = []
    try:
        for batch in batches:
            skipped += batch.get("skipped", [])
            if "image" not in batch:
                continue
            images = placement.inputs(batch["image"]) if placement else batch["image"]
            embeddings = features(images)  # [B, D]
            parts["adapted_emb"].append(embeddings.float().cpu())
            parts["adapted"].append(head(embeddings).float().cpu())
            with model.disabled():
                base_embeddings = features(images)
                if base_head == "original":
                    parts["base"].append(head(base_embeddings).float().cpu())
            if base_head == "trained":
                parts["base"].append(head(base_embeddings).float().cpu())
            parts["base_emb"].append(base_embeddings.float().cpu())
            parts["labels"].append(batch["label"])
            rows += [{"index": i, "metadata": m} for i, m in zip(batch["index"].tolist(), batch["metadata"],
                                                                  strict=True)]
    finally:
        model.train(was_training)
    if not rows:
        raise ConfigError("no readable image to evaluate: every image was skipped as corrupt")
    cat = {k: torch.cat(v) for k, v in parts.items()}
    return Collected(Outputs(cat["base"], cat["base_emb"]), Outputs(cat["adapted"], cat["adapted_emb"]),
                     cat["labels"], rows, skipped)


@contextlib.contextmanager
def recording_head(model: AdaptedModel) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Inside the block, every eval-mode call of the classifier's head appends (embeddings [B, D], logits [B, C]).

    An evaluation that already runs (the trainer's last one) then yields the adapted embeddings for free.
    """
    _, head = classifier_parts(model.base_model)
    records: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if not module.training:
            records.append((args[0].detach().float(), output.detach().float()))

    handle = head.register_forward_hook(hook)
    try:
        yield records
    finally:
        handle.remove()
