import base64
import json
from dataclasses import replace
from html.parser import HTMLParser

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from conftest import real_assets_or_skip
from synthetic_images import class_image, csv_manifest, tiny_train_config
from vislora.cli import app
from vislora.errors import VisloraError
from vislora.report import load_run, write_report

runner = CliRunner()
PNG = b"\x89PNG\r\n\x1a\n"
VOID = {"meta", "img", "br", "hr", "link", "input"}
PLOTS = {"training", "telemetry", "per_class", "confusion", "drift", "rank_utilisation", "parameters"}


class Page(HTMLParser):
    """Collects images and headings, and checks that every element is closed in order."""

    def __init__(self):
        super().__init__()
        self.stack, self.images, self.headings, self.errors, self._in_heading = [], [], [], [], False

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))
        elif tag not in VOID:
            self.stack.append(tag)
        self._in_heading = tag in ("h1", "h2", "h3")

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)
        self._in_heading = False

    def handle_data(self, data):
        if self._in_heading:
            self.headings.append(data.strip())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A short real run on a manifest with metadata: a group column and a licence for half of the images."""
    root = tmp_path_factory.mktemp("report")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(30):
        class_image(i % 3, rng).save(root / f"{i}.png")
        rows.append({"path": f"{i}.png", "label": f"c{i % 3}", "group": "indoor" if i < 15 else "outdoor",
                     "license": "cc-by-4.0" if i % 2 else ""})
    manifest = csv_manifest(root, rows)
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_train_config(root / "run", manifest, manifest, optim={"max_steps": 8},
                                                       run={"eval_every": 4, "monitor_gradients": True},
                                                       eval={"specificity": 0.9, "bootstrap": 200})))
    result = runner.invoke(app, ["train", str(config)])
    assert result.exit_code == 0, result.output
    return root / "run"


def test_report_renders_html_pngs_and_model_card(run):
    result = runner.invoke(app, ["report", str(run), "--latency-images", "4"])
    assert result.exit_code == 0, result.output
    folder = run / "report"
    assert f"report: {folder / 'report.html'}" in result.output.replace("\n", "")

    for name in PLOTS:
        data = (folder / f"{name}.png").read_bytes()
        assert data.startswith(PNG) and len(data) > 2000, name
        assert Image.open(folder / f"{name}.png").size[0] > 300
    page = Page()
    page.feed((folder / "report.html").read_text())
    page.close()
    assert page.errors == [] and page.stack == []
    assert {image["alt"] for image in page.images} == PLOTS
    for image in page.images:  # embedded, so the page stands alone
        assert base64.b64decode(image["src"].removeprefix("data:image/png;base64,")).startswith(PNG)
    for heading in ("Training", "Telemetry", "Before / after", "Per group", "Embedding drift", "Latency",
                    "Adapter diagnostics", "Parameter efficiency", "Training data", "Clinical metrics",
                    "AUROC per class", "Operating points per class"):
        assert heading in page.headings, heading

    evaluation = json.loads((folder / "evaluation.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert evaluation["adapted"]["accuracy"] == pytest.approx(summary["final"]["accuracy"])  # same model, same data
    assert {d["name"] for d in evaluation["per_group"]["group"]} == {"indoor", "outdoor"}

    card = (folder / "MODEL_CARD.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "peft" and front["base_model"] == "timm/vit_tiny_patch16_224"
    metrics = {m["name"]: m["value"] for m in front["model-index"][0]["results"][0]["metrics"]}
    assert metrics["accuracy (adapted)"] == round(evaluation["adapted"]["accuracy"], 4)
    assert metrics["accuracy (base)"] == round(evaluation["base"]["accuracy"], 4)
    clinical = evaluation["clinical"]["adapted"]  # measured with the run's eval section
    assert (clinical["specificity"], clinical["bootstrap"], clinical["n"]) == (0.9, 200, 30)
    assert metrics["macro AUROC, one-vs-rest (adapted)"] == round(clinical["macro_auroc"]["value"], 4)
    assert "## Clinical metrics" in card and "sensitivity @ specificity 0.9: base" in card
    assert "95% percentile intervals from 200 bootstrap resamples stratified by class (seed 0)" in card
    assert "| license | 50.0% |" in card and "| capture_date | 0.0% |" in card and "| location | 0.0% |" in card
    assert "Provenance is incomplete: some or all images lack license, capture_date, location" in card
    for section in ("## Model details", "## Training data", "## Evaluation", "### Per-group results and regressions",
                    "## Adapter health", "## Intended use", "## Limitations"):
        assert section in card
    diagnostics = json.loads((folder / "diagnostics.json").read_text())
    assert len(diagnostics["layers"]) == 4 and diagnostics["verdict"]["status"] in card


def test_inspect_auto_rebuilds_the_base_from_task_json(run):
    result = runner.invoke(app, ["inspect", str(run / "adapter"), "--base", "auto", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["source"] == str(run / "adapter") and len(data["layers"]) == 4
    assert all(layer["relative_norm"] > 0 for layer in data["layers"])
    files_only = json.loads(runner.invoke(app, ["inspect", str(run / "adapter"), "--json"]).stdout)
    for from_files, from_model in zip(files_only["layers"], data["layers"], strict=True):
        assert from_files["singular_values"] == pytest.approx(from_model["singular_values"], rel=1e-5)


def test_training_curves_show_the_logged_gradient_flow(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("grad_norm_median" in r for r in rows if r["split"] == "train")
    from vislora.report.plots import training_curves

    with_grads = training_curves(rows, run / "with.png")
    without = training_curves([{k: v for k, v in r.items() if not k.startswith("grad")} for r in rows],
                              run / "without.png")
    assert Image.open(with_grads).size[0] > Image.open(without).size[0]  # a fourth panel


def test_telemetry_plot_and_section_show_the_logged_figures(run, tmp_path, monkeypatch):
    import statistics

    from vislora.report import plots
    from vislora.report.html import telemetry_html

    info = load_run(run)
    train = [r for r in info.metrics if r["split"] == "train"]
    written = {r["path"]: r for r in info.metrics if r["split"] == "checkpoint"}
    assert set(written) == {"best", "adapter"}  # no step checkpoints in this run (run.save_every: 0)
    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or path)
    plots.telemetry(info.metrics, tmp_path / "telemetry.png")
    time_ax, memory_ax, size_ax = drawn[0].axes
    assert list(time_ax.lines[0].get_ydata()) == [r["step_s"] for r in train]
    assert list(memory_ax.lines[0].get_ydata()) == [r["peak_rss_mib"] for r in train]
    assert {tuple(line.get_ydata()) for line in size_ax.lines} == {
        (r["bytes"] / 1024,) for r in written.values()}

    html = "".join(telemetry_html(info, {}))
    assert f"<td>median step time</td><td>{statistics.median(r['step_s'] for r in train):.3f} s</td>" in html
    share = 100 * sum(r["data_s"] for r in train) / sum(r["step_s"] for r in train)
    assert f"<td>data loading</td><td>{share:.0f}% of step time</td>" in html
    assert f"<td>peak resident memory</td><td>{max(r['peak_rss_mib'] for r in train):,.0f} MiB</td>" in html
    assert (f"<td>adapter</td><td>1</td><td>{written['adapter']['bytes'] / 1024:,.1f} KiB</td>"
            f"<td>{written['adapter']['seconds']:.3f} s</td>") in html
    assert "Out of memory" not in html
    info.metrics.append({"step": 3, "split": "oom", "during": "training step 4", "peak_rss_mib": 2048.0})
    assert ("Out of memory during training step 4 (peak resident memory 2,048 MiB); the run was resumed from its "
            "last checkpoint.") in "".join(telemetry_html(info, {}))
    old = [{k: v for k, v in r.items() if k not in ("step_s", "data_s", "peak_rss_mib")} for r in train]
    assert plots.telemetry(old, tmp_path / "old.png") is None  # a run logged before telemetry: no panel
    assert telemetry_html(replace(info, metrics=old), {}) == []


def test_report_names_what_is_missing(tmp_path, run):
    with pytest.raises(VisloraError, match=r"config\.yaml is missing"):
        write_report(tmp_path)
    with pytest.raises(VisloraError, match=r"run/checkpoints holds no trained adapter \(task.json missing\)"):
        write_report(run, adapter="checkpoints")


@pytest.mark.slow
def test_demo_report_reuses_the_probe_and_final_evaluation(tmp_path):
    from vislora.train.demo import run_demo

    real_assets_or_skip()
    result = run_demo(tmp_path / "demo", steps=4, batch_size=16, train_images=96, test_images=60, image_size=28,
                      log=lambda _: None)
    assert result.report == tmp_path / "demo" / "report" / "report.html" and result.report.is_file()
    evaluation = json.loads((result.report.parent / "evaluation.json").read_text())
    assert evaluation["base"]["accuracy"] == pytest.approx(result.probe_accuracy, abs=1e-6)
    assert evaluation["adapted"]["accuracy"] == pytest.approx(result.lora_accuracy, abs=1e-9)
    assert evaluation["base"]["n"] == evaluation["adapted"]["n"] == 60 and 0 < evaluation["drift"]["mean"] <= 1
    for name in PLOTS:
        assert (result.report.parent / f"{name}.png").stat().st_size > 2000
    card = (result.report.parent / "MODEL_CARD.md").read_text()
    assert "base_model: facebook/dinov2-small" in card and "linear probe" in card


@pytest.mark.parametrize(("method", "tags"), [("lora", ["vislora", "lora", "image-classification"]),
                                               ("dora", ["vislora", "lora", "dora", "image-classification"])])
def test_model_card_names_each_tag_once(run, method, tags):
    from vislora.diagnostics import build_diagnosis
    from vislora.report.card import model_card

    card = model_card(load_run(run), {"method": method, "rank": 4, "alpha": 8}, build_diagnosis("a", "a", 0.9, []),
                      None, None, None)
    assert yaml.safe_load(card.split("---\n")[1])["tags"] == tags


def test_a_single_evaluation_is_a_labelled_bar_not_a_dot(tmp_path, monkeypatch):
    from vislora.report import plots

    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or path)
    rows = [{"split": "train", "step": s, "loss": 2.0 / s, "lr_adapter": 1e-3, "lr_head": 1e-3} for s in range(1, 41)]
    plots.training_curves([*rows, {"split": "val", "step": 40, "loss": 0.4, "accuracy": 0.8625, "n": 1000}],
                          tmp_path / "once.png")
    accuracy = drawn[0].axes[1]
    assert [bar.get_width() for bar in accuracy.patches] == [0.8625] and accuracy.get_xlim() == (0, 1)
    assert "0.8625" in [text.get_text() for text in accuracy.texts]
    assert "evaluated once on 1,000 images" in accuracy.get_title()
    assert [label.get_text() for label in accuracy.get_yticklabels()] == ["step 40"]

    plots.training_curves([*rows, {"split": "val", "step": 20, "loss": 0.5, "accuracy": 0.8},
                           {"split": "val", "step": 40, "loss": 0.4, "accuracy": 0.86}], tmp_path / "twice.png")
    curve = drawn[1].axes[1]
    assert len(curve.patches) == 0 and list(curve.lines[0].get_ydata()) == [0.8, 0.86]  # two points: a curve
