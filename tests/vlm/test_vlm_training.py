import json
import logging
import math

import pytest
import torch
from dual_fixtures import caption_manifest, dual_train_config, save_towers
from safetensors.torch import load_file
from typer.testing import CliRunner

from synthetic_images import image_folder
from vislora.cli import app
from vislora.data import DataError
from vislora.evaluate import evaluate_dual
from vislora.run_config import TrainConfig
from vislora.train.trainer import Trainer


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    return save_towers(tmp_path_factory.mktemp("towers"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("images"), per_class=8)


def rows(run, split):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


def test_few_shot_trains_both_towers_from_k_shots_and_records_the_task(tmp_path, towers, folder):
    cfg = TrainConfig.parse(dual_train_config(
        tmp_path / "run", towers, folder, folder, task={"kind": "few_shot", "shots": 2},
        adapter={"train_heads": False}, optim={"batch_size": 6, "max_steps": 8}))
    trainer = Trainer(cfg)
    assert len(trainer.train_data) == 6  # 2 shots x 3 classes
    untrained = trainer.evaluate()
    result = trainer.fit()
    assert set(result.final) == {"accuracy", "loss"} and result.final["loss"] < untrained.loss
    task = json.loads((result.adapter_dir / "task.json").read_text())
    assert task["task"] == "few_shot" and task["class_names"] == ["red", "green", "blue"]
    assert task["towers"] == {"vision": "vision", "text": "text"}
    weights = load_file(result.adapter_dir / "adapter_model.safetensors")
    trained_b = {k for k, v in weights.items() if "lora_B" in k and v.abs().sum() > 0}
    assert any(".vision." in k for k in trained_b) and any(".text." in k for k in trained_b)
    heads = ("base_model.model.vision_proj", "base_model.model.text_proj", "base_model.model.logit_scale")
    assert not any(k.startswith(heads) for k in weights)  # CLIP-LoRA: projections and scale frozen
    again = evaluate_dual(result.adapter_dir, folder)  # rebuilt from task.json alone
    assert again.n == 24 and again.metrics() == pytest.approx(result.final)
    out = CliRunner().invoke(app, ["clip", "eval", "--adapter", str(result.adapter_dir), "--data", str(folder)])
    assert out.exit_code == 0 and f"{result.final['accuracy']:.4f}" in out.output, out.output


def test_contrastive_captions_missing_images_and_truncation(tmp_path, towers, caplog):
    manifest = caption_manifest(tmp_path / "data", per_class=4, missing=2, long_captions=3)
    sections = {"run": {"best_metric": "recall@1"}, "optim": {"max_steps": 4}}
    with caplog.at_level(logging.WARNING):
        trainer = Trainer(TrainConfig.parse(dual_train_config(tmp_path / "run", towers, manifest, manifest,
                                                              **sections)))
    assert "2 of 14 images are missing and are skipped: " in caplog.text and "gone-0.png" in caplog.text
    assert len(trainer.train_data) == len(trainer.val_data) == 12
    result = trainer.fit()
    assert {"accuracy", "i2t_r@1", "i2t_r@5", "i2t_r@10", "t2i_r@1", "t2i_r@10", "recall@1"} <= set(result.final)
    assert result.best["recall@1"] == result.final["recall@1"]
    assert rows(result.run_dir, "train")[-1]["truncated_captions"] >= 3  # the long captions, batch after batch
    strict = dual_train_config(tmp_path / "strict", towers, manifest, data={"strict": True})
    with pytest.raises(DataError, match=r"2 of 14 images are missing \(.*gone-0\.png.*\); restore them"):
        Trainer(TrainConfig.parse(strict))


STAGES = [{"steps": 2, "train": ["text"]}, {"steps": 2, "train": ["vision"]},
          {"steps": 2, "train": ["text", "vision"], "lr_scale": 0.1}]


def staged(tmp_path, towers, folder, out):
    return TrainConfig.parse(dual_train_config(tmp_path / out, towers, folder, stages=STAGES,
                                               run={"save_every": 1, "keep_last": 10},
                                               optim={"lr_adapter": 1e-2, "lr_head": 1e-2}))


def tower_weights(step_dir, tower):
    weights = load_file(step_dir / "adapter_model.safetensors")
    return {k: v for k, v in weights.items() if f".{tower}." in k or k.startswith(f"base_model.model.{tower}_proj")}


def test_stages_switch_towers_carry_optimizer_state_and_scale_the_lr(tmp_path, towers, folder):
    trainer = Trainer(staged(tmp_path, towers, folder, "run"))
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2)
    result = trainer.fit()
    assert result.steps == 6
    announced = rows(result.run_dir, "stage")
    assert [(r["step"], r["stage"], r["train"]) for r in announced] == [
        (0, 1, ["text"]), (2, 2, ["vision"]), (4, 3, ["text", "vision"])]
    plan = trainer.stage_plan
    by_tower = {t: sum(p.numel() for n, p in plan.candidates.items() if plan.towers[n] in (t, None))
                for t in ("text", "vision")}
    assert [r["trainable"] for r in announced] == [by_tower["text"], by_tower["vision"], plan.trainable_count(2)]
    assert plan.trainable_count(2) == sum(p.numel() for p in plan.candidates.values())
    steps = {s: result.run_dir / f"checkpoints/step-{s:06d}" for s in range(1, 7)}
    text_2, text_4 = tower_weights(steps[2], "text"), tower_weights(steps[4], "text")
    assert all(torch.equal(text_2[k], text_4[k]) for k in text_2)  # stage 2 leaves the text tower alone
    vision_2, vision_4 = tower_weights(steps[2], "vision"), tower_weights(steps[4], "vision")
    assert all(v.abs().sum() == 0 for k, v in vision_2.items() if "lora_B" in k)  # not trained in stage 1
    assert any(not torch.equal(vision_2[k], vision_4[k]) for k in vision_2)
    cosine = 0.5 * (1 + math.cos(math.pi * 4 / 6))  # the lr logged at step 4 is the one step 5 uses
    train_rows = {r["step"]: r for r in rows(result.run_dir, "train")}
    assert train_rows[4]["lr_adapter"] == pytest.approx(1e-2 * cosine * 0.1)
    assert train_rows[3]["lr_adapter"] == pytest.approx(1e-2 * 0.5 * (1 + math.cos(math.pi * 3 / 6)))
    # AdamW state is carried for parameters that stay trainable (vision: stages 2 + 3; the logit scale: all),
    # and starts fresh for those that come back after a pause (text: stage 3 only)
    optimizer = trainer.optimizer.optimizer
    taken = {n: int(optimizer.state[p]["step"]) for n, p in plan.candidates.items()}
    assert {taken[n] for n in taken if plan.towers[n] == "vision"} == {4}
    assert {taken[n] for n in taken if plan.towers[n] == "text"} == {2}
    assert taken["base_model.logit_scale.copies.default.log_scale"] == 6


@pytest.mark.parametrize("resume_at", [3, 4], ids=["mid-stage", "at-boundary"])
def test_resume_lands_in_the_right_stage_with_its_optimizer_state(tmp_path, towers, folder, resume_at):
    import shutil

    straight = Trainer(staged(tmp_path, towers, folder, "a")).fit()
    interrupted = tmp_path / "b"
    shutil.copytree(straight.run_dir, interrupted)
    for step in range(resume_at + 1, 7):
        shutil.rmtree(interrupted / f"checkpoints/step-{step:06d}")
    for name in ("adapter", "summary.json"):
        path = interrupted / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    resumed = Trainer(staged(tmp_path, towers, folder, "b"))
    assert resumed.stage_plan.current == 0
    result = resumed.fit()
    assert resumed.stage_plan.current == 2
    for name in ("adapter/adapter_model.safetensors", "checkpoints/step-000006/optimizer.safetensors"):
        a, b = load_file(straight.run_dir / name), load_file(result.run_dir / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    def untimed(run):
        return [{k: v for k, v in r.items() if k != "time"} for r in rows(run, "stage")]
    assert untimed(straight.run_dir) == untimed(result.run_dir) and len(untimed(result.run_dir)) == 3


def test_stage_errors_name_the_problem(tmp_path, towers, folder):
    from vislora import ConfigError

    cfg = dual_train_config(tmp_path / "run", towers, folder, adapter={"text_targets": None, "train_heads": False},
                            stages=[{"steps": 2, "train": ["text"]}])
    with pytest.raises(ConfigError, match=r"optim\.max_steps is 6 but the stages add up to 2 steps; drop "
                                          r"optim\.max_steps \(it defaults to the stages' sum\) or make them agree$"):
        TrainConfig.parse(cfg)
    del cfg["optim"]["max_steps"]
    assert TrainConfig.parse(cfg).optim.max_steps == 2
    with pytest.raises(ConfigError, match=r"stage 1 trains \['text'\], but no trainable parameter"):
        Trainer(TrainConfig.parse(cfg))


def test_vislora_train_prints_each_stage_and_its_trainable_count(tmp_path, towers, folder):
    import yaml

    config = dual_train_config(tmp_path / "run", towers, folder, stages=STAGES)
    config["run"]["progress"] = True
    path = tmp_path / "staged.yaml"
    path.write_text(yaml.safe_dump(config))
    out = CliRunner().invoke(app, ["train", str(path)])
    assert out.exit_code == 0, out.output
    counts = [r["trainable"] for r in rows(tmp_path / "run", "stage")]
    for index, (stage, count) in enumerate(zip(STAGES, counts, strict=True)):
        towers_trained = "+".join(stage["train"])
        line = f"stage {index + 1}/3 from step {2 * index + 1}: training {towers_trained}, {count:,} trainable"
        assert line in out.output, out.output
    assert f"stage 3/3: steps 5-6, train text+vision, lr x0.1, {counts[2]:,} trainable parameters" in out.output
