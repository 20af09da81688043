import gzip
import json
import random

import numpy as np
import pytest
import torch

from synthetic_images import class_image, corrupt_png, csv_manifest, image_folder
from vislora import assets
from vislora.data import (
    AugmentConfig,
    DataError,
    SampleTransform,
    build_transform,
    collate,
    manifest,
    model_input_spec,
    open_dataset,
)
from vislora.errors import VisloraWarning


def test_image_folder_labels_follow_subfolders(tmp_path):
    data = open_dataset(image_folder(tmp_path / "d", per_class=3))
    assert data.classes == ["class0", "class1", "class2"]
    assert data.labels() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    sample = data[4]
    assert sample["label"] == 1 and sample["image"].size == (32, 32)


def test_corrupt_image_is_skipped_and_listed_by_collate(tmp_path):
    root = image_folder(tmp_path / "d", per_class=2)
    corrupt_png(root / "class1" / "broken.png")
    data = open_dataset(root)
    data.transform = SampleTransform(build_transform(model_input_spec(torch.nn.Identity(), 32), train=False))
    bad = next(i for i, r in enumerate(data.records) if r.source.endswith("broken.png"))
    batch = collate([data[i] for i in range(len(data))])
    assert batch["skipped"] == [bad]
    assert batch["image"].shape == (6, 3, 32, 32) and bad not in batch["index"].tolist()


def test_corrupt_image_fails_in_strict_mode_naming_the_file(tmp_path):
    root = image_folder(tmp_path / "d", per_class=1)
    corrupt_png(root / "class0" / "broken.png")
    data = open_dataset(root, strict=True)
    bad = next(i for i, r in enumerate(data.records) if r.source.endswith("broken.png"))
    with pytest.raises(DataError, match=r"broken\.png cannot be decoded .*data\.strict: false"):
        data[bad]


def test_manifest_metadata_travels_with_each_sample(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        class_image(i % 2, rng).save(tmp_path / f"{i}.png")
        rows.append({"path": f"{i}.png", "label": f"c{i % 2}", "license": "cc-by", "group": "ab"[i // 2]})
    data = manifest(csv_manifest(tmp_path, rows))
    assert data.metadata_columns == ["group", "license"]
    batch = collate([{**data[i], "image": torch.zeros(1)} for i in range(4)])
    assert [m["group"] for m in batch["metadata"]] == ["a", "a", "b", "b"]


def test_missing_label_column_is_a_clear_error(tmp_path):
    path = csv_manifest(tmp_path, [{"path": "a.png", "class": "cat"}])
    with pytest.raises(DataError, match=r"has no column 'label' \(columns: path, class\).*data\.label_column"):
        manifest(path)
    assert manifest(path, label_column="class").classes == ["cat"]


def test_empty_label_cell_names_the_line(tmp_path):
    path = csv_manifest(tmp_path, [{"path": "a.png", "label": "x"}, {"path": "b.png", "label": ""}])
    with pytest.raises(DataError, match="line 3: empty 'label'"):
        manifest(path)


def test_jsonl_caption_pairs(tmp_path):
    class_image(0, np.random.default_rng(0)).save(tmp_path / "a.png")
    path = tmp_path / "captions.jsonl"
    path.write_text(json.dumps({"path": "a.png", "caption": "a red square", "location": "lab"}) + "\n")
    data = manifest(path, label_column=None)
    assert data[0]["caption"] == "a red square" and data[0]["metadata"] == {"location": "lab"}
    path.write_text("{not json\n")
    with pytest.raises(DataError, match="line 1 is not valid JSON"):
        manifest(path, label_column=None)


def test_unknown_label_in_eval_data_is_refused(tmp_path):
    path = csv_manifest(tmp_path, [{"path": "a.png", "label": "zebra"}])
    with pytest.raises(DataError, match=r"labels \['zebra'\] are not among the training classes"):
        open_dataset(path, classes=["cat", "dog"])


def test_missing_source_explains_the_choices(tmp_path):
    with pytest.raises(DataError, match="fashion-mnist:train"):
        open_dataset(tmp_path / "nope")


def test_stratified_subset_keeps_class_shares(tmp_path):
    data = open_dataset(image_folder(tmp_path / "d", per_class=10))
    sub = data.subset(15, seed=3)
    assert len(sub) == 15 and sorted(sub.labels()) == [0] * 5 + [1] * 5 + [2] * 5
    assert [r.source for r in data.subset(15, seed=3).records] == [r.source for r in sub.records]


def test_sample_transform_is_seeded_per_epoch_and_index_and_keeps_global_rng(tmp_path):
    data = open_dataset(image_folder(tmp_path / "d", per_class=1))
    spec = model_input_spec(torch.nn.Identity(), 32)
    transform = SampleTransform(build_transform(spec, train=True, augment=AugmentConfig(color_jitter=0.4)), seed=7)
    image = data.open_image(0)
    torch.manual_seed(0)
    random.seed(0)
    first = transform(image, 0)
    torch.manual_seed(0)
    expected_next = torch.rand(1)
    torch.manual_seed(0)
    transform(image, 0)
    assert torch.equal(torch.rand(1), expected_next)  # global RNG untouched
    assert torch.equal(transform(image, 0), first)
    assert not torch.equal(transform(image, 1), first)
    transform.set_epoch(1)
    assert not torch.equal(transform(image, 0), first)


def test_input_spec_comes_from_the_model(vit):
    spec = model_input_spec(vit)
    assert spec.size == 32 and spec.mean == tuple(vit.pretrained_cfg["mean"])
    assert model_input_spec(vit, 64).size == 64


def test_strong_augmentation_warns():
    with pytest.warns(VisloraWarning, match="cutmix .*destabilises low-rank adapters"):
        AugmentConfig(cutmix=1.0)


def test_idx_reader_and_download_from_a_mirror(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    for split, (image_file, label_file) in assets.FASHION_MNIST_FILES.items():
        n = 2 if split == "train" else 1
        header = (2051).to_bytes(4, "big") + n.to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
        (mirror / image_file).write_bytes(gzip.compress(header + images[:n].tobytes()))
        labels = (2049).to_bytes(4, "big") + n.to_bytes(4, "big") + bytes([3, 7][:n])
        (mirror / label_file).write_bytes(gzip.compress(labels))
    monkeypatch.setenv("VISLORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(assets, "FASHION_MNIST_SYSTEM", tmp_path / "absent")
    with pytest.raises(assets.AssetError, match="apt-get install dataset-fashion-mnist"):
        assets.fashion_mnist_dir()
    folder = assets.download_fashion_mnist(tmp_path / "cache" / "fashion-mnist", base_url=mirror.as_uri() + "/")
    assert assets.fashion_mnist_dir() == folder
    x, y = assets.read_fashion_mnist("train")
    assert np.array_equal(x, images) and y.tolist() == [3, 7]
    assert not list(folder.glob(".*.tmp"))  # atomic writes leave no temp files
