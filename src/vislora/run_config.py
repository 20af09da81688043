"""The run config, TrainConfig: one YAML file describes a training run; `--set section.key=value` overrides any field.

The trainer reads it, writes it resolved into RUN/config.yaml, and whatever opens a run later (vislora.runs) reads
it back. Unknown keys are errors that name the closest valid key (`optim.lr_adaptr` -> did you mean `lr_adapter`?).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vislora.config import AdapterConfig
from vislora.data.images import check_window
from vislora.data.tiling import TilingConfig
from vislora.data.transforms import AugmentConfig
from vislora.errors import ConfigError
from vislora.io import apply_overrides, atomic_write_text, read_mapping


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Section):
    spec: str = Field(..., description="timm:<name>, hf:<id or dir>, open_clip:<name>, or asset:dinov2-small.")
    pretrained: bool = Field(True, description="Load pretrained weights (timm/open_clip download them).")
    head: Literal["auto", "own", "linear"] = Field(
        "auto", description="auto: a timm model keeps its own classifier; others get a linear head on pooled features.")
    pooling: Literal["cls", "mean", "cls_mean"] = Field("cls", description="Features the linear head reads.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra arguments for the model factory "
                                   "(timm.create_model / from_pretrained), e.g. {depth: 6}.")
    text: str | None = Field(None, description="Dual encoders: the text tower (hf:<id or dir> or "
                             "asset:all-minilm-l6-v2) paired with the image backbone `spec` through new projections; "
                             "unset when `spec` already has both towers (hf: CLIP/SigLIP, open_clip:).")
    embed_dim: int = Field(256, ge=1, description="Dual encoders: width of the shared embedding space.")
    text_pooling: Literal["mean", "cls"] = Field("mean", description="Dual encoders: text features the projection "
                                                 "reads (mean over tokens, as sentence-transformers).")
    lm: str | None = Field(None, description="Captioning / VQA: the causal language model (hf:<id or dir> or "
                           "asset:smollm2-135m-instruct) composed LLaVA-style with the vision encoder `spec`; unset "
                           "when `spec` is a whole Hugging Face VLM (vislora.vlm.build_vlm).")
    connector_hidden: int | None = Field(None, ge=1, description="Captioning / VQA with model.lm: hidden width of "
                                         "the new connector (default: the LM's width).")


class AdapterSection(_Section):
    """AdapterConfig fields, optionally starting from a task preset; the head is always trained and saved."""

    preset: str | None = Field(None, description="Task preset (vislora presets); other keys override it.")
    rank: int | None = None
    alpha: float | None = None
    dropout: float | None = None
    use_rslora: bool | None = None
    targets: list[str] | None = None
    exclude: list[str] | None = None
    layers: list[int] | None = None
    rank_pattern: dict[str, int] | None = None
    alpha_pattern: dict[str, float] | None = None
    train_norms: bool | None = None
    modules_to_save: list[str] | None = None
    init: str | None = None
    method: str | None = Field(None, description="lora (default), dora, adalora or molora.")
    adalora: dict[str, Any] | None = Field(None, description="AdaLoRA budget: target_rank, tinit, tfinal, delta_t, "
                                           "beta1, beta2, orth_reg_weight (method: adalora).")
    molora: dict[str, Any] | None = Field(None, description="MoLoRA experts: experts, top_k, gate (token|image), "
                                          "balance_weight (method: molora).")
    vision_targets: list[str] | None = Field(None, description="Dual encoders: targets inside the image tower.")
    text_targets: list[str] | None = Field(None, description="Dual encoders: targets inside the text tower.")
    vision_rank: int | None = Field(None, ge=1, description="Rank in the image tower (default: rank).")
    vision_alpha: float | None = Field(None, gt=0, description="Alpha in the image tower (default: alpha).")
    text_rank: int | None = Field(None, ge=1, description="Rank in the text tower (default: rank).")
    text_alpha: float | None = Field(None, gt=0, description="Alpha in the text tower (default: alpha).")
    train_heads: bool = Field(True, description="Dual encoders: train and save the projections of adapted towers "
                              "and the logit scale (CLIP-LoRA keeps them frozen).")
    frozen: dict[str, str] = Field(default_factory=dict, description="Adapters loaded from these folders under "
                                   "these names, kept active and frozen while this one trains (e.g. a shared "
                                   "vision adapter under a per-language text adapter).")
    train_connector: bool = Field(False, description="Captioning / VQA: train the VLM's connector in full and save "
                                  "it with the adapter (LLaVA's stage 1 aligns it with both towers frozen).")
    part_ranks: dict[str, int] | None = Field(None, description="Captioning / VQA: rank per VLM part, e.g. "
                                              "{vision: 4} (default: rank).")
    part_alphas: dict[str, float] | None = Field(None, description="Captioning / VQA: alpha per VLM part.")

    def build(self, *trained: str) -> AdapterConfig:
        """The AdapterConfig for a model whose classifier (head, and a tiled model's attention pooling) lives at the
        `trained` module paths."""
        fields = self.model_dump(exclude={"preset", *TOWER_FIELDS, *VLM_FIELDS}, exclude_none=True)
        fields["modules_to_save"] = list(dict.fromkeys([*fields.get("modules_to_save", []), *trained]))
        if self.preset:
            return AdapterConfig.from_preset(self.preset, **fields)
        return AdapterConfig.parse(fields)


TOWER_FIELDS = ("vision_targets", "text_targets", "vision_rank", "vision_alpha", "text_rank", "text_alpha",
                "train_heads", "frozen")
VLM_FIELDS = ("train_connector", "part_ranks", "part_alphas")  # adapter fields of generative VLM runs


MULTILABEL_KINDS = ("multilabel", "prompted_multilabel")  # task kinds configured by task.multilabel
GENERATIVE_KINDS = ("captioning", "vqa")  # task kinds that train a generative VLM (vislora.vlm)
VLM_PARTS = ("lm", "vision", "connector", "qformer")  # what a generative run's stages train (vislora.vlm.PARTS)
TOWERS = ("vision", "text")  # what the other runs' stages train


class MultilabelSection(_Section):
    """task.kind multilabel: the attribute vocabulary, the loss, and how per-attribute thresholds are tuned."""

    attributes: list[str] | None = Field(None, description="Attribute names in output order; default: every label "
                                         "seen in data.train (and every group member), naturally sorted.")
    groups: dict[str, list[str]] = Field(default_factory=dict, description="Named groups of attributes, e.g. "
                                         "{fabric: [cotton, silk], cut: [slim, loose]}; an attribute is in one group "
                                         "at most.")
    single_choice: list[str] = Field(default_factory=list, description="Groups with exactly one label per image: "
                                     "scored by a softmax over the group, trained with cross-entropy.")
    separator: str = Field("|", min_length=1, description="Separator of the labels in a CSV label cell (a|b|c); "
                           "a JSONL label cell may also be a JSON list.")
    allow_empty: bool = Field(False, description="Accept images with an empty label list (negatives for every "
                              "attribute); by default an empty list is an error naming its line.")
    loss: Literal["bce", "asymmetric"] = Field("bce", description="bce: binary cross-entropy per attribute; "
                                               "asymmetric: ASL (Ridnik et al. 2021) for many negatives, rare "
                                               "positives.")
    gamma_neg: float = Field(4.0, ge=0, description="asymmetric: focusing exponent of the negatives.")
    gamma_pos: float = Field(0.0, ge=0, description="asymmetric: focusing exponent of the positives.")
    clip: float = Field(0.05, ge=0, lt=1, description="asymmetric: probability margin m shifted off the "
                        "negatives (p_m = max(p - m, 0)).")
    pos_weight: Literal["none", "auto"] | dict[str, float] = Field(
        "none", description="Weight of the positive term per attribute: none; auto = negatives / positives in "
        "data.train; or a mapping attribute -> weight (others 1.0).")
    thresholds: Literal["max_f1", "precision"] = Field(
        "max_f1", description="How per-attribute thresholds are tuned on data.val (data.train when there is no "
        "val): max_f1, or precision = the lowest threshold reaching target_precision (max-F1 where none does).")
    target_precision: float = Field(0.9, gt=0, le=1, description="thresholds: precision -- the precision to reach.")
    rare_below: int = Field(10, ge=1, description="Attributes with fewer training positives are rare, reported "
                            "apart (rare_map).")


class TaskSection(_Section):
    """What is trained: an image classifier (single- or multi-label), or a dual encoder (contrastive image-text,
    few-shot prompt classifier)."""

    kind: Literal["classification", "multilabel", "contrastive", "few_shot", "prompted_multilabel", "captioning",
                  "vqa"] = Field(
        "classification", description="classification: backbone + head; multilabel: backbone + one logit per "
        "attribute (task.multilabel); contrastive: symmetric InfoNCE on image-"
        "caption pairs; few_shot: CLIP-LoRA, cross-entropy against a text classifier built from prompts; "
        "prompted_multilabel: a dual encoder scores each attribute of task.multilabel by its prompts; "
        "captioning / vqa: a generative VLM (model.spec + model.lm) learns to answer, loss on the answer tokens only.")
    multilabel: MultilabelSection = Field(default_factory=MultilabelSection)
    templates: list[str] = Field(default_factory=lambda: ["a photo of a {}."], min_length=1, description=(
        "Prompt templates ('{}' = class name). Prompt classifiers ensemble all (few_shot trains through that "
        "ensemble); contrastive captions made from labels cycle through them."))
    class_names: dict[str, str] = Field(default_factory=dict, description="Readable name per label for prompts "
                                        "(e.g. {n01440764: tench}); labels not listed are used as they are.")
    shots: int | None = Field(None, ge=1, description="few_shot: images per class sampled from data.train "
                              "(seeded by run.seed); unset = all of data.train.")
    loss: Literal["infonce", "sigmoid"] = Field("infonce", description="contrastive: InfoNCE (CLIP) or pairwise "
                                                "sigmoid (SigLIP; needs a model with a logit bias).")
    prompt: str = Field("Describe the image briefly.", min_length=1, description="captioning: the instruction "
                        "every image is asked (VQA examples bring their own question).")
    max_length: int = Field(512, ge=8, description="captioning / vqa: tokens of prompt (image tokens included) + "
                            "answer; longer answers are cut, with a warning.")
    system: str | None = Field(None, description="captioning / vqa: the chat template's system turn (unset: none).")
    generations: int = Field(8, ge=0, description="captioning / vqa: held-out examples answered greedily at each "
                             "evaluation (exact match for VQA; 0: held-out loss only).")
    max_new_tokens: int = Field(32, ge=1, description="captioning / vqa: longest answer generated in evaluation.")


class DataSection(_Section):
    train: str = Field(..., description="Image folder, .csv/.jsonl manifest, or fashion-mnist:train.")
    val: str | None = Field(None, description="Held-out data for evaluation and best-checkpoint choice.")
    label_column: str | None = Field("label", description="Manifest label column; null for caption-only data.")
    path_column: str = "path"
    image_size: int | None = Field(None, ge=8, description="Square input side; default: the model's native size.")
    image_sizes: list[Annotated[int, Field(ge=8)]] | None = Field(
        None, min_length=1, description="Mixed-resolution training: each step resizes its batch to one of these sides "
        "(drawn from run.seed and the step); evaluation stays at image_size. Multiples of the ViT patch size.")
    train_limit: int | None = Field(None, ge=1, description="Use a stratified random subset of this many images.")
    val_limit: int | None = Field(None, ge=1)
    strict: bool = Field(False, description="Fail on a corrupt image instead of skipping and counting it.")
    allow_mixed_resolution: bool = Field(False, description="Accept images of different sizes (all are resized).")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    window: str | tuple[float, float] = Field(
        "auto", description="DICOM window: auto (the file's WindowCenter/Width, else min/max), none (min/max), a "
        "preset (lung, soft_tissue, bone, brain) or [center, width]; saved with the adapter for eval and serving.")
    tiling: TilingConfig | None = Field(None, description="Large images: a classifier sees each image as tiles whose "
                                        "features are pooled per image (data.image_size is then the tiles' side "
                                        "at the model's input); null: whole images resized to the model's input.")

    @field_validator("window")
    @classmethod
    def _known_window(cls, window: str | tuple[float, float]) -> str | tuple[float, float]:
        return check_window(window)


class OptimSection(_Section):
    batch_size: int = Field(32, ge=1, description="Images per process per micro-batch.")
    max_steps: int = Field(..., ge=1, description="Optimizer steps to train.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr_adapter: float = Field(1e-3, gt=0, description="AdamW learning rate of the low-rank adapter weights.")
    lr_head: float = Field(1e-2, gt=0, description="Learning rate of the other trainable weights (head, norms).")
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping max-norm; null = off.")


class RunSection(_Section):
    output_dir: str = Field(..., description="Run directory: config.yaml, metrics.jsonl, checkpoints/, best/.")
    seed: int = 0
    eval_every: int = Field(0, ge=0, description="Evaluate on data.val every N steps (0: only at the end).")
    save_every: int = Field(0, ge=0, description="Write a resumable checkpoint every N steps (0: never).")
    keep_last: int = Field(2, ge=1, description="Step checkpoints kept on disk.")
    best_metric: Literal["accuracy", "loss", "recall@1", "map", "exact_match"] = Field(
        "accuracy", description="recall@1: mean of image->text and text->image recall@1 (contrastive runs); map: "
        "mean average precision (multilabel runs, whose default it is); exact_match: greedy answers equal to a "
        "reference answer (vqa runs; captioning and vqa default to loss).")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many evaluations without improving best_metric.")
    early_stopping_min_delta: float = Field(0.0, ge=0)
    nan_max_consecutive: int = Field(5, ge=1, description="Stop after this many NaN/Inf steps in a row.")
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = False
    compile: bool = Field(False, description="torch.compile the model (slow first step, faster after).")
    resume: bool = Field(True, description="Continue from the last checkpoint in output_dir if there is one.")
    progress: bool = Field(True, description="Show a progress bar (on a terminal only: logs and pipes get the "
                           "run's messages without it).")
    log_every: int = Field(1, ge=1, description="Write a train line to metrics.jsonl every N steps.")
    monitor_gradients: bool = Field(False, description="Log per-layer gradient norms of the adapter weights to "
                                    "metrics.jsonl and warn when they vanish or explode (vislora.train.monitor).")


class EvalSection(_Section):
    """Clinical metrics of a classifier's evaluations (`vislora eval`, `vislora report`; vislora.evaluate.clinical):
    one-vs-rest AUROC, sensitivity at `specificity`, specificity at `sensitivity`, bootstrap intervals."""

    specificity: float = Field(0.95, gt=0, lt=1, description="Sensitivity is reported at this specificity.")
    sensitivity: float = Field(0.95, gt=0, lt=1, description="Specificity is reported at this sensitivity.")
    bootstrap: int = Field(1000, ge=0, description="Bootstrap resamples for the confidence intervals (0: none).")
    ci: float = Field(0.95, gt=0, lt=1, description="Confidence level of the intervals (percentile bootstrap).")
    seed: int = Field(0, description="Seed of the resamples: the same seed gives the same intervals.")
    stratified: bool = Field(True, description="Resample within each class (class counts kept); false: resample "
                             "all images, skipping (and counting) resamples where a class has no positive.")


class StageSection(_Section):
    """One stage of a multi-stage run (vislora.train.stages): how many optimizer steps, which towers train, the
    learning-rate factor, and the adapter's rank."""

    steps: int = Field(..., ge=1, description="Optimizer steps in this stage.")
    train: list[Literal["vision", "text", "lm", "connector", "qformer"]] = Field(
        default_factory=lambda: ["vision", "text"], min_length=1,
        description="Towers whose adapters train (a model without towers is all `vision`; default: everything); "
        "captioning / vqa runs name VLM parts: lm, vision, connector, qformer (default: all of them).")
    lr_scale: float = Field(1.0, gt=0, description="Multiplies both learning rates during this stage.")
    rank: int | None = Field(
        None, ge=1, description="Progressive rank growth: the adapter grows to this rank when the stage starts. The "
        "model's output is unchanged at that moment and the optimizer keeps the state of the old entries; ranks "
        "never shrink (e.g. 4 -> 16 -> 32 over three stages).")


class TrainConfig(_Section):
    """A whole training run. Load with `TrainConfig.load(path, overrides)`."""

    model: ModelSection
    task: TaskSection = Field(default_factory=TaskSection)
    adapter: AdapterSection = Field(default_factory=AdapterSection)
    data: DataSection
    optim: OptimSection
    run: RunSection
    stages: list[StageSection] = Field(default_factory=list, description="Multi-stage schedule, e.g. text tower "
                                       "only, then vision only, then both at lr_scale 0.1; see docs/vlm.md.")
    eval: EvalSection = Field(default_factory=EvalSection)

    @model_validator(mode="before")
    @classmethod
    def _steps_from_stages(cls, data: Any) -> Any:
        """optim.max_steps defaults to the sum of the stages' steps, and must equal it when given."""
        if not isinstance(data, dict) or not data.get("stages") or not isinstance(data.get("optim"), dict):
            return data
        total = sum(s.get("steps", 0) for s in data["stages"] if isinstance(s, dict))
        given = data["optim"].get("max_steps")
        if given is None:
            return {**data, "optim": {**data["optim"], "max_steps": total}}
        if given != total:
            raise ValueError(f"optim.max_steps is {given} but the stages add up to {total} steps; drop "
                             f"optim.max_steps (it defaults to the stages' sum) or make them agree")
        return data

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.run.eval_every and not self.data.val:
            raise ValueError("run.eval_every is set but data.val is empty; give held-out data or set eval_every: 0")
        if self.run.early_stopping_patience and not self.data.val:
            raise ValueError("run.early_stopping_patience needs data.val to measure improvement")
        if self.task.kind in GENERATIVE_KINDS:
            self._check_generative()
        else:
            self._check_not_generative()
        if self.task.kind in ("classification", "multilabel") and self.model.text:
            raise ValueError("model.text pairs a text tower with the image backbone, which only dual-encoder tasks "
                             "use; set task.kind: contrastive or few_shot, or drop model.text")
        if self.task.kind not in MULTILABEL_KINDS and self.task.multilabel != MultilabelSection():
            raise ValueError(f"task.multilabel is set but task.kind is {self.task.kind!r}; set task.kind: multilabel "
                             "(or prompted_multilabel) or drop task.multilabel")
        if self.task.kind in MULTILABEL_KINDS:
            self._check_multilabel()
        if self.task.kind == "few_shot" and self.data.label_column is None:
            raise ValueError("task.kind few_shot needs labelled data: set data.label_column")
        if self.data.tiling is not None:
            self._check_tiling()
        return self

    def _check_generative(self) -> None:
        """captioning / vqa: no dual-encoder or classifier settings; stages name VLM parts (all of them by default);
        best_metric defaults to the held-out loss."""
        kind = self.task.kind
        if self.model.connector_hidden is not None and self.model.lm is None:
            raise ValueError("model.connector_hidden sizes the connector composed between model.spec and model.lm; "
                             "set model.lm (a causal LM), or drop connector_hidden for a whole Hugging Face VLM")
        if self.model.text:
            raise ValueError(f"model.text pairs a text tower with a dual encoder; a {kind} run composes a VLM with "
                             "model.lm (a causal LM): use model.lm, or drop model.text")
        towers = _changed(self.adapter, ("preset", *TOWER_FIELDS))
        if towers:
            raise ValueError(f"adapter.{', adapter.'.join(towers)} belong to dual encoders and classifiers; a {kind} "
                             "run names VLM parts in adapter.targets (lm, lm:q, vision, connector, qformer) with "
                             "adapter.part_ranks / part_alphas")
        for index, stage in enumerate(self.stages):
            if "train" not in stage.model_fields_set:
                stage.train = list(VLM_PARTS)
            elif "text" in stage.train:
                raise ValueError(f"stages[{index}].train names `text`, a dual-encoder tower; a {kind} run trains VLM "
                                 f"parts: {', '.join(VLM_PARTS)}")
        measured = ("loss", "exact_match") if kind == "vqa" and self.task.generations else ("loss",)
        if self.run.best_metric not in measured:
            if "best_metric" in self.run.model_fields_set:
                raise ValueError(f"run.best_metric {self.run.best_metric} is not measured by this {kind} run; use "
                                 f"{' or '.join(measured)} (exact_match: vqa runs with task.generations > 0)")
            self.run.best_metric = "loss"

    def _check_not_generative(self) -> None:
        """Generative settings (model.lm, adapter.train_connector, task.prompt, VLM parts in stages) on another task
        kind are errors."""
        kind = self.task.kind
        named = [f"model.{f}" for f in _changed(self.model, ("lm", "connector_hidden"))]
        named += [f"adapter.{f}" for f in _changed(self.adapter, VLM_FIELDS)]
        named += [f"task.{f}" for f in _changed(self.task, ("prompt", "max_length", "system", "generations",
                                                              "max_new_tokens"))]
        if named:
            raise ValueError(f"{', '.join(named)} configure captioning / VQA runs, but task.kind is {kind!r}; set "
                             "task.kind: captioning or vqa, or drop them")
        for index, stage in enumerate(self.stages):
            parts = sorted(set(stage.train) - set(TOWERS))
            if parts:
                raise ValueError(f"stages[{index}].train names {parts}, VLM parts of captioning / vqa runs; a {kind} "
                                 "run's stages train towers: vision, text")

    def _check_tiling(self) -> None:
        if self.task.kind not in ("classification", "multilabel"):
            raise ValueError(f"data.tiling tiles images for classifiers; task.kind is {self.task.kind!r}: set "
                             "task.kind: classification or multilabel, or drop data.tiling")
        if self.adapter.method == "molora":
            raise ValueError("data.tiling recomputes tile features in the backward pass, which MoLoRA's per-forward "
                             "balance loss cannot follow; use another adapter.method or drop data.tiling")
        if self.data.image_sizes:
            raise ValueError(f"data.image_sizes {self.data.image_sizes} resizes whole batches, but with data.tiling "
                             "the batches hold whole images that are cut into tiles; drop one of the two (tiles are "
                             "resized to data.image_size)")
        if self.data.tiling.image_size is None and self.data.allow_mixed_resolution and self.optim.batch_size > 1:
            raise ValueError(f"data.tiling.image_size is null, so images keep their sizes, and "
                             f"data.allow_mixed_resolution lets them differ: a batch of {self.optim.batch_size} "
                             "cannot be stacked; set data.tiling.image_size or optim.batch_size: 1")

    def _check_multilabel(self) -> None:
        augment = self.data.augment
        mixing = [name for name, on in (("mixup", augment.mixup > 0), ("cutmix", augment.cutmix > 0),
                                        ("label_smoothing", augment.label_smoothing > 0)) if on]
        if mixing:
            raise ValueError(f"data.augment {', '.join(mixing)} mix single-label class targets; multilabel runs do "
                             "not support them: set them to 0")
        if self.data.label_column is None:
            raise ValueError(f"task.kind {self.task.kind} needs labelled data: set data.label_column")
        if "best_metric" not in self.run.model_fields_set:
            self.run.best_metric = "map"

    @classmethod
    def parse(cls, data: dict[str, Any]) -> TrainConfig:
        """Validate a mapping; unknown keys name the closest valid one."""
        _check_keys(data, cls, "")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}"
                + (f" (got {err['input']!r})" if err["type"] != "missing" and err["loc"] else "")
                for err in exc.errors()
            )
            raise ConfigError(f"invalid train config: {problems}") from None

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
        """Read YAML, apply `key.path=value` overrides (values parsed as YAML), validate."""
        data = read_mapping(path, "train config", "sections model, data, optim, run; examples/ has runnable configs")
        return cls.parse(apply_overrides(data, overrides))

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False))


def _changed(section: BaseModel, fields: tuple[str, ...]) -> list[str]:
    """The `fields` of `section` whose values differ from their defaults (a resolved config.yaml sets every field)."""
    defaults = type(section).model_fields
    return [f for f in fields if getattr(section, f) != defaults[f].get_default(call_default_factory=True)]


def _check_keys(data: Any, model: type[BaseModel], prefix: str) -> None:
    if not isinstance(data, dict):
        return
    fields = model.model_fields
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"did you mean '{prefix}{close[0]}'?" if close else f"valid keys: {', '.join(fields)}"
            raise ConfigError(f"unknown config key '{prefix}{key}': {hint}")
        annotation = fields[key].annotation
        sub = next((t for t in (annotation, *get_args(annotation)) if isinstance(t, type) and
                    issubclass(t, BaseModel)), None) if get_origin(annotation) is not dict else None
        if sub is not None:
            _check_keys(value, sub, f"{prefix}{key}.")
