"""Clinical metrics of a classifier from its class probabilities: AUROC, sensitivity at a specificity and the
reverse, with percentile bootstrap confidence intervals.

- The ROC of one class (one-vs-rest: the class is positive, every other class negative) predicts positive when
  score >= t, for t = +inf and every distinct score, highest first (tied scores enter together);
  sensitivity = TP / P, specificity = TN / N.
- AUROC = the trapezoid area under (1 - specificity, sensitivity) = P(positive scores above negative) +
  1/2 P(tie), as scikit-learn's `roc_auc_score`. Macro AUROC: the mean over classes with positives and negatives;
  the others are listed apart (`undefined`), their AUROC does not exist.
- Sensitivity at specificity s: the highest sensitivity among ROC points of specificity >= s (its threshold: the
  highest giving it, so its specificity is the highest too). Specificity at sensitivity: the reverse.
- Bootstrap: resample b draws n images with replacement with `np.random.default_rng(seed)`, one draw
  `rng.integers(0, n_k, n_k)` per true class k in ascending order (stratified, the default: every resample keeps the
  class counts, as pROC's stratified bootstrap), or one draw `rng.integers(0, n, n)` over all images. A resample
  in which a class has no positive or no negative is skipped for that class (and for the macro AUROC) and counted.
  The interval is the (1 - ci) / 2 and (1 + ci) / 2 quantiles (linear interpolation) of the other resamples'
  values. Base and adapted models compared with the same settings see the same resamples, so the interval of
  their difference is paired.

All resamples of one class are scored at once: the images are sorted by score once, each resample is a row of
counts [B, n] (how often each image was drawn), and TP/FP at every threshold are cumulative sums of counts.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from vislora.errors import ConfigError

CHUNK_ELEMENTS = 4_000_000  # resample counts held at once (rows x images): bounds the memory of the bootstrap


@dataclass
class Interval:
    """A point estimate and its percentile bootstrap interval (None without a bootstrap)."""

    value: float
    low: float | None = None
    high: float | None = None

    def text(self, digits: int = 3, signed: bool = False) -> str:
        """'0.912 [0.871, 0.947]', or '0.912' without an interval; `signed` writes a difference (+0.031)."""
        form = f"{'+' if signed else ''}.{digits}f"
        if self.low is None or self.high is None:
            return f"{self.value:{form}}"
        return f"{self.value:{form}} [{self.low:{form}}, {self.high:{form}}]"


@dataclass
class OperatingPoint:
    """One point of a ROC: predict the class when its score >= threshold (inf: never)."""

    threshold: float
    sensitivity: float
    specificity: float

    def threshold_text(self, digits: int = 3) -> str:
        """The threshold, or 'never' when no threshold reaches the target (sensitivity 0)."""
        return "never" if math.isinf(self.threshold) else f"{self.threshold:.{digits}f}"


@dataclass
class ClassClinical:
    """One class against the rest: AUROC, sensitivity at the target specificity and specificity at the target
    sensitivity (with intervals), the ROC points they come from, and the resamples skipped for this class."""

    name: str
    positives: int
    negatives: int
    auroc: Interval
    sensitivity: Interval  # at the target specificity
    specificity: Interval  # at the target sensitivity
    at_specificity: OperatingPoint
    at_sensitivity: OperatingPoint
    skipped: int = 0


@dataclass
class ClinicalMetrics:
    """Clinical metrics of one model on n images, the settings they were measured with, and the classes whose
    AUROC is undefined here (no positive or no negative); `skipped` counts resamples left out of the macro."""

    n: int
    specificity: float
    sensitivity: float
    bootstrap: int
    ci: float
    seed: int
    stratified: bool
    macro_auroc: Interval
    classes: list[ClassClinical]
    undefined: list[str] = field(default_factory=list)
    skipped: int = 0

    def describe_intervals(self) -> str:
        """How the intervals were made, in words (and how many resamples the macro AUROC skipped)."""
        if not self.bootstrap:
            return "no confidence intervals (bootstrap 0)"
        kind = "stratified by class" if self.stratified else "over all images"
        text = f"{self.ci:.0%} percentile intervals from {self.bootstrap} bootstrap resamples {kind} (seed {self.seed})"
        if self.skipped:
            text += f"; {self.skipped} resamples lacked a positive or negative of some class and were skipped"
        return text

    def to_dict(self) -> dict[str, Any]:
        """JSON-able data; a threshold of inf (never predict the class) becomes None."""
        data = asdict(self)
        for row in data["classes"]:
            for key in ("at_specificity", "at_sensitivity"):
                if math.isinf(row[key]["threshold"]):
                    row[key]["threshold"] = None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClinicalMetrics:
        """The record `to_dict` wrote."""
        def point(d: dict[str, Any]) -> OperatingPoint:
            return OperatingPoint(**{**d, "threshold": math.inf if d["threshold"] is None else d["threshold"]})

        classes = [ClassClinical(**{**c, "auroc": Interval(**c["auroc"]), "sensitivity": Interval(**c["sensitivity"]),
                                    "specificity": Interval(**c["specificity"]),
                                    "at_specificity": point(c["at_specificity"]),
                                    "at_sensitivity": point(c["at_sensitivity"])}) for c in data["classes"]]
        return cls(**{**data, "macro_auroc": Interval(**data["macro_auroc"]), "classes": classes})


@dataclass
class ClinicalComparison:
    """Base and adapted models on the same images and resamples; `auroc_change[class]` and `macro_change` are
    adapted - base AUROC with paired intervals."""

    base: ClinicalMetrics
    adapted: ClinicalMetrics
    macro_change: Interval
    auroc_change: dict[str, Interval]


@dataclass
class RocCurve:
    """A ROC as scikit-learn's `roc_curve(drop_intermediate=False)`: thresholds +inf then every distinct score."""

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray


def roc_curve(scores: Any, positives: Any) -> RocCurve:
    """The ROC of scores [n] against 0/1 (or bool) `positives` [n]."""
    scores, positives = _binary(scores, positives)
    thresholds, tp, fp = _unweighted(scores, positives)
    return RocCurve(fpr=fp[0] / fp[0, -1], tpr=tp[0] / tp[0, -1], thresholds=thresholds)


def auroc(scores: Any, positives: Any) -> float:
    """Area under the ROC of scores [n] against 0/1 `positives` [n] (equals sklearn's roc_auc_score)."""
    scores, positives = _binary(scores, positives)
    _, tp, fp = _unweighted(scores, positives)
    return float(_auc(tp, fp)[0])


def sensitivity_at_specificity(scores: Any, positives: Any, specificity: float) -> OperatingPoint:
    """The ROC point of highest sensitivity whose specificity >= `specificity` (the highest such threshold)."""
    _fraction("specificity", specificity)
    scores, positives = _binary(scores, positives)
    return _at_specificity(*_unweighted(scores, positives), specificity)


def specificity_at_sensitivity(scores: Any, positives: Any, sensitivity: float) -> OperatingPoint:
    """The ROC point of highest specificity whose sensitivity >= `sensitivity` (the lowest such threshold)."""
    _fraction("sensitivity", sensitivity)
    scores, positives = _binary(scores, positives)
    return _at_sensitivity(*_unweighted(scores, positives), sensitivity)


def ovr_auroc(probs: Any, labels: Any) -> tuple[np.ndarray, float]:
    """One-vs-rest AUROC of each class [C] (NaN where the labels hold no or only that class) and their macro mean
    over the defined classes, from probabilities [n, C] and class indices [n]."""
    probs, labels = _multiclass(probs, labels, None)
    per_class = np.array([_auc(*_unweighted(probs[:, k], labels == k)[1:])[0] for k in range(probs.shape[1])])
    defined = per_class[~np.isnan(per_class)]
    return per_class, float(defined.mean()) if len(defined) else math.nan


def roc_counts(scores: np.ndarray, positives: np.ndarray, weights: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds [G+1], TP [B, G+1], FP [B, G+1]): weighted counts of true and false positives when predicting
    positive at score >= threshold, for thresholds +inf then the G distinct scores, highest first; row b of
    `weights` [B, n] is how often each image counts (a bootstrap resample; ones for the data as it is)."""
    order = np.argsort(-scores, kind="stable")
    ranked = scores[order]
    last = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]  # last index of each run of tied scores
    counts = weights[:, order]  # [B, n]
    tp, fp = np.zeros((2, len(counts), len(last) + 1), dtype=counts.dtype)  # column 0: threshold +inf
    tp[:, 1:] = np.cumsum(counts * positives[order], axis=1)[:, last]
    fp[:, 1:] = np.cumsum(counts, axis=1)[:, last] - tp[:, 1:]
    return np.r_[np.inf, ranked[last]], tp, fp


def _auc(tp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """Trapezoid area under each row's ROC [B]: sum (FP_g - FP_g-1)(TP_g + TP_g-1) / 2PN; NaN without P or N."""
    area = np.sum(np.diff(fp, axis=1) * (tp[:, 1:] + tp[:, :-1]), axis=1) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((tp[:, -1] > 0) & (fp[:, -1] > 0), area / (tp[:, -1] * fp[:, -1]), np.nan)


def _rates(tp: np.ndarray, fp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sensitivity TP / P and specificity TN / N at each threshold [B, G+1] (exact ratios of counts)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return tp / tp[:, -1:], (fp[:, -1:] - fp) / fp[:, -1:]


def _figures(tp: np.ndarray, fp: np.ndarray, specificity: float, sensitivity: float) -> np.ndarray:
    """[3, B]: AUROC, sensitivity at `specificity`, specificity at `sensitivity` of each row; NaN without P or N.

    Along a row sensitivity rises and specificity falls, so the points of specificity >= s are a prefix (the best
    sensitivity is at its end) and those of sensitivity >= s a suffix (the best specificity at its start); the
    threshold +inf (specificity 1) and the lowest score (sensitivity 1) keep both non-empty (rows without P or N,
    whose rates are NaN, are clipped in range and then marked NaN)."""
    sens, spec = _rates(tp, fp)
    rows, last = np.arange(len(tp)), tp.shape[1] - 1
    out = np.stack([_auc(tp, fp), sens[rows, np.clip((spec >= specificity).sum(axis=1) - 1, 0, last)],
                    spec[rows, np.clip(last + 1 - (sens >= sensitivity).sum(axis=1), 0, last)]])
    out[:, np.isnan(out[0])] = np.nan
    return out


def _at_specificity(thresholds: np.ndarray, tp: np.ndarray, fp: np.ndarray, specificity: float) -> OperatingPoint:
    """The ROC point (row 0 of the counts) of sensitivity at `specificity`: of the best sensitivity, the highest
    threshold (so the highest specificity)."""
    sens, spec = (r[0] for r in _rates(tp, fp))
    ok = spec >= specificity
    i = np.flatnonzero(ok & (sens == sens[ok].max()))[0]
    return OperatingPoint(float(thresholds[i]), float(sens[i]), float(spec[i]))


def _at_sensitivity(thresholds: np.ndarray, tp: np.ndarray, fp: np.ndarray, sensitivity: float) -> OperatingPoint:
    """The ROC point of specificity at `sensitivity`: of the best specificity, the lowest threshold."""
    sens, spec = (r[0] for r in _rates(tp, fp))
    ok = sens >= sensitivity
    i = np.flatnonzero(ok & (spec == spec[ok].max()))[-1]
    return OperatingPoint(float(thresholds[i]), float(sens[i]), float(spec[i]))


def _unweighted(scores: np.ndarray, positives: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """roc_counts of the data as it is: every image counted once."""
    return roc_counts(scores, positives, np.ones((1, len(scores)), dtype=np.int64))


def resample_counts(labels: np.ndarray, bootstrap: int, seed: int = 0, stratified: bool = True
                    ) -> Iterator[np.ndarray]:
    """Bootstrap resamples of the images as chunks of counts [rows, n] (how often each image is drawn), at most
    CHUNK_ELEMENTS counts per chunk; drawn as the module docstring says, the groups' draws of a chunk in one call
    (the same stream, however the resamples are chunked)."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    groups = [np.flatnonzero(labels == k) for k in np.unique(labels)] if stratified else [np.arange(n)]
    members = np.concatenate(groups)  # image indices, grouped
    sizes = np.concatenate([np.full(len(g), len(g)) for g in groups])  # size of each position's group
    starts = np.repeat(np.cumsum([0] + [len(g) for g in groups[:-1]]), [len(g) for g in groups])
    rows = max(1, CHUNK_ELEMENTS // n)
    for start in range(0, bootstrap, rows):
        size = min(rows, bootstrap - start)
        drawn = members[starts + rng.integers(0, sizes, size=(size, n))]  # [rows, n] image indices
        offsets = n * np.arange(size)[:, None]
        yield np.bincount((drawn + offsets).ravel(), minlength=size * n).reshape(size, n)


def clinical_metrics(probs: Any, labels: Any, classes: Sequence[str], specificity: float = 0.95,
                     sensitivity: float = 0.95, bootstrap: int = 1000, ci: float = 0.95, seed: int = 0,
                     stratified: bool = True) -> ClinicalMetrics:
    """One-vs-rest clinical metrics of each class and the macro AUROC, from probabilities [n, C] and class indices
    [n], with `ci` percentile intervals from `bootstrap` resamples (0: no intervals)."""
    return _measure([probs], labels, classes, specificity, sensitivity, bootstrap, ci, seed, stratified)[0][0]


def compare_clinical(base_probs: Any, adapted_probs: Any, labels: Any, classes: Sequence[str],
                     specificity: float = 0.95, sensitivity: float = 0.95, bootstrap: int = 1000, ci: float = 0.95,
                     seed: int = 0, stratified: bool = True) -> ClinicalComparison:
    """`clinical_metrics` of both models on the same resamples, and the AUROC change with paired intervals."""
    (base, adapted), (base_boot, adapted_boot) = _measure(
        [base_probs, adapted_probs], labels, classes, specificity, sensitivity, bootstrap, ci, seed, stratified)
    diff = adapted_boot[0] - base_boot[0]  # [B, K] AUROC, NaN where skipped (the same resamples for both)
    changes = {b.name: _interval(a.auroc.value - b.auroc.value, diff[:, j], ci)[0]
               for j, (b, a) in enumerate(zip(base.classes, adapted.classes, strict=True))}
    macro = _interval(adapted.macro_auroc.value - base.macro_auroc.value, diff.mean(axis=1), ci)[0]
    return ClinicalComparison(base=base, adapted=adapted, macro_change=macro, auroc_change=changes)


def _measure(models: list[Any], labels: Any, classes: Sequence[str], specificity: float, sensitivity: float,
             bootstrap: int, ci: float, seed: int, stratified: bool
             ) -> tuple[list[ClinicalMetrics], list[np.ndarray]]:
    """Records of each model's probabilities, and their bootstrap figures [3, B, K] over the defined classes."""
    for name, value in (("specificity", specificity), ("sensitivity", sensitivity), ("ci", ci)):
        _fraction(name, value)
    if not isinstance(bootstrap, int) or bootstrap < 0:
        raise ConfigError(f"bootstrap must be a whole number of resamples >= 0 (0: no intervals), got {bootstrap!r}")
    arrays = [_multiclass(probs, labels, classes) for probs in models]
    labels = arrays[0][1]
    counts = np.bincount(labels, minlength=len(classes))
    defined = [k for k in range(len(classes)) if 0 < counts[k] < len(labels)]
    targets = (specificity, sensitivity)
    boots = [np.empty((3, 0, len(defined))) for _ in models]
    for chunk in resample_counts(labels, bootstrap, seed, stratified):
        boots = [np.concatenate([b, _class_figures(p, labels, chunk, defined, *targets)], axis=1)
                 for b, (p, _) in zip(boots, arrays, strict=True)]
    records = []
    for (probs, _), boot in zip(arrays, boots, strict=True):
        rows = [_class_record(classes[k], probs[:, k], labels == k, boot[:, :, j], targets, ci)
                for j, k in enumerate(defined)]
        value = float(np.mean([r.auroc.value for r in rows])) if rows else math.nan
        macro, skipped = _interval(value, boot[0].mean(axis=1), ci)
        records.append(ClinicalMetrics(
            n=len(labels), specificity=specificity, sensitivity=sensitivity, bootstrap=bootstrap, ci=ci, seed=seed,
            stratified=stratified, macro_auroc=macro, classes=rows,
            undefined=[c for k, c in enumerate(classes) if k not in defined], skipped=skipped))
    return records, boots


def _class_figures(probs: np.ndarray, labels: np.ndarray, weights: np.ndarray, defined: list[int],
                   specificity: float, sensitivity: float) -> np.ndarray:
    """[3, B, K]: AUROC, sensitivity at specificity, specificity at sensitivity per resample and defined class."""
    out = np.empty((3, len(weights), len(defined)))
    for j, k in enumerate(defined):
        _, tp, fp = roc_counts(probs[:, k], labels == k, weights)
        out[:, :, j] = _figures(tp, fp, specificity, sensitivity)
    return out


def _class_record(name: str, scores: np.ndarray, positives: np.ndarray, boot: np.ndarray,
                  targets: tuple[float, float], ci: float) -> ClassClinical:
    """One class's figures on the data as it is, with intervals from its bootstrap figures `boot` [3, B]."""
    thresholds, tp, fp = _unweighted(scores, positives)
    at_spec, at_sens = _at_specificity(thresholds, tp, fp, targets[0]), _at_sensitivity(thresholds, tp, fp, targets[1])
    values = (float(_auc(tp, fp)[0]), at_spec.sensitivity, at_sens.specificity)
    (auc, skipped), (sens, _), (spec, _) = (_interval(values[i], boot[i], ci) for i in range(3))
    return ClassClinical(name=name, positives=int(positives.sum()), negatives=int((~positives).sum()), auroc=auc,
                         sensitivity=sens, specificity=spec, at_specificity=at_spec, at_sensitivity=at_sens,
                         skipped=skipped)


def _interval(value: float, samples: np.ndarray, ci: float) -> tuple[Interval, int]:
    """(`value` with the percentile interval of the finite `samples`, how many samples were NaN: skipped)."""
    kept = samples[~np.isnan(samples)]
    if not len(kept):
        return Interval(value), len(samples)
    low, high = np.quantile(kept, [(1 - ci) / 2, (1 + ci) / 2])
    return Interval(value, float(low), float(high)), len(samples) - len(kept)


def _fraction(name: str, value: float) -> None:
    if not 0 < value < 1:
        raise ConfigError(f"{name} must be between 0 and 1 (exclusive), got {value!r}; e.g. {name}=0.95")


def _array(values: Any) -> np.ndarray:
    return np.asarray(values.detach().cpu().numpy() if hasattr(values, "detach") else values)


def _binary(scores: Any, positives: Any) -> tuple[np.ndarray, np.ndarray]:
    scores, positives = _array(scores).astype(np.float64), _array(positives)
    if scores.ndim != 1 or positives.shape != scores.shape:
        raise ConfigError(f"scores {scores.shape} and positives {positives.shape} must both be [images]")
    if not np.isin(positives, (0, 1)).all():
        raise ConfigError(f"positives must be 0/1 or bool, got values {np.unique(positives)[:5].tolist()}")
    positives = positives.astype(bool)
    if positives.all() or not positives.any():
        raise ConfigError(f"the ROC needs positives and negatives; got {int(positives.sum())} positives and "
                          f"{int((~positives).sum())} negatives")
    _finite(scores)
    return scores, positives


def _multiclass(probs: Any, labels: Any, classes: Sequence[str] | None) -> tuple[np.ndarray, np.ndarray]:
    probs, labels = _array(probs).astype(np.float64), _array(labels)
    if probs.ndim != 2 or labels.shape != probs.shape[:1] or not len(labels):
        raise ConfigError(f"probabilities {probs.shape} must be [images, classes] and labels {labels.shape} "
                          "[images], for at least one image")
    if classes is not None and len(classes) != probs.shape[1]:
        raise ConfigError(f"{len(classes)} class names for {probs.shape[1]} probability columns")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise ConfigError(f"labels must be class indices 0..{probs.shape[1] - 1}, got {labels.dtype} values from "
                          f"{labels.min()} to {labels.max()}")
    _finite(probs)
    return probs, labels.astype(np.int64)


def _finite(scores: np.ndarray) -> None:
    if not np.isfinite(scores).all():
        raise ConfigError(f"{int((~np.isfinite(scores)).sum())} scores are NaN or infinite; the model's outputs "
                          "must be finite to rank them")
