"""Classification metrics against hand-computed references (scikit-learn's macro-F1, the textbook ECE)."""

import numpy as np
import pytest
import torch

from vislora.evaluate import classification_metrics, expected_calibration_error

CLASSES = [f"c{i}" for i in range(7)]


def reference_f1(labels, preds, n_classes):
    """Macro-F1 the textbook way: per-class precision and recall over the classes seen in labels or predictions."""
    scores = []
    for c in range(n_classes):
        tp = sum(1 for y, p in zip(labels, preds, strict=True) if y == c and p == c)
        predicted, actual = preds.count(c), labels.count(c)
        if predicted == 0 and actual == 0:
            continue
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        scores.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return sum(scores) / len(scores)


def reference_ece(probs, labels, bins=15):
    total, n = 0.0, len(labels)
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        members = [i for i in range(n) if lo < max(probs[i]) <= hi]
        if members:
            accuracy = sum(probs[i].index(max(probs[i])) == labels[i] for i in members) / len(members)
            confidence = sum(max(probs[i]) for i in members) / len(members)
            total += len(members) / n * abs(accuracy - confidence)
    return total


def test_metrics_match_hand_computed_references():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(40, 7, generator=gen) * 2
    labels = torch.randint(0, 7, (40,), generator=gen)
    logits[:12, :] = -5.0
    logits[torch.arange(12), labels[:12]] = 5.0  # some sure and right
    metadata = [{"site": "a" if i % 4 else "b", "id": str(i)} for i in range(40)]
    m = classification_metrics(logits, labels, CLASSES, metadata)
    preds = logits.argmax(-1).tolist()
    assert m.n == 40 and m.accuracy == pytest.approx(np.mean(np.array(preds) == labels.numpy()))
    top5 = [labels[i].item() in logits[i].topk(5).indices.tolist() for i in range(40)]
    assert m.top5 == pytest.approx(sum(top5) / 40) and m.top5 > m.accuracy
    assert m.macro_f1 == pytest.approx(reference_f1(labels.tolist(), preds, 7))
    probs = torch.softmax(logits.double(), -1).tolist()
    assert m.ece == pytest.approx(reference_ece(probs, labels.tolist()))
    assert m.loss == pytest.approx(torch.nn.functional.cross_entropy(logits.double(), labels).item())
    assert sum(map(sum, m.confusion)) == 40 and all(m.confusion[i][i] >= 0 for i in range(7))
    assert m.confusion[labels[0]][preds[0]] >= 1
    first = CLASSES[labels[0]]
    mask = labels == labels[0]
    assert m.per_class[first] == pytest.approx((logits[mask].argmax(-1) == labels[mask]).float().mean().item())
    assert set(m.groups) == {"site"}  # "id" is unique per row: not a group
    b_rows = [i for i in range(40) if i % 4 == 0]
    assert m.groups["site"]["b"] == pytest.approx(sum(preds[i] == labels[i] for i in b_rows) / len(b_rows))


def test_calibration_error_is_zero_when_confidence_equals_accuracy():
    # confidence 0.75 on every sample (4 classes), 3 of 4 right: perfectly calibrated
    logits = torch.log(torch.tensor([[0.75, 0.25 / 3, 0.25 / 3, 0.25 / 3]])).repeat(4, 1)
    assert expected_calibration_error(logits, torch.tensor([0, 0, 0, 1])) == pytest.approx(0.0, abs=1e-7)
    assert expected_calibration_error(logits, torch.tensor([1, 1, 1, 1])) == pytest.approx(0.75)
