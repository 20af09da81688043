"""Multi-label metrics and per-attribute thresholds, from scores [N, A] and multi-hot targets [N, A].

Scores are probabilities (sigmoid per attribute, softmax within single-choice groups); an attribute is predicted
when its score >= its threshold.

- Average precision per attribute, as scikit-learn's `average_precision_score`: AP = sum_k (R_k - R_{k-1}) P_k over
  the distinct score values k taken as thresholds in decreasing order (tied scores enter together).
- mAP: the mean AP over attributes with at least one positive in the data; the others are listed apart
  (`no_positives`), their AP is undefined.
- Per attribute precision, recall and F1 = 2TP / (2TP + FP + FN) at the thresholds; micro F1 pools TP/FP/FN over
  attributes; macro F1 averages F1 over attributes present in the targets or the predictions.
- Rare attributes (fewer than `rare_below` positives in the training data) get their own mAP.

Thresholds are tuned per attribute on validation data (`tune_thresholds`): `max_f1` takes the highest threshold of
maximal F1; `precision` takes the lowest threshold whose precision reaches `target_precision` (the most recall at
that precision) and falls back to max F1, with a warning, for attributes where no threshold reaches it. An
attribute without positives in the validation data keeps the default threshold (listed in `untuned`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from vislora.errors import ConfigError, VisloraWarning

ThresholdMode = Literal["max_f1", "precision"]
DEFAULT_THRESHOLD = 0.5


@dataclass
class Curve:
    """Precision and recall of one attribute at each distinct score, highest score first; `tp`, `fp` the counts of
    true and false positives when predicting positive at score >= threshold."""

    thresholds: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    positives: int

    @property
    def precision(self) -> np.ndarray:
        return self.tp / (self.tp + self.fp)

    @property
    def recall(self) -> np.ndarray:
        return self.tp / self.positives if self.positives else np.full(len(self.tp), np.nan)

    @property
    def f1(self) -> np.ndarray:
        return 2 * self.tp / (self.tp + self.fp + self.positives)  # 2TP / (2TP + FP + FN), FN = P - TP

    def average_precision(self) -> float:
        """sum_k (R_k - R_{k-1}) P_k, R_0 = 0; NaN without positives."""
        if not self.positives:
            return math.nan
        recall = self.recall
        return float(np.sum(np.diff(recall, prepend=0.0) * self.precision))


def curve(scores: np.ndarray, targets: np.ndarray) -> Curve:
    """The precision-recall curve of one attribute from its scores [N] and 0/1 targets [N]."""
    order = np.argsort(-scores, kind="stable")
    scores, targets = scores[order], targets[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # last index of each run of tied scores
    tp = np.cumsum(targets)[last]
    return Curve(thresholds=scores[last], tp=tp, fp=last + 1 - tp, positives=int(targets.sum()))


def average_precision(scores: torch.Tensor | np.ndarray, targets: torch.Tensor | np.ndarray) -> np.ndarray:
    """AP of each attribute [A] (NaN where an attribute has no positive) from scores and targets [N, A]."""
    scores, targets = _arrays(scores, targets)
    return np.array([curve(scores[:, a], targets[:, a]).average_precision() for a in range(scores.shape[1])])


@dataclass
class AttributeScore:
    """One attribute's figures: positives in the evaluated data (and in training, when known), AP (NaN without
    positives), and precision / recall / F1 at `threshold`."""

    name: str
    positives: int
    ap: float
    threshold: float
    precision: float
    recall: float
    f1: float
    predicted: int
    train_positives: int | None = None
    rare: bool = False


@dataclass
class MultilabelMetrics:
    """Multi-label metrics of one model on N images."""

    n: int
    map: float
    micro_f1: float
    macro_f1: float
    per_attribute: list[AttributeScore]
    no_positives: list[str] = field(default_factory=list)  # excluded from mAP
    rare: list[str] = field(default_factory=list)
    rare_below: int | None = None
    rare_map: float = math.nan  # mean AP of the rare attributes that have positives here
    loss: float | None = None
    skipped: int = 0  # corrupt images left out

    def metrics(self) -> dict[str, float]:
        """The headline figures (what the trainer logs and run.best_metric reads)."""
        figures = {"map": self.map, "micro_f1": self.micro_f1, "macro_f1": self.macro_f1}
        if self.rare:
            figures["rare_map"] = self.rare_map
        if self.loss is not None:
            figures["loss"] = self.loss
        return figures

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def multilabel_metrics(scores: torch.Tensor | np.ndarray, targets: torch.Tensor | np.ndarray, names: Sequence[str],
                       thresholds: Sequence[float] | float = DEFAULT_THRESHOLD,
                       train_counts: Mapping[str, int] | None = None, rare_below: int = 10,
                       loss: float | None = None) -> MultilabelMetrics:
    """All figures of one model from its scores and the multi-hot targets [N, A]; attributes in `names` order.
    With `train_counts` (positives per attribute in the training data) attributes below `rare_below` are rare."""
    scores, targets = _arrays(scores, targets)
    n, count = scores.shape
    if n == 0:
        raise ConfigError("no images to evaluate (all were skipped or the data is empty)")
    if len(names) != count:
        raise ConfigError(f"{len(names)} attribute names for {count} score columns; they must match")
    cut = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (count,))
    predicted = scores >= cut  # [N, A]
    truth = targets > 0.5
    tp = (predicted & truth).sum(0)
    fp = (predicted & ~truth).sum(0)
    fn = (~predicted & truth).sum(0)
    ap = average_precision(scores, targets)
    rows = []
    for a, name in enumerate(names):
        train = None if train_counts is None else int(train_counts.get(name, 0))
        rows.append(AttributeScore(
            name=name, positives=int(truth[:, a].sum()), ap=float(ap[a]), threshold=float(cut[a]),
            precision=_ratio(tp[a], tp[a] + fp[a]), recall=_ratio(tp[a], tp[a] + fn[a]),
            f1=_ratio(2 * tp[a], 2 * tp[a] + fp[a] + fn[a]), predicted=int(predicted[:, a].sum()),
            train_positives=train, rare=train is not None and train < rare_below))
    present = (tp + fp + fn) > 0
    rare = [r.name for r in rows if r.rare]
    rare_aps = [r.ap for r in rows if r.rare and r.positives]
    return MultilabelMetrics(
        n=n, map=float(np.nanmean(ap)) if np.isfinite(ap).any() else math.nan,
        micro_f1=_ratio(2 * tp.sum(), 2 * tp.sum() + fp.sum() + fn.sum()),
        macro_f1=float(np.mean([r.f1 for r, p in zip(rows, present, strict=True) if p])) if present.any() else 0.0,
        per_attribute=rows, no_positives=[r.name for r in rows if not r.positives], rare=rare,
        rare_below=rare_below if train_counts is not None else None,
        rare_map=float(np.mean(rare_aps)) if rare_aps else math.nan, loss=loss)


@dataclass
class Thresholds:
    """Tuned thresholds, one per attribute in `names` order; `fallback` lists the attributes that could not reach
    `target_precision` (they got max-F1 thresholds), `untuned` those without positives (they kept `default`)."""

    names: list[str]
    values: list[float]
    mode: ThresholdMode = "max_f1"
    target_precision: float | None = None
    fallback: list[str] = field(default_factory=list)
    untuned: list[str] = field(default_factory=list)
    tuned_on: str = ""

    def as_dict(self) -> dict[str, float]:
        return dict(zip(self.names, self.values, strict=True))

    def to_dict(self) -> dict[str, Any]:
        """JSON form (task.json `thresholds`); `Thresholds.from_dict` reads it back."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Thresholds:
        return cls(**{k: list(v) if isinstance(v, list | tuple) else v for k, v in data.items()})


def tune_thresholds(scores: torch.Tensor | np.ndarray, targets: torch.Tensor | np.ndarray, names: Sequence[str],
                    mode: ThresholdMode = "max_f1", target_precision: float = 0.9,
                    default: float = DEFAULT_THRESHOLD, tuned_on: str = "") -> Thresholds:
    """Per-attribute thresholds on validation scores and targets [N, A] (see the module docstring)."""
    if mode not in ("max_f1", "precision"):
        raise ConfigError(f"threshold mode must be 'max_f1' or 'precision', got {mode!r}")
    if mode == "precision" and not 0 < target_precision <= 1:
        raise ConfigError(f"target precision must be in (0, 1], got {target_precision}")
    scores, targets = _arrays(scores, targets)
    values, fallback, untuned = [], [], []
    for a, name in enumerate(names):
        pr = curve(scores[:, a], targets[:, a])
        if not pr.positives:
            values.append(default)
            untuned.append(name)
            continue
        if mode == "precision":
            reached = np.flatnonzero(pr.precision >= target_precision)
            if len(reached):
                values.append(float(pr.thresholds[reached[-1]]))  # lowest threshold: the most recall
                continue
            fallback.append(name)
        values.append(float(pr.thresholds[int(np.argmax(pr.f1))]))  # first maximum: the highest such threshold
    if fallback:
        warnings.warn(f"no threshold reaches precision {target_precision} for {', '.join(fallback)} on "
                      f"{tuned_on or 'the tuning data'}; they use their max-F1 thresholds instead", VisloraWarning,
                      stacklevel=2)
    return Thresholds(list(names), values, mode, target_precision if mode == "precision" else None, fallback,
                      untuned, tuned_on)


def _arrays(scores: torch.Tensor | np.ndarray, targets: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = scores.detach().cpu().double().numpy() if torch.is_tensor(scores) else np.asarray(scores, np.float64)
    targets = targets.detach().cpu().double().numpy() if torch.is_tensor(targets) else np.asarray(targets, np.float64)
    if scores.ndim != 2 or scores.shape != targets.shape:
        raise ConfigError(f"scores {scores.shape} and targets {targets.shape} must both be [images, attributes]")
    return scores, (targets > 0.5).astype(np.float64)


def _ratio(num: float, den: float) -> float:
    """num / den, 0.0 when den is 0 (scikit-learn's zero_division default)."""
    return float(num / den) if den else 0.0
