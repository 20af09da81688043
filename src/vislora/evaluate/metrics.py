"""Classification metrics of one model on labelled images, from its logits.

accuracy, top-5, macro-F1 (mean over classes of 2TP / (predicted + actual)), cross-entropy loss, expected
calibration error (ECE = sum_b |b| / N * |accuracy(b) - confidence(b)| over equal-width confidence bins),
per-class accuracy, the confusion matrix, and accuracy per value of each metadata column.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vislora.errors import ConfigError

ECE_BINS = 15


@dataclass
class Metrics:
    """Classification metrics of one model; `groups[column][value]` is the accuracy within that group."""

    n: int
    accuracy: float
    top5: float
    macro_f1: float
    loss: float
    ece: float
    per_class: dict[str, float]
    confusion: list[list[int]]  # [true class][predicted class]
    groups: dict[str, dict[str, float]] = field(default_factory=dict)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: Sequence[str],
                           metadata: Sequence[dict[str, str]] | None = None, bins: int = ECE_BINS) -> Metrics:
    """All metrics of one model from its logits [N, C] and the labels [N]."""
    n, n_classes = logits.shape
    if n == 0:
        raise ConfigError("no images to evaluate (all were skipped or the data is empty)")
    logits, labels = logits.detach().double(), labels.long()
    preds = logits.argmax(-1)
    correct = preds == labels
    top = logits.topk(min(5, n_classes), dim=-1).indices  # [N, k]
    confusion = torch.bincount(labels * n_classes + preds, minlength=n_classes ** 2).view(n_classes, n_classes)
    support = confusion.sum(1)
    return Metrics(
        n=n, accuracy=correct.double().mean().item(), top5=(top == labels[:, None]).any(-1).double().mean().item(),
        macro_f1=macro_f1(confusion), loss=F.cross_entropy(logits, labels).item(),
        ece=expected_calibration_error(logits, labels, bins),
        per_class={classes[c]: (confusion[c, c] / support[c]).item() for c in range(n_classes) if support[c]},
        confusion=confusion.tolist(), groups=_group_accuracy(correct.tolist(), metadata or []))


def macro_f1(confusion: torch.Tensor) -> float:
    """Mean F1 over classes present in the labels or the predictions (as scikit-learn's average='macro')."""
    tp = confusion.diag().double()
    seen = confusion.sum(0).double() + confusion.sum(1).double()  # predicted + actual count of each class
    return (2 * tp[seen > 0] / seen[seen > 0]).mean().item()  # F1 = 2PR/(P+R) = 2TP/(predicted + actual)


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """sum over equal-width confidence bins of |bin| / N * |accuracy(bin) - mean confidence(bin)|."""
    confidence, preds = F.softmax(logits.double(), dim=-1).max(-1)
    correct = (preds == labels).double()
    index = torch.bucketize(confidence, torch.linspace(0, 1, bins + 1, dtype=torch.float64)[1:-1])  # (lo, hi]
    count = torch.bincount(index, minlength=bins).double()
    gap = (torch.bincount(index, correct, bins) - torch.bincount(index, confidence, bins)).abs()
    return (gap.sum() / count.sum()).item()  # sum_b |sum(correct) - sum(conf)| / N


def _group_accuracy(correct: list[bool], metadata: Sequence[dict[str, str]]) -> dict[str, dict[str, float]]:
    """Accuracy per value of every metadata column with 2..N-1 distinct values (ids and dates are not groups)."""
    columns: dict[str, dict[str, list[bool]]] = {}
    for ok, meta in zip(correct, metadata, strict=False):
        for column, value in meta.items():
            columns.setdefault(column, {}).setdefault(value, []).append(ok)
    return {column: {value: sum(v) / len(v) for value, v in sorted(values.items())}
            for column, values in columns.items() if 1 < len(values) < len(correct)}
