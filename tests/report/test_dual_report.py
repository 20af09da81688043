"""`vislora report` on dual-encoder runs: recall@K both ways, zero-shot accuracy and image-embedding drift, base vs
adapted, in evaluation.json, report.html and MODEL_CARD.md."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))

from dual_export_helpers import captions, pair_run, timm_few_shot_run
from test_report import PNG, Page

from vislora.cli import app
from vislora.errors import VisloraError
from vislora.evaluate import evaluate_dual
from vislora.report import write_report
from vislora.runs import load_trained_dual

RECALL = {f"{way}_r@{k}" for way in ("i2t", "t2i") for k in (1, 5, 10)}


@pytest.fixture(scope="module")
def report():
    run = pair_run().parent
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    return run / "report"


def test_dual_report_has_recall_zero_shot_accuracy_and_drift_base_vs_adapted(report):
    evaluation = json.loads((report / "evaluation.json").read_text())
    assert {"accuracy", "recall@1", *RECALL} <= set(evaluation["adapted"]) and set(evaluation["adapted"]) == set(
        evaluation["base"])
    again = evaluate_dual(pair_run(), captions()["val"])  # the same model and data through `vislora clip eval`
    assert evaluation["adapted"] == pytest.approx(again.metrics())
    assert evaluation["n"] == 12 and evaluation["base"] != evaluation["adapted"]

    model, task = load_trained_dual(pair_run())  # drift: base vs adapted image embeddings of the same images
    from vislora.data.datasets import open_dataset
    from vislora.data.transforms import build_transform
    from vislora.runs import input_spec

    dataset = open_dataset(captions()["val"], classes=task["classes"])
    transform = build_transform(input_spec(task), train=False)
    images = torch.stack([transform(dataset[i]["image"]) for i in range(len(dataset))])
    with torch.inference_mode():
        adapted, _ = model(images=images)
        with model.disabled():
            base, _ = model(images=images)
    cosine = torch.nn.functional.cosine_similarity(base.double(), adapted.double(), dim=-1)
    assert evaluation["drift"]["mean"] == pytest.approx(cosine.mean().item(), abs=1e-5)
    assert evaluation["drift"]["min"] < 1.0


def test_dual_report_page_and_model_card_show_the_figures(report):
    page = Page()
    page.feed((report / "report.html").read_text())
    page.close()
    assert page.errors == [] and page.stack == []
    assert {image["alt"] for image in page.images} == {"training", "telemetry", "drift", "rank_utilisation",
                                                       "parameters"}
    for heading in ("Training", "Telemetry", "Before / after", "Embedding drift", "Adapter diagnostics",
                    "Parameter efficiency"):
        assert heading in page.headings, heading
    html = (report / "report.html").read_text()
    for label in ("zero-shot accuracy (prompt classifier)", "image -&gt; text recall@1", "text -&gt; image recall@10",
                  "mean cosine similarity"):
        assert label in html, label
    for name in ("drift", "training"):
        assert (report / f"{name}.png").read_bytes().startswith(PNG)

    evaluation = json.loads((report / "evaluation.json").read_text())
    card = (report / "MODEL_CARD.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "peft" and front["pipeline_tag"] == "zero-shot-image-classification"
    metrics = {m["name"]: m["value"] for m in front["model-index"][0]["results"][0]["metrics"]}
    assert metrics["zero-shot accuracy (adapted)"] == round(evaluation["adapted"]["accuracy"], 4)
    assert metrics["zero-shot accuracy (base)"] == round(evaluation["base"]["accuracy"], 4)
    assert metrics["image->text recall@1 (adapted)"] == round(evaluation["adapted"]["i2t_r@1"], 4)
    assert f"| image -> text recall@5 | {evaluation['base']['i2t_r@5']:.4f} | {evaluation['adapted']['i2t_r@5']:.4f}" \
        in card
    assert f"mean {evaluation['drift']['mean']:.4f}" in card
    for section in ("## Model details", "## Training data", "## Evaluation", "## Adapter health", "## Intended use",
                    "## Limitations", "## How to use"):
        assert section in card, section


def test_few_shot_report_on_data_without_captions_says_recall_is_absent(tmp_path):
    from synthetic_images import image_folder

    folder = image_folder(tmp_path / "images", per_class=3)
    files = write_report(timm_few_shot_run().parent, data=str(folder), out=tmp_path / "report")
    evaluation = json.loads(files.evaluation.read_text())
    assert "accuracy" in evaluation["adapted"] and not RECALL & set(evaluation["adapted"])
    assert "No retrieval recall: the evaluation data has no captions" in files.html.read_text()
    assert "zero-shot accuracy (adapted)" in files.model_card.read_text()


def test_report_refuses_a_dual_run_on_a_prepared_base(tmp_path):
    run = shutil.copytree(pair_run().parent, tmp_path / "run")
    task = json.loads((run / "adapter" / "task.json").read_text())
    (run / "adapter" / "task.json").write_text(json.dumps({**task, "prepared_base": True}))
    with pytest.raises(VisloraError, match="vislora report does not support dual-encoder runs on a prepared base"):
        write_report(run)
