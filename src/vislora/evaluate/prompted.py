"""Held-out scoring of prompted attributes (vislora.tasks.prompted): zero-shot and adapted, with calibrated
per-attribute thresholds.

Zero-shot use is the base dual encoder's prompted scores with thresholds tuned on validation data
(`zero_shot_attributes`); a trained prompted run saves the thresholds tuned for its adapter and for the base
(task.json `thresholds`, `zero_shot_thresholds`), and `compare_prompted` (`vislora eval` on such an adapter) scores
both on new data, per attribute, at those thresholds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from vislora.data.attributes import AttributeSet
from vislora.data.datasets import ImageDataset, MultiLabelFormat, collate, open_dataset
from vislora.data.transforms import SampleTransform, build_transform
from vislora.errors import ConfigError
from vislora.evaluate.dual import embed_rows
from vislora.evaluate.multilabel import (
    DEFAULT_THRESHOLD,
    MultilabelMetrics,
    ThresholdMode,
    Thresholds,
    multilabel_metrics,
    tune_thresholds,
)
from vislora.runs import input_spec, load_trained_dual
from vislora.tasks.clip import DEFAULT_TEMPLATES
from vislora.tasks.multilabel import attribute_scores, saved_attributes, saved_thresholds
from vislora.tasks.prompted import PROMPTED_TASK, attribute_prompts, logit_bias, prompt_names, prompted_logits


@dataclass
class PromptedScores:
    """Prompted scores [N, A] and multi-hot targets [N, A] of N images (sorted by dataset index), and how many
    corrupt images were skipped."""

    scores: torch.Tensor
    targets: torch.Tensor
    logits: torch.Tensor
    skipped: int = 0


@torch.no_grad()
def prompted_scores(model: Any, rows: Sequence[Mapping[str, Any]], attributes: AttributeSet, names: Sequence[str],
                    templates: Sequence[str], device: torch.device | str = "cpu", skipped: int = 0) -> PromptedScores:
    """Scores of embedded `rows` ({index, label: multi-hot, image: embedding}, from `embed_rows`) against the
    attributes' prompts through `model` (a dual encoder with its adapters active), in eval mode."""
    if not rows:
        raise ConfigError("no readable image to score: the data is empty or every image was skipped as corrupt")
    was_training = model.training
    model.eval()
    try:
        prompts = attribute_prompts(model, names, templates, device).float().cpu()  # [A, dim]
        scale, bias = model.logit_scale().float().cpu(), logit_bias(model).float().cpu()
    finally:
        model.train(was_training)
    images = torch.stack([r["image"] for r in rows])  # [N, dim]
    logits = prompted_logits(images, prompts, scale, bias)  # [N, A]
    targets = torch.tensor([r["label"] for r in rows], dtype=torch.float32).reshape(len(rows), len(attributes))
    return PromptedScores(attribute_scores(logits, attributes), targets, logits, skipped)


def score_dataset(model: Any, dataset: ImageDataset, attributes: AttributeSet, names: Sequence[str],
                  templates: Sequence[str], batch_size: int = 64, base: bool = False) -> PromptedScores:
    """Prompted scores of a whole (multi-label) dataset; `base` scores the dual encoder without its adapters."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate,
                                         generator=torch.Generator())
    dual = getattr(model, "base_model", model)  # the dual encoder, adapters injected in place
    with _without_adapters(model) if base else contextlib.nullcontext():
        rows, skipped = embed_rows(model, loader, dual.tokenize)
        return prompted_scores(dual, rows, attributes, names, templates, skipped=len(skipped))


def zero_shot_attributes(model: Any, attributes: AttributeSet, val: ImageDataset, test: ImageDataset | None = None,
                         class_names: Mapping[str, str] | None = None,
                         templates: Sequence[str] = DEFAULT_TEMPLATES, mode: ThresholdMode = "max_f1",
                         target_precision: float = 0.9, batch_size: int = 64,
                         train_counts: Mapping[str, int] | None = None,
                         rare_below: int = 10) -> tuple[Thresholds, MultilabelMetrics]:
    """Zero-shot prompted attributes of a dual encoder as it is: thresholds tuned on `val`, and the metrics of
    `test` (default: `val` itself) at those thresholds. Both datasets carry their transforms and `attributes`."""
    names = prompt_names(list(attributes.names), class_names or {})
    tuning = score_dataset(model, val, attributes, names, templates, batch_size)
    thresholds = tune_thresholds(tuning.scores, tuning.targets, attributes.names, mode, target_precision,
                                 tuned_on=val.name)
    scored = tuning if test is None else score_dataset(model, test, attributes, names, templates, batch_size)
    metrics = multilabel_metrics(scored.scores, scored.targets, attributes.names, thresholds.values,
                                 train_counts=train_counts, rare_below=rare_below)
    metrics.skipped = scored.skipped
    return thresholds, metrics


@dataclass
class AttributeDelta:
    """One attribute, zero-shot (base) and adapted: AP and F1 at each model's thresholds."""

    name: str
    positives: int
    base_ap: float
    adapted_ap: float
    base_f1: float
    adapted_f1: float
    rare: bool = False

    @property
    def ap_delta(self) -> float:
        return self.adapted_ap - self.base_ap


@dataclass
class PromptedComparison:
    """Zero-shot (base dual encoder, its own tuned thresholds) vs adapted prompted attributes on the same images."""

    data: str
    base: MultilabelMetrics
    adapted: MultilabelMetrics
    per_attribute: list[AttributeDelta]
    skipped: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"data": self.data, "skipped": self.skipped, "base": self.base.to_dict(),
                "adapted": self.adapted.to_dict(),
                "per_attribute": [{**asdict(d), "ap_delta": d.ap_delta} for d in self.per_attribute]}


def compare_prompted(adapter_dir: str | Path, data: str | Path, *, batch_size: int = 64, limit: int | None = None,
                     label_column: str = "label", path_column: str = "path", seed: int = 0) -> PromptedComparison:
    """Score a prompted run's adapter and its base dual encoder on multi-label `data` (the run's separator; labels
    checked against its attributes): mAP, F1, rare mAP and per-attribute AP/F1, each at the thresholds tuned for
    it in training."""
    model, task = load_trained_dual(adapter_dir)
    if task.get("task") != PROMPTED_TASK:
        raise ConfigError(f"{adapter_dir} is a {task.get('task')!r} run; compare_prompted scores "
                          f"{PROMPTED_TASK} runs (vislora clip eval scores the other dual-encoder runs)")
    attributes = saved_attributes(task)
    dataset = open_dataset(data, label_column=label_column, path_column=path_column,
                           multilabel=MultiLabelFormat(task.get("separator", "|"), task.get("allow_empty", False)),
                           attributes=attributes)
    if limit:
        dataset = dataset.subset(limit, seed=seed)
    dataset.transform = SampleTransform(build_transform(input_spec(task), train=False), seed)
    names, templates = list(task.get("class_names") or attributes.names), task.get("templates") or DEFAULT_TEMPLATES
    counts, rare_below = task.get("train_counts"), task.get("rare_below", 10)
    results = {}
    for which, base in (("base", True), ("adapted", False)):
        scored = score_dataset(model, dataset, attributes, names, templates, batch_size, base=base)
        saved = {**task, "thresholds": task.get("zero_shot_thresholds")} if base else task
        results[which] = multilabel_metrics(scored.scores, scored.targets, attributes.names,
                                            saved_thresholds(saved, DEFAULT_THRESHOLD).tolist(), train_counts=counts,
                                            rare_below=rare_below)
        results[which].skipped = scored.skipped
    deltas = [AttributeDelta(b.name, b.positives, b.ap, a.ap, b.f1, a.f1, a.rare)
              for b, a in zip(results["base"].per_attribute, results["adapted"].per_attribute, strict=True)]
    return PromptedComparison(str(data), results["base"], results["adapted"], deltas, results["adapted"].skipped)


@contextlib.contextmanager
def _without_adapters(model: Any) -> Iterator[None]:
    if not hasattr(model, "disabled"):
        raise ConfigError(f"a {type(model).__name__} has no adapters to leave out; score it as it is")
    with model.disabled():
        yield

