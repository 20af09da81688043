"""A dual-encoder run opened from its adapter folder (vislora.runs.load_trained_dual) computes what training ended
with, also on a randomly initialised image tower, which is rebuilt from the run's seed."""

import json
import shutil

import pytest
import torch
from dual_fixtures import dual_train_config, save_towers

from synthetic_images import image_folder
from vislora.dual_encoder import build_dual_encoder
from vislora.errors import AdapterFileError
from vislora.run_config import TrainConfig
from vislora.runs import load_trained_dual
from vislora.train.trainer import Trainer

TIMM_TOWER = {"spec": "timm:vit_tiny_patch16_224", "pretrained": False,
              "kwargs": {"img_size": 32, "patch_size": 8, "depth": 2}}  # kwargs.embed_dim would be the dual encoder's


def test_a_random_image_tower_is_rebuilt_from_the_run_seed(tmp_path):
    towers = save_towers(tmp_path / "towers")
    folder = image_folder(tmp_path / "images", per_class=4)
    config = dual_train_config(tmp_path / "run", towers, folder, model=TIMM_TOWER, run={"seed": 5},
                               adapter={"vision_targets": ["qkv"], "text_targets": ["query", "value"]},
                               optim={"batch_size": 6, "max_steps": 2})
    trainer = Trainer(TrainConfig.parse(config))
    result = trainer.fit()
    assert json.loads((result.adapter_dir / "task.json").read_text())["model"]["pretrained"] is False
    moved = shutil.copytree(result.adapter_dir, tmp_path / "registry" / "v1")  # task.json's seed, no config.yaml
    images = torch.randn(3, 3, 32, 32)
    trained = trainer.adapted.eval()
    with torch.no_grad():
        expected, _ = trained(images=images)
        for adapter_dir in (result.adapter_dir, moved):
            model, task = load_trained_dual(adapter_dir)
            assert task["task"] == "contrastive" and not model.training
            torch.testing.assert_close(model(images=images)[0], expected, rtol=0, atol=0)


def test_a_prepared_base_the_adapter_saves_whole_is_rebuilt_and_one_it_does_not_is_refused(tmp_path):
    towers = save_towers(tmp_path / "towers")
    folder = image_folder(tmp_path / "images", per_class=4)
    images = torch.randn(3, 3, 32, 32)
    for variant, adapter, rebuilt in (
            ("both", {"vision_targets": ["q", "v"], "text_targets": ["q", "v"]}, True),
            ("vision", {"vision_targets": ["q", "v"], "text_targets": None}, False)):  # text_proj frozen, not saved
        config = TrainConfig.parse(dual_train_config(tmp_path / variant, towers, folder, adapter=adapter,
                                                     optim={"batch_size": 6, "max_steps": 2}))
        base = build_dual_encoder(config.model.spec, config.model.text, embed_dim=config.model.embed_dim)
        with torch.no_grad():  # "pre-aligned" projections: not what model.* builds
            base.vision_proj.weight.mul_(1.5)
            base.text_proj.weight.mul_(0.5)
        trainer = Trainer(config, base_model=base)
        result = trainer.fit()
        task = json.loads((result.adapter_dir / "task.json").read_text())
        assert task["prepared_base"] is not rebuilt
        if not rebuilt:
            with pytest.raises(AdapterFileError, match="prepared in Python"):
                load_trained_dual(result.adapter_dir)
            continue
        with torch.no_grad():
            expected = trainer.adapted.eval()(images=images)[0]
            model, _ = load_trained_dual(result.adapter_dir)
            torch.testing.assert_close(model(images=images)[0], expected, rtol=0, atol=0)
