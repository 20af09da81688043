"""task.json carries what rebuilding the model needs, so an adapter works away from its run directory."""

import json
import shutil

import torch

from synthetic_images import image_folder, tiny_train_config
from vislora.run_config import TrainConfig
from vislora.train.evaluation import load_trained
from vislora.train.trainer import Trainer


def test_an_adapter_copied_out_of_its_run_rebuilds_the_same_random_base(tmp_path):
    folder = image_folder(tmp_path / "images", per_class=4)
    config = tiny_train_config(tmp_path / "run", folder, run={"seed": 7}, optim={"max_steps": 2})
    result = Trainer(TrainConfig.parse(config)).fit()
    assert json.loads((result.adapter_dir / "task.json").read_text())["seed"] == 7
    moved = shutil.copytree(result.adapter_dir, tmp_path / "registry" / "v1")  # no config.yaml beside or above it
    x = torch.randn(2, 3, 32, 32)
    in_run, _ = load_trained(result.adapter_dir)
    away, _ = load_trained(moved)
    with torch.no_grad():
        torch.testing.assert_close(away(x), in_run(x), rtol=0, atol=0)
