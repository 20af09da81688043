"""Trainer callbacks fire where their docstrings say, and what they return reaches the loss and the log."""

import json

import pytest
import torch
from safetensors.torch import load_file

from synthetic_images import image_folder, tiny_train_config
from vislora.run_config import TrainConfig
from vislora.train.callbacks import TrainerCallback
from vislora.train.trainer import Trainer


class Recorder(TrainerCallback):
    """Adds `weight * sum(B^2)` to the loss and records what the trainer shows it."""

    def __init__(self, weight: float) -> None:
        self.weight = weight
        self.events: list[tuple[str, int, bool]] = []

    def extra_loss(self, trainer):
        lora_b = [p for n, p in trainer.adapted.named_parameters() if "lora_B" in n]
        return self.weight * torch.stack([p.square().sum() for p in lora_b]).sum()

    def on_gradients(self, trainer):
        has_grads = all(p.grad is not None for p in trainer.adapted.adapter_parameters("default"))
        self.events.append(("gradients", trainer.loop.step, has_grads))

    def on_step_end(self, trainer, taken):
        has_grads = all(p.grad is not None for p in trainer.adapted.adapter_parameters("default"))
        self.events.append(("step_end", trainer.loop.step, taken and has_grads))

    def metrics(self, trainer):
        return {"recorder_events": float(len(self.events))}


@pytest.fixture
def folder(tmp_path):
    return image_folder(tmp_path / "images", per_class=8)


def run(tmp_path, folder, name, callbacks):
    config = TrainConfig.parse(tiny_train_config(tmp_path / name, folder, folder, optim={"max_steps": 3},
                                                 run={"log_every": 1}))
    return Trainer(config, callbacks=callbacks).fit()


def test_callbacks_fire_in_order_with_gradients_present_and_log_metrics(tmp_path, folder):
    recorder = Recorder(weight=0.0)
    result = run(tmp_path, folder, "a", [recorder])
    assert recorder.events == [(kind, step, True) for step in range(3) for kind in ("gradients", "step_end")]
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["recorder_events"] for r in rows if r["split"] == "train"] == [2.0, 4.0, 6.0]


def test_extra_loss_changes_what_is_trained(tmp_path, folder):
    plain = run(tmp_path, folder, "plain", [])
    regularised = run(tmp_path, folder, "reg", [Recorder(weight=100.0)])
    assert b_norm(regularised) < b_norm(plain)  # the penalty on B pulled it towards zero


def b_norm(result) -> float:
    weights = load_file(result.adapter_dir / "adapter_model.safetensors")
    return sum(t.square().sum().item() for key, t in weights.items() if "lora_B" in key)
