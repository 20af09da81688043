"""What the trainer trains: a small task interface, so one loop serves classification (single- and multi-label) and
dual-encoder tasks.

A task builds the base model and its adapter config, turns a batch into a loss, and evaluates held-out data.
The trainer picks the task `task.kind` names (vislora.train.trainer.TASKS); the dual-encoder tasks live in
`vislora.train.vlm`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any, Protocol

import torch
from accelerate.utils import gather_object
from torch import nn

from vislora.config import AdapterConfig
from vislora.data.attributes import AttributeSet
from vislora.data.datasets import ImageDataset, MultiLabelFormat, collate, open_dataset
from vislora.data.transforms import build_mixup
from vislora.errors import ConfigError, DataError, VisloraWarning
from vislora.evaluate.multilabel import MultilabelMetrics, Thresholds, multilabel_metrics, tune_thresholds
from vislora.run_config import TrainConfig
from vislora.tasks.classification import (
    EvalResult,
    build_classifier,
    classification_loss,
    eval_batches,
    predict_rows,
    summarize,
)
from vislora.tasks.multilabel import MultilabelLoss, attribute_scores, pos_weights
from vislora.tasks.tiled import build_tiled_classifier
from vislora.train.view import TrainerView

logger = logging.getLogger(__name__)


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

    def data_format(self) -> MultiLabelFormat | None:
        """How the label column of a manifest is read: None for one label per image."""
        return None

    def open_data(self, source: str, classes: list[str] | None, limit: int | None) -> ImageDataset:
        """The dataset data.train / data.val names (`classes`: the training data's, for the held-out data), cut to a
        stratified random `limit` of images."""
        data = self.config.data
        dataset = open_dataset(source, label_column=data.label_column, path_column=data.path_column,
                               strict=data.strict, classes=classes, multilabel=self.data_format())
        return dataset.subset(limit, seed=self.config.run.seed) if limit else dataset

    def prepare_data(self, dataset: ImageDataset, train: bool) -> ImageDataset:
        """Last look at a dataset before training (sampling, checks); identity by default."""
        return dataset

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """A training batch of dataset items (vislora.data.datasets.collate: corrupt images listed under `skipped`)."""
        return collate(samples)

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

    def finish(self, trainer: TrainerView) -> None:
        """Called once after the last step and evaluation, before the final adapter is saved."""


class ClassificationTask(TrainTask):
    """A backbone with a classification head, cross-entropy (MixUp / label smoothing as configured)."""

    kind = "classification"

    def build(self, classes: list[str], base: nn.Module | None = None) -> tuple[nn.Module, AdapterConfig]:
        cfg = self.config
        if base is not None:
            raise ConfigError("a prepared base model is for dual-encoder tasks; a classifier is built from model.spec")
        self.classes = list(classes)
        model = cfg.model
        if cfg.data.tiling is not None:
            base = build_tiled_classifier(model.spec, len(classes), cfg.data.tiling, model.pretrained, model.head,
                                          model.pooling, cfg.data.image_size, **model.kwargs)
            self.head_path, self.tiling, trained = base.head_path, base.tiling, base.trained_modules()
        else:
            base, self.head_path = build_classifier(model.spec, len(classes), model.pretrained, model.head,
                                                    model.pooling, cfg.data.image_size,
                                                    dynamic_size=bool(cfg.data.image_sizes), **model.kwargs)
            self.tiling, trained = None, [self.head_path]
        self.mixup = build_mixup(cfg.data.augment, len(classes))
        return base, cfg.adapter.build(*trained)

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
        tiling = {"tiling": self.tiling.model_dump(mode="json")} if self.tiling is not None else {}
        return {**super().info(), "head": self.head_path, **tiling}



class AttributeTask(TrainTask):
    """What the two multi-label tasks share (MultilabelTask below, PromptedMultilabelTask in vislora.train.vlm): the
    task.multilabel settings, the attributes the training data fixes (task.multilabel.attributes/groups/
    single_choice, default every label seen) with their training counts, the loss, and what task.json records.
    Put it first among the bases: its methods extend the other base's."""

    def __init__(self, config: TrainConfig) -> None:
        super().__init__(config)
        self.settings = config.task.multilabel
        self.attributes: AttributeSet | None = None
        self.train_counts: dict[str, int] = {}
        self.n_train = 0
        self.thresholds: Thresholds | None = None

    def data_format(self) -> MultiLabelFormat:
        return MultiLabelFormat(self.settings.separator, self.settings.allow_empty)

    def prepare_data(self, dataset: ImageDataset, train: bool) -> ImageDataset:
        """The training data fixes the attributes; every row of both datasets is checked against them."""
        dataset = super().prepare_data(dataset, train)
        if not dataset.multilabel:
            raise DataError(f"{dataset.name} holds one label per image; task.kind {self.kind} needs a .csv/.jsonl "
                            "manifest whose label column lists each image's attributes (a|b|c, or a JSON list)")
        if not train:
            return dataset.with_attributes(self.attributes)
        s = self.settings
        self.attributes = AttributeSet.from_labels(dataset.label_sets(), s.attributes, s.groups, s.single_choice)
        dataset = dataset.with_attributes(self.attributes)
        self.train_counts, self.n_train = self.attributes.counts(dataset.label_sets()), len(dataset)
        return dataset

    def attribute_loss(self, classes: list[str]) -> MultilabelLoss:
        """The multi-label loss over the attributes `prepare_data` fixed (`classes` must be them)."""
        if self.attributes is None or list(classes) != list(self.attributes.names):
            raise ConfigError(f"a {self.kind} run takes its attributes from the training data; pass the training "
                              "data through prepare_data first")
        s = self.settings
        return MultilabelLoss(self.attributes, s.loss, pos_weights(s.pos_weight, self.attributes, self.train_counts,
                                                                   self.n_train), s.gamma_neg, s.gamma_pos, s.clip)

    def info(self) -> dict[str, Any]:
        s = self.settings
        return {**super().info(), "attributes": self.attributes.to_dict(),
                "thresholds": self.thresholds.to_dict() if self.thresholds else None,
                "train_counts": self.train_counts, "rare_below": s.rare_below,
                "format": {"separator": s.separator, "allow_empty": s.allow_empty}}


class MultilabelTask(AttributeTask, ClassificationTask):
    """A backbone with one logit per attribute (vislora.tasks.multilabel): BCE or asymmetric loss, cross-entropy in
    single-choice groups; evaluation reports mAP, F1 at 0.5 and rare-attribute mAP, and tunes per-attribute
    thresholds on the evaluated data, which are saved in task.json with the adapter."""

    kind = "multilabel"

    def build(self, classes: list[str], base: nn.Module | None = None) -> tuple[nn.Module, AdapterConfig]:
        self.loss_fn = self.attribute_loss(classes)
        return super().build(classes, base)

    def loss(self, model: nn.Module, batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, int]:
        images, targets = batch["image"].to(device), batch["label"].to(device)
        return self.loss_fn(model(images).float(), targets), len(images)

    def evaluate(self, trainer: TrainerView) -> MultilabelMetrics:
        """mAP, F1 at threshold 0.5, rare mAP and loss over `val_data`; thresholds tuned on the same scores."""
        return self.score(trainer, trainer.val_data)

    def score(self, trainer: TrainerView, dataset: ImageDataset) -> MultilabelMetrics:
        """Metrics of the model on `dataset` (sharded across processes), and `thresholds` tuned on it."""
        logits, targets, skipped = self._logits(trainer, dataset)
        if not len(logits):
            raise ConfigError(f"no readable image in {dataset.name} to evaluate: every image was skipped as corrupt")
        names = list(self.attributes.names)
        scores = attribute_scores(logits, self.attributes)
        result = multilabel_metrics(scores, targets, names, train_counts=self.train_counts,
                                    rare_below=self.settings.rare_below, loss=self.loss_fn(logits, targets).item())
        result.skipped = skipped
        self.thresholds = tune_thresholds(scores, targets, names, self.settings.thresholds,
                                          self.settings.target_precision,
                                          tuned_on=f"{dataset.name} at step {trainer.loop.step}")
        return result

    def _logits(self, trainer: TrainerView, dataset: ImageDataset) -> tuple[torch.Tensor, torch.Tensor, int]:
        accelerator = trainer.accelerator
        indices = list(range(accelerator.process_index, len(dataset), accelerator.num_processes))
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices),
                                             batch_size=self.config.optim.batch_size, collate_fn=collate,
                                             num_workers=self.config.data.num_workers, generator=torch.Generator())
        rows, skipped = {}, []
        with torch.no_grad():
            for batch in eval_batches(trainer.model, loader, skipped):
                with accelerator.autocast():
                    logits = trainer.model(batch["image"].to(accelerator.device)).float().cpu()
                rows.update(zip(batch["index"].tolist(), logits.tolist(), strict=True))
        merged: dict[int, list[float]] = {}
        for part in gather_object([rows]):  # DDP may repeat samples
            merged.update(part)
        order = sorted(merged)
        targets = [self.attributes.encode(dataset.records[i].labels or ()) for i in order]
        logits = torch.tensor([merged[i] for i in order]).reshape(len(order), len(self.attributes))
        return (logits, torch.stack(targets) if targets else torch.zeros(0, len(self.attributes)),
                len(set(gather_object(skipped))))

    def finish(self, trainer: TrainerView) -> None:
        """Without data.val, thresholds are tuned on the training images (evaluation transform), with a warning:
        they fit the training data and are likely too permissive."""
        if trainer.val_data is None:
            on_training_images(trainer, lambda data: self.score(trainer, data))


def on_training_images(trainer: TrainerView, tune: Callable[[ImageDataset], object]) -> None:
    """For a run without data.val: warn that thresholds are tuned on the training images, then call `tune` on them
    under the evaluation transform (put back after)."""
    warnings.warn("no data.val: per-attribute thresholds are tuned on the training images, where the model "
                  "scores higher than on new images; give data.val for thresholds that hold on new data",
                  VisloraWarning, stacklevel=3)
    data = trainer.train_data
    transform, data.transform = data.transform, trainer.eval_transform
    try:
        tune(data)
    finally:
        data.transform = transform
