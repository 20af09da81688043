"""Before/after comparison: the base model and the adapted model scored on the same images.

Metrics of both (vislora.evaluate.metrics), then per class and per metadata group the accuracy before and after,
with a regression flagged where the adapted model loses more than `tolerance`, and McNemar's exact test on the
images one model got right and the other wrong (is the change more than noise?); embedding drift when both
models' features are known, latency when measured, and clinical metrics (vislora.evaluate.clinical) when asked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from vislora.diagnostics.records import json_safe
from vislora.evaluate.clinical import ClinicalComparison
from vislora.evaluate.drift import Drift, embedding_drift
from vislora.evaluate.latency import Latency
from vislora.evaluate.metrics import Metrics, classification_metrics


@dataclass
class Outputs:
    """What one model produced for N images: logits [N, C] and pooled embeddings [N, D] (None if unknown)."""

    logits: torch.Tensor
    embeddings: torch.Tensor | None = None


@dataclass
class Delta:
    """Accuracy of one class or group before and after; a regression loses more than the tolerance.

    `lost`/`gained` count images the base got right and the adapted model wrong, and the reverse; `p_value` is
    the exact two-sided McNemar test on them (the same images scored twice): small means the change is not noise.
    """

    name: str
    n: int
    base: float
    adapted: float
    regression: bool
    lost: int = 0
    gained: int = 0
    p_value: float = 1.0

    @property
    def delta(self) -> float:
        return self.adapted - self.base


@dataclass
class Comparison:
    """Base vs adapted on the same data."""

    data: str
    base: Metrics
    adapted: Metrics
    per_class: list[Delta]
    per_group: dict[str, list[Delta]]
    drift: Drift | None
    tolerance: float
    latency: Latency | None = None
    skipped: int = 0  # corrupt images left out
    baseline: str = "the backbone without its adapters, with the trained head"
    clinical: ClinicalComparison | None = None  # AUROC, sensitivity/specificity with intervals, when asked

    @property
    def regressions(self) -> list[Delta]:
        """Classes and groups whose accuracy dropped by more than `tolerance`."""
        return [d for d in self.per_class if d.regression] + [
            d for deltas in self.per_group.values() for d in deltas if d.regression]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able data (non-finite floats become None); every delta also carries `delta` = adapted - base."""
        def rows(deltas: list[Delta]) -> list[dict[str, Any]]:
            return [{**asdict(d), "delta": d.delta} for d in deltas]

        return json_safe({**asdict(self), "per_class": rows(self.per_class),
                          "per_group": {k: rows(v) for k, v in self.per_group.items()},
                          "regressions": rows(self.regressions)})


def compare(base: Outputs, adapted: Outputs, labels: torch.Tensor, classes: Sequence[str],
            metadata: Sequence[dict[str, str]] | None = None, tolerance: float = 0.01, data: str = "") -> Comparison:
    """Metrics of both models, per-class and per-group deltas (regression: adapted < base - tolerance), drift."""
    before = classification_metrics(base.logits, labels, classes, metadata)
    after = classification_metrics(adapted.logits, labels, classes, metadata)
    right_before, right_after = base.logits.argmax(-1) == labels, adapted.logits.argmax(-1) == labels

    def delta(name: str, mask: torch.Tensor) -> Delta:
        old, new = right_before[mask].double().mean().item(), right_after[mask].double().mean().item()
        lost, gained = int((right_before & ~right_after & mask).sum()), int((~right_before & right_after & mask).sum())
        return Delta(name, int(mask.sum()), old, new, new < old - tolerance, lost, gained, mcnemar_p(lost, gained))

    per_class = [delta(c, labels == i) for i, c in enumerate(classes) if c in after.per_class]
    per_group = {column: [delta(value, torch.tensor([m.get(column) == value for m in metadata or []]))
                          for value in values] for column, values in after.groups.items()}
    drift = None
    if base.embeddings is not None and adapted.embeddings is not None:
        drift = embedding_drift(base.embeddings, adapted.embeddings)
    return Comparison(data=data, base=before, adapted=after, per_class=per_class, per_group=per_group, drift=drift,
                      tolerance=tolerance)


def points(share: float) -> str:
    """0.01 -> '1 point', 0.025 -> '2.5 points': an accuracy difference in percentage points."""
    value = 100 * share
    return f"{value:g} point" + ("" if value == 1 else "s")


def mcnemar_p(lost: int, gained: int) -> float:
    """Exact two-sided McNemar p-value: P(a split at least this uneven) for lost + gained fair coin flips."""
    n = lost + gained
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(lost, gained) + 1))
    return min(1.0, 2 * tail / 2 ** n)
