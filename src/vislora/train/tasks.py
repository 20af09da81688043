"""What the trainer trains: a small task interface, so one loop serves classification and dual-encoder tasks.

A task builds the base model and its adapter config, turns a batch into a loss, and evaluates held-out data.
The trainer picks the task `task.kind` names (vislora.train.trainer.TASKS); the dual-encoder tasks live in
`vislora.train.vlm`.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from accelerate.utils import gather_object
from torch import nn

from vislora.config import AdapterConfig
from vislora.data.datasets import ImageDataset, collate
from vislora.data.transforms import build_mixup
from vislora.errors import ConfigError
from vislora.run_config import TrainConfig
from vislora.tasks.classification import EvalResult, build_classifier, classification_loss, predict_rows, summarize
from vislora.train.view import TrainerView


class Evaluation(Protocol):
    """Held-out results: `metrics()` holds every logged figure (best_metric is read from it)."""

    n: int
    skipped: int

    def metrics(self) -> dict[str, float]: ...


class TrainTask:
    """Base task; subclasses implement build, loss and evaluate."""

    kind = ""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.classes: list[str] = []

    def prepare_data(self, dataset: ImageDataset, train: bool) -> ImageDataset:
        """Last look at a dataset before training (sampling, checks); identity by default."""
        return dataset

    def build(self, classes: list[str], base: nn.Module | None = None) -> tuple[nn.Module, AdapterConfig]:
        """(base model, config of the adapter `default` to train on it); `base` is a prepared model to use."""
        raise NotImplementedError

    def adapted(self, model: nn.Module) -> None:
        """Called once after injection (e.g. to load frozen adapters under the trained one)."""

    def image_model(self, base: nn.Module) -> nn.Module:
        """The module whose input spec (size, normalisation) the image transforms follow."""
        return getattr(base, "backbone", base)

    def backbones(self, base: nn.Module) -> list[nn.Module]:
        """Modules that get gradient checkpointing."""
        return [getattr(base, "backbone", base)]

    def loss(self, model: nn.Module, batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, int]:
        """(loss of one micro-batch, images in it)."""
        raise NotImplementedError

    def evaluate(self, trainer: TrainerView) -> Evaluation:
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        """What task.json records beside the adapter, so the adapter can be used without the run config."""
        return {"task": self.kind, "model": self.config.model.model_dump(mode="json"), "classes": self.classes}

    def train_metrics(self) -> dict[str, float]:
        """Figures logged with each training row."""
        return {}


class ClassificationTask(TrainTask):
    """A backbone with a classification head, cross-entropy (MixUp / label smoothing as configured)."""

    kind = "classification"

    def build(self, classes: list[str], base: nn.Module | None = None) -> tuple[nn.Module, AdapterConfig]:
        cfg = self.config
        if base is not None:
            raise ConfigError("a prepared base model is for dual-encoder tasks; a classifier is built from model.spec")
        self.classes = list(classes)
        base, self.head_path = build_classifier(cfg.model.spec, len(classes), cfg.model.pretrained, cfg.model.head,
                                                cfg.model.pooling, cfg.data.image_size, **cfg.model.kwargs)
        self.mixup = build_mixup(cfg.data.augment, len(classes))
        return base, cfg.adapter.build(self.head_path)

    def loss(self, model: nn.Module, batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, int]:
        images, targets = batch["image"].to(device), batch["label"].to(device)
        if self.mixup is not None:
            even = len(images) - len(images) % 2
            images, targets = self.mixup(images[:even], targets[:even])
        logits = model(images)
        return classification_loss(logits.float(), targets, self.config.data.augment.label_smoothing), len(images)

    def evaluate(self, trainer: TrainerView) -> EvalResult:
        """Accuracy, loss, per-class and per-group accuracy over `val_data`, sharded across processes."""
        accelerator = trainer.accelerator
        indices = list(range(accelerator.process_index, len(trainer.val_data), accelerator.num_processes))
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(trainer.val_data, indices),
                                             batch_size=self.config.optim.batch_size, collate_fn=collate,
                                             num_workers=self.config.data.num_workers, generator=torch.Generator())
        rows, skipped = predict_rows(trainer.model, loader, accelerator.device, accelerator.autocast)
        rows, skipped = gather_object(rows), gather_object(skipped)
        return summarize(rows, trainer.val_data.classes, skipped=len(set(skipped)))

    def info(self) -> dict[str, Any]:
        return {**super().info(), "head": self.head_path}

