"""Evaluate a trained adapter directory (it carries task.json: model spec, classes, input size) on any data."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import torch

from vislora.data.datasets import collate, open_dataset
from vislora.data.transforms import InputSpec, SampleTransform, build_transform
from vislora.errors import AdapterFileError
from vislora.io import atomic_write_text
from vislora.model import AdaptedModel, load_adapter
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
    base, _ = build_classifier(model_cfg["spec"], len(task["classes"]), model_cfg.get("pretrained", True),
                               model_cfg.get("head", "auto"), model_cfg.get("pooling", "cls"), spec.size,
                               **model_cfg.get("kwargs", {}))
    model = load_adapter(base, adapter_dir)
    return model.eval(), {**task, "input_spec": spec}


def evaluate_adapter(adapter_dir: str | Path, data: str | Path, batch_size: int = 64, limit: int | None = None,
                     label_column: str = "label", path_column: str = "path", seed: int = 0,
                     predictions: str | Path | None = None) -> EvalResult:
    """Accuracy, loss, per-class and per-metadata-group accuracy of a trained adapter on `data`."""
    model, task = load_trained(adapter_dir)
    dataset = open_dataset(data, label_column=label_column, path_column=path_column, classes=task["classes"])
    if limit:
        dataset = dataset.subset(limit, seed=seed)
    dataset.transform = SampleTransform(build_transform(task["input_spec"], train=False), seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate,
                                         generator=torch.Generator())
    rows, skipped = predict_rows(model, loader)
    result = summarize(rows, task["classes"], skipped=len(skipped))
    if predictions is not None:
        write_predictions(result, dataset, Path(predictions))
    return result


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
