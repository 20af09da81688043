"""Resumable checkpoints: adapter + optimizer + scheduler + RNG + loop position, never half-written.

A checkpoint is built in `checkpoints/.step-N.tmp/` and renamed to `checkpoints/step-N/` only when every
file in it is written and fsynced, so a `step-N` folder is always complete. No pickle: tensors go to
safetensors, everything else to JSON.

    step-000040/
      adapter_config.json, adapter_model.safetensors   the adapter (PEFT layout), plus task.json
      optimizer.safetensors                             AdamW moments by parameter index
      trainer_state.json                                step, epoch, batch, scheduler, best, param groups
      rng-<rank>.safetensors / rng-<rank>.json          torch / Python + NumPy RNG state of each process
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from vislora.errors import AdapterFileError
from vislora.io import fsync

STEP_DIR = re.compile(r"step-(\d+)")


@dataclass
class LoopState:
    """Where the training loop is; saved in trainer_state.json."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed
    images_seen: int = 0
    best_value: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0
    skipped: list[int] = field(default_factory=list)  # indices of corrupt training images


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (temp folders of a killed write are ignored)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.fullmatch(p.name).group(1)))


def staging_dir(root: Path, step: int) -> Path:
    return root / f".step-{step:06d}.tmp"


def save_rng(folder: Path, rank: int) -> None:
    """This process's torch, CUDA, Python and NumPy RNG states."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(tensors, folder / f"rng-{rank}.safetensors")
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    text = json.dumps({"python": [version, list(state), gauss],
                       "numpy": [kind, keys.tolist(), pos, has_gauss, cached]})
    _write_synced(folder / f"rng-{rank}.json", text.encode())
    fsync(folder / f"rng-{rank}.safetensors")


def load_rng(folder: Path, rank: int) -> None:
    tensors = load_file(folder / f"rng-{rank}.safetensors")
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available() and "cuda.0" in tensors:
        torch.cuda.set_rng_state_all([tensors[f"cuda.{i}"] for i in range(torch.cuda.device_count())])
    states = json.loads((folder / f"rng-{rank}.json").read_text())
    version, state, gauss = states["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_trainer_state(folder: Path, loop: LoopState, optimizer: torch.optim.Optimizer,
                       scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """Optimizer tensors to safetensors; loop position, scheduler and param groups to JSON."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    save_file(tensors, folder / "optimizer.safetensors")
    fsync(folder / "optimizer.safetensors")
    scheduler_state = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    payload = {"loop": asdict(loop), "scheduler": scheduler_state, "param_groups": state["param_groups"],
               "optimizer_scalars": scalars}
    _write_synced(folder / "trainer_state.json", json.dumps(payload, indent=1).encode())


def load_trainer_state(folder: Path, optimizer: torch.optim.Optimizer,
                       scheduler: torch.optim.lr_scheduler.LRScheduler) -> LoopState:
    """Restore optimizer and scheduler in place; return the loop position."""
    try:
        payload = json.loads((folder / "trainer_state.json").read_text())
        tensors = load_file(folder / "optimizer.safetensors")
    except (OSError, ValueError) as exc:
        raise AdapterFileError(f"checkpoint {folder} cannot be read ({exc}); delete it to resume from the one "
                               "before") from None
    per_param: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *payload["optimizer_scalars"].items()]:
        index, _, name = key.partition(".")
        per_param.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": payload["param_groups"]})
    scheduler.load_state_dict({**scheduler.state_dict(), **payload["scheduler"]})
    return LoopState(**payload["loop"])


def saved_step(folder: Path) -> int:
    """The step a checkpoint was written at (read from its trainer_state.json)."""
    try:
        return int(json.loads((folder / "trainer_state.json").read_text())["loop"]["step"])
    except (OSError, ValueError, KeyError) as exc:
        raise AdapterFileError(f"checkpoint {folder} cannot be read ({exc}); delete it to resume from the one "
                               "before") from None


def publish(staging: Path, final: Path) -> None:
    """Rename a fully written staging folder onto its final name (atomic), then fsync the parent."""
    if final.exists():
        remove_dir(final)
    os.rename(staging, final)
    fsync(final.parent)


def remove_dir(folder: Path) -> None:
    """Delete a folder so that a kill midway never leaves it half deleted under its own name: it is renamed to a
    hidden name first (atomic), then removed; leftovers of a killed removal go with the next one."""
    doomed = folder.with_name(f".{folder.name}.deleting")
    shutil.rmtree(doomed, ignore_errors=True)
    os.rename(folder, doomed)
    fsync(folder.parent)
    shutil.rmtree(doomed)
    for stale in folder.parent.glob(".*.deleting"):
        shutil.rmtree(stale, ignore_errors=True)


def replace_dir(source: Path, target: Path) -> None:
    """Make `target` a complete copy of `source`: copy to a temp folder, then swap it in by renames.

    At every moment `target` is either the old complete folder, the new complete folder, or (between the
    two renames) absent with the old one at `<target>.old`.
    """
    tmp = target.with_name(f".{target.name}.tmp")
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    for file in tmp.iterdir():
        fsync(file)
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
    os.rename(tmp, target)
    fsync(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
