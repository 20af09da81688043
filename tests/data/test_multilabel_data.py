import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from synthetic_images import TAGS, class_image, tag_manifest
from vislora.cli import app
from vislora.data import AttributeSet, DataError, MultiLabelFormat, check_dataset, collate, manifest, open_dataset

ML = MultiLabelFormat()


def _png(root, name="a.png"):
    class_image(0, np.random.default_rng(0)).save(root / name)
    return name


def test_csv_cells_split_on_the_separator_into_label_tuples(tmp_path):
    _png(tmp_path)
    (tmp_path / "m.csv").write_text("path,label,license\na.png,cotton|striped,cc0\na.png, silk ;x,cc0\n")
    data = manifest(tmp_path / "m.csv", multilabel=ML)
    assert [r.labels for r in data.records] == [("cotton", "striped"), ("silk ;x",)]
    assert [r.line for r in data.records] == [2, 3] and data.records[0].label is None
    semi = manifest(tmp_path / "m.csv", multilabel=MultiLabelFormat(separator=";"))
    assert semi.records[0].labels == ("cotton|striped",) and semi.records[1].labels == ("silk", "x")
    assert data.classes == ["cotton", "silk ;x", "striped"] and data.multilabel


def test_jsonl_list_cells_and_multi_hot_targets(tmp_path):
    _png(tmp_path)
    lines = [{"path": "a.png", "label": ["b", "a10"]}, {"path": "a.png", "label": ["a2", "b", "b"]}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    data = manifest(tmp_path / "m.jsonl", multilabel=ML)
    assert data.classes == ["a2", "a10", "b"]  # natural order: 2 before 10
    assert data.records[1].labels == ("a2", "b")  # duplicates dropped
    batch = collate([{**data[i], "image": torch.zeros(1)} for i in range(2)])
    assert batch["label"].tolist() == [[0.0, 1.0, 1.0], [1.0, 0.0, 1.0]]


def test_unknown_label_names_the_line_and_the_valid_names(tmp_path):
    _png(tmp_path)
    (tmp_path / "m.csv").write_text("path,label\na.png,cotton\na.png,cotton|velvet\n")
    attributes = AttributeSet(("cotton", "silk"))
    with pytest.raises(DataError, match=r"m\.csv line 3: 'velvet' is not an attribute; valid names: cotton, silk"):
        manifest(tmp_path / "m.csv", multilabel=ML, attributes=attributes)
    with pytest.raises(DataError, match=r"line 3: 'velvet' is not an attribute"):
        open_dataset(tmp_path / "m.csv", multilabel=ML, classes=["cotton", "silk"])


def test_empty_label_list_is_refused_unless_allowed(tmp_path):
    _png(tmp_path)
    (tmp_path / "m.csv").write_text("path,label\na.png,cotton\na.png,\n")
    with pytest.raises(DataError, match=r"m\.csv line 3: empty label list;.*allow_empty: true"):
        manifest(tmp_path / "m.csv", multilabel=ML)
    data = manifest(tmp_path / "m.csv", multilabel=MultiLabelFormat(allow_empty=True))
    assert data.records[1].labels == () and data[1]["label"].tolist() == [0.0]
    (tmp_path / "m.jsonl").write_text('{"path": "a.png", "label": []}\n')
    with pytest.raises(DataError, match=r"m\.jsonl line 1: empty label list"):
        manifest(tmp_path / "m.jsonl", multilabel=ML)


def test_malformed_csv_rows_name_their_line(tmp_path):
    _png(tmp_path)
    (tmp_path / "m.csv").write_text("path,label\na.png,cotton\n\na.png,cotton,extra\n")
    with pytest.raises(DataError, match=r"m\.csv line 4 has 3 fields but the header has 2 \(path, label\)"):
        manifest(tmp_path / "m.csv", multilabel=ML)
    (tmp_path / "m.csv").write_text('path,label\n"a.png","x\ny"\nb.png\n')  # a quoted cell spans lines 2-3
    with pytest.raises(DataError, match=r"line 4 has 1 fields"):
        manifest(tmp_path / "m.csv")
    (tmp_path / "m.csv").write_text("path,label\na.png,cotton||silk\n")
    with pytest.raises(DataError, match=r"line 2: label list 'cotton\|\|silk' has an empty entry"):
        manifest(tmp_path / "m.csv", multilabel=ML)


def test_a_list_in_single_label_data_points_to_multilabel(tmp_path):
    _png(tmp_path)
    (tmp_path / "m.jsonl").write_text('{"path": "a.png", "label": ["x", "y"]}\n')
    with pytest.raises(DataError, match=r"line 1: 'label' holds a list .*task\.kind: multilabel"):
        manifest(tmp_path / "m.jsonl")


def test_multilabel_needs_a_manifest(tmp_path):
    with pytest.raises(DataError, match=r"multi-label data must be a \.csv/\.jsonl manifest"):
        open_dataset("fashion-mnist:test", multilabel=ML)


def test_attribute_set_groups_and_single_choice(tmp_path):
    attrs = AttributeSet(("cotton", "silk", "slim", "loose", "striped"),
                         groups={"fabric": ("cotton", "silk"), "cut": ("slim", "loose")}, single_choice=("fabric",))
    assert attrs.encode(("silk", "striped")).tolist() == [0.0, 1.0, 0.0, 0.0, 1.0]
    assert attrs.decode(attrs.encode(("silk", "striped"))) == ("silk", "striped")
    assert attrs.group_indices() == {"fabric": [0, 1]} and attrs.group_of("loose") == "cut"
    assert AttributeSet.from_dict(json.loads(json.dumps(attrs.to_dict()))) == attrs
    with pytest.raises(DataError, match=r"x line 9: single-choice group 'fabric' needs exactly one of "
                                        r"\['cotton', 'silk'\], found \['cotton', 'silk'\]"):
        attrs.check(("cotton", "silk"), "x line 9")
    with pytest.raises(DataError, match=r"found none"):
        attrs.check(("slim",), "x line 9")
    with pytest.raises(DataError, match=r"group 'cut' names \['baggy'\], which are not attributes"):
        AttributeSet(("slim",), groups={"cut": ("slim", "baggy")})
    with pytest.raises(DataError, match=r"'slim' is in groups 'a' and 'b'"):
        AttributeSet(("slim",), groups={"a": ("slim",), "b": ("slim",)})
    with pytest.raises(DataError, match=r"single_choice names \['pattern'\], which are not groups"):
        AttributeSet(("slim",), single_choice=("pattern",))
    with pytest.raises(DataError, match=r"attributes \['a'\] are listed more than once"):
        AttributeSet(("a", "a"))


def test_with_attributes_checks_every_row_against_the_groups(tmp_path):
    path = tag_manifest(tmp_path, n=6)
    data = manifest(path, multilabel=ML)
    default = AttributeSet.from_labels(data.label_sets(), groups={"warm": ("red", "yellow")})
    assert default.names == tuple(sorted(TAGS))
    strict = AttributeSet(default.names, default.groups, single_choice=("warm",))
    bad = next(i for i, labels in enumerate(data.label_sets())
               if sum(t in ("red", "yellow") for t in labels) != 1)
    with pytest.raises(DataError, match=rf"tags\.csv line {bad + 2}: single-choice group 'warm'"):
        data.with_attributes(strict)
    assert data.with_attributes(default).attributes == default


def test_stratified_subset_of_multilabel_rows_uses_the_first_label(tmp_path):
    data = manifest(tag_manifest(tmp_path, n=20), multilabel=ML)
    sub = data.subset(10, seed=1)
    assert len(sub) == 10 and sub.multilabel and sub.classes == data.classes
    assert [r.source for r in data.subset(10, seed=1).records] == [r.source for r in sub.records]


def test_data_check_counts_images_per_attribute_and_flags_rare_ones(tmp_path):
    path = tag_manifest(tmp_path, n=20, rare="yellow")
    data = manifest(path, multilabel=ML)
    report = check_dataset(data, tmp_path / "audit", rare_below=3)
    sets = data.label_sets()
    assert report.multilabel and report.class_counts == {t: sum(t in s for s in sets) for t in data.classes}
    assert report.class_counts["yellow"] == 2 and report.rare == ["yellow"]
    assert report.labels_per_image == pytest.approx(sum(map(len, sets)) / 20)
    assert "rare attributes (fewer than 3 images): yellow" in str(report)
    audit = (tmp_path / "audit" / "audit.csv").read_text()
    assert "|" in audit  # labels of a row are written joined
    result = CliRunner().invoke(app, ["data", "check", str(path), "--multilabel", "--rare-below", "3",
                                      "--out", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert "20 images, 4 attributes" in result.output and "yellow" in result.output
    assert "rare attributes (fewer than 3 images): yellow" in result.output
