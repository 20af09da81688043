import math
import warnings

import numpy as np
import pytest
import torch

from conftest import require_module
from vislora.errors import ConfigError, VisloraWarning
from vislora.evaluate.multilabel import Thresholds, average_precision, multilabel_metrics, tune_thresholds

NAMES = ["a", "b", "c", "d", "e"]


def _fixed(seed=0, n=60):
    """Scores rounded to 1 decimal (many ties), targets correlated with them; attribute e has no positive."""
    rng = np.random.default_rng(seed)
    scores = np.round(rng.random((n, 5)), 1)
    targets = (scores + rng.normal(0, 0.3, (n, 5)) > 0.6).astype(int)
    targets[:, 4] = 0
    return scores, targets


def test_average_precision_equals_sklearn_with_ties():
    metrics = require_module("sklearn.metrics")
    scores, targets = _fixed()
    ours = average_precision(torch.tensor(scores), torch.tensor(targets))
    for a in range(4):
        assert ours[a] == pytest.approx(metrics.average_precision_score(targets[:, a], scores[:, a]), abs=1e-12)
    assert math.isnan(ours[4])
    all_tied = np.full(6, 0.5)
    assert average_precision(all_tied[:, None], np.array([[1], [0], [0], [1], [0], [0]]))[0] == pytest.approx(
        metrics.average_precision_score([1, 0, 0, 1, 0, 0], all_tied))  # = 2/6, the positive rate


def test_map_excludes_attributes_without_positives_and_f1_equals_sklearn():
    metrics = require_module("sklearn.metrics")
    scores, targets = _fixed(1)
    cut = np.array([0.5, 0.3, 0.7, 0.45, 0.5])
    result = multilabel_metrics(scores, targets, NAMES, thresholds=cut.tolist())
    assert result.no_positives == ["e"]
    assert result.map == pytest.approx(np.mean([metrics.average_precision_score(targets[:, a], scores[:, a])
                                                for a in range(4)]))
    predicted = (scores >= cut).astype(int)
    assert result.micro_f1 == pytest.approx(metrics.f1_score(targets, predicted, average="micro"))
    present = [a for a in range(5) if targets[:, a].any() or predicted[:, a].any()]
    assert result.macro_f1 == pytest.approx(metrics.f1_score(targets, predicted, average="macro", labels=present,
                                                             zero_division=0))
    for a, row in enumerate(result.per_attribute):
        assert row.precision == pytest.approx(metrics.precision_score(targets[:, a], predicted[:, a],
                                                                      zero_division=0))
        assert row.recall == pytest.approx(metrics.recall_score(targets[:, a], predicted[:, a], zero_division=0))
        assert row.f1 == pytest.approx(metrics.f1_score(targets[:, a], predicted[:, a], zero_division=0))
        assert row.threshold == cut[a] and row.predicted == predicted[:, a].sum()


def test_rare_attributes_are_reported_apart():
    metrics = require_module("sklearn.metrics")
    scores, targets = _fixed(2)
    train = {"a": 50, "b": 3, "c": 40, "d": 1, "e": 0}
    result = multilabel_metrics(scores, targets, NAMES, train_counts=train, rare_below=5)
    assert result.rare == ["b", "d", "e"] and result.rare_below == 5
    assert result.rare_map == pytest.approx(np.mean([metrics.average_precision_score(targets[:, a], scores[:, a])
                                                     for a in (1, 3)]))  # e has no positives here
    assert result.metrics()["rare_map"] == result.rare_map
    assert [r.train_positives for r in result.per_attribute] == [50, 3, 40, 1, 0]


def test_max_f1_thresholds_reach_the_best_f1_on_the_curve():
    metrics = require_module("sklearn.metrics")
    scores, targets = _fixed(3)
    tuned = tune_thresholds(scores, targets, NAMES)
    assert tuned.untuned == ["e"] and tuned.values[4] == 0.5 and tuned.mode == "max_f1"
    for a in range(4):
        precision, recall, cuts = metrics.precision_recall_curve(targets[:, a], scores[:, a])
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = np.nan_to_num(2 * precision * recall / (precision + recall))[:-1]
        best = f1.max()
        assert metrics.f1_score(targets[:, a], scores[:, a] >= tuned.values[a]) == pytest.approx(best)
        assert tuned.values[a] == cuts[f1 == best].max()  # the highest threshold of maximal F1


def test_target_precision_takes_the_lowest_threshold_reaching_it_else_falls_back_with_a_warning():
    scores = np.array([[0.9, 0.9], [0.8, 0.8], [0.7, 0.7], [0.6, 0.6], [0.5, 0.5], [0.4, 0.4]])
    targets = np.array([[1, 0], [1, 1], [0, 0], [1, 1], [0, 0], [1, 0]])
    # attribute x: precision at 0.9/0.8/0.7/0.6/0.5/0.4 = 1, 1, 2/3, 3/4, 3/5, 4/6 -> lowest reaching 0.75 is 0.6
    # attribute y: precision 0, 1/2, 1/3, 1/2, 2/5, 1/3 never reaches 0.75 -> max F1 (2*2/(4+2)=2/3 at 0.6)
    with pytest.warns(VisloraWarning, match=r"no threshold reaches precision 0\.75 for y on val; they use their "
                                            r"max-F1 thresholds"):
        tuned = tune_thresholds(scores, targets, ["x", "y"], mode="precision", target_precision=0.75, tuned_on="val")
    assert tuned.values == [0.6, 0.6] and tuned.fallback == ["y"] and tuned.target_precision == 0.75
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tune_thresholds(scores[:, :1], targets[:, :1], ["x"], mode="precision", target_precision=1.0
                               ).values == [0.8]
    assert Thresholds.from_dict(tuned.to_dict()) == tuned and tuned.as_dict() == {"x": 0.6, "y": 0.6}


def test_bad_input_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"scores \(2, 3\) and targets \(2, 2\) must both be"):
        average_precision(np.zeros((2, 3)), np.zeros((2, 2)))
    with pytest.raises(ConfigError, match="2 attribute names for 3 score columns"):
        multilabel_metrics(np.zeros((2, 3)), np.zeros((2, 3)), ["a", "b"])
    with pytest.raises(ConfigError, match="threshold mode must be 'max_f1' or 'precision', got 'f2'"):
        tune_thresholds(np.zeros((2, 1)), np.zeros((2, 1)), ["a"], mode="f2")
