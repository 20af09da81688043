"""A trained classifier run compared with its base model on any data (`vislora eval`, compare_adapter)."""

import json

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from conftest import require_module
from synthetic_images import class_image, csv_manifest, tiny_train_config
from vislora.cli import app
from vislora.evaluate import ClinicalMetrics, evaluate_adapter
from vislora.run_config import EvalSection

runner = CliRunner()


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

    for text in ("clinical metrics, one class against the rest", "macro AUROC", "AUROC per class",
                 "sensitivity at specificity 0.95"):
        assert text in result.output
    clinical = data["clinical"]
    assert [c["name"] for c in clinical["adapted"]["classes"]] == ["c0", "c1", "c2"]
    assert clinical["adapted"]["classes"][0]["positives"] == 8 and clinical["adapted"]["bootstrap"] == 1000
    # the same figures from evaluate_adapter's rows (softmax probabilities per image), checked against sklearn
    metrics = require_module("sklearn.metrics")
    alone = evaluate_adapter(tmp_path / "run" / "adapter", manifest, clinical=EvalSection(bootstrap=0))
    probs, labels = alone.probabilities()
    expected = metrics.roc_auc_score(labels.numpy(), probs.double().numpy(), multi_class="ovr")
    assert alone.clinical["macro_auroc"]["value"] == pytest.approx(expected, abs=1e-6)
    assert clinical["adapted"]["macro_auroc"]["value"] == pytest.approx(expected, abs=1e-6)
    assert ClinicalMetrics.from_dict(alone.clinical).macro_auroc.low is None

    result = runner.invoke(app, ["eval", "--adapter", str(tmp_path / "run" / "adapter"), "--data", str(manifest),
                                 "--specificity", "1.5"])
    assert result.exit_code != 0
    assert "--specificity: Input should be less than 1 (got 1.5)" in str(result.exception)
