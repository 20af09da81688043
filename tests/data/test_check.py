import csv
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import missing_asset
from synthetic_images import class_image, corrupt_png, csv_manifest, image_folder
from vislora import assets
from vislora.data import check_dataset, manifest, open_dataset


def test_check_lists_corrupt_duplicates_balance_and_writes_audit(tmp_path):
    root = image_folder(tmp_path / "d", per_class=20)
    for i in range(20, 40):  # class2 twice as large as the others
        class_image(2, np.random.default_rng(i)).save(root / "class2" / f"{i:03d}.png")
    shutil.copy(root / "class0" / "000.png", root / "class1" / "copy_of_class0.png")
    corrupt_png(root / "class1" / "truncated.png")
    Image.new("RGB", (64, 48)).save(root / "class0" / "big.png")

    report = check_dataset(open_dataset(root), tmp_path / "audit", fraction=0.05, seed=1)

    assert [f.rsplit("/", 1)[1] for f, _ in report.corrupt] == ["truncated.png"]
    assert report.resolutions == {"32x32": 81, "64x48": 1}
    assert report.class_counts == {"class0": 21, "class1": 22, "class2": 40}
    assert report.imbalance == 40 / 21
    assert [sorted(g) for g in report.duplicates] == [[str(root / "class0" / "000.png"),
                                                      str(root / "class1" / "copy_of_class0.png")]]
    rows = list(csv.DictReader(Path(report.audit_csv).read_text().splitlines()))
    per_class = {c: sum(r["label"] == c for r in rows) for c in report.class_counts}
    assert per_class == {"class0": 2, "class1": 2, "class2": 2}  # ceil(5%) of readable images per class
    assert all("truncated" not in r["image"] for r in rows) and rows[0]["reviewed_label"] == ""
    sheet = Image.open(report.contact_sheet)
    assert sheet.size == (6 * 104, 1 * 118)
    saved = json.loads((tmp_path / "audit" / "report.json").read_text())
    assert saved["corrupt"][0][0].endswith("truncated.png") and "corrupt/unreadable: 1" in str(report)


def test_metadata_coverage_counts_filled_rows(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        class_image(i % 2, rng).save(tmp_path / f"{i}.png")
        rows.append({"path": f"{i}.png", "label": f"c{i % 2}", "licence": "cc0" if i else "",
                     "capture_date": f"2024-01-0{i + 1}" if i < 2 else "", "location": "", "camera": "x"})
    report = check_dataset(manifest(csv_manifest(tmp_path, rows)))
    assert report.metadata_coverage == {"license": 75.0, "capture_date": 50.0, "location": 0.0, "camera": 100.0}
    assert report.audit_csv is None


def test_fashion_mnist_check_runs_on_the_array_dataset(tmp_path):

    try:
        assets.fashion_mnist_dir()
    except assets.AssetError as err:
        missing_asset(f"Fashion-MNIST not installed ({err})")
    data = open_dataset("fashion-mnist:test").subset(200, seed=0)
    report = check_dataset(data, tmp_path)
    assert report.resolutions == {"28x28": 200} and sum(report.class_counts.values()) == 200
    rows = list(csv.DictReader(Path(report.audit_csv).read_text().splitlines()))
    assert len(rows) == 10  # ceil(5% of 20) = 1 per class
