"""AdaLoRA and MoLoRA inside the trainer: the loop drives the allocator and the losses, and resume is exact."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from synthetic_images import image_folder, tiny_train_config
from vislora import AdapterConfig
from vislora.run_config import TrainConfig
from vislora.train.tasks import ClassificationTask
from vislora.train.trainer import Trainer

ADALORA = {"targets": ["q", "v", "o"], "rank": 6, "alpha": 6, "method": "adalora",
           "adalora": {"target_rank": 2, "tinit": 2, "tfinal": 3, "delta_t": 1}}
MOLORA = {"targets": ["qkv", "fc1"], "rank": 2, "alpha": 4, "method": "molora",
          "molora": {"experts": 3, "top_k": 2, "balance_weight": 0.05}}


@pytest.fixture
def folder(tmp_path):
    return image_folder(tmp_path / "images", per_class=8)


def config(tmp_path, folder, out, adapter, **run):
    return TrainConfig.parse(tiny_train_config(tmp_path / out, folder, folder, adapter=adapter,
                                               optim={"max_steps": 10, "lr_adapter": 1e-2},
                                               run={"log_every": 1, **run}))


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_adalora_budget_falls_during_training_and_ranks_are_reported(tmp_path, folder):
    result = Trainer(config(tmp_path, folder, "a", ADALORA)).fit()
    budgets = [r["adalora.default.rank_budget"] for r in rows(result.run_dir) if r["split"] == "train"]
    layers = 2 * 2 + 2  # q and v slices of 2 blocks + o of 2 blocks
    assert budgets[-1] == 2 * layers  # target_rank per pair once the schedule is over
    assert budgets[0] > budgets[-1]
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert sum(summary["adapter_ranks"].values()) == 2 * layers
    exported = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert sum(t.shape[0] for k, t in exported.items() if k.endswith("lora_A.weight")) == 2 * layers


def test_molora_logs_expert_shares(tmp_path, folder):
    result = Trainer(config(tmp_path, folder, "m", MOLORA)).fit()
    train_rows = [r for r in rows(result.run_dir) if r["split"] == "train"]
    assert all(sum(r[f"molora.default.expert_{e}"] for e in range(3)) == pytest.approx(1.0) for r in train_rows)


@pytest.mark.parametrize("adapter", [ADALORA, MOLORA], ids=["adalora", "molora"])
def test_resume_is_exact(tmp_path, folder, adapter):
    run = {"save_every": 4, "keep_last": 5}
    straight = Trainer(config(tmp_path, folder, "a", adapter, **run)).fit()
    interrupted = tmp_path / "b"
    shutil.copytree(straight.run_dir, interrupted)
    for name in ("checkpoints/step-000008", "adapter", "summary.json"):
        path = interrupted / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    resumed = Trainer(config(tmp_path, folder, "b", adapter, **run)).fit()
    for name in ("adapter_model.safetensors", *(["vislora_state.safetensors"] if adapter is ADALORA else [])):
        a, b = load_file(straight.adapter_dir / name), load_file(resumed.adapter_dir / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("frozen", [ADALORA, MOLORA], ids=["adalora", "molora"])
def test_a_frozen_variant_adapter_does_not_move_while_another_trains(tmp_path, folder, monkeypatch, frozen):
    """AdaLoRA's E and MoLoRA's gate belong to their adapter: kept active and frozen under the one being trained,
    no tensor of it changes through the trainer's steps."""

    def adapted(task, model):
        model.add_adapter("frozen", AdapterConfig.parse(frozen))
        with torch.no_grad():  # E away from zero, so that gradients reach every tensor of the frozen adapter
            for param in model.adapter_parameters("frozen"):
                param.add_(0.1)
        model.set_active(["frozen", "default"])
        model.set_trainable("default")

    monkeypatch.setattr(ClassificationTask, "adapted", adapted)
    trainer = Trainer(config(tmp_path, folder, "f", {"targets": ["qkv"], "rank": 2, "alpha": 4}))
    names = [n for n, _ in trainer.adapted.named_parameters() if "frozen" in n.split(".")]
    assert any("lora_E" in n or "lora_gate" in n for n in names)
    before = {n: p.detach().clone() for n, p in trainer.adapted.named_parameters() if n in names}
    trained = {n: p.detach().clone() for n, p in trainer.adapted.named_parameters() if "default" in n.split(".")}
    trainer.fit()
    after = dict(trainer.adapted.named_parameters())
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    assert any(not torch.equal(after[n], v) for n, v in trained.items())  # the other adapter did train
