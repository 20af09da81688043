"""The training loop: Accelerate underneath, adapter-only checkpoints, exact resume.

`Trainer(config).fit()` trains adapter `default` on an image classifier and writes the run directory:
config.yaml, metrics.jsonl, checkpoints/step-N/, best/, adapter/ (the final adapter) and summary.json.
The same code runs on one CPU, one GPU, or under `accelerate launch --num_processes N`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from torch import nn

from vislora.data.datasets import ImageDataset
from vislora.data.tiling import image_spec
from vislora.data.transforms import SampleTransform, build_transform
from vislora.errors import ConfigError, TrainingError
from vislora.input_size import fit_input_size, run_input_spec, sized_batch
from vislora.model import AdaptedModel, inject
from vislora.parameters import parameter_report
from vislora.run_config import TrainConfig
from vislora.train import checkpoint as ckpt
from vislora.train import oom
from vislora.train.batches import EpochBatches
from vislora.train.callbacks import TrainerCallback
from vislora.train.generative import CaptioningTask, VqaTask
from vislora.train.monitor import GradientMonitor
from vislora.train.rundir import MetricsLog, RunDirectory, TrainResult
from vislora.train.schedule import build_optimizer, build_scheduler
from vislora.train.stages import StagePlan, apply_stage
from vislora.train.tasks import ClassificationTask, Evaluation, MultilabelTask, TrainTask
from vislora.train.telemetry import Telemetry, timed
from vislora.train.vlm import ContrastiveTask, FewShotTask, PromptedMultilabelTask

logger = logging.getLogger(__name__)

TASKS: dict[str, type[TrainTask]] = {"classification": ClassificationTask, "multilabel": MultilabelTask,
                                     "contrastive": ContrastiveTask, "few_shot": FewShotTask,
                                     "prompted_multilabel": PromptedMultilabelTask, "captioning": CaptioningTask,
                                     "vqa": VqaTask}  # task.kind -> task


class Trainer(RunDirectory):
    """Build model, data, optimizer from a TrainConfig; `fit()` trains. Tests may pass their own datasets, and
    dual-encoder runs a prepared base model (e.g. with pre-aligned projections) instead of `model.spec`, captioning
    and VQA runs a prepared `vislora.vlm.Vlm`."""

    def __init__(self, config: TrainConfig, train_data: ImageDataset | None = None,
                 val_data: ImageDataset | None = None, callbacks: Sequence[TrainerCallback] = (),
                 base_model: nn.Module | None = None) -> None:
        self.config = config
        self.callbacks = list(callbacks)
        if config.run.monitor_gradients:
            self.callbacks.append(GradientMonitor())
        self.run_dir = Path(config.run.output_dir)
        # Accelerate keeps one global state per process; a second Trainer in the same process (a notebook,
        # the tests) may ask for another precision. The process group (PartialState) is kept.
        AcceleratorState._reset_state()
        if config.run.mixed_precision == "fp16" and not _has_accelerator():
            raise ConfigError("run.mixed_precision fp16 needs a GPU: on CPU Accelerate has no fp16 autocast and would "
                              "silently train in fp32; use mixed_precision: bf16 (autocast works on CPU) or no")
        # Without a GPU, cpu=True lets Accelerate join a multi-process launch over gloo (MULTI_CPU).
        self.accelerator = Accelerator(mixed_precision=config.run.mixed_precision, cpu=not _has_accelerator())
        set_seed(config.run.seed)
        self.task = TASKS[config.task.kind](config)
        self.train_data = self.task.prepare_data(train_data if train_data is not None else self._open(
            config.data.train, None, config.data.train_limit), train=True)
        classes = self.train_data.classes
        self.val_data = val_data if val_data is not None or not config.data.val else self._open(
            config.data.val, classes, config.data.val_limit)
        if self.val_data is not None:
            self.val_data = self.task.prepare_data(self.val_data, train=False)
        self._check_resolutions(self.train_data, self.val_data)
        self.model = self._build_model(classes, base_model)
        self.spec = replace(run_input_spec(self._base_model(), config.data.image_size, config.data.image_sizes),
                            window=config.data.window)
        train_spec = replace(self.spec, size=max(self.spec.train_sizes)) if self.spec.train_sizes else self.spec
        images = image_spec(self.spec, config.data.tiling)  # a tiled model takes whole images, not its input side
        self.train_transform = SampleTransform(build_transform(image_spec(train_spec, config.data.tiling), True,
                                                               config.data.augment), config.run.seed)
        self.eval_transform = SampleTransform(build_transform(images, False), config.run.seed)
        self.train_data.transform, self.train_data.window = self.train_transform, self.spec.window
        if self.val_data is not None:
            self.val_data.transform, self.val_data.window = self.eval_transform, self.spec.window
        self.optimizer = build_optimizer(self.model, config.optim)
        self.scheduler = build_scheduler(self.optimizer, config.optim)
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.loop = ckpt.LoopState()
        self.stage_plan = self._plan_stages()
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        self.activity = "setting up"  # what the loop is doing, for the out-of-memory advice
        self._last_eval_step: int | None = None

    # ---------------------------------------------------------------- setup
    def _open(self, source: str, classes: list[str] | None, limit: int | None) -> ImageDataset:
        return self.task.open_data(source, classes, limit)

    def _check_resolutions(self, *datasets: ImageDataset | None) -> None:
        if self.config.data.allow_mixed_resolution:
            return
        for dataset in (d for d in datasets if d is not None):
            sizes = dataset.resolutions()
            sizes.pop(None, None)
            if len(sizes) > 1:
                top = ", ".join(f"{w}x{h}: {n}" for (w, h), n in sizes.most_common(4))
                raise ConfigError(f"{dataset.name} mixes {len(sizes)} image resolutions ({top}, ...); every image "
                                  "is resized to the model's input size, which distorts some of them differently. "
                                  "Set data.allow_mixed_resolution: true to accept that, or resize the dataset")

    def _build_model(self, classes: list[str], base_model: nn.Module | None) -> AdaptedModel:
        cfg = self.config
        base, adapter_config = self.task.build(classes, base_model)
        fit_input_size(self.task.image_model(base), cfg.data.image_size)  # a dual encoder's image tower too
        if cfg.run.gradient_checkpointing:
            for backbone in self.task.backbones(base):
                _enable_gradient_checkpointing(backbone)
        model = inject(base, adapter_config)
        self.task.adapted(model)
        model.train()
        if cfg.run.compile:
            model.base_model.compile()
        return model

    def _base_model(self) -> nn.Module:
        return self.task.image_model(self.accelerator.unwrap_model(self.model).base_model)

    def _plan_stages(self) -> StagePlan | None:
        """The run's stages resolved against the model, and the first one entered (None without stages)."""
        if not self.config.stages:
            return None
        if self.accelerator.num_processes > 1:
            raise ConfigError("multi-stage training (stages:) runs in one process for now: a stage change alters "
                              "the trainable set, which a data-parallel wrapper fixes at start; drop stages or run "
                              "without accelerate launch")
        self.stage_plan = StagePlan(self.config.stages, self.adapted)
        self.enter_stage(0, carry_state=False)
        return self.stage_plan

    def enter_stage(self, index: int, carry_state: bool = True) -> None:
        """Make stage `index` the current one (vislora.train.stages.apply_stage): trainable set, rank, a new optimizer
        (AdamW state carried for parameters that stay trainable), the LR schedule at the current step."""
        if self.stage_plan is None:
            raise ConfigError(f"cannot enter stage {index + 1}: this run has no stages (its config's `stages:` is "
                              "empty); add stages to the run config")
        optimizer, self.scheduler = apply_stage(self.stage_plan, index, self.adapted, self.optimizer,
                                                self.config.optim, self.loop.step, carry_state)
        self.optimizer = self.accelerator.prepare(optimizer)

    def _next_stage(self) -> None:
        """After a step: enter the stage that runs the next step if it differs, and say so."""
        plan = self.stage_plan
        if plan is None or plan.index_at(self.loop.step) == plan.current:
            return
        self.enter_stage(plan.index_at(self.loop.step))
        self._announce_stage()

    def _announce_stage(self) -> None:
        plan = self.stage_plan
        index = plan.current
        count = plan.trainable_count(index)
        self._say(f"stage {index + 1}/{len(plan.stages)} from step {self.loop.step + 1}: training "
                  f"{plan.trains(index)}, {count:,} trainable parameters, "
                  f"lr x{plan.stages[index].lr_scale:g}")
        self._write_metrics({"step": self.loop.step, "split": "stage", "stage": index + 1, "trainable": count,
                             "train": plan.stages[index].train, "lr_scale": plan.stages[index].lr_scale})

    @property
    def adapted(self) -> AdaptedModel:
        return self.accelerator.unwrap_model(self.model)

    def load_checkpoint(self, folder: Path) -> None:
        """Enter the stage the checkpoint was saved in (it holds that stage's optimizer), then restore it."""
        if self.stage_plan is not None:
            self.enter_stage(self.stage_plan.index_at(ckpt.saved_step(folder)), carry_state=False)
        super().load_checkpoint(folder)

    # ---------------------------------------------------------------- fit
    def fit(self) -> TrainResult:
        """Train to `optim.max_steps` (or early stop), resuming from the last checkpoint when asked. Running out of
        memory raises a TrainingError with what to change, computed from the config (vislora.train.oom)."""
        start_time = time.perf_counter()
        self._prepare_run_dir()
        report = parameter_report(self.adapted)
        if self.accelerator.is_main_process:
            logger.info("training %s trainable of %s parameters (%.3f%%)", f"{report.trainable:,}",
                        f"{report.total:,}", report.trainable_percent)
        if self.stage_plan is not None:
            self._say(self.stage_plan.describe())
        if self.stage_plan is not None and self.loop.step == 0:
            self._announce_stage()
        self.telemetry = Telemetry(self.accelerator.device)
        try:
            last_eval, stopped_early = self._train()
        except Exception as exc:
            if not oom.is_out_of_memory(exc):
                raise
            raise self._out_of_memory(exc) from exc
        self.task.finish(self)
        return self._finish(last_eval, stopped_early, report, time.perf_counter() - start_time)

    def _train(self) -> tuple[Evaluation | None, bool]:
        """The steps, with evaluations and checkpoints as configured, then the final evaluation."""
        cfg = self.config
        accelerator = self.accelerator
        bar = self._progress_bar()
        stopped_early = False
        last_eval: Evaluation | None = None
        micro, window_images, running_loss = 0, 0, 0.0
        self.telemetry.start_step()
        while self.loop.step < cfg.optim.max_steps and not stopped_early:
            for batch in timed(self._epoch_batches(), self.telemetry.waited):
                self.activity = f"training step {self.loop.step + 1}"
                self.loop.batch_in_epoch += 1
                micro += 1
                loss, n_images = self._forward_backward(batch, last=micro == cfg.optim.grad_accum)
                running_loss += loss
                window_images += n_images
                if micro < cfg.optim.grad_accum:
                    continue
                finite, grad_norm = self._optimizer_step()
                micro = 0
                self.loop.step += 1
                seconds = self.telemetry.end_step()
                images = int(accelerator.reduce(torch.tensor(window_images), "sum").item())
                self.loop.images_seen += images
                images_per_s = images / max(seconds, 1e-9)
                mean_loss = accelerator.reduce(torch.tensor(running_loss / cfg.optim.grad_accum), "mean").item()
                self._log_train(mean_loss, grad_norm, finite, images_per_s, bar)
                self._next_stage()
                running_loss, window_images = 0.0, 0
                if cfg.run.eval_every and self.loop.step % cfg.run.eval_every == 0:
                    self.activity = f"the evaluation at step {self.loop.step}"
                    last_eval = self.evaluate()
                    stopped_early = self._after_eval(last_eval)
                if cfg.run.save_every and self.loop.step % cfg.run.save_every == 0:
                    self.activity = f"writing the checkpoint of step {self.loop.step}"
                    self.save_checkpoint()
                if stopped_early or self.loop.step >= cfg.optim.max_steps:
                    break
                self.telemetry.start_step()  # evaluation and checkpoint writing are not part of the next step
            else:
                self.loop.epoch += 1
                self.loop.batch_in_epoch = 0
        if bar is not None:
            bar.close()
        if self.val_data is not None and self._last_eval_step != self.loop.step:
            self.activity = f"the final evaluation at step {self.loop.step}"
            last_eval = self.evaluate()
            stopped_early = self._after_eval(last_eval) or stopped_early
        return last_eval, stopped_early

    def _out_of_memory(self, exc: BaseException) -> TrainingError:
        """After an allocator failure: drop the gradients, remove a half-written checkpoint (published ones are
        complete and stay), log the peak memory, and build the error with the advice."""
        self.optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if self.accelerator.is_main_process:
            shutil.rmtree(ckpt.staging_dir(self.run_dir / "checkpoints", self.loop.step), ignore_errors=True)
            self._write_metrics({"step": self.loop.step, "split": "oom", "during": self.activity,
                                 **self.telemetry.memory.peaks()})
            self.metrics.sync()
            self.metrics.close()
        return oom.out_of_memory_error(exc, self.config, self.accelerator.device, self.activity,
                                       self.accelerator.num_processes)

    def _epoch_batches(self) -> Iterator[dict[str, Any]]:
        cfg = self.config
        self.train_transform.set_epoch(self.loop.epoch)
        sampler = EpochBatches(len(self.train_data), cfg.optim.batch_size, cfg.run.seed, self.loop.epoch,
                               self.loop.batch_in_epoch, self.accelerator.process_index,
                               self.accelerator.num_processes)
        if len(self.train_data) < cfg.optim.batch_size * self.accelerator.num_processes:
            raise ConfigError(f"{self.train_data.name} has {len(self.train_data)} images, fewer than one batch "
                              f"({cfg.optim.batch_size} x {self.accelerator.num_processes} processes); lower "
                              "optim.batch_size")
        # Own generator: creating a loader must not draw from the global RNG (resume would shift dropout).
        loader = torch.utils.data.DataLoader(self.train_data, batch_sampler=sampler, collate_fn=self.task.collate,
                                             num_workers=cfg.data.num_workers, generator=torch.Generator())
        for batch in loader:
            self._count_skipped(batch["skipped"])
            yield batch

    def _count_skipped(self, indices: list[int]) -> None:
        new = set(indices) - set(self.loop.skipped)
        self.loop.skipped = sorted(set(self.loop.skipped) | new)

    def _forward_backward(self, batch: dict[str, Any], last: bool) -> tuple[float, int]:
        """Loss of one micro-batch, backpropagated (gradients synced across processes only on the last one)."""
        accelerator = self.accelerator
        sync = accelerator.no_sync(self.model) if not last else contextlib.nullcontext()
        with sync:
            if "image" not in batch:  # every image of this micro-batch was corrupt: keep processes in step
                loss = sum((p * 0).sum() for p in self.model.parameters() if p.requires_grad)
                accelerator.backward(loss)
                return 0.0, 0
            with accelerator.autocast():
                batch = sized_batch(batch, self.spec, self.config.run.seed, self.loop.step)  # data.image_sizes
                loss, n_images = self.task.loss(self.model, batch, accelerator.device)
                loss = loss + self._extra_loss()
            accelerator.backward(loss / self.config.optim.grad_accum)
            return loss.item(), n_images

    def _extra_loss(self) -> torch.Tensor | float:
        """Regularisers the adapters ask for (AdaLoRA, MoLoRA) plus the callbacks' terms; 0.0 when none."""
        terms = [self.adapted.auxiliary_loss(), *(cb.extra_loss(self) for cb in self.callbacks)]
        terms = [t for t in terms if t is not None]
        return torch.stack([t.float() for t in terms]).sum() if terms else 0.0

    def _optimizer_step(self) -> tuple[bool, float]:
        """Clip, check for NaN/Inf, step or skip; raise after `nan_max_consecutive` bad steps in a row."""
        cfg = self.config
        for callback in self.callbacks:
            callback.on_gradients(self)
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = self.accelerator.clip_grad_norm_(params, cfg.optim.max_grad_norm or math.inf)
        grad_norm = float(norm)
        finite = math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            self.scheduler.step()
            self.loop.nonfinite_in_a_row = 0
        else:
            if self.accelerator.scaler is not None:  # fp16: lower the loss scale, as the scaler's own skip does;
                self.accelerator.scaler.update()  # without it the next step's unscale_ raises
            self.loop.nonfinite_in_a_row += 1
            self.loop.nonfinite_total += 1
            logger.warning("step %d: loss or gradients are NaN/Inf; the step was skipped (%d in a row)",
                           self.loop.step + 1, self.loop.nonfinite_in_a_row)
        if finite:  # adapters that act on the step (AdaLoRA's rank allocator) see its gradients
            self.adapted.after_optimizer_step(self.loop.step + 1, cfg.optim.max_steps)
        for callback in self.callbacks:
            callback.on_step_end(self, finite)
        self.optimizer.zero_grad(set_to_none=True)
        if self.loop.nonfinite_in_a_row >= cfg.run.nan_max_consecutive:
            raise TrainingError(
                f"loss or gradients were NaN/Inf for {self.loop.nonfinite_in_a_row} steps in a row (up to step "
                f"{self.loop.step + 1}); training stopped. Lower optim.lr_adapter ({cfg.optim.lr_adapter}) and "
                f"optim.lr_head ({cfg.optim.lr_head}), keep optim.max_grad_norm on, use mixed_precision: no, "
                "and check the data for broken images; the last good checkpoint is in "
                f"{self.run_dir / 'checkpoints'}")
        return finite, grad_norm

    # ---------------------------------------------------------------- evaluation
    def evaluate(self) -> Evaluation:
        """Held-out metrics over `val_data` (the task's), sharded across processes and gathered."""
        result = self.task.evaluate(self)
        self._last_eval_step = self.loop.step
        self._write_metrics({"step": self.loop.step, "split": "val", **result.metrics(), "n": result.n,
                             "skipped_images": result.skipped})
        return result

    def _after_eval(self, result: Evaluation) -> bool:
        """Keep the best adapter; True when early stopping says stop."""
        cfg = self.config.run
        metrics = result.metrics()
        if cfg.best_metric not in metrics:
            raise ConfigError(f"run.best_metric is {cfg.best_metric!r}, but this {self.task.kind} evaluation reports "
                              f"only {sorted(metrics)}; choose one of those")
        value = metrics[cfg.best_metric]
        sign = -1 if cfg.best_metric == "loss" else 1
        best = self.loop.best_value
        if best is None or sign * (value - best) > cfg.early_stopping_min_delta:
            self.loop.best_value, self.loop.best_step = value, self.loop.step
            self.loop.evals_without_improvement = 0
            self._save_adapter(self.run_dir / "best")
        else:
            self.loop.evals_without_improvement += 1
        patience = cfg.early_stopping_patience
        if patience and self.loop.evals_without_improvement >= patience:
            if self.accelerator.is_main_process:
                logger.warning("early stopping at step %d: %s has not improved for %d evaluations (best %.4f at "
                               "step %d)", self.loop.step, cfg.best_metric, patience, self.loop.best_value,
                               self.loop.best_step)
            return True
        return False

    def _log_train(self, loss: float, grad_norm: float, finite: bool, images_per_s: float, bar: Any) -> None:
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        if self.loop.step % self.config.run.log_every == 0 or not finite:
            extra = {**self.task.train_metrics(), **self.adapted.adapter_metrics()}
            for callback in self.callbacks:
                extra.update(callback.metrics(self))
            self._write_metrics({"step": self.loop.step, "epoch": self.loop.epoch, "split": "train", "loss": loss,
                                 "lr_adapter": lrs[0], "lr_head": lrs[-1], "grad_norm": grad_norm,
                                 "finite": finite, "images_per_s": round(images_per_s, 2),
                                 "skipped_images": len(self.loop.skipped), **self.telemetry.row(), **extra})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lrs[0]:.2e}", img_s=f"{images_per_s:.1f}")

    def _say(self, message: str) -> None:
        """A line for the log and, when the progress bar is on, the console (printed around the bar)."""
        if not self.accelerator.is_main_process:
            return
        logger.info(message)
        if self.config.run.progress:
            from tqdm.auto import tqdm

            tqdm.write(message)

    def _progress_bar(self) -> Any:
        if not (self.config.run.progress and self.accelerator.is_main_process):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.config.optim.max_steps, initial=self.loop.step, desc="train", unit="step",
                    dynamic_ncols=True, disable=None)  # None: no bar when stderr is not a terminal (CI logs)


def train(config: TrainConfig) -> TrainResult:
    """Train as `config` says; the library form of `vislora train`."""
    return Trainer(config).fit()


def _has_accelerator() -> bool:
    return torch.cuda.is_available() or torch.backends.mps.is_available()


def _enable_gradient_checkpointing(backbone: nn.Module) -> None:
    if hasattr(backbone, "set_grad_checkpointing"):  # timm
        backbone.set_grad_checkpointing(True)
    elif getattr(backbone, "supports_gradient_checkpointing", False):  # transformers
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        raise ConfigError(f"{type(backbone).__name__} does not support gradient checkpointing; set "
                          "run.gradient_checkpointing: false")
