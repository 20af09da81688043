"""What a report reads from a run directory (config.yaml, metrics.jsonl, summary.json, the adapter's task.json)
and from the training data (size, classes, metadata coverage)."""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vislora.data.check import COVERAGE_FIELDS, metadata_coverage_of
from vislora.data.datasets import ImageDataset, MultiLabelFormat, open_dataset
from vislora.errors import VisloraError

logger = logging.getLogger(__name__)


@dataclass
class RunInfo:
    """A training run as written by the trainer."""

    run_dir: Path
    adapter_dir: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    summary: dict[str, Any] | None
    task: dict[str, Any]

    @property
    def name(self) -> str:
        return self.run_dir.resolve().name


@dataclass
class DataSummary:
    """Size, class balance and metadata coverage (% of rows with licence, capture date, location, ...)."""

    source: str
    n_images: int
    class_counts: dict[str, int]
    coverage: dict[str, float] = field(default_factory=dict)

    @property
    def missing_provenance(self) -> list[str]:
        """Provenance fields (licence, capture date, location) that some rows lack."""
        return [name for name in COVERAGE_FIELDS if self.coverage.get(name, 0.0) < 100.0]


def load_run(run_dir: str | Path, adapter: str = "adapter") -> RunInfo:
    """Read a run directory; `adapter` names the folder to report on (adapter, best, checkpoints/step-N)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise VisloraError(f"{run_dir} is not a run directory: config.yaml is missing (found: "
                           f"{sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else 'no such folder'}). "
                           "Give the run.output_dir of a `vislora train` run")
    adapter_dir = run_dir / adapter
    if not (adapter_dir / "task.json").is_file():
        raise VisloraError(f"{adapter_dir} holds no trained adapter (task.json missing); the run may still be "
                           "training or was killed: report on --adapter best or a checkpoints/step-N folder")
    return RunInfo(run_dir=run_dir, adapter_dir=adapter_dir,
                   config=yaml.safe_load((run_dir / "config.yaml").read_text()) or {},
                   metrics=read_metrics(run_dir / "metrics.jsonl"),
                   summary=json.loads((run_dir / "summary.json").read_text())
                   if (run_dir / "summary.json").is_file() else None,
                   task=json.loads((adapter_dir / "task.json").read_text()))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl rows; a line torn by a kill is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("skipping a torn line in %s", path)
    return rows


def summarize_data(dataset: ImageDataset) -> DataSummary:
    """Class counts (images per attribute for multi-label data) and metadata coverage of `dataset` (the same
    figures as `vislora data check`)."""
    labels = Counter(label for labels in dataset.label_sets() for label in set(labels))
    return DataSummary(source=dataset.name, n_images=len(dataset),
                       class_counts={c: labels.get(c, 0) for c in dataset.classes},
                       coverage=metadata_coverage_of(dataset))


def training_data(info: RunInfo) -> DataSummary | None:
    """The run's training data as it was used (same subset), or None if it cannot be opened here."""
    data = info.config.get("data", {})
    task = info.config.get("task", {})
    multilabel = None
    if task.get("kind") == "multilabel":
        settings = task.get("multilabel", {})
        multilabel = MultiLabelFormat(settings.get("separator", "|"), settings.get("allow_empty", False))
    try:
        dataset = open_dataset(data["train"], label_column=data.get("label_column", "label"),
                               path_column=data.get("path_column", "path"), multilabel=multilabel)
    except (VisloraError, KeyError, OSError) as exc:
        logger.warning("training data %s cannot be opened (%s); the report leaves its summary out",
                       data.get("train"), exc)
        return None
    if data.get("train_limit"):
        dataset = dataset.subset(data["train_limit"], seed=info.config.get("run", {}).get("seed", 0))
    return summarize_data(dataset)


@dataclass
class ReportFiles:
    """Where the report went."""

    folder: Path
    html: Path
    model_card: Path
    diagnostics: Path
    evaluation: Path | None
    plots: list[Path]
