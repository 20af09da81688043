"""Training telemetry in metrics.jsonl: step time, data-loading time, peak memory per logging interval, checkpoint
sizes and write times; and resuming with a smaller micro-batch (what the out-of-memory advice asks for)."""

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from synthetic_images import image_folder, tiny_train_config
from vislora.errors import TrainingError
from vislora.run_config import TrainConfig
from vislora.train.callbacks import TrainerCallback
from vislora.train.trainer import Trainer

BLOCK_MIB = 160


@pytest.fixture
def folder(tmp_path):
    return image_folder(tmp_path / "images", per_class=8)


def config(tmp_path, folder, out="run", **sections):
    return TrainConfig.parse(tiny_train_config(tmp_path / out, folder, folder, **sections))


def rows(run, split):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


def rss_mib():
    """VmRSS read here, independently of vislora.train.telemetry."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def bytes_on_disk(folder):
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


class SampleRss(TrainerCallback):
    """The RSS at the end of every step: a lower bound of that step's peak."""

    def __init__(self):
        self.samples = []

    def on_step_end(self, trainer, taken):
        self.samples.append(rss_mib())


class Spike(TrainerCallback):
    """Holds a written block of BLOCK_MIB MiB from step 2's gradients to its end (resident memory, then freed)."""

    def on_gradients(self, trainer):
        if trainer.loop.step == 1:
            self.block = torch.ones(BLOCK_MIB * 2 ** 20 // 4)  # written, so resident

    def on_step_end(self, trainer, taken):
        self.block = None


def test_train_rows_have_step_time_and_peak_memory_and_checkpoint_rows_their_size(tmp_path, folder):
    cfg = config(tmp_path, folder, optim={"max_steps": 4}, run={"save_every": 2, "keep_last": 2, "eval_every": 2})
    sampler = SampleRss()
    trainer = Trainer(cfg, callbacks=[sampler])
    rss_before = rss_mib()
    start = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - start

    train = rows(result.run_dir, "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for row, sampled in zip(train, sampler.samples, strict=True):
        assert 0 < row["data_s"] < row["step_s"]
        assert row["images_per_s"] == pytest.approx(4 / row["step_s"], rel=1e-3, abs=0.01)  # 4 images a step
        assert row["peak_rss_mib"] >= max(rss_before, sampled) - 0.1
    assert sum(r["step_s"] for r in train) < wall  # evaluation and checkpoints are not in the steps
    summary = json.loads((result.run_dir / "summary.json").read_text())["telemetry"]
    assert summary["device"] == "cpu" and summary["peak_rss_scope"] == "interval"
    assert summary["rss_at_start_mib"] == pytest.approx(rss_before, abs=20)

    written = rows(result.run_dir, "checkpoint")
    assert [(r["step"], r["path"]) for r in written if r["path"] != "best"] == [
        (2, "checkpoints/step-000002"), (4, "checkpoints/step-000004"), (4, "adapter")]
    assert [r["step"] for r in written if r["path"] == "best"] in ([2], [2, 4])  # written when held-out improved
    last = {r["path"]: r for r in written}
    for path in ("checkpoints/step-000002", "checkpoints/step-000004", "best", "adapter"):
        assert last[path]["bytes"] == bytes_on_disk(result.run_dir / path), path
        assert last[path]["seconds"] > 0
    assert last["checkpoints/step-000004"]["bytes"] > last["adapter"]["bytes"]  # + optimizer, RNG, loop state


def test_peak_memory_and_step_time_are_per_logging_interval(tmp_path, folder):
    trainer = Trainer(config(tmp_path, folder, optim={"max_steps": 4}, run={"log_every": 2}), callbacks=[Spike()])
    rss_before = rss_mib()
    result = trainer.fit()
    train = rows(result.run_dir, "train")
    assert [r["step"] for r in train] == [2, 4] and all(0 < r["data_s"] < r["step_s"] for r in train)
    first, second = (r["peak_rss_mib"] for r in train)
    assert first > rss_before + 0.9 * BLOCK_MIB  # steps 1-2: step 2 held the block
    assert first - second > 0.9 * BLOCK_MIB  # steps 3-4 did not: the peak was reset with the row of step 2


@pytest.mark.slow  # three short runs
def test_resume_with_half_the_micro_batch_and_twice_the_accumulation_goes_on_at_the_same_image(tmp_path, folder):
    sections = {"optim": {"batch_size": 4, "grad_accum": 2, "max_steps": 4}, "run": {"save_every": 2}}
    straight = Trainer(config(tmp_path, folder, "a", **sections)).fit()
    interrupted = tmp_path / "b"
    shutil.copytree(straight.run_dir, interrupted)
    for name in ("checkpoints/step-000004", "adapter", "best", "summary.json"):
        path = interrupted / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    halved = {**sections, "optim": {**sections["optim"], "batch_size": 2, "grad_accum": 4}}
    with pytest.raises(TrainingError, match=r"\(optim\.batch_size changed\); resume it with the "
                       r"same config, or choose a new run\.output_dir; optim\.batch_size and optim\.grad_accum may "
                       r"change together when their product stays 8 \(images per optimizer step\)"):
        Trainer(config(tmp_path, folder, "b", optim={**sections["optim"], "batch_size": 2}, run=sections["run"])).fit()
    resumed = Trainer(config(tmp_path, folder, "b", **halved)).fit()

    def loop(run):
        return json.loads((run / "checkpoints/step-000004/trainer_state.json").read_text())["loop"]
    # 24 images: step 3 ends epoch 0 either way, step 4 takes the first 8 images of epoch 1
    assert (loop(straight.run_dir)["epoch"], loop(straight.run_dir)["batch_in_epoch"]) == (1, 2)  # micro-batches of 4
    assert (loop(interrupted)["epoch"], loop(interrupted)["batch_in_epoch"]) == (1, 4)  # of 2
    assert loop(interrupted)["images_seen"] == loop(straight.run_dir)["images_seen"] == 32
    a = load_file(straight.adapter_dir / "adapter_model.safetensors")
    b = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    for key in a:  # the same images per step; only the order of float sums differs
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
