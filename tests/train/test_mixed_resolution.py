"""Mixed-resolution training (data.image_sizes): each step trains at the side drawn from (seed, step), evaluation
stays at data.image_size, task.json records the sides, and a resumed run equals an uninterrupted one."""

import json
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file

from synthetic_images import image_folder, tiny_train_config
from vislora.errors import ConfigError, VisloraWarning
from vislora.input_size import step_side
from vislora.run_config import TrainConfig
from vislora.runs import load_trained
from vislora.train.trainer import Trainer

SIDES = [16, 24, 32]


@pytest.fixture
def folder(tmp_path):
    return image_folder(tmp_path / "images", per_class=4)


def config(tmp_path, folder, out="run", **sections):
    sections = {"data": {"image_sizes": SIDES, **sections.pop("data", {})}, **sections}
    return TrainConfig.parse(tiny_train_config(tmp_path / out, folder, folder, **sections))


def test_each_step_trains_at_its_drawn_side_and_evaluates_at_image_size(tmp_path, folder):
    trainer = Trainer(config(tmp_path, folder, optim={"max_steps": 6}))
    seen: list[tuple[bool, int]] = []
    trainer.adapted.base_model.patch_embed.register_forward_pre_hook(
        lambda module, args: seen.append((module.training, args[0].shape[-1])))
    result = trainer.fit()
    trained = [side for training, side in seen if training]
    assert trained == [step_side(SIDES, 0, step) for step in range(6)] and len(set(trained)) > 1
    assert {side for training, side in seen if not training} == {32}  # evaluation at data.image_size
    task = json.loads((result.adapter_dir / "task.json").read_text())["input"]
    assert (task["size"], task["train_sizes"], task["position_embeddings"]) == (32, SIDES, "native")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a side the run trained at: no warning
        _, reopened = load_trained(result.adapter_dir, image_size=16)
    assert reopened["input_spec"].size == 16
    with pytest.warns(VisloraWarning, match="trained at 32 px and runs at 40 px"):
        load_trained(result.adapter_dir, image_size=40)


def test_a_resumed_mixed_run_equals_an_uninterrupted_one(tmp_path, folder):
    sections = {"optim": {"max_steps": 6}, "run": {"save_every": 3, "keep_last": 5}}
    straight = Trainer(config(tmp_path, folder, "a", **sections)).fit()
    interrupted = tmp_path / "b"
    shutil.copytree(straight.run_dir, interrupted)
    for name in ("checkpoints/step-000006", "adapter", "best", "summary.json"):
        path = interrupted / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    resumed = Trainer(config(tmp_path, folder, "b", **sections)).fit()
    a = load_file(straight.adapter_dir / "adapter_model.safetensors")
    b = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sides_that_are_not_multiples_of_the_patch_are_refused(tmp_path, folder):
    with pytest.raises(ConfigError, match=r"data.image_sizes \[16, 20\] holds \[20\].*patch size 8"):
        Trainer(config(tmp_path, folder, data={"image_sizes": [16, 20]}))
    with pytest.raises(ValueError, match="greater than or equal to 8"):
        config(tmp_path, folder, data={"image_sizes": [4]})
