import json
import math

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

import vislora
from conftest import randomize_adapters
from synthetic_images import class_image, csv_manifest, tiny_train_config
from vislora.cli import app
from vislora.evaluate import (
    Outputs,
    classification_metrics,
    collect,
    compare,
    embedding_drift,
    expected_calibration_error,
    mcnemar_p,
    measure_latency,
    points,
)
from vislora.tasks.classification import build_classifier

runner = CliRunner()
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


def test_mcnemar_p_values_and_point_wording():
    assert mcnemar_p(5, 0) == 2 / 32 and mcnemar_p(0, 6) == 2 / 64 and mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(3, 3) == 1.0 and mcnemar_p(2, 8) == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert points(0.01) == "1 point" and points(0.025) == "2.5 points"


def test_drift_of_identical_and_rotated_embeddings():
    x = torch.randn(50, 16)
    same = embedding_drift(x, x.clone())
    assert same.mean == pytest.approx(1.0) and same.p5 == pytest.approx(1.0) and sum(same.counts) == 50
    rotated = torch.cat([x[:, 8:], x[:, :8]], dim=1)
    expected = torch.nn.functional.cosine_similarity(x.double(), rotated.double())
    drift = embedding_drift(x, rotated)
    assert drift.mean == pytest.approx(expected.mean().item()) and drift.min == pytest.approx(expected.min().item())
    assert drift.p5 == pytest.approx(np.percentile(expected.numpy(), 5))
    assert sum(drift.counts) == 50 and drift.edges[0] <= drift.min and drift.edges[-1] >= 1.0


def test_group_regressions_are_flagged_beyond_the_tolerance():
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    right = torch.nn.functional.one_hot(labels, 2).float() * 4
    wrong = right.flip(-1)
    metadata = [{"site": s} for s in ("a", "a", "b", "b", "c", "c")]
    adapted = torch.cat([wrong[:2], right[2:]])  # site a: 1.0 -> 0.0, site b: 0.0 -> 1.0, site c: same
    base = torch.cat([right[:2], wrong[2:4], right[4:]])
    result = compare(Outputs(base), Outputs(adapted), labels, ["x", "y"], metadata, tolerance=0.01)
    groups = {d.name: d for d in result.per_group["site"]}
    assert groups["a"].regression and groups["a"].delta == -1.0 and groups["a"].n == 2
    assert (groups["a"].lost, groups["a"].gained, groups["a"].p_value) == (2, 0, 0.5)  # 2 * (1/2)^2
    assert not groups["b"].regression and not groups["c"].regression
    assert [d.name for d in result.regressions] == ["a"]
    assert result.drift is None
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["regressions"][0]["name"] == "a" and data["per_group"]["site"][0]["delta"] == -1.0


@pytest.fixture
def classifier():
    torch.manual_seed(0)
    base, head = build_classifier("timm:vit_tiny_patch16_224", 3, pretrained=False, head="linear", image_size=32,
                                  patch_size=8, embed_dim=32, depth=2, num_heads=2)
    return vislora.inject(base, vislora.AdapterConfig(rank=4, alpha=8, targets=["q", "v"], modules_to_save=[head]))


def batches(n=2, size=4):
    gen = torch.Generator().manual_seed(5)
    return [{"image": torch.randn(size, 3, 32, 32, generator=gen), "label": torch.arange(size) % 3,
             "index": torch.arange(i * size, (i + 1) * size), "metadata": [{}] * size, "skipped": [3] if i else []}
            for i in range(n)]


def test_collect_runs_base_and_adapted_on_the_same_images(classifier):
    run = collect(classifier, batches())
    base, adapted = run.base, run.adapted
    assert run.skipped == [3]  # the corrupt image the second batch reported
    assert torch.equal(base.logits, adapted.logits) and torch.equal(base.embeddings, adapted.embeddings)  # B = 0
    randomize_adapters(classifier)
    run = collect(classifier, batches())
    base, adapted, labels, rows = run.base, run.adapted, run.labels, run.rows
    images = torch.cat([b["image"] for b in batches()])
    with torch.no_grad():
        assert torch.allclose(adapted.logits, classifier(images), atol=1e-5)
        with classifier.disabled():
            base_features = classifier.base_model.features(images)
        trained_head = classifier.base_model.head.current()
        assert torch.allclose(base.logits, trained_head(base_features), atol=1e-5)
        original = collect(classifier, batches(), base_head="original").base
        with classifier.disabled():
            assert torch.allclose(original.logits, classifier(images), atol=1e-5)
    assert not torch.allclose(base.logits, adapted.logits) and [r["index"] for r in rows] == list(range(8))
    assert labels.tolist() == [0, 1, 2, 0, 0, 1, 2, 0]
    with pytest.raises(vislora.ConfigError, match="base_head must be 'trained' or 'original', got 'own'"):
        collect(classifier, batches(), base_head="own")


def test_latency_times_all_three_and_leaves_the_model_untouched(classifier):
    randomize_adapters(classifier)
    images = batches(1)[0]["image"]
    with torch.no_grad():
        before = classifier(images)
    latency = measure_latency(classifier, images, repeats=2)
    assert latency.batch_size == 4 and min(latency.base, latency.unmerged, latency.merged) > 0
    assert latency.merged_max_abs_diff < 1e-4 and not classifier.merged
    with torch.no_grad():
        assert torch.equal(classifier(images), before)  # timed on a merged copy: this model is untouched
    assert math.isclose(latency.throughput(latency.base), 4 / latency.base)


def test_eval_command_compares_and_writes_json(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        class_image(i % 3, rng).save(tmp_path / f"{i}.png")
        rows.append({"path": f"{i}.png", "label": f"c{i % 3}", "group": "indoor" if i < 12 else "outdoor"})
    manifest = csv_manifest(tmp_path, rows)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_train_config(tmp_path / "run", manifest, manifest)))
    assert runner.invoke(app, ["train", str(config)]).exit_code == 0
    out = tmp_path / "eval.json"
    result = runner.invoke(app, ["eval", "--adapter", str(tmp_path / "run" / "adapter"), "--data", str(manifest),
                                 "--latency-images", "4", "--json", str(out)])
    assert result.exit_code == 0, result.output
    for text in ("on 24 images", "macro-F1", "ECE", "per group", "outdoor", "embedding drift", "adapters merged"):
        assert text in result.output
    data = json.loads(out.read_text())
    assert data["adapted"]["n"] == data["base"]["n"] == 24 and len(data["drift"]["counts"]) == 20
    assert {d["name"] for d in data["per_group"]["group"]} == {"indoor", "outdoor"}
    assert data["latency"]["batch_size"] == 4 and data["latency"]["merged_max_abs_diff"] < 1e-4
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert data["adapted"]["accuracy"] == pytest.approx(summary["final"]["accuracy"])  # the trainer's own figure


def test_latency_of_an_adapter_that_cannot_merge_has_no_merged_figure():
    base, _ = build_classifier("timm:vit_tiny_patch16_224", 3, pretrained=False, head="linear", image_size=32,
                               patch_size=8, embed_dim=32, depth=2, num_heads=2)
    model = vislora.inject(base, vislora.AdapterConfig(rank=2, alpha=4, targets=["fc1"], method="molora"))
    latency = measure_latency(model, batches(1)[0]["image"], repeats=1)
    assert latency.merged is None and math.isnan(latency.merged_max_abs_diff) and latency.unmerged > 0
    assert not model.merged
