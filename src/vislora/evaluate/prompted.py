"""Held-out scoring of prompted attributes (vislora.tasks.prompted): zero-shot and adapted, with calibrated
per-attribute thresholds.

Zero-shot use is the base dual encoder's prompted scores with thresholds tuned on validation data
(`zero_shot_attributes`); a trained prompted run saves the thresholds tuned for its adapter and for the base
(task.json `thresholds`, `zero_shot_thresholds`), and `compare_prompted` (`vislora eval` on such an adapter) scores
both on new data, per attribute, at those thresholds, in the shape of a multilabel tagger's comparison
(vislora.evaluate.multilabel_comparison).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vislora.data.attributes import AttributeSet
from vislora.data.datasets import ImageDataset, collate
from vislora.errors import ConfigError
from vislora.evaluate.drift import embedding_drift
from vislora.evaluate.dual import embed_rows
from vislora.evaluate.multilabel import (
    DEFAULT_THRESHOLD,
    MultilabelMetrics,
    ThresholdMode,
    Thresholds,
    multilabel_metrics,
    tune_thresholds,
)
from vislora.evaluate.multilabel_comparison import (
    MultilabelComparison,
    attribute_deltas,
    open_multilabel_data,
    thresholds_source,
    write_multilabel_predictions,
)
from vislora.model import AdaptedModel
from vislora.runs import input_spec, load_trained_dual
from vislora.tasks.clip import DEFAULT_TEMPLATES
from vislora.tasks.multilabel import attribute_scores, saved_attributes, saved_thresholds
from vislora.tasks.prompted import PROMPTED_TASK, attribute_prompts, logit_bias, prompt_names, prompted_logits

ZERO_SHOT = ("the base dual encoder zero-shot: the same prompts through both towers without adapters, its own logit "
             "scale and bias, at the thresholds tuned for it on the run's validation data")


@dataclass
class PromptedScores:
    """Prompted scores and logits [N, A], multi-hot targets [N, A] and image embeddings of N images (in `indices`
    order, dataset indices), and how many corrupt images were skipped."""

    scores: torch.Tensor
    targets: torch.Tensor
    logits: torch.Tensor
    embeddings: torch.Tensor  # [N, dim] the images'
    indices: list[int]
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
    return PromptedScores(attribute_scores(logits, attributes), targets, logits, images,
                          [r["index"] for r in rows], skipped)


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


def compare_prompted(adapter_dir: str | Path, data: str | Path, *, batch_size: int = 64, limit: int | None = None,
                     label_column: str = "label", path_column: str = "path", seed: int = 0,
                     predictions: str | Path | None = None) -> MultilabelComparison:
    """A prompted run's adapter vs its base dual encoder zero-shot on multi-label `data` (read as the run's
    training data was, checked against its attributes): mAP, F1, rare mAP, per-attribute AP/F1, each model at the
    thresholds tuned for it in training, and the drift of the image embeddings. `predictions` gets one CSV row per
    image with the adapted model's scores (as for multilabel taggers)."""
    model, task = load_trained_dual(adapter_dir)
    if task.get("task") != PROMPTED_TASK:
        raise ConfigError(f"{adapter_dir} is a {task.get('task')!r} run; compare_prompted scores "
                          f"{PROMPTED_TASK} runs (vislora clip eval scores the other dual-encoder runs)")
    return compare_prompted_model(model, task, data, batch_size=batch_size, limit=limit, label_column=label_column,
                                  path_column=path_column, seed=seed, predictions=predictions)


def compare_prompted_model(model: AdaptedModel, task: dict[str, Any], data: str | Path, *, batch_size: int = 64,
                           limit: int | None = None, label_column: str = "label", path_column: str = "path",
                           seed: int = 0, predictions: str | Path | None = None) -> MultilabelComparison:
    """compare_prompted for a prompted run already opened with `load_trained_dual` (its model and task.json)."""
    attributes = saved_attributes(task)
    dataset = open_multilabel_data({**task, "input_spec": input_spec(task)}, data, limit, label_column, path_column,
                                   seed)
    names, templates = list(task.get("class_names") or attributes.names), task.get("templates") or DEFAULT_TEMPLATES
    counts, rare_below = task.get("train_counts"), task.get("rare_below", 10)
    scored, measured = {}, {}
    for which, thresholds in (("base", task.get("zero_shot_thresholds")), ("adapted", task.get("thresholds"))):
        scored[which] = score_dataset(model, dataset, attributes, names, templates, batch_size, base=which == "base")
        cut = saved_thresholds({**task, "thresholds": thresholds}, DEFAULT_THRESHOLD).tolist()
        measured[which] = multilabel_metrics(scored[which].scores, scored[which].targets, attributes.names, cut,
                                             counts, rare_below)
    base, adapted = measured["base"], measured["adapted"]
    comparison = MultilabelComparison(
        data=f"{data} ({adapted.n} images)", base=base, adapted=adapted, per_attribute=attribute_deltas(base, adapted),
        drift=embedding_drift(scored["base"].embeddings, scored["adapted"].embeddings),
        thresholds=f"adapted: {thresholds_source(task.get('thresholds'))}; base: "
                   f"{thresholds_source(task.get('zero_shot_thresholds'))}",
        skipped=scored["adapted"].skipped, baseline=ZERO_SHOT, task=PROMPTED_TASK)
    if predictions is not None:
        write_multilabel_predictions(dataset, [{"index": i, "metadata": dataset.records[i].metadata}
                                               for i in scored["adapted"].indices], scored["adapted"].scores,
                                     saved_thresholds(task), Path(predictions))
    return comparison


@contextlib.contextmanager
def _without_adapters(model: Any) -> Iterator[None]:
    if not hasattr(model, "disabled"):
        raise ConfigError(f"a {type(model).__name__} has no adapters to leave out; score it as it is")
    with model.disabled():
        yield

