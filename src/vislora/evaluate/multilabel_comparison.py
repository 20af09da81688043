"""Base vs adapted for a multi-label tagger (task.kind multilabel), on the same images.

Both models are scored as the trained tagger scores (sigmoid per attribute, softmax within single-choice groups) and
measured with vislora.evaluate.multilabel at the thresholds saved with the adapter (tuned for the adapted model on
the run's validation data). "Base" is what vislora.evaluate.collect runs: by default the backbone without its
adapters under the trained head (`base_head="trained"`), so the difference is what the adapters add.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from vislora.data.datasets import ImageDataset, MultiLabelFormat, collate, open_dataset
from vislora.devices import Placement
from vislora.diagnostics.records import json_safe
from vislora.evaluate.collect import BaseHead, collect
from vislora.evaluate.drift import Drift, embedding_drift
from vislora.evaluate.multilabel import MultilabelMetrics, multilabel_metrics
from vislora.io import atomic_write_text
from vislora.model import AdaptedModel
from vislora.runs import load_trained
from vislora.tasks.multilabel import attribute_scores, saved_attributes, saved_thresholds

BASELINES = {"trained": "the backbone without its adapters, with the trained head",
             "original": "the backbone without its adapters, with its own head"}


@dataclass
class AttributeDelta:
    """One attribute before and after: AP (NaN without positives) and F1 at the saved threshold."""

    name: str
    positives: int
    train_positives: int | None
    rare: bool
    threshold: float
    base_ap: float
    adapted_ap: float
    base_f1: float
    adapted_f1: float

    @property
    def ap_delta(self) -> float:
        return self.adapted_ap - self.base_ap


@dataclass
class MultilabelComparison:
    """Base vs adapted multi-label metrics on the same data; `per_attribute` in attribute order."""

    data: str
    base: MultilabelMetrics
    adapted: MultilabelMetrics
    per_attribute: list[AttributeDelta]
    drift: Drift | None
    thresholds: str  # where the thresholds come from
    skipped: int = 0
    baseline: str = BASELINES["trained"]
    task: str = "multilabel"  # the run's task.kind (prompted_multilabel for prompted attributes)

    @property
    def rare(self) -> list[AttributeDelta]:
        return [d for d in self.per_attribute if d.rare]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able data (non-finite floats become None); every attribute row also carries `ap_delta`."""
        return json_safe({**asdict(self),
                          "per_attribute": [{**asdict(d), "ap_delta": d.ap_delta} for d in self.per_attribute]})


def compare_multilabel(base_logits: torch.Tensor, adapted_logits: torch.Tensor, targets: torch.Tensor,
                       task: dict[str, Any], data: str = "", drift: Drift | None = None) -> MultilabelComparison:
    """Metrics of both models' logits [N, A] against multi-hot targets [N, A] at the thresholds in `task` (a
    multilabel task.json), with rare attributes from its training counts."""
    attributes = saved_attributes(task)
    thresholds = saved_thresholds(task)
    names = list(attributes.names)
    counts, rare_below = task.get("train_counts"), task.get("rare_below", 10)

    def measure(logits: torch.Tensor) -> MultilabelMetrics:
        scores = attribute_scores(logits.float(), attributes)
        return multilabel_metrics(scores, targets, names, thresholds.tolist(), counts, rare_below)

    base, adapted = measure(base_logits), measure(adapted_logits)
    return MultilabelComparison(data=data, base=base, adapted=adapted, per_attribute=attribute_deltas(base, adapted),
                                drift=drift, thresholds=thresholds_source(task.get("thresholds")))


def attribute_deltas(base: MultilabelMetrics, adapted: MultilabelMetrics) -> list[AttributeDelta]:
    """Each attribute's AP and F1 before and after, at the adapted model's threshold, in attribute order."""
    return [AttributeDelta(a.name, a.positives, a.train_positives, a.rare, a.threshold, b.ap, a.ap, b.f1, a.f1)
            for b, a in zip(base.per_attribute, adapted.per_attribute, strict=True)]


def thresholds_source(tuned: Mapping[str, Any] | None) -> str:
    """Where saved thresholds (task.json `thresholds`, a `Thresholds.to_dict()`) come from, for messages."""
    if not tuned:
        return "0.5 for every attribute (none were tuned)"
    return f"tuned ({tuned.get('mode')}) on {tuned.get('tuned_on') or 'the validation data'}"


def open_multilabel_data(task: dict[str, Any], data: str | Path, limit: int | None = None,
                         label_column: str = "label", path_column: str = "path", seed: int = 0) -> ImageDataset:
    """`data` read as the adapter's training data was (separator, empty lists), checked against its attributes,
    with its evaluation transform; a subset of `limit` images (stratified by first label) if given."""
    fmt = task.get("format", {})
    dataset = open_dataset(data, label_column=label_column, path_column=path_column,
                           multilabel=MultiLabelFormat(fmt.get("separator", "|"), fmt.get("allow_empty", False)),
                           attributes=saved_attributes(task))
    if limit:
        dataset = dataset.subset(limit, seed=seed)
    dataset.read_as(task["input_spec"], seed)
    return dataset


def compare_multilabel_adapter(adapter_dir: str | Path, data: str | Path, batch_size: int = 64,
                               limit: int | None = None, label_column: str = "label", path_column: str = "path",
                               seed: int = 0, predictions: str | Path | None = None, base_head: BaseHead = "trained",
                               progress: Callable[[Iterable, int], Iterable] | None = None) -> MultilabelComparison:
    """Base vs adapted for a multilabel adapter folder on `data`."""
    model, task = load_trained(adapter_dir)
    return compare_multilabel_model(model, task, data, batch_size, limit, label_column, path_column, seed,
                                    predictions, base_head, progress)


def compare_multilabel_model(model: AdaptedModel, task: dict[str, Any], data: str | Path, batch_size: int = 64,
                             limit: int | None = None, label_column: str = "label", path_column: str = "path",
                             seed: int = 0, predictions: str | Path | None = None, base_head: BaseHead = "trained",
                             progress: Callable[[Iterable, int], Iterable] | None = None,
                             placement: Placement | None = None) -> MultilabelComparison:
    """compare_multilabel_adapter for a tagger already loaded with `load_trained` (and placed by `placement`);
    `predictions` gets one CSV row per image (labels, predicted attributes, every attribute's score)."""
    dataset = open_multilabel_data(task, data, limit, label_column, path_column, seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate,
                                         generator=torch.Generator())
    run = collect(model, progress(loader, len(loader)) if progress else loader, base_head, placement)
    drift = embedding_drift(run.base.embeddings, run.adapted.embeddings)
    comparison = compare_multilabel(run.base.logits, run.adapted.logits, run.labels, task,
                                    f"{data} ({len(run.rows)} images)", drift)
    comparison.skipped, comparison.baseline = len(run.skipped), BASELINES[base_head]
    if predictions is not None:
        scores = attribute_scores(run.adapted.logits, saved_attributes(task))
        write_multilabel_predictions(dataset, run.rows, scores, saved_thresholds(task), Path(predictions))
    return comparison


def write_multilabel_predictions(dataset: ImageDataset, rows: list[dict[str, Any]], scores: torch.Tensor,
                                 thresholds: torch.Tensor, path: Path) -> None:
    """One CSV row per image: index, image, labels, predicted (scores >= thresholds, '|'-joined), exact (1 when
    the two sets are equal), one score column per attribute, every metadata column."""
    names = dataset.classes
    columns = ["index", "image", "labels", "predicted", "exact", *[f"score:{n}" for n in names],
               *dataset.metadata_columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for row, score in zip(rows, scores.tolist(), strict=True):
        labels = dataset.records[row["index"]].labels or ()
        predicted = [n for n, s, t in zip(names, score, thresholds.tolist(), strict=True) if s >= t]
        writer.writerow({"index": row["index"], "image": dataset.describe(row["index"]), "labels": "|".join(labels),
                         "predicted": "|".join(predicted), "exact": int(set(predicted) == set(labels)),
                         **{f"score:{n}": f"{s:.6f}" for n, s in zip(names, score, strict=True)}, **row["metadata"]})
    atomic_write_text(path, buffer.getvalue())


def nan_text(value: float, digits: int = 4, signed: bool = False) -> str:
    """A figure for tables: '-' for NaN (an AP without positives); `signed` writes a + on gains."""
    return "-" if math.isnan(value) else f"{value:{'+' if signed else ''}.{digits}f}"
