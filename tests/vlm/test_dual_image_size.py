"""A dual encoder's image tower at another side than its native one: the trainer runs it at data.image_size, the
run reopens at that side (and at another, with a warning), and task.json records how."""

import json

import pytest
import torch
from dual_fixtures import dual_train_config, save_towers

from synthetic_images import image_folder
from vislora.errors import VisloraWarning
from vislora.run_config import TrainConfig
from vislora.runs import load_trained_dual
from vislora.train.trainer import Trainer

TIMM_TOWER = {"spec": "timm:vit_tiny_patch16_224", "pretrained": False, "kwargs": {"patch_size": 8, "depth": 2}}


def test_a_timm_image_tower_trained_at_32_px_reopens_at_32_and_48_px(tmp_path):
    towers = save_towers(tmp_path / "towers")
    folder = image_folder(tmp_path / "images", per_class=4)
    config = dual_train_config(tmp_path / "run", towers, folder, model=TIMM_TOWER,
                               adapter={"vision_targets": ["qkv"], "text_targets": ["query", "value"]},
                               optim={"batch_size": 6, "max_steps": 2})
    trainer = Trainer(TrainConfig.parse(config))
    result = trainer.fit()
    recorded = json.loads((result.adapter_dir / "task.json").read_text())["input"]
    assert (recorded["size"], recorded["native_size"], recorded["position_embeddings"]) == (32, 224, "timm-resample")
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected, _ = trainer.adapted.eval()(images=images)
        model, _ = load_trained_dual(result.adapter_dir)
        torch.testing.assert_close(model(images=images)[0], expected, rtol=0, atol=0)
        with pytest.warns(VisloraWarning, match="trained at 32 px and runs at 48 px"):
            model, task = load_trained_dual(result.adapter_dir, image_size=48)
        assert task["input"]["size"] == 48 and model(images=torch.randn(3, 3, 48, 48))[0].shape == (3, 16)
