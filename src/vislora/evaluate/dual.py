"""Held-out scoring of dual encoders: prompt-classifier accuracy, contrastive loss, retrieval recall.

The trainer's dual-encoder tasks and `vislora clip eval` (`evaluate_dual`, a trained run opened with
vislora.runs.load_trained_dual) use the same two steps: `embed_rows` (images, and captions when the data has them,
through the adapted model) and `score_rows`. The prompt classifier's logits are scale * image_emb @ text_emb.T with
one text embedding per class, averaged over the prompt templates.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vislora.data.datasets import collate, open_dataset
from vislora.devices import resolve_device
from vislora.runs import input_spec, load_trained_dual
from vislora.tasks.classification import eval_batches
from vislora.tasks.clip import contrastive_loss, retrieval_recall, same_label, text_classifier


@dataclass
class DualEvalResult:
    """Held-out figures of a dual encoder; absent figures (no labels, no captions) are left out."""

    n: int
    skipped: int = 0
    figures: dict[str, float] = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return self.figures.get("accuracy", math.nan)

    @property
    def loss(self) -> float:
        return self.figures.get("loss", math.nan)

    def metrics(self) -> dict[str, float]:
        return dict(self.figures)


@torch.no_grad()
def embed_rows(model: nn.Module, batches: Iterable[dict[str, Any]], tokenizer: Any,
               device: torch.device | str = "cpu", autocast: Any = None) -> tuple[list[dict[str, Any]], list[int]]:
    """Rows {index, label, image emb[, caption, text emb]} on the CPU, and the indices of skipped samples."""
    rows, skipped = [], []
    for batch in eval_batches(model, batches, skipped):
        tokens = tokenizer(batch["caption"]) if "caption" in batch else {}
        with autocast() if autocast else contextlib.nullcontext():
            images, texts = model(images=batch["image"].to(device), **{k: v.to(device) for k, v in tokens.items()})
        for j, (index, label) in enumerate(zip(batch["index"].tolist(), batch["label"].tolist(), strict=True)):
            row = {"index": index, "label": label, "image": images[j].float().cpu()}
            if tokens:
                row.update(caption=batch["caption"][j], text=texts[j].float().cpu())
            rows.append(row)
    return rows, skipped


@torch.no_grad()
def score_rows(rows: Sequence[dict[str, Any]], model: Any, names: Sequence[str], templates: Sequence[str],
               device: torch.device | str = "cpu") -> dict[str, float]:
    """accuracy + loss of the prompt classifier (labelled rows); contrastive_loss, i2t/t2i recall@1/5/10 and their
    mean recall@1 (captioned rows). `model` is the dual encoder with its adapters active; it runs in eval mode
    (no dropout in the prompt classifier) and is put back as it was."""
    was_training = model.training
    model.eval()
    try:
        return _score(rows, model, names, templates, device)
    finally:
        model.train(was_training)


def _score(rows: Sequence[dict[str, Any]], model: Any, names: Sequence[str], templates: Sequence[str],
           device: torch.device | str) -> dict[str, float]:
    images = torch.stack([r["image"] for r in rows])  # [n, dim]
    labels = torch.tensor([r["label"] for r in rows])
    scale = model.logit_scale().float().cpu()
    figures: dict[str, float] = {}
    if names and (labels >= 0).all():
        classifier = text_classifier(model, names, templates, device).cpu()  # [classes, dim]
        logits = scale * images @ classifier.T  # [n, classes]
        figures["accuracy"] = (logits.argmax(1) == labels).float().mean().item()
        figures["loss"] = F.cross_entropy(logits, labels).item()
    if "text" in rows[0]:
        texts = torch.stack([r["text"] for r in rows])  # [n, dim]
        figures["contrastive_loss"] = contrastive_loss(images, texts, scale, same_label(labels)).item()
        figures.setdefault("loss", figures["contrastive_loss"])
        recall = retrieval_recall(images, texts, range(len(rows)))
        figures.update(recall.metrics())
        figures["recall@1"] = (recall.image_to_text[1] + recall.text_to_image[1]) / 2
    return figures


def evaluate_dual(adapter_dir: str | Path, data: str | Path, *, batch_size: int = 64, limit: int | None = None,
                  label_column: str | None = "label", templates: Sequence[str] | None = None,
                  seed: int = 0, device: str = "cpu") -> DualEvalResult:
    """Score a trained dual-encoder adapter on `data`: prompt-classifier accuracy with the run's class names and
    templates (or `templates`), and retrieval recall when the data has captions; the towers run on `device`
    (auto | cpu | cuda | cuda:N | mps, vislora.devices)."""
    place = resolve_device(device)
    model, task = load_trained_dual(adapter_dir)
    model.to(place)
    classes = task.get("classes") or None
    dataset = open_dataset(data, label_column=label_column if classes else None, classes=classes)
    if limit:
        dataset = dataset.subset(limit, seed=seed)
    dataset.read_as(input_spec(task), seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate,
                                         generator=torch.Generator())
    rows, skipped = embed_rows(model, loader, model.base_model.tokenize, place)
    if not rows:
        return DualEvalResult(n=0, skipped=len(skipped))
    names = task.get("class_names") or []
    figures = score_rows(rows, model.base_model, names, templates or task.get("templates") or [], place)
    return DualEvalResult(n=len(rows), skipped=len(skipped), figures=figures)
