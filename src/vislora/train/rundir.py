"""The run directory's bookkeeping: config.yaml and the resume check, checkpoints, saved adapters, the metrics log,
and summary.json with the TrainResult of the run.

A resumed run must have the same config, except for the keys in RESUME_FREE_KEYS (logging, workers, and what only
trades memory for time: gradient checkpointing, mixed precision, tiles per backbone call) and optim.batch_size with
optim.grad_accum when their product (the images per optimizer step) stays the same: the position in the epoch is
then converted to the new micro-batch, so the run goes on at the same image (what out-of-memory advice asks for,
vislora.train.oom).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from vislora.data.transforms import InputSpec
from vislora.errors import TrainingError
from vislora.formats import load_adapter_weights, save_adapter
from vislora.io import atomic_write_text
from vislora.model import AdaptedModel
from vislora.run_config import EvalSection, TrainConfig
from vislora.train import checkpoint as ckpt
from vislora.train.tasks import Evaluation, TrainTask
from vislora.train.telemetry import Telemetry, folder_bytes

logger = logging.getLogger(__name__)

# config keys a resumed run may change
RESUME_FREE_KEYS = {"run.resume", "run.progress", "run.output_dir", "data.num_workers", "run.log_every",
                    "run.monitor_gradients", "run.gradient_checkpointing", "run.mixed_precision",
                    "data.tiling.tiles_per_step", *(f"eval.{key}" for key in EvalSection.model_fields)}
BATCH_KEYS = {"optim.batch_size", "optim.grad_accum"}  # free on resume while their product stays


@dataclass
class TrainResult:
    """What `fit` produced: where the adapters are and the last/best held-out metrics."""

    run_dir: Path
    adapter_dir: Path
    best_dir: Path | None
    steps: int
    stopped_early: bool
    final: dict[str, float] | None
    best: dict[str, Any] | None
    skipped_images: int
    trainable_params: int
    total_params: int
    seconds: float
    adapter_ranks: dict[str, int] = field(default_factory=dict)  # per layer; AdaLoRA's after pruning


class MetricsLog:
    """metrics.jsonl: one JSON object per line, flushed as written, fsynced at checkpoints.

    A kill can tear the last line; `truncate(step)` (on resume) drops torn lines and lines past `step`.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: Any = None

    def write(self, row: dict[str, Any]) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (kept open for the run)
        self._file.write(json.dumps({**row, "time": round(time.time(), 3)}) + "\n")
        self._file.flush()

    def sync(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def truncate(self, step: int) -> None:
        """Keep the lines up to `step` (a killed run may have logged past its last checkpoint)."""
        self.close()
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill
            if row.get("step", 0) <= step:
                kept.append(line)
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))


class RunDirectory:
    """The Trainer's files: what `run.output_dir` holds and how it is written (atomically) and read back.

    A base of Trainer, which sets the attributes annotated here; the methods read nothing else of it.
    """

    config: TrainConfig
    accelerator: Accelerator
    run_dir: Path
    metrics: MetricsLog
    loop: ckpt.LoopState
    optimizer: Any  # torch.optim.Optimizer, wrapped by Accelerate
    scheduler: Any  # torch.optim.lr_scheduler.LRScheduler
    task: TrainTask
    spec: InputSpec
    adapted: AdaptedModel
    telemetry: Telemetry

    def _prepare_run_dir(self) -> None:
        accelerator = self.accelerator
        checkpoints = ckpt.list_checkpoints(self.run_dir / "checkpoints")
        saved = self.run_dir / "config.yaml"
        if checkpoints and not self.config.run.resume:
            raise TrainingError(f"{self.run_dir} already holds a run (checkpoints up to {checkpoints[-1].name}); "
                                "set run.resume: true to continue it, or choose a new run.output_dir")
        saved_batch = self.config.optim.batch_size
        if checkpoints and saved.is_file():
            saved_batch = self._check_same_run(saved)
        if accelerator.is_main_process:
            self.config.save(saved)
        if checkpoints:
            self.load_checkpoint(checkpoints[-1])
            self._rebatch(saved_batch, checkpoints[-1])
        elif accelerator.is_main_process:
            self.metrics.path.unlink(missing_ok=True)
        accelerator.wait_for_everyone()

    def _check_same_run(self, saved: Path) -> int:
        """Refuse a config that differs from the saved run's beyond what resume allows; the saved batch size."""
        before = TrainConfig.load(saved)
        previous, current = before.model_dump(mode="json"), self.config.model_dump(mode="json")
        changed = changed_keys(previous, current, RESUME_FREE_KEYS)
        old, new = before.optim, self.config.optim
        if set(changed) <= BATCH_KEYS and old.batch_size * old.grad_accum == new.batch_size * new.grad_accum:
            changed = []
        if changed:
            hint = (f"; optim.batch_size and optim.grad_accum may change together when their product stays "
                    f"{old.batch_size * old.grad_accum} (images per optimizer step)" if BATCH_KEYS & set(changed)
                    else "")
            raise TrainingError(f"{self.run_dir} holds a run with a different config ({', '.join(changed)} changed); "
                                f"resume it with the same config, or choose a new run.output_dir{hint}")
        return old.batch_size

    def _rebatch(self, saved_batch: int, folder: Path) -> None:
        """Express the position in the epoch in micro-batches of the new optim.batch_size (same images consumed)."""
        new = self.config.optim.batch_size
        if new == saved_batch:
            return
        images = self.loop.batch_in_epoch * saved_batch
        if images % new:
            raise TrainingError(f"{folder} stopped after {images} images of epoch {self.loop.epoch} per process, not "
                                f"a whole number of micro-batches of optim.batch_size {new}; resume with a batch size "
                                f"that divides {images} (e.g. a divisor of {saved_batch})")
        self.loop.batch_in_epoch = images // new

    def save_checkpoint(self) -> Path:
        """Write checkpoints/step-N/ atomically (every process saves its RNG), prune old ones; log its size and time."""
        start = time.perf_counter()
        accelerator = self.accelerator
        root = self.run_dir / "checkpoints"
        staging = ckpt.staging_dir(root, self.loop.step)
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        accelerator.wait_for_everyone()
        ckpt.save_rng(staging, accelerator.process_index)
        if accelerator.is_main_process:
            self._save_adapter_files(staging)
            ckpt.save_trainer_state(staging, self.loop, self.optimizer, self.scheduler)
            self.metrics.sync()
        accelerator.wait_for_everyone()
        final = ckpt.step_dir(root, self.loop.step)
        if accelerator.is_main_process:
            ckpt.publish(staging, final)
            self._log_checkpoint(final, time.perf_counter() - start)
            for old in ckpt.list_checkpoints(root)[:-self.config.run.keep_last]:
                ckpt.remove_dir(old)  # a kill midway leaves no half-deleted checkpoint that looks complete
        accelerator.wait_for_everyone()
        return final

    def _log_checkpoint(self, folder: Path, seconds: float) -> None:
        """A metrics row for a written checkpoint or adapter folder: its bytes on disk and the seconds to write it."""
        self._write_metrics({"step": self.loop.step, "split": "checkpoint",
                             "path": folder.relative_to(self.run_dir).as_posix(), "bytes": folder_bytes(folder),
                             "seconds": round(seconds, 6)})

    def load_checkpoint(self, folder: Path) -> None:
        """Restore adapter, optimizer, scheduler, RNG and loop position from a checkpoint folder."""
        load_adapter_weights(self.adapted, folder)
        self.loop = ckpt.load_trainer_state(folder, self.optimizer, self.scheduler)
        ckpt.load_rng(folder, self.accelerator.process_index)
        if self.accelerator.is_main_process:
            self.metrics.truncate(self.loop.step)
            logger.info("resumed from %s (step %d, epoch %d)", folder, self.loop.step, self.loop.epoch)

    def _save_adapter(self, target: Path) -> None:
        """Write the current adapter to `target` (best/, adapter/) by a complete copy swapped in."""
        if not self.accelerator.is_main_process:
            return
        start = time.perf_counter()
        staging = target.with_name(f".{target.name}.staging")
        shutil.rmtree(staging, ignore_errors=True)
        self._save_adapter_files(staging)
        ckpt.replace_dir(staging, target)
        shutil.rmtree(staging, ignore_errors=True)
        self._log_checkpoint(target, time.perf_counter() - start)

    def _save_adapter_files(self, folder: Path) -> None:
        save_adapter(self.adapted, folder, "default")
        task = {**self.task.info(), "input": asdict(self.spec), "step": self.loop.step,
                "seed": self.config.run.seed}  # rebuilds a randomly initialised base wherever the adapter goes
        atomic_write_text(folder / "task.json", json.dumps(task, indent=2))

    def _write_metrics(self, row: dict[str, Any]) -> None:
        if not self.accelerator.is_main_process:
            return
        self.metrics.write(row)

    def _finish(self, final: Evaluation | None, stopped_early: bool, report: Any, seconds: float) -> TrainResult:
        adapter_dir = self.run_dir / "adapter"
        self._save_adapter(adapter_dir)
        best_dir = self.run_dir / "best"
        result = TrainResult(
            run_dir=self.run_dir, adapter_dir=adapter_dir, best_dir=best_dir if best_dir.is_dir() else None,
            steps=self.loop.step, stopped_early=stopped_early, final=final.metrics() if final else None,
            best={"step": self.loop.best_step, self.config.run.best_metric: self.loop.best_value}
            if self.loop.best_step is not None else None,
            skipped_images=len(self.loop.skipped), trainable_params=report.trainable, total_params=report.total,
            seconds=seconds, adapter_ranks=self.adapted.adapter_ranks("default"))
        if self.accelerator.is_main_process:
            summary = {**asdict(result), "run_dir": str(self.run_dir), "adapter_dir": str(adapter_dir),
                       "best_dir": str(result.best_dir) if result.best_dir else None,
                       "telemetry": self.telemetry.summary()}
            atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2))
            self.metrics.close()
        self.accelerator.wait_for_everyone()
        return result


def changed_keys(previous: dict[str, Any], current: dict[str, Any], ignore: set[str]) -> list[str]:
    """Dotted keys whose values differ between two config dumps."""
    a, b = _flatten(previous), _flatten(current)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and k not in ignore)


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and key not in ("rank_pattern", "alpha_pattern"):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
