"""Image classification: a backbone with its own head (timm) or a linear head on pooled features (HF, open_clip).

`build_classifier` makes the base model that adapters are injected into; `evaluate` computes accuracy,
loss, per-class and per-group accuracy (any metadata column) and per-sample predictions.
"""

from __future__ import annotations

import contextlib
import functools
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from vislora.assets import resolve_model_spec
from vislora.backbones import load_base_model
from vislora.errors import ConfigError
from vislora.input_size import build_timm, fit_input_size, hf_image_kwargs

Head = Literal["auto", "own", "linear"]
Pooling = Literal["cls", "mean", "cls_mean"]


class LinearProbeClassifier(nn.Module):
    """`head(pool(backbone(x)))`: a linear layer on the backbone's pooled features."""

    def __init__(self, backbone: nn.Module, num_features: int, num_classes: int, pooling: Pooling = "cls") -> None:
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        width = 2 * num_features if pooling == "cls_mean" else num_features
        self.head = nn.Linear(width, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled features [batch, width] that the head reads."""
        if hasattr(self.backbone, "encode_image"):  # open_clip
            return self.backbone.encode_image(images)
        out = self.backbone(pixel_values=images, **hf_image_kwargs(self.backbone))  # any side (vislora.input_size)
        tokens = out.last_hidden_state  # [batch, tokens, width]; token 0 is CLS
        cls = out.pooler_output if getattr(out, "pooler_output", None) is not None else tokens[:, 0]
        if self.pooling == "cls":
            return cls
        mean = tokens[:, 1:].mean(dim=1)
        return mean if self.pooling == "mean" else torch.cat([cls, mean], dim=-1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def build_classifier(spec: str, num_classes: int, pretrained: bool = True, head: Head = "auto",
                     pooling: Pooling = "cls", image_size: int | None = None, native_size: int | None = None,
                     dynamic_size: bool = False, **kwargs: Any) -> tuple[nn.Module, str]:
    """(model returning logits, path of its head module) for a timm/HF/open_clip spec or `asset:<name>`.

    head="auto" keeps a timm model's own classifier (re-sized to `num_classes`) and puts a linear head on
    pooled features of other families; "linear" forces the pooled-feature head for timm too. `kwargs` go
    to the model factory. The backbone runs at `image_size` (default: its native side), its position embeddings
    adapted as vislora.input_size says; `native_size` is the side a run recorded for a timm base (see
    `build_timm`), `dynamic_size` builds a timm ViT that takes any side per forward (mixed-resolution training).
    """
    spec = resolve_model_spec(spec)
    family = spec.partition(":")[0] if ":" in spec else "timm"
    if head == "own" and family != "timm":
        raise ConfigError(f"model.head='own' needs a timm model; {spec!r} has no classifier of its own: "
                          "use head: linear")
    if family == "timm":
        kwargs["num_classes"] = num_classes if head in ("auto", "own") else 0
        backbone = build_timm(functools.partial(load_base_model, spec, pretrained=pretrained), image_size, kwargs,
                              pretrained, native_size, dynamic_size)
        if head in ("auto", "own"):
            return backbone, backbone.pretrained_cfg.get("classifier", "head")
    else:
        backbone = load_base_model(spec, pretrained=pretrained, **kwargs)
        fit_input_size(backbone, image_size)
    if family == "timm":
        return _TimmPooled(backbone, num_classes), "head"
    return LinearProbeClassifier(backbone, _width(backbone), num_classes, pooling), "head"


class _TimmPooled(nn.Module):
    """A timm model without its classifier, plus a linear head on its pre-logits features."""

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)  # num_classes=0: pooled pre-logits

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def _width(backbone: nn.Module) -> int:
    config = getattr(backbone, "config", None)
    if config is not None:
        return getattr(config, "hidden_size", None) or config.vision_config.hidden_size
    visual = getattr(backbone, "visual", None)
    if visual is not None:
        return visual.output_dim
    raise ConfigError(f"cannot tell the feature width of a {type(backbone).__name__}; use a timm or HF model")


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy; `targets` are class indices, or soft labels [batch, classes] from MixUp."""
    if targets.dim() == 2:
        return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


@dataclass
class EvalResult:
    """Held-out metrics; `groups[column][value]` is the accuracy of the samples whose metadata has that value;
    `clinical` holds AUROC and sensitivity/specificity with intervals when asked (vislora.evaluate.clinical's
    ClinicalMetrics.to_dict(), filled by vislora.evaluate.evaluate_adapter)."""

    accuracy: float
    loss: float
    n: int
    skipped: int = 0
    per_class: dict[str, float] = field(default_factory=dict)
    groups: dict[str, dict[str, float]] = field(default_factory=dict)
    predictions: list[dict[str, Any]] = field(default_factory=list)
    clinical: dict[str, Any] | None = None

    def metrics(self) -> dict[str, float]:
        return {"accuracy": self.accuracy, "loss": self.loss}

    def probabilities(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Class probabilities [n, C] and labels [n] of the predictions (rows of `predict_rows` carry `probs`)."""
        return (torch.stack([r["probs"] for r in self.predictions]),
                torch.tensor([r["label"] for r in self.predictions]))


def summarize(rows: Sequence[dict[str, Any]], classes: Sequence[str], skipped: int = 0) -> EvalResult:
    """Aggregate per-sample rows `{"index", "label", "pred", "loss", "metadata"}` (and `probs`, kept in the
    predictions) into an EvalResult."""
    rows = sorted({r["index"]: r for r in rows}.values(), key=lambda r: r["index"])  # DDP may repeat samples
    n = len(rows)
    if n == 0:
        return EvalResult(accuracy=float("nan"), loss=float("nan"), n=0, skipped=skipped)
    correct = [r["label"] == r["pred"] for r in rows]
    per_class: dict[str, list[bool]] = defaultdict(list)
    groups: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for row, ok in zip(rows, correct, strict=True):
        per_class[classes[row["label"]]].append(ok)
        for column, value in row.get("metadata", {}).items():
            groups[column][value].append(ok)
    return EvalResult(
        accuracy=sum(correct) / n,
        loss=sum(r["loss"] for r in rows) / n,
        n=n,
        skipped=skipped,
        per_class={c: sum(v) / len(v) for c, v in per_class.items()},
        groups={col: {val: sum(v) / len(v) for val, v in vals.items()} for col, vals in groups.items()
                if 1 < len(vals) < n},  # a column unique per row (a date, an id) is not a group
        predictions=[{**r, "pred_class": classes[r["pred"]], "label_class": classes[r["label"]]} for r in rows],
    )


def eval_batches(model: nn.Module, batches: Iterable[dict[str, Any]], skipped: list[int]
                 ) -> Iterator[dict[str, Any]]:
    """The batches that hold images, `model` in eval mode while they are used (put back as it was after); the
    indices of skipped (corrupt) samples are appended to `skipped`."""
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            skipped += batch["skipped"]
            if "image" in batch:
                yield batch
    finally:
        model.train(was_training)


@torch.no_grad()
def predict_rows(model: nn.Module, batches: Iterable[dict[str, Any]], device: torch.device | str = "cpu",
                 autocast: Any = None) -> tuple[list[dict[str, Any]], list[int]]:
    """Per-sample rows for `summarize`, and the indices of skipped (corrupt) samples; `probs` is the row's
    softmax [C] (float32, on the CPU)."""
    rows, skipped = [], []
    for batch in eval_batches(model, batches, skipped):
        with autocast() if autocast else contextlib.nullcontext():
            logits = model(batch["image"].to(device)).float()
        labels = batch["label"].to(device)
        losses = F.cross_entropy(logits, labels, reduction="none")
        probs = F.softmax(logits, dim=-1).cpu()  # [B, C]
        for i, label, pred, loss, meta, p in zip(batch["index"].tolist(), labels.tolist(), logits.argmax(-1).tolist(),
                                                 losses.tolist(), batch["metadata"], probs, strict=True):
            rows.append({"index": i, "label": label, "pred": pred, "loss": loss, "metadata": meta, "probs": p})
    return rows, skipped
