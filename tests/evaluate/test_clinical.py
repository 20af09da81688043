"""Clinical metrics against scikit-learn and against a plain loop over bootstrap resamples."""

import json
import math

import numpy as np
import pytest
import torch

from conftest import require_module
from vislora.errors import ConfigError
from vislora.evaluate.clinical import (
    ClinicalMetrics,
    auroc,
    clinical_metrics,
    compare_clinical,
    ovr_auroc,
    resample_counts,
    roc_curve,
    sensitivity_at_specificity,
    specificity_at_sensitivity,
)

CLASSES = ["a", "b", "c", "d"]


def _predictions(n=120, classes=4, seed=0, signal=1.5, decimals=None):
    """Softmax probabilities [n, C] with the true class lifted by `signal`, labels covering every class; rounded
    logits give tied scores."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    logits = rng.normal(size=(n, classes))
    logits[np.arange(n), labels] += signal
    if decimals is not None:
        logits = np.round(logits, decimals)
    probs = np.exp(logits)
    return probs / probs.sum(1, keepdims=True), labels


def _reference_point(scores, positives, target, by):
    """sklearn's ROC points; sensitivity at specificity (by='spec') or the reverse, with its threshold."""
    fpr, tpr, thresholds = require_module("sklearn.metrics").roc_curve(positives, scores, drop_intermediate=False)
    negatives, count = int((~positives).sum()), int(positives.sum())
    spec = (negatives - np.round(fpr * negatives)) / negatives  # exact ratios of counts, as TN / N
    sens = np.round(tpr * count) / count
    if by == "spec":
        ok = spec >= target
        i = np.flatnonzero(ok & (sens == sens[ok].max()))[0]
    else:
        ok = sens >= target
        i = np.flatnonzero(ok & (spec == spec[ok].max()))[-1]
    return sens[i], spec[i], thresholds[i]


def test_binary_auroc_and_roc_equal_sklearn_with_ties():
    metrics = require_module("sklearn.metrics")
    rng = np.random.default_rng(1)
    positives = rng.random(200) < 0.3
    scores = np.round(rng.random(200) * 0.6 + 0.4 * positives, 1)  # 1 decimal: many ties
    assert auroc(scores, positives) == pytest.approx(metrics.roc_auc_score(positives, scores), abs=1e-12)
    assert auroc(torch.tensor(scores), torch.tensor(positives)) == auroc(scores, positives)
    assert auroc(np.full(6, 0.3), [1, 0, 1, 0, 0, 1]) == 0.5  # every score tied: the diagonal
    fpr, tpr, thresholds = metrics.roc_curve(positives, scores, drop_intermediate=False)
    ours = roc_curve(scores, positives)
    np.testing.assert_allclose(ours.fpr, fpr, atol=1e-15)
    np.testing.assert_allclose(ours.tpr, tpr, atol=1e-15)
    np.testing.assert_array_equal(ours.thresholds, thresholds)


def test_multiclass_one_vs_rest_equals_sklearn_macro_and_per_class():
    metrics = require_module("sklearn.metrics")
    probs, labels = _predictions(decimals=1)
    per_class, macro = ovr_auroc(probs, labels)
    assert macro == pytest.approx(metrics.roc_auc_score(labels, probs, multi_class="ovr", average="macro"), abs=1e-12)
    expected = metrics.roc_auc_score(labels, probs, multi_class="ovr", average=None)
    np.testing.assert_allclose(per_class, expected, atol=1e-12)
    result = clinical_metrics(probs, labels, CLASSES, bootstrap=0)
    assert result.macro_auroc.value == pytest.approx(macro, abs=1e-15)
    assert [c.auroc.value for c in result.classes] == pytest.approx(list(expected), abs=1e-12)
    assert result.macro_auroc.low is None and result.undefined == []


@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.95, 0.975])
def test_operating_points_equal_a_reference_from_sklearn_roc_curve(target):
    probs, labels = _predictions(n=80, decimals=1)
    for k in range(4):
        scores, positives = probs[:, k], labels == k
        point = sensitivity_at_specificity(scores, positives, target)
        assert (point.sensitivity, point.specificity, point.threshold) == pytest.approx(
            _reference_point(scores, positives, target, "spec"))
        assert point.specificity >= target
        point = specificity_at_sensitivity(scores, positives, target)
        assert (point.sensitivity, point.specificity, point.threshold) == pytest.approx(
            _reference_point(scores, positives, target, "sens"))
        assert point.sensitivity >= target


def test_an_unreachable_specificity_gives_sensitivity_zero_at_an_infinite_threshold():
    scores, positives = np.array([0.9, 0.8, 0.7, 0.2]), np.array([0, 1, 1, 0])  # the top score is a negative
    point = sensitivity_at_specificity(scores, positives, 0.9)
    assert (point.sensitivity, point.specificity, point.threshold) == (0.0, 1.0, math.inf)
    exact = sensitivity_at_specificity(scores, positives, 0.5)  # specificity 1/2 is reached exactly
    assert (exact.sensitivity, exact.specificity, exact.threshold) == (1.0, 0.5, 0.7)


def _loop_reference(probs, labels, bootstrap, seed, ci, stratified, target=0.9):
    """Resample by resample: draw the indices as documented, score with sklearn, take percentiles; NaN skipped."""
    metrics = require_module("sklearn.metrics")
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(labels == k) for k in np.unique(labels)] if stratified else [np.arange(len(labels))]
    aucs, sens = [], []
    for _ in range(bootstrap):
        index = np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups])
        row_auc, row_sens = [], []
        for k in range(probs.shape[1]):
            positives = labels[index] == k
            if positives.all() or not positives.any():
                row_auc.append(np.nan)
                row_sens.append(np.nan)
                continue
            row_auc.append(metrics.roc_auc_score(positives, probs[index, k]))
            row_sens.append(_reference_point(probs[index, k], positives, target, "spec")[0])
        aucs.append(row_auc)
        sens.append(row_sens)
    aucs, sens = np.array(aucs), np.array(sens)

    def bounds(values):
        kept = values[~np.isnan(values)]
        return tuple(np.quantile(kept, [(1 - ci) / 2, (1 + ci) / 2])), int(np.isnan(values).sum())

    return [bounds(aucs[:, k]) for k in range(probs.shape[1])], bounds(aucs.mean(1)), [
        bounds(sens[:, k]) for k in range(probs.shape[1])]


@pytest.mark.parametrize("stratified", [True, False])
def test_bootstrap_intervals_equal_a_loop_over_resamples(stratified):
    probs, labels = _predictions(n=30, classes=3, seed=3, signal=1.0, decimals=1)
    labels[:27] = labels[:27] % 2  # class 2 is rare (1 image): some unstratified resamples miss it
    per_class, macro, sens = _loop_reference(probs, labels, 60, 7, 0.9, stratified)
    result = clinical_metrics(probs, labels, ["x", "y", "z"], specificity=0.9, bootstrap=60, ci=0.9, seed=7,
                              stratified=stratified)
    for row, (bounds, skipped), (sens_bounds, _) in zip(result.classes, per_class, sens, strict=True):
        assert (row.auroc.low, row.auroc.high) == pytest.approx(bounds, abs=1e-12)
        assert (row.sensitivity.low, row.sensitivity.high) == pytest.approx(sens_bounds, abs=1e-12)
        assert row.skipped == skipped
    assert (result.macro_auroc.low, result.macro_auroc.high) == pytest.approx(macro[0], abs=1e-12)
    assert result.skipped == macro[1]
    assert (result.skipped > 0) == (not stratified)  # stratified resamples keep every class


def test_resamples_do_not_depend_on_chunking(monkeypatch):
    labels = np.arange(50) % 3
    whole = np.concatenate(list(resample_counts(labels, 40, seed=5)))
    monkeypatch.setattr("vislora.evaluate.clinical.CHUNK_ELEMENTS", 7 * 50)
    chunks = list(resample_counts(labels, 40, seed=5))
    assert len(chunks) == 6 and np.array_equal(np.concatenate(chunks), whole)
    assert (whole.sum(1) == 50).all() and (whole[:, labels == 2].sum(1) == 16).all()  # stratified: counts kept


def test_bootstrap_is_reproducible_contains_the_estimate_and_narrows_with_more_images():
    probs, labels = _predictions(n=200, seed=4)
    first = clinical_metrics(probs, labels, CLASSES, bootstrap=200, seed=1)
    assert first == clinical_metrics(probs, labels, CLASSES, bootstrap=200, seed=1)
    assert first != clinical_metrics(probs, labels, CLASSES, bootstrap=200, seed=2)
    for interval in [first.macro_auroc] + [c.auroc for c in first.classes] + [c.sensitivity for c in first.classes]:
        assert interval.low <= interval.value <= interval.high
    more = clinical_metrics(*_predictions(n=2000, seed=4), CLASSES, bootstrap=200, seed=1)
    assert more.macro_auroc.high - more.macro_auroc.low < 0.5 * (first.macro_auroc.high - first.macro_auroc.low)
    assert first.macro_auroc.text() == (f"{first.macro_auroc.value:.3f} [{first.macro_auroc.low:.3f}, "
                                        f"{first.macro_auroc.high:.3f}]")


def test_a_class_without_positives_is_listed_apart_and_the_record_round_trips_through_json():
    metrics = require_module("sklearn.metrics")
    probs, labels = _predictions(n=90, classes=4, seed=5)
    labels[labels == 3] = 0  # no image of class d: its AUROC is undefined
    result = clinical_metrics(probs, labels, CLASSES, bootstrap=50, specificity=0.99)
    assert result.undefined == ["d"] and [c.name for c in result.classes] == ["a", "b", "c"]
    expected = [metrics.roc_auc_score(labels == k, probs[:, k]) for k in range(3)]
    assert result.macro_auroc.value == pytest.approx(np.mean(expected), abs=1e-12)
    assert not math.isnan(result.macro_auroc.low) and result.skipped == 0
    text = json.dumps(result.to_dict(), allow_nan=False)  # strict JSON: an infinite threshold is written as null
    assert ClinicalMetrics.from_dict(json.loads(text)) == result


def test_paired_comparison_of_two_models():
    metrics = require_module("sklearn.metrics")
    base, labels = _predictions(n=150, seed=6, signal=0.5)
    adapted, _ = _predictions(n=150, seed=6, signal=2.0)
    result = compare_clinical(base, adapted, labels, CLASSES, bootstrap=100, seed=3)
    assert result.base == clinical_metrics(base, labels, CLASSES, bootstrap=100, seed=3)
    expected = (metrics.roc_auc_score(labels, adapted, multi_class="ovr")
                - metrics.roc_auc_score(labels, base, multi_class="ovr"))
    assert result.macro_change.value == pytest.approx(expected, abs=1e-12)
    assert 0 < result.macro_change.low <= result.macro_change.value <= result.macro_change.high
    same = compare_clinical(base, base, labels, CLASSES, bootstrap=20)
    assert (same.macro_change.low, same.macro_change.high) == (0.0, 0.0)  # the same resamples for both
    assert set(same.auroc_change) == set(CLASSES)


@pytest.mark.parametrize(("call", "message"), [
    (lambda p, y: clinical_metrics(p[:, 0], y, CLASSES), r"probabilities \(120,\) must be \[images, classes\]"),
    (lambda p, y: clinical_metrics(p, y[:-1], CLASSES), r"labels \(119,\) \[images\]"),
    (lambda p, y: clinical_metrics(p, y, CLASSES[:3]), "3 class names for 4 probability columns"),
    (lambda p, y: clinical_metrics(p, y + 1, CLASSES), "labels must be class indices 0..3, got int64 values from 1 "
     "to 4"),
    (lambda p, y: clinical_metrics(p, y, CLASSES, specificity=1.0), "specificity must be between 0 and 1 .*got 1.0"),
    (lambda p, y: clinical_metrics(p, y, CLASSES, sensitivity=0), "sensitivity must be between 0 and 1"),
    (lambda p, y: clinical_metrics(p, y, CLASSES, ci=95), "ci must be between 0 and 1 .*got 95"),
    (lambda p, y: clinical_metrics(p, y, CLASSES, bootstrap=-1), "bootstrap must be a whole number .*got -1"),
    (lambda p, y: clinical_metrics(np.where(p > 0.5, np.nan, p), y, CLASSES), "scores are NaN or infinite"),
    (lambda p, y: auroc(p[:, 0], np.zeros(120)), "needs positives and negatives; got 0 positives and 120 negatives"),
    (lambda p, y: auroc(p[:, 0], y), r"positives must be 0/1 or bool, got values \[0, 1, 2, 3\]"),
    (lambda p, y: sensitivity_at_specificity(p[:, 0], y == 0, 1.5), "specificity must be between 0 and 1"),
])
def test_bad_input_is_refused_with_the_problem_named(call, message):
    probs, labels = _predictions()
    with pytest.raises(ConfigError, match=message):
        call(probs, labels)
