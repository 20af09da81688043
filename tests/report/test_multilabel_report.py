import json

import pytest

from multilabel_run import train_tiny_multilabel
from vislora.evaluate.multilabel_comparison import compare_multilabel_adapter
from vislora.report import write_report


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    result, val = train_tiny_multilabel(tmp_path_factory.mktemp("ml"))
    return result, write_report(result.run_dir), compare_multilabel_adapter(result.adapter_dir, val)


def test_report_has_the_multilabel_section_with_the_numbers(report):
    _, files, comparison = report
    html = files.html.read_text()
    assert "Multi-label tagging: before / after" in html and "Rare attributes (fewer than 5 training images)" in html
    assert f"<td>mAP</td><td>{comparison.base.map:.4f}</td><td>{comparison.adapted.map:.4f}</td>" in html
    yellow = next(d for d in comparison.per_attribute if d.name == "yellow")
    assert f"<td>yellow</td><td>{yellow.positives}</td><td>2</td><td>{yellow.threshold:.3f}</td>" in html
    assert "No held-out data" not in html
    saved = json.loads(files.evaluation.read_text())
    assert saved["task"] == "multilabel" and saved["adapted"]["map"] == pytest.approx(comparison.adapted.map)


def test_model_card_describes_the_tagger_and_its_rare_attributes(report):
    _, files, comparison = report
    card = files.model_card.read_text()
    assert "multi-label tagging with 4 attributes" in card
    assert f"| mAP | {comparison.base.map:.4f} | {comparison.adapted.map:.4f} |" in card
    rare_part = card.split("### Rare attributes (fewer than 5 training images)")[1]
    assert "| yellow |" in rare_part and "| yellow |" not in card.split("### Rare attributes")[0]
    assert (files.folder / "training.png").is_file()
