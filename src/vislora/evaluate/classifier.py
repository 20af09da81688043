"""A trained classifier adapter scored on any data: alone (`evaluate_adapter`), or beside its base model
(`compare_adapter`, `compare_model`: vislora.evaluate.comparison, with latency).

The adapter folder is opened as a run (vislora.runs.load_trained: task.json names the model spec, classes and
input transform), and the data gets the run's classes and evaluation transform.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vislora.data.datasets import ImageDataset, collate, open_dataset
from vislora.devices import Placement
from vislora.errors import ConfigError
from vislora.evaluate.clinical import clinical_metrics, compare_clinical
from vislora.evaluate.collect import BaseHead, collect
from vislora.evaluate.comparison import Comparison, compare
from vislora.evaluate.latency import measure_latency
from vislora.io import atomic_write_text
from vislora.model import AdaptedModel
from vislora.run_config import EvalSection
from vislora.runs import load_trained
from vislora.tasks.classification import EvalResult, predict_rows, summarize


def open_eval_data(task: dict[str, Any], data: str | Path, limit: int | None = None, label_column: str = "label",
                   path_column: str = "path", seed: int = 0) -> ImageDataset:
    """`data` with the adapter's classes and evaluation transform; a stratified subset of `limit` images if given."""
    if task.get("task") == "multilabel":
        raise ConfigError("this is a multilabel adapter: compare it with vislora.evaluate.multilabel_comparison."
                          "compare_multilabel_adapter (`vislora eval` picks it by itself)")
    dataset = open_dataset(data, label_column=label_column, path_column=path_column, classes=task["classes"])
    if limit:
        dataset = dataset.subset(limit, seed=seed)
    dataset.read_as(task["input_spec"], seed)
    return dataset


def evaluate_adapter(adapter_dir: str | Path, data: str | Path, batch_size: int = 64, limit: int | None = None,
                     label_column: str = "label", path_column: str = "path", seed: int = 0,
                     predictions: str | Path | None = None, clinical: EvalSection | None = None) -> EvalResult:
    """Accuracy, loss, per-class and per-metadata-group accuracy of a trained adapter on `data`; with `clinical`
    settings also AUROC and sensitivity/specificity with intervals (`result.clinical`, ClinicalMetrics.to_dict())."""
    model, task = load_trained(adapter_dir)
    dataset = open_eval_data(task, data, limit, label_column, path_column, seed)
    rows, skipped = predict_rows(model, _loader(dataset, batch_size))
    result = summarize(rows, task["classes"], skipped=len(skipped))
    if clinical is not None and result.n:
        result.clinical = clinical_metrics(*result.probabilities(), task["classes"], **clinical.model_dump()).to_dict()
    if predictions is not None:
        write_predictions(result, dataset, Path(predictions))
    return result


def compare_adapter(adapter_dir: str | Path, data: str | Path, batch_size: int = 64, limit: int | None = None,
                    label_column: str = "label", path_column: str = "path", seed: int = 0,
                    predictions: str | Path | None = None, base_head: BaseHead = "trained", tolerance: float = 0.01,
                    latency_images: int = 8, progress: Callable[[Iterable, int], Iterable] | None = None,
                    clinical: EvalSection | None = None) -> Comparison:
    """Base vs adapted on the same images of `data` (see vislora.evaluate.comparison), plus latency on
    `latency_images`, and clinical metrics with `clinical` settings."""
    model, task = load_trained(adapter_dir)
    return compare_model(model, task, data, batch_size, limit, label_column, path_column, seed, predictions,
                         base_head, tolerance, latency_images, progress, clinical)


def compare_model(model: AdaptedModel, task: dict[str, Any], data: str | Path, batch_size: int = 64,
                  limit: int | None = None, label_column: str = "label", path_column: str = "path", seed: int = 0,
                  predictions: str | Path | None = None, base_head: BaseHead = "trained", tolerance: float = 0.01,
                  latency_images: int = 8, progress: Callable[[Iterable, int], Iterable] | None = None,
                  clinical: EvalSection | None = None, placement: Placement | None = None) -> Comparison:
    """compare_adapter for a classifier already loaded with `load_trained` (and placed by `placement`, whose
    device and dtype the images are sent to)."""
    dataset = open_eval_data(task, data, limit, label_column, path_column, seed)
    loader = _loader(dataset, batch_size)
    batches = progress(loader, len(loader)) if progress else loader
    run = collect(model, batches, base_head, placement)
    adapted, labels, rows = run.adapted, run.labels, run.rows
    comparison = compare(run.base, adapted, labels, task["classes"], [r["metadata"] for r in rows], tolerance,
                         data=f"{data} ({len(rows)} images)")
    comparison.skipped = len(run.skipped)
    if clinical is not None:
        comparison.clinical = compare_clinical(F.softmax(run.base.logits.double(), dim=-1),
                                               F.softmax(adapted.logits.double(), dim=-1), labels, task["classes"],
                                               **clinical.model_dump())
    if latency_images:
        first = collate([dataset[r["index"]] for r in rows[:latency_images]])
        images = placement.inputs(first["image"]) if placement else first["image"]
        comparison.latency = measure_latency(model, images)
    if predictions is not None:
        losses = F.cross_entropy(adapted.logits.double(), labels, reduction="none").tolist()
        scored = [{**r, "label": y, "pred": p, "loss": loss} for r, y, p, loss in
                  zip(rows, labels.tolist(), adapted.logits.argmax(-1).tolist(), losses, strict=True)]
        write_predictions(summarize(scored, task["classes"]), dataset, Path(predictions))
    return comparison


def _loader(dataset: ImageDataset, batch_size: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate, generator=torch.Generator())


def write_predictions(result: EvalResult, dataset: Any, path: Path) -> None:
    """One CSV row per image: image, label, prediction, correct, loss, and every metadata column."""
    columns = ["index", "image", "label", "prediction", "correct", "loss", *dataset.metadata_columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for row in result.predictions:
        writer.writerow({"index": row["index"], "image": dataset.describe(row["index"]), "label": row["label_class"],
                         "prediction": row["pred_class"], "correct": int(row["label"] == row["pred"]),
                         "loss": f"{row['loss']:.6f}", **row["metadata"]})
    atomic_write_text(path, buffer.getvalue())
