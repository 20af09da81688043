"""Dual-encoder tasks for the trainer: contrastive image-text fine-tuning, few-shot prompt classification and
prompted multi-label attributes.

Both build a dual encoder (`vislora.dual_encoder`), adapt its towers with one tower-aware AdapterConfig
(`adapter.vision_targets` / `text_targets`, per-tower rank and alpha), can keep other adapters active and frozen
underneath (`adapter.frozen`), and evaluate with a text classifier built from prompts (prompt ensembling over
`task.templates`) plus, on captioned data, retrieval recall@1/5/10 in both directions.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import gather_object
from torch import nn

from vislora.config import AdapterConfig
from vislora.data.datasets import ImageDataset, collate
from vislora.dual_encoder import DualTowerModel, build_dual_encoder
from vislora.errors import ConfigError, DataError
from vislora.evaluate.dual import DualEvalResult, embed_rows, score_rows
from vislora.evaluate.multilabel import MultilabelMetrics, Thresholds, multilabel_metrics, tune_thresholds
from vislora.evaluate.prompted import PromptedScores, prompted_scores
from vislora.formats import load_adapter
from vislora.run_config import TOWER_FIELDS, VLM_FIELDS, TrainConfig
from vislora.runs import dual_encoder_args
from vislora.tasks.clip import (
    CLIP_LORA,
    contrastive_loss,
    same_label,
    sample_shots,
    sigmoid_loss,
    text_classifier,
)
from vislora.tasks.prompted import (
    PROMPTED_TASK,
    add_logit_bias,
    attribute_prompts,
    logit_bias,
    prompt_names,
    prompted_logits,
)
from vislora.towers import tower_adapter_config
from vislora.train.tasks import AttributeTask, TrainTask, on_training_images
from vislora.train.view import TrainerView

logger = logging.getLogger(__name__)


class DualTask(TrainTask):
    """Shared by the contrastive and few-shot tasks: model, adapter config, data checks, evaluation."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        if config.run.best_metric == "recall@1" and config.task.kind != "contrastive":
            raise ConfigError("run.best_metric recall@1 needs task.kind contrastive on captioned data; use accuracy")

    def prepare_data(self, dataset: ImageDataset, train: bool) -> ImageDataset:
        return drop_missing(dataset)

    def build(self, classes: list[str], base: nn.Module | None = None) -> tuple[nn.Module, AdapterConfig]:
        self.classes = list(classes)
        given = base is not None
        if base is None:
            base = self.described_model()
        elif not isinstance(base, DualTowerModel):
            raise ConfigError(f"a {self.kind} run needs a dual encoder, got a {type(base).__name__}; build one with "
                              "vislora.dual_encoder.build_dual_encoder")
        config = self.adapter_config(base)
        self.prepared = given and not self.rebuilds(base, config.modules_to_save)
        self.base = base
        return base, config

    def described_model(self) -> DualTowerModel:
        """The dual encoder model.* describes, built with the arguments `vislora.runs` rebuilds runs with."""
        return build_dual_encoder(**dual_encoder_args(self.config.model.model_dump(mode="json")))

    def rebuilds(self, base: nn.Module, saved: list[str]) -> bool:
        """Whether a base model prepared in Python (e.g. pre-aligned projections) equals the one model.* describes
        (built as `vislora.runs` rebuilds it) in every weight the adapter does not save: then task.json and the
        adapter rebuild the trained model, and the run can be evaluated, reported, merged and exported from its
        folder. Otherwise task.json marks it `prepared_base`."""
        with torch.random.fork_rng(devices=[]):
            if not self.config.model.pretrained:
                torch.manual_seed(self.config.run.seed)
            built = self.described_model().state_dict()
        given = base.state_dict()
        kept = [k for k in given if not any(k == p or k.startswith(p + ".") for p in saved)]
        if set(given) == set(built) and all(torch.equal(given[k], built[k]) for k in kept):
            return True
        logger.info("the prepared base model differs from model.* in weights the adapter does not save: task.json "
                    "marks it prepared_base (its folder cannot rebuild it)")
        return False

    def adapter_config(self, base: DualTowerModel) -> AdapterConfig:
        """adapter.vision_targets / text_targets (or adapter.targets in both towers), per-tower rank/alpha; the
        logit scale is left to the frozen adapters when there are some (one adapter may own a saved module)."""
        a = self.config.adapter
        if a.preset:
            raise ConfigError("adapter.preset is for image classifiers; dual encoders take vision_targets / "
                              "text_targets (examples/fewshot_fashion_mnist.yaml shows CLIP-LoRA's recipe)")
        vision, text = a.vision_targets, a.text_targets
        if vision is None and text is None:
            vision = text = a.targets or CLIP_LORA["targets"]
        common = a.model_dump(exclude={"preset", "targets", "rank", "alpha", *TOWER_FIELDS, *VLM_FIELDS},
                              exclude_none=True)
        return tower_adapter_config(base, vision, text, rank=a.rank or 8, alpha=a.alpha or 16.0,
                                    vision_rank=a.vision_rank, vision_alpha=a.vision_alpha, text_rank=a.text_rank,
                                    text_alpha=a.text_alpha, train_heads=a.train_heads,
                                    train_logit_scale=a.train_heads and not a.frozen, **common)

    def adapted(self, model: nn.Module) -> None:
        """Load `adapter.frozen` adapters, keep them active under `default`, train only `default`."""
        frozen = self.config.adapter.frozen
        for name, folder in frozen.items():
            load_adapter(model, folder, name, activate=False)
        if frozen:
            model.set_active([*frozen, "default"])
            model.set_trainable("default")

    def image_model(self, base: nn.Module) -> nn.Module:
        return base.vision_tower

    def backbones(self, base: nn.Module) -> list[nn.Module]:
        return [base.get_submodule(prefix) for prefix in base.towers.values()]

    def names(self) -> list[str]:
        """Readable class names for prompts (task.class_names maps labels to them)."""
        return [self.config.task.class_names.get(c, c) for c in self.classes]

    def captions(self, batch: dict[str, Any]) -> list[str]:
        """The batch's captions, or captions made from labels (templates cycled by sample index)."""
        if "caption" in batch:
            return list(batch["caption"])
        templates, names = self.config.task.templates, self.names()
        return [templates[i % len(templates)].format(names[y])
                for i, y in zip(batch["index"].tolist(), batch["label"].tolist(), strict=True)]

    def embedded(self, trainer: TrainerView, dataset: ImageDataset) -> tuple[list[dict[str, Any]], int]:
        """Rows {index, label, image emb[, caption, text emb]} of `dataset` through the model, sharded across
        processes and gathered (sorted by index), and the number of skipped images."""
        accelerator = trainer.accelerator
        indices = list(range(accelerator.process_index, len(dataset), accelerator.num_processes))
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices),
                                             batch_size=self.config.optim.batch_size, collate_fn=collate,
                                             num_workers=self.config.data.num_workers, generator=torch.Generator())
        rows, skipped = embed_rows(trainer.model, loader, self.base.tokenize, accelerator.device,
                                   accelerator.autocast)
        rows = sorted({r["index"]: r for r in gather_object(rows)}.values(), key=lambda r: r["index"])
        return rows, len(set(gather_object(skipped)))

    def evaluate(self, trainer: TrainerView) -> DualEvalResult:
        """Prompt-classifier accuracy (labelled data), contrastive loss, retrieval recall (captioned data) over
        `val_data`, sharded across processes and gathered."""
        rows, skipped = self.embedded(trainer, trainer.val_data)
        if not rows:
            return DualEvalResult(n=0, skipped=skipped)
        figures = score_rows(rows, self.base, self.names() if self.classes else [], self.config.task.templates,
                             trainer.accelerator.device)
        return DualEvalResult(n=len(rows), skipped=skipped, figures=figures)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "class_names": self.names(), "templates": self.config.task.templates,
                "towers": dict(self.base.towers), "frozen": dict(self.config.adapter.frozen),
                "prepared_base": self.prepared}

    def train_metrics(self) -> dict[str, float]:
        return {"truncated_captions": self.base.tokenizer.truncated}


class ContrastiveTask(DualTask):
    """Symmetric InfoNCE (or SigLIP's sigmoid loss) between images and their captions; on labelled data the captions
    of other images of the same class are positives too, not negatives."""

    kind = "contrastive"

    def loss(self, model: nn.Module, batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, int]:
        captions = self.captions(batch)
        tokens = self.base.tokenize(captions)
        images, texts = model(images=batch["image"].to(device), input_ids=tokens["input_ids"].to(device),
                              attention_mask=tokens["attention_mask"].to(device))
        positives = same_label(batch["label"].to(device))
        scale = self.base.logit_scale()
        if self.config.task.loss == "sigmoid":
            bias = self.base.logit_scale.bias
            if bias is None:
                raise ConfigError("task.loss sigmoid needs a model with a logit bias (SigLIP); use infonce")
            return sigmoid_loss(images, texts, scale, bias, positives), len(images)
        return contrastive_loss(images, texts, scale, positives), len(images)


class FewShotTask(DualTask):
    """CLIP-LoRA: K images per class, cross-entropy of scale * image_emb @ text_classifier.T, the classifier rebuilt
    from the prompts every step so the text tower's adapters train through it. It ensembles all `task.templates`,
    as evaluation does (CLIP-LoRA uses one template for both: give one)."""

    kind = "few_shot"

    def prepare_data(self, dataset: ImageDataset, train: bool) -> ImageDataset:
        dataset = super().prepare_data(dataset, train)
        shots = self.config.task.shots
        if not train or shots is None:
            return dataset
        support = copy.copy(dataset)
        support.records = [dataset.records[i] for i in sample_shots(dataset.labels(), shots, self.config.run.seed)]
        logger.info("%d-shot support set: %d images from %s", shots, len(support), dataset.name)
        return support

    def loss(self, model: nn.Module, batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, int]:
        images, _ = model(images=batch["image"].to(device))
        classifier = text_classifier(self.base, self.names(), self.config.task.templates, device)
        logits = self.base.logit_scale() * images @ classifier.T  # [batch, classes]
        return F.cross_entropy(logits, batch["label"].to(device)), len(images)



class PromptedMultilabelTask(AttributeTask, DualTask):
    """Prompted attributes (vislora.tasks.prompted): every attribute of task.multilabel scored by its prompts,
    scale * cos(image, prompt) + bias, under the multi-label loss (BCE or ASL; cross-entropy in single-choice
    groups), the prompt embeddings recomputed through the adapted text tower every step. Evaluation reports mAP,
    F1 and rare mAP and tunes the adapter's per-attribute thresholds; the base model's zero-shot thresholds are tuned
    once on the same data. Both go into task.json."""

    kind = PROMPTED_TASK

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.zero_shot: Thresholds | None = None  # the base dual encoder's

    def build(self, classes: list[str], base: nn.Module | None = None) -> tuple[nn.Module, AdapterConfig]:
        """The dual encoder, with a logit bias added when it has none (vislora.tasks.prompted)."""
        self.loss_fn = self.attribute_loss(classes)
        base, adapter_config = super().build(classes, base)
        add_logit_bias(base)
        self.prompt_names = prompt_names(self.classes, self.config.task.class_names)
        return base, adapter_config

    def names(self) -> list[str]:
        return self.prompt_names

    def loss(self, model: nn.Module, batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, int]:
        images, _ = model(images=batch["image"].to(device))  # [batch, dim]
        prompts = attribute_prompts(self.base, self.names(), self.config.task.templates, device)  # [A, dim]
        logits = prompted_logits(images, prompts, self.base.logit_scale(), logit_bias(self.base).to(device))
        return self.loss_fn(logits.float(), batch["label"].to(device)), len(images)

    def evaluate(self, trainer: TrainerView) -> MultilabelMetrics:
        """mAP, F1 at 0.5, rare mAP and loss on `val_data`; the adapter's thresholds tuned on the same scores (and,
        at the first evaluation, the base model's)."""
        if self.zero_shot is None:
            self.zero_shot = self.tune(trainer, trainer.val_data, base=True)[1]
        return self.score(trainer, trainer.val_data)

    def score(self, trainer: TrainerView, dataset: ImageDataset) -> MultilabelMetrics:
        """Metrics of the adapted model on `dataset`; `thresholds` tuned on it."""
        scored, self.thresholds = self.tune(trainer, dataset)
        names = list(self.attributes.names)
        result = multilabel_metrics(scored.scores, scored.targets, names, train_counts=self.train_counts,
                                    rare_below=self.settings.rare_below,
                                    loss=self.loss_fn(scored.logits, scored.targets).item())
        result.skipped = scored.skipped
        return result

    def tune(self, trainer: TrainerView, dataset: ImageDataset, base: bool = False) -> tuple[PromptedScores,
                                                                                            Thresholds]:
        """Scores of the adapted (or `base`) model on `dataset` and per-attribute thresholds tuned on them."""
        with trainer.adapted.disabled() if base else contextlib.nullcontext():
            rows, skipped = self.embedded(trainer, dataset)
            scored = prompted_scores(self.base, rows, self.attributes, self.names(), self.config.task.templates,
                                     trainer.accelerator.device, skipped)
        who = "the base model" if base else f"step {trainer.loop.step}"
        return scored, tune_thresholds(scored.scores, scored.targets, list(self.attributes.names),
                                       self.settings.thresholds, self.settings.target_precision,
                                       tuned_on=f"{dataset.name} at {who}")

    def finish(self, trainer: TrainerView) -> None:
        """Without data.val, both sets of thresholds are tuned on the training images (evaluation transform), with
        a warning: they fit the training data."""
        if trainer.val_data is None:
            on_training_images(trainer, lambda data: self._tune_both(trainer, data))

    def _tune_both(self, trainer: TrainerView, data: ImageDataset) -> None:
        self.zero_shot = self.tune(trainer, data, base=True)[1]
        self.score(trainer, data)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "zero_shot_thresholds": self.zero_shot.to_dict() if self.zero_shot else None}



TOWER_VARIANTS = ("both", "vision", "text")


def tower_variants(config: TrainConfig) -> dict[str, TrainConfig]:
    """One dual-encoder run as three: LoRA on both towers, on the image tower only, on the text tower only (e.g. for
    the retail benchmark's prompted comparison). Each adapted tower gets the config's own targets there
    (adapter.vision_targets / text_targets, else adapter.targets, else CLIP-LoRA's q, k, v); the other tower is left
    as it is (no LoRA, projection frozen). Each variant writes to run.output_dir/<variant>."""
    a = config.adapter
    targets = {"vision": a.vision_targets or a.targets or CLIP_LORA["targets"],
               "text": a.text_targets or a.targets or CLIP_LORA["targets"]}
    variants = {}
    for variant in TOWER_VARIANTS:
        data = config.model_dump(mode="json")
        data["adapter"].update({f"{tower}_targets": targets[tower] if variant in ("both", tower) else None
                                for tower in ("vision", "text")})
        data["run"]["output_dir"] = str(Path(config.run.output_dir) / variant)
        variants[variant] = TrainConfig.parse(data)
    return variants


def drop_missing(dataset: ImageDataset) -> ImageDataset:
    """Report image files a manifest lists but the disk lacks, and leave them out (strict datasets fail)."""
    missing = [i for i, r in enumerate(dataset.records) if isinstance(r.source, str) and not Path(r.source).is_file()]
    if not missing:
        return dataset
    listed = ", ".join(dataset.describe(i) for i in missing[:5]) + (", ..." if len(missing) > 5 else "")
    if dataset.strict:
        raise DataError(f"{dataset.name}: {len(missing)} of {len(dataset)} images are missing ({listed}); restore "
                        "them or remove their rows, or set data.strict: false to skip them")
    logger.warning("%s: %d of %d images are missing and are skipped: %s", dataset.name, len(missing), len(dataset),
                   listed)
    kept = copy.copy(dataset)
    gone = set(missing)
    kept.records = [r for i, r in enumerate(dataset.records) if i not in gone]
    return kept
