"""Running out of memory for real: a run resumed with a micro-batch that does not fit under an address-space cap
stops with advice, keeps its checkpoint, and resumes as advised.

The cap is RLIMIT_AS, set once torch and the trainer are imported (they map gigabytes of libraries and reserved
address space before any tensor), MARGIN_MIB above what is mapped then; `vislora.cli.run` (the console script's
entry point) runs under it. An allocation past it fails in the allocator itself (mmap returns ENOMEM and the CPU
allocator raises "DefaultCPUAllocator: can't allocate memory"), as on a machine without that much memory; nothing
in vislora knows the cap is there. The run that must fail runs in a fresh process, where what is mapped is the
same every time; the advised resume runs in this one, under the same margin (memory this process freed earlier
and still maps can only help it fit).
"""

import contextlib
import hashlib
import json
import os
import resource
import shlex
import subprocess
import sys

import pytest
import torch
import yaml

import vislora.cli.train
from synthetic_images import image_folder, tiny_train_config
from vislora.cli import run
from vislora.errors import TrainingError
from vislora.formats import load_adapter_weights
from vislora.run_config import TrainConfig
from vislora.runs import load_trained
from vislora.train import checkpoint as ckpt
from vislora.train.callbacks import TrainerCallback
from vislora.train.oom import is_out_of_memory, out_of_memory_error
from vislora.train.telemetry import MIB, status_mib
from vislora.train.trainer import Trainer

# Measured here (2026-11, torch 2.14 CPU) in a fresh process resuming this test's run: 224-px micro-batches of 12
# images fit 80 MiB above what is mapped, of 24 fail even 120 MiB above it. The cap sits between, 20 MiB from each.
MARGIN_MIB = 100
CAPPED_CLI = """
import resource, sys
import timm, vislora.cli.train, vislora.train.trainer
from vislora.cli import run
from vislora.train.telemetry import MIB, status_mib
cap = int(status_mib("VmSize") * MIB) + int(sys.argv[1]) * MIB
resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
sys.argv = ["vislora", *sys.argv[2:]]
run()
"""


class Interrupted(Exception):
    """Stands for Ctrl-C: the run stops in step 2, after step 1's checkpoint."""


class StopInStep2(TrainerCallback):
    def extra_loss(self, trainer):
        if trainer.loop.step == 1:
            raise Interrupted


@contextlib.contextmanager
def address_space_cap(margin_mib):
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (int(status_mib("VmSize") * MIB) + margin_mib * MIB, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def one_line(text):
    return " ".join(text.split())  # the console wraps long lines


def vislora_process(args, cwd):
    """The CLI in a fresh process under the cap: (exit code, output on one line)."""
    done = subprocess.run([sys.executable, "-c", CAPPED_CLI, str(MARGIN_MIB), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})  # no thread arenas
    return done.returncode, one_line(done.stdout + done.stderr)


def vislora(args, capsys):
    """The CLI in this process, as the `vislora` console script runs it, under the cap: (exit code, output)."""
    capsys.readouterr()
    argv = sys.argv
    sys.argv = ["vislora", *args]
    try:
        with address_space_cap(MARGIN_MIB):
            run()
        code = 0
    except SystemExit as exc:
        code = exc.code
    finally:
        sys.argv = argv
    captured = capsys.readouterr()
    return code, one_line(captured.out + captured.err)


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.slow
def test_resuming_with_a_batch_that_does_not_fit_stops_with_advice_and_resumes_as_advised(tmp_path, monkeypatch,
                                                                                        capsys):
    folder = image_folder(tmp_path / "images", per_class=8)  # 24 images
    settings = tiny_train_config("run", folder, data={"image_size": 224}, optim={
        "batch_size": 4, "grad_accum": 6, "max_steps": 2}, run={"save_every": 1})
    monkeypatch.chdir(tmp_path)  # run.output_dir is relative, as users write it; the advised command runs here
    with pytest.raises(Interrupted):
        Trainer(TrainConfig.parse(settings), callbacks=[StopInStep2()]).fit()
    first = tmp_path / "run/checkpoints/step-000001"
    before = digest(first)

    bigger = tmp_path / "bigger.yaml"  # the same 24 images per step, in one micro-batch
    bigger.write_text(yaml.safe_dump({**settings, "optim": {**settings["optim"], "batch_size": 24, "grad_accum": 1}}))
    code, output = vislora_process(["train", str(bigger)], tmp_path)

    assert code == 2, output
    assert "Traceback" not in output
    assert ("error: out of memory on cpu in training step 2 (optim.batch_size 24, optim.grad_accum 1, "
            "run.mixed_precision no, run.gradient_checkpointing false): DefaultCPUAllocator: can't allocate memory: "
            "you tried to allocate") in output
    advice = ("To fit, change (first fix first): "
              "- optim.batch_size: 12 with optim.grad_accum: 2 (the same 24 images per optimizer step, in smaller "
              "micro-batches) "
              "- run.gradient_checkpointing: true (activations are recomputed in the backward pass instead of kept: "
              "less memory, a slower step) "
              "- run.mixed_precision: bf16 (activations in 16 bits) "
              "- a smaller data.image_size than 224 (a new run: the input size cannot change on resume) ")
    command = "vislora train run/config.yaml --set optim.batch_size=12 --set optim.grad_accum=2"
    assert (advice + "The last checkpoint, run/checkpoints/step-000001 (step 1), is complete and was not touched; "
            f"resume from it with: {command}") in output
    assert digest(first) == before
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run/checkpoints")] == ["step-000001"]
    assert not list((tmp_path / "run/checkpoints").glob(".*"))  # no half-written checkpoint left behind
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["split"] == "oom" and rows[-1]["during"] == "training step 2"

    model, _ = load_trained(first)  # the checkpoint is an adapter that loads
    load_adapter_weights(model, first)

    code, output = vislora(shlex.split(command)[1:], capsys)  # the advised command, under the same cap
    assert code == 0, output
    assert "trained 2 steps" in output
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in rows if r["split"] in ("train", "oom")] == [
        (1, "train"), (1, "oom"), (2, "train")]  # the failure stays on record: it came after step 1
    saved = TrainConfig.load(tmp_path / "run/config.yaml")
    assert (saved.optim.batch_size, saved.optim.grad_accum) == (12, 2)


def test_allocator_failures_are_recognised_and_other_errors_are_not():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 4x3)"))
    try:  # a real CPU allocation failure: more bytes than any address space holds
        torch.empty(2 ** 62, dtype=torch.uint8)
    except RuntimeError as exc:
        assert is_out_of_memory(exc), str(exc)
    else:
        pytest.fail("allocating 4 EiB succeeded")


def test_advice_follows_the_config(tmp_path):
    settings = tiny_train_config(tmp_path / "run", tmp_path, optim={"batch_size": 6, "grad_accum": 1, "max_steps": 4},
                                 run={"gradient_checkpointing": True, "mixed_precision": "bf16", "save_every": 0})
    settings["data"] = {"train": str(tmp_path), "image_size": 32,
                        "tiling": {"size": 32, "tiles_per_step": 4, "image_size": 64}}
    error = out_of_memory_error(MemoryError(), TrainConfig.parse(settings), torch.device("cpu"), "training step 1")
    assert isinstance(error, TrainingError)
    lines = str(error).splitlines()
    assert lines[0] == ("out of memory on cpu in training step 1 (optim.batch_size 6, optim.grad_accum 1, "
                        "run.mixed_precision bf16, run.gradient_checkpointing true): MemoryError")
    assert lines[1:] == [
        "To fit, change (first fix first):",
        "  - optim.batch_size: 3 with optim.grad_accum: 2 (the same 6 images per optimizer step, in smaller "
        "micro-batches)",
        "  - data.tiling.tiles_per_step: 2 (tiles per backbone call; now 4)",
        "  - a smaller data.tiling.image_size than 64 (a new run: the input size cannot change on resume)",
        "No checkpoint was written yet (run.save_every is 0); this starts the run again:",
        f"  vislora train {tmp_path / 'run' / 'config.yaml'} --set optim.batch_size=3 --set optim.grad_accum=2"]
