"""The trainer as a real process: killed with SIGKILL and resumed; run data-parallel by `accelerate launch`."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from synthetic_images import image_folder, tiny_train_config
from vislora.train import checkpoint as ckpt

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def write_config(tmp_path, name, **sections):
    folder = tmp_path / "images"
    if not folder.exists():
        image_folder(folder, per_class=8)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tiny_train_config(tmp_path / name, folder, **sections)))
    return path


def train_command(config):
    return [sys.executable, "-m", "vislora.cli", "train", str(config)]


def environment():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def assert_complete(step_dir):
    for name in ("adapter_model.safetensors", "optimizer.safetensors", "rng-0.safetensors"):
        load_file(step_dir / name)
    ckpt.LoopState(**json.loads((step_dir / "trainer_state.json").read_text())["loop"])


def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(tmp_path):
    sections = {"adapter": {"dropout": 0.1}, "optim": {"max_steps": 80},
                "run": {"save_every": 1, "keep_last": 3}}
    straight = write_config(tmp_path, "straight", **sections)
    subprocess.run(train_command(straight), check=True, env=environment(), capture_output=True)

    killed = write_config(tmp_path, "killed", **sections)
    run_dir = tmp_path / "killed"
    process = subprocess.Popen(train_command(killed), env=environment(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoints" / "step-000006").exists():
        assert process.poll() is None and time.monotonic() < deadline, "training ended before it could be killed"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (run_dir / "adapter").exists(), "the run finished before the kill: nothing was tested"
    steps = ckpt.list_checkpoints(run_dir / "checkpoints")
    assert steps and int(steps[-1].name.split("-")[1]) < 80
    for step in steps:  # every published checkpoint is whole, wherever the kill landed
        assert_complete(step)

    subprocess.run(train_command(killed), check=True, env=environment(), capture_output=True)
    final_straight = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    final_resumed = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert final_straight.keys() == final_resumed.keys()
    for key in final_straight:
        assert torch.equal(final_straight[key], final_resumed[key]), key
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))


def test_accelerate_launch_two_cpu_processes_matches_one_process_with_the_global_batch(tmp_path):
    launcher = shutil.which("accelerate", path=str(BIN))
    assert launcher, "accelerate's launcher is not installed next to this Python"
    # dropout off: augmentation is seeded per sample, so two processes x 4 images equal one process x 8
    two = write_config(tmp_path, "two", optim={"batch_size": 4, "max_steps": 4}, run={"save_every": 2})
    one = write_config(tmp_path, "one", optim={"batch_size": 8, "max_steps": 4}, run={"save_every": 2})
    env = {**environment(), "HOME": str(tmp_path)}  # no user accelerate config
    subprocess.run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                    "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "vislora.cli", "train", str(two)],
                   check=True, env=env, capture_output=True, timeout=300)
    subprocess.run(train_command(one), check=True, env=env, capture_output=True, timeout=300)
    assert {p.name for p in (tmp_path / "two/checkpoints/step-000004").glob("rng-*.json")} == {"rng-0.json",
                                                                                                "rng-1.json"}
    a = load_file(tmp_path / "two/adapter/adapter_model.safetensors")
    b = load_file(tmp_path / "one/adapter/adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(a[key], torch.zeros_like(a[key])) for key in a if "lora_B" in key)
