"""Tiled runs: data.tiling trains a TiledClassifier (classification and multilabel), task.json records the tiling,
and vislora.runs.load_trained rebuilds the model, so eval and report work on the run."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from synthetic_images import class_image, image_folder, tag_manifest, tiny_train_config
from vislora import ConfigError
from vislora.data import DataError, collate
from vislora.data.transforms import build_transform
from vislora.errors import ExportError
from vislora.evaluate.classifier import evaluate_adapter
from vislora.export.common import load_exportable
from vislora.report import write_report
from vislora.run_config import TrainConfig
from vislora.runs import load_trained
from vislora.tasks.tiled import TiledClassifier
from vislora.train.trainer import Trainer

TILING = {"size": 32, "overlap": 8, "aggregate": "attention", "tiles_per_step": 3, "image_size": 56}  # 2 x 2 tiles


def tiled_config(tmp_path, train, val=None, tiling=TILING, kind="classification", **sections):
    data = {"tiling": tiling, **sections.pop("data", {})}
    config = tiny_train_config(tmp_path / "run", train, val, data=data, **sections)
    return TrainConfig.parse({**config, "task": {"kind": kind}})


@pytest.mark.slow  # train, eval and report
def test_tiled_run_trains_saves_reloads_and_evaluates(tmp_path):
    folder = image_folder(tmp_path / "images", per_class=3, size=80)
    trainer = Trainer(tiled_config(tmp_path, folder, folder, optim={"max_steps": 4, "lr_adapter": 3e-3}))
    assert trainer.train_data[0]["image"].shape == (3, 56, 56)  # whole images at tiling.image_size, not 32
    result = trainer.fit()

    task = json.loads((result.adapter_dir / "task.json").read_text())
    assert task["tiling"] == {**TILING, "size": 32} and task["input"]["size"] == 32
    assert task["head"] == "classifier.head"
    saved = json.loads((result.adapter_dir / "adapter_config.json").read_text())["modules_to_save"]
    assert saved == ["classifier.head", "tile_attention"]

    model, loaded = load_trained(result.adapter_dir)
    assert isinstance(model.base_model, TiledClassifier) and loaded["input_spec"].size == 56
    batch = collate([trainer.val_data[i] for i in range(3)])["image"]
    with torch.no_grad():
        torch.testing.assert_close(model(batch), trainer.adapted.eval()(batch))  # the trained attention came back
    evaluated = evaluate_adapter(result.adapter_dir, folder, batch_size=5)
    assert evaluated.n == 9 and evaluated.metrics() == pytest.approx(result.final)

    report = write_report(result.run_dir, latency_images=1)
    assert "accuracy" in report.html.read_text()


def test_images_keep_their_sizes_without_tiling_image_size(tmp_path):
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(70, 40), (40, 90), (64, 64)] * 2):
        (tmp_path / "mixed" / f"class{i % 3}").mkdir(parents=True, exist_ok=True)
        class_image(i % 3, rng, size=64).resize((w, h)).save(tmp_path / "mixed" / f"class{i % 3}" / f"{i}.png")
    tiling = {**TILING, "image_size": None, "aggregate": "max"}
    with pytest.raises(ConfigError, match=r"optim\.batch_size: 1"):
        tiled_config(tmp_path, tmp_path / "mixed", tiling=tiling, data={"allow_mixed_resolution": True})
    config = tiled_config(tmp_path, tmp_path / "mixed", tmp_path / "mixed", tiling=tiling,
                          data={"allow_mixed_resolution": True}, optim={"batch_size": 1, "max_steps": 3})
    trainer = Trainer(config)
    assert {tuple(trainer.train_data[i]["image"].shape) for i in range(6)} == {(3, 40, 70), (3, 90, 40), (3, 64, 64)}
    result = trainer.fit()
    assert result.final["accuracy"] >= 0 and load_trained(result.adapter_dir)[1]["input_spec"].size is None
    assert evaluate_adapter(result.adapter_dir, tmp_path / "mixed", batch_size=1).n == 6
    with pytest.raises(DataError, match=r"data\.tiling\.image_size"):
        evaluate_adapter(result.adapter_dir, tmp_path / "mixed", batch_size=3)


def test_tiled_multilabel_run(tmp_path):
    train = tag_manifest(tmp_path / "data", n=12, seed=0, name="train.csv")
    config = tiled_config(tmp_path, train, train, tiling={"size": 16, "aggregate": "mean"}, kind="multilabel",
                          optim={"batch_size": 4, "max_steps": 2})
    result = Trainer(config).fit()
    model, task = load_trained(result.adapter_dir)
    assert task["task"] == "multilabel" and task["tiling"]["size"] == 16 and task["thresholds"] is not None
    image = build_transform(task["input_spec"], train=False)(Image.open(next(train.parent.glob("*.png"))))
    assert image.shape == (3, 32, 32)  # the tag images' own size; 16-px tiles resized to the model's 32
    assert model(image[None]).shape == (1, len(task["attributes"]["names"]))
    with pytest.raises(ExportError, match="tiled classifier"):
        load_exportable(result.adapter_dir)  # merged and ONNX forms would drop the tiling


@pytest.mark.parametrize(("change", "message"), [
    ({"task": {"kind": "contrastive"}}, "data.tiling tiles images for classifiers"),
    ({"adapter": {"method": "molora"}}, "MoLoRA"),
    ({"data": {"tiling": {"tiles_per_stp": 4}}}, r"did you mean 'data\.tiling\.tiles_per_step'"),
    ({"data": {"tiling": {"size": 16, "overlap": 16}}}, "overlap=16 with size=16"),
    ({"data": {"tiling": {"aggregate": "median"}}}, "aggregate"),
    ({"data": {"tiling": {}, "image_sizes": [32, 64]}}, "drop one of the two"),
])
def test_tiling_config_errors(tmp_path, change, message):
    config = tiny_train_config(tmp_path / "run", tmp_path, data={"tiling": {}})
    for section, values in change.items():
        config[section] = {**config.get(section, {}), **values}
    with pytest.raises(ConfigError, match=message):
        TrainConfig.parse(config)
