"""Progressive rank growth as config: stages raise the rank, the output is unchanged at each growth, resume is exact."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from synthetic_images import image_folder, tiny_train_config
from vislora import ConfigError
from vislora.run_config import TrainConfig
from vislora.train.trainer import Trainer

STAGES = [{"steps": 3, "rank": 2}, {"steps": 3, "rank": 4, "lr_scale": 0.5}, {"steps": 3, "rank": 8, "lr_scale": 0.25}]


@pytest.fixture
def folder(tmp_path):
    return image_folder(tmp_path / "images", per_class=8)


def config(tmp_path, folder, out, stages=STAGES, **run):
    data = tiny_train_config(tmp_path / out, folder, folder, adapter={"targets": ["q", "v"], "rank": 2, "alpha": 4},
                             optim={"lr_adapter": 1e-2}, run={"log_every": 1, **run})
    data["optim"].pop("max_steps")  # the stages' sum
    return TrainConfig.parse({**data, "stages": stages})


def test_stages_grow_the_rank_keep_the_output_and_the_optimizer_state(tmp_path, folder):
    trainer = Trainer(config(tmp_path, folder, "a"))
    x = torch.randn(2, 3, 32, 32)
    model = trainer.adapted
    with torch.no_grad():
        for param in model.adapter_parameters("default"):
            param.add_(torch.randn_like(param) * 0.1)
    optimizer = trainer.optimizer.optimizer
    a = model.layers()["blocks.0.attn.qkv"].adapters["default"].lora_A
    optimizer.state[a] = {"step": torch.tensor(3.0), "exp_avg": torch.ones_like(a), "exp_avg_sq": torch.ones_like(a)}
    model.eval()
    before = model(x)
    trainer.loop.step = 3
    trainer.enter_stage(1)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)
    grown = model.layers()["blocks.0.attn.qkv"].adapters["default"].lora_A
    assert grown.shape[0] == 2 * 4 and grown.requires_grad
    state = trainer.optimizer.optimizer.state[grown]["exp_avg"].view(2, 4, -1)
    assert state[:, :2].eq(1).all() and state[:, 2:].eq(0).all()
    assert trainer.stage_plan.describe().splitlines()[1].startswith(
        "stage 2/3: steps 4-6, train everything, lr x0.5, rank 4")  # an image classifier has no towers to name


def test_a_progressive_run_ends_at_the_last_rank_and_resumes_exactly(tmp_path, folder):
    run = {"save_every": 2, "keep_last": 9}
    straight = Trainer(config(tmp_path, folder, "a", **run)).fit()
    assert set(straight.adapter_ranks.values()) == {2 * 8}  # q and v slices of rank 8
    stages = [json.loads(r) for r in (straight.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in stages if r["split"] == "stage"] == [1, 2, 3]
    counts = [r["trainable"] for r in stages if r["split"] == "stage"]
    assert counts[0] < counts[1] < counts[2]
    interrupted = tmp_path / "b"
    shutil.copytree(straight.run_dir, interrupted)
    for name in ("checkpoints/step-000006", "checkpoints/step-000008", "adapter", "summary.json"):
        path = interrupted / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    resumed = Trainer(config(tmp_path, folder, "b", **run)).fit()  # from step 4: inside stage 2, rank 4
    a = load_file(straight.adapter_dir / "adapter_model.safetensors")
    b = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ranks_only_grow(tmp_path, folder):
    with pytest.raises(ConfigError, match="stage 2 asks for rank 1, below the adapter's rank 2"):
        Trainer(config(tmp_path, folder, "c", stages=[{"steps": 2, "rank": 2}, {"steps": 2, "rank": 1}]))


def test_a_run_without_stages_has_no_stage_to_enter(tmp_path, folder):
    trainer = Trainer(TrainConfig.parse(tiny_train_config(tmp_path / "d", folder)))
    with pytest.raises(ConfigError, match=r"cannot enter stage 1: this run has no stages"):
        trainer.enter_stage(0)
