import csv

import pytest
import torch
from typer.testing import CliRunner

from multilabel_run import train_tiny_multilabel
from vislora.cli import app
from vislora.data import collate
from vislora.errors import ConfigError
from vislora.evaluate import compare_adapter
from vislora.evaluate.collect import collect
from vislora.evaluate.multilabel import multilabel_metrics
from vislora.evaluate.multilabel_comparison import compare_multilabel_adapter, open_multilabel_data
from vislora.runs import load_trained
from vislora.tasks.multilabel import attribute_scores, saved_attributes, saved_thresholds


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_tiny_multilabel(tmp_path_factory.mktemp("ml"))


def test_base_and_adapted_are_scored_at_the_saved_thresholds(run, tmp_path):
    result, val = run
    comparison = compare_multilabel_adapter(result.adapter_dir, val, batch_size=5, predictions=tmp_path / "p.csv")
    model, task = load_trained(result.adapter_dir)
    data = open_multilabel_data(task, val)
    loader = torch.utils.data.DataLoader(data, batch_size=16, collate_fn=collate)
    both = collect(model, loader)
    attributes, thresholds = saved_attributes(task), saved_thresholds(task)
    for outputs, measured in ((both.adapted, comparison.adapted), (both.base, comparison.base)):
        expected = multilabel_metrics(attribute_scores(outputs.logits, attributes), both.labels, task["classes"],
                                      thresholds.tolist(), task["train_counts"], 5)
        assert measured.map == pytest.approx(expected.map) and measured.micro_f1 == pytest.approx(expected.micro_f1)
        assert [r.ap for r in measured.per_attribute] == pytest.approx([r.ap for r in expected.per_attribute])
    assert comparison.adapted.rare == ["yellow"] and [d.name for d in comparison.rare] == ["yellow"]
    assert comparison.base.map != comparison.adapted.map  # the adapter changes the scores
    assert [d.threshold for d in comparison.per_attribute] == pytest.approx(thresholds.tolist())
    assert "tuned (max_f1) on" in comparison.thresholds and "val.csv at step 6" in comparison.thresholds
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert len(rows) == 16 and rows[0]["labels"] == "|".join(data.records[0].labels)
    scores = [float(rows[0][f"score:{n}"]) for n in task["classes"]]
    assert rows[0]["predicted"] == "|".join(n for n, s, t in zip(task["classes"], scores, thresholds.tolist(),
                                                                  strict=True) if s >= t)




def test_eval_cli_prints_map_rare_and_per_attribute_rows(run, tmp_path):
    result, val = run
    out = CliRunner().invoke(app, ["eval", "--adapter", str(result.adapter_dir), "--data", str(val),
                                   "--json", str(tmp_path / "e.json")], terminal_width=200)
    assert out.exit_code == 0, out.output
    for text in ("mAP", "micro-F1", "macro-F1", "rare mAP (1 attributes < 5 training images)", "per attribute",
                 "yellow*", "* rare: fewer than 5 training images (yellow)", "thresholds",
                 "base = the backbone without its adapters, with the trained head"):
        assert text in out.output
    assert '"task": "multilabel"' in (tmp_path / "e.json").read_text()


def test_single_label_comparison_refuses_a_multilabel_adapter(run):
    result, val = run
    with pytest.raises(ConfigError, match="this is a multilabel adapter"):
        compare_adapter(result.adapter_dir, val)
