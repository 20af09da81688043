"""Evaluate a trained adapter directory (it carries task.json: model spec, classes, input size) on any data.

`evaluate_adapter` scores the adapted model; `compare_adapter` puts it beside the base model (vislora.evaluate).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from vislora.data.datasets import ImageDataset, collate, open_dataset
from vislora.data.transforms import InputSpec, SampleTransform, build_transform
from vislora.errors import AdapterFileError
from vislora.evaluate import BaseHead, Comparison, collect, compare, measure_latency
from vislora.formats import load_adapter
from vislora.io import atomic_write_text
from vislora.model import AdaptedModel
from vislora.tasks.classification import EvalResult, build_classifier, predict_rows, summarize


def load_trained(adapter_dir: str | Path) -> tuple[AdaptedModel, dict[str, Any]]:
    """The classifier with the adapter loaded, in eval mode, and the adapter's task.json."""
    adapter_dir = Path(adapter_dir)
    task_file = adapter_dir / "task.json"
    if not task_file.is_file():
        raise AdapterFileError(f"{adapter_dir} has no task.json: it was not written by `vislora train`. Give a "
                               "run's adapter/, best/ or checkpoints/step-N/ folder")
    task = json.loads(task_file.read_text())
    model_cfg = task["model"]
    spec = InputSpec(**{**task["input"], "mean": tuple(task["input"]["mean"]), "std": tuple(task["input"]["std"])})
    pretrained = model_cfg.get("pretrained", True)
    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        if not pretrained:  # a randomly initialised base is rebuilt from the run's seed, as the trainer built it
            torch.manual_seed(task["seed"] if "seed" in task else run_seed(adapter_dir))
        base, _ = build_classifier(model_cfg["spec"], len(task["classes"]), pretrained, model_cfg.get("head", "auto"),
                                   model_cfg.get("pooling", "cls"), spec.size, **model_cfg.get("kwargs", {}))
    model = load_adapter(base, adapter_dir)
    return model.eval(), {**task, "input_spec": spec}


def run_seed(adapter_dir: Path) -> int:
    """run.seed of the run holding `adapter_dir` (RUN/adapter, RUN/best, RUN/checkpoints/step-N)."""
    for folder in (adapter_dir.parent, adapter_dir.parent.parent):
        if (folder / "config.yaml").is_file():
            return int((yaml.safe_load((folder / "config.yaml").read_text()) or {}).get("run", {}).get("seed", 0))
    raise AdapterFileError(f"{adapter_dir} was trained on a randomly initialised base model (model.pretrained: false), "
                           "which is rebuilt from the run's seed in its config.yaml, but no config.yaml is beside or "
                           "above the folder; keep the adapter inside its run directory")


def open_eval_data(task: dict[str, Any], data: str | Path, limit: int | None = None, label_column: str = "label",
                   path_column: str = "path", seed: int = 0) -> ImageDataset:
    """`data` with the adapter's classes and evaluation transform; a stratified subset of `limit` images if given."""
    dataset = open_dataset(data, label_column=label_column, path_column=path_column, classes=task["classes"])
    if limit:
        dataset = dataset.subset(limit, seed=seed)
    dataset.transform = SampleTransform(build_transform(task["input_spec"], train=False), seed)
    return dataset


def evaluate_adapter(adapter_dir: str | Path, data: str | Path, batch_size: int = 64, limit: int | None = None,
                     label_column: str = "label", path_column: str = "path", seed: int = 0,
                     predictions: str | Path | None = None) -> EvalResult:
    """Accuracy, loss, per-class and per-metadata-group accuracy of a trained adapter on `data`."""
    model, task = load_trained(adapter_dir)
    dataset = open_eval_data(task, data, limit, label_column, path_column, seed)
    rows, skipped = predict_rows(model, _loader(dataset, batch_size))
    result = summarize(rows, task["classes"], skipped=len(skipped))
    if predictions is not None:
        write_predictions(result, dataset, Path(predictions))
    return result


def compare_adapter(adapter_dir: str | Path, data: str | Path, batch_size: int = 64, limit: int | None = None,
                    label_column: str = "label", path_column: str = "path", seed: int = 0,
                    predictions: str | Path | None = None, base_head: BaseHead = "trained", tolerance: float = 0.01,
                    latency_images: int = 8, progress: Callable[[Iterable, int], Iterable] | None = None,
                    ) -> Comparison:
    """Base vs adapted on the same images of `data` (see vislora.evaluate), plus latency on `latency_images`."""
    model, task = load_trained(adapter_dir)
    return compare_model(model, task, data, batch_size, limit, label_column, path_column, seed, predictions,
                         base_head, tolerance, latency_images, progress)


def compare_model(model: AdaptedModel, task: dict[str, Any], data: str | Path, batch_size: int = 64,
                  limit: int | None = None, label_column: str = "label", path_column: str = "path", seed: int = 0,
                  predictions: str | Path | None = None, base_head: BaseHead = "trained", tolerance: float = 0.01,
                  latency_images: int = 8, progress: Callable[[Iterable, int], Iterable] | None = None,
                  ) -> Comparison:
    """compare_adapter for a classifier already loaded with `load_trained`."""
    dataset = open_eval_data(task, data, limit, label_column, path_column, seed)
    loader = _loader(dataset, batch_size)
    batches = progress(loader, len(loader)) if progress else loader
    run = collect(model, batches, base_head)
    adapted, labels, rows = run.adapted, run.labels, run.rows
    comparison = compare(run.base, adapted, labels, task["classes"], [r["metadata"] for r in rows], tolerance,
                         data=f"{data} ({len(rows)} images)")
    comparison.skipped = len(run.skipped)
    if latency_images:
        first = collate([dataset[r["index"]] for r in rows[:latency_images]])
        comparison.latency = measure_latency(model, first["image"])
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
