"""Before/after evaluation: the base model and the adapted model on the same images.

Metrics per model (accuracy, top-5, macro-F1, loss, expected calibration error, per-class accuracy, confusion
matrix, per-group accuracy for metadata columns), per-class and per-group deltas with regressions flagged,
embedding drift (cosine similarity between base and adapted pooled features of each image) and latency of the
base, unmerged and merged models on the same inputs. "Base" is the backbone without its adapters; by default it
keeps the trained head (a classifier's own head would be untrained), so the delta is what the adapters add.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vislora.diagnostics.records import json_safe
from vislora.errors import AdapterError, ConfigError
from vislora.model import AdaptedModel

logger = logging.getLogger(__name__)

ECE_BINS = 15
BaseHead = Literal["trained", "original"]


@dataclass
class Outputs:
    """What one model produced for N images: logits [N, C] and pooled embeddings [N, D] (None if unknown)."""

    logits: torch.Tensor
    embeddings: torch.Tensor | None = None


@dataclass
class Collected:
    """Both models' outputs on the same readable images, their labels [N], rows {index, metadata}, and the
    indices of images skipped as corrupt."""

    base: Outputs
    adapted: Outputs
    labels: torch.Tensor
    rows: list[dict[str, Any]]
    skipped: list[int]


@dataclass
class Metrics:
    """Classification metrics of one model; `groups[column][value]` is the accuracy within that group."""

    n: int
    accuracy: float
    top5: float
    macro_f1: float
    loss: float
    ece: float
    per_class: dict[str, float]
    confusion: list[list[int]]  # [true class][predicted class]
    groups: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class Delta:
    """Accuracy of one class or group before and after; a regression loses more than the tolerance.

    `lost`/`gained` count images the base got right and the adapted model wrong, and the reverse; `p_value` is
    the exact two-sided McNemar test on them (the same images scored twice): small means the change is not noise.
    """

    name: str
    n: int
    base: float
    adapted: float
    regression: bool
    lost: int = 0
    gained: int = 0
    p_value: float = 1.0

    @property
    def delta(self) -> float:
        return self.adapted - self.base


@dataclass
class Drift:
    """Cosine similarity between base and adapted embeddings of the same images, and its histogram."""

    mean: float
    median: float
    p5: float
    min: float
    counts: list[int]
    edges: list[float]


@dataclass
class Latency:
    """Median seconds per batch of the same images: base (adapters off), unmerged and merged adapters."""

    batch_size: int
    repeats: int
    base: float
    unmerged: float
    merged: float | None  # None: the adapter cannot be merged (MoLoRA)
    merged_max_abs_diff: float  # |merged - unmerged| logits: merging must not change the outputs (NaN: not merged)

    def throughput(self, seconds: float) -> float:
        return self.batch_size / seconds


@dataclass
class Comparison:
    """Base vs adapted on the same data."""

    data: str
    base: Metrics
    adapted: Metrics
    per_class: list[Delta]
    per_group: dict[str, list[Delta]]
    drift: Drift | None
    tolerance: float
    latency: Latency | None = None
    skipped: int = 0  # corrupt images left out
    baseline: str = "the backbone without its adapters, with the trained head"

    @property
    def regressions(self) -> list[Delta]:
        """Classes and groups whose accuracy dropped by more than `tolerance`."""
        return [d for d in self.per_class if d.regression] + [
            d for deltas in self.per_group.values() for d in deltas if d.regression]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able data (non-finite floats become None); every delta also carries `delta` = adapted - base."""
        def rows(deltas: list[Delta]) -> list[dict[str, Any]]:
            return [{**asdict(d), "delta": d.delta} for d in deltas]

        return json_safe({**asdict(self), "per_class": rows(self.per_class),
                          "per_group": {k: rows(v) for k, v in self.per_group.items()},
                          "regressions": rows(self.regressions)})


# ---------------------------------------------------------------------------------------------- metrics
def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: Sequence[str],
                           metadata: Sequence[dict[str, str]] | None = None, bins: int = ECE_BINS) -> Metrics:
    """All metrics of one model from its logits [N, C] and the labels [N]."""
    n, n_classes = logits.shape
    if n == 0:
        raise ConfigError("no images to evaluate (all were skipped or the data is empty)")
    logits, labels = logits.detach().double(), labels.long()
    preds = logits.argmax(-1)
    correct = preds == labels
    top = logits.topk(min(5, n_classes), dim=-1).indices  # [N, k]
    confusion = torch.bincount(labels * n_classes + preds, minlength=n_classes ** 2).view(n_classes, n_classes)
    support = confusion.sum(1)
    return Metrics(
        n=n, accuracy=correct.double().mean().item(), top5=(top == labels[:, None]).any(-1).double().mean().item(),
        macro_f1=macro_f1(confusion), loss=F.cross_entropy(logits, labels).item(),
        ece=expected_calibration_error(logits, labels, bins),
        per_class={classes[c]: (confusion[c, c] / support[c]).item() for c in range(n_classes) if support[c]},
        confusion=confusion.tolist(), groups=_group_accuracy(correct.tolist(), metadata or []))


def macro_f1(confusion: torch.Tensor) -> float:
    """Mean F1 over classes present in the labels or the predictions (as scikit-learn's average='macro')."""
    tp = confusion.diag().double()
    seen = confusion.sum(0).double() + confusion.sum(1).double()  # predicted + actual count of each class
    return (2 * tp[seen > 0] / seen[seen > 0]).mean().item()  # F1 = 2PR/(P+R) = 2TP/(predicted + actual)


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """sum over equal-width confidence bins of |bin| / N * |accuracy(bin) - mean confidence(bin)|."""
    confidence, preds = F.softmax(logits.double(), dim=-1).max(-1)
    correct = (preds == labels).double()
    index = torch.bucketize(confidence, torch.linspace(0, 1, bins + 1, dtype=torch.float64)[1:-1])  # (lo, hi]
    count = torch.bincount(index, minlength=bins).double()
    gap = (torch.bincount(index, correct, bins) - torch.bincount(index, confidence, bins)).abs()
    return (gap.sum() / count.sum()).item()  # sum_b |sum(correct) - sum(conf)| / N


def _group_accuracy(correct: list[bool], metadata: Sequence[dict[str, str]]) -> dict[str, dict[str, float]]:
    """Accuracy per value of every metadata column with 2..N-1 distinct values (ids and dates are not groups)."""
    columns: dict[str, dict[str, list[bool]]] = {}
    for ok, meta in zip(correct, metadata, strict=False):
        for column, value in meta.items():
            columns.setdefault(column, {}).setdefault(value, []).append(ok)
    return {column: {value: sum(v) / len(v) for value, v in sorted(values.items())}
            for column, values in columns.items() if 1 < len(values) < len(correct)}


def embedding_drift(base: torch.Tensor, adapted: torch.Tensor, bins: int = 20) -> Drift:
    """Per-image cosine similarity of base [N, D] and adapted [N, D] embeddings: summary and histogram."""
    cos = F.cosine_similarity(base.detach().double(), adapted.detach().double(), dim=-1)  # [N]
    low = min(math.floor(cos.min().item() * 100) / 100, 0.99)  # a multiple of 0.01 below the smallest value
    counts, edges = np.histogram(cos.numpy(), bins=bins, range=(low, 1.0 + 1e-9))
    return Drift(mean=cos.mean().item(), median=cos.median().item(), p5=torch.quantile(cos, 0.05).item(),
                 min=cos.min().item(), counts=counts.tolist(), edges=[round(e, 6) for e in edges.tolist()])


def compare(base: Outputs, adapted: Outputs, labels: torch.Tensor, classes: Sequence[str],
            metadata: Sequence[dict[str, str]] | None = None, tolerance: float = 0.01, data: str = "") -> Comparison:
    """Metrics of both models, per-class and per-group deltas (regression: adapted < base - tolerance), drift."""
    before = classification_metrics(base.logits, labels, classes, metadata)
    after = classification_metrics(adapted.logits, labels, classes, metadata)
    right_before, right_after = base.logits.argmax(-1) == labels, adapted.logits.argmax(-1) == labels

    def delta(name: str, mask: torch.Tensor) -> Delta:
        old, new = right_before[mask].double().mean().item(), right_after[mask].double().mean().item()
        lost, gained = int((right_before & ~right_after & mask).sum()), int((~right_before & right_after & mask).sum())
        return Delta(name, int(mask.sum()), old, new, new < old - tolerance, lost, gained, mcnemar_p(lost, gained))

    per_class = [delta(c, labels == i) for i, c in enumerate(classes) if c in after.per_class]
    per_group = {column: [delta(value, torch.tensor([m.get(column) == value for m in metadata or []]))
                          for value in values] for column, values in after.groups.items()}
    drift = None
    if base.embeddings is not None and adapted.embeddings is not None:
        drift = embedding_drift(base.embeddings, adapted.embeddings)
    return Comparison(data=data, base=before, adapted=after, per_class=per_class, per_group=per_group, drift=drift,
                      tolerance=tolerance)


def points(share: float) -> str:
    """0.01 -> '1 point', 0.025 -> '2.5 points': an accuracy difference in percentage points."""
    value = 100 * share
    return f"{value:g} point" + ("" if value == 1 else "s")


def mcnemar_p(lost: int, gained: int) -> float:
    """Exact two-sided McNemar p-value: P(a split at least this uneven) for lost + gained fair coin flips."""
    n = lost + gained
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(lost, gained) + 1))
    return min(1.0, 2 * tail / 2 ** n)


# ---------------------------------------------------------------------------------------------- running models
def classifier_parts(classifier: nn.Module) -> tuple[Callable[[torch.Tensor], torch.Tensor], nn.Module]:
    """(images -> pooled features [N, D], head) of a vislora classifier or a timm model with its own head."""
    if hasattr(classifier, "features") and hasattr(classifier, "head"):
        return classifier.features, classifier.head
    if hasattr(classifier, "forward_features") and hasattr(classifier, "get_classifier"):  # timm
        return (lambda x: classifier.forward_head(classifier.forward_features(x), pre_logits=True),
                classifier.get_classifier())
    raise ConfigError(f"cannot split a {type(classifier).__name__} into features and a head; before/after "
                      "evaluation needs a classifier built by vislora (build_classifier) or a timm model")


@torch.no_grad()
def collect(model: AdaptedModel, batches: Iterable[dict[str, Any]], base_head: BaseHead = "trained") -> Collected:
    """Base and adapted outputs, labels and per-image rows {index, metadata} over `batches` of images.

    Each batch runs twice: with the adapters, then inside `model.disabled()`. base_head="trained" keeps the
    adapter's trained head for the base model; "original" uses the base model's own head.
    """
    if base_head not in ("trained", "original"):
        raise ConfigError(f"base_head must be 'trained' or 'original', got {base_head!r}")
    features, head = classifier_parts(model.base_model)
    was_training = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("base", "base_emb", "adapted", "adapted_emb", "labels")}
    rows: list[dict[str, Any]] = []
    skipped: list[int] = []
    try:
        for batch in batches:
            skipped += batch.get("skipped", [])
            if "image" not in batch:
                continue
            images = batch["image"]
            embeddings = features(images)  # [B, D]
            parts["adapted_emb"].append(embeddings.float())
            parts["adapted"].append(head(embeddings).float())
            with model.disabled():
                base_embeddings = features(images)
                if base_head == "original":
                    parts["base"].append(head(base_embeddings).float())
            if base_head == "trained":
                parts["base"].append(head(base_embeddings).float())
            parts["base_emb"].append(base_embeddings.float())
            parts["labels"].append(batch["label"])
            rows += [{"index": i, "metadata": m} for i, m in zip(batch["index"].tolist(), batch["metadata"],
                                                                  strict=True)]
    finally:
        model.train(was_training)
    if not rows:
        raise ConfigError("no readable image to evaluate: every image was skipped as corrupt")
    cat = {k: torch.cat(v) for k, v in parts.items()}
    return Collected(Outputs(cat["base"], cat["base_emb"]), Outputs(cat["adapted"], cat["adapted_emb"]),
                     cat["labels"], rows, skipped)


@contextlib.contextmanager
def recording_head(model: AdaptedModel) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Inside the block, every eval-mode call of the classifier's head appends (embeddings [B, D], logits [B, C]).

    An evaluation that already runs (the trainer's last one) then yields the adapted embeddings for free.
    """
    _, head = classifier_parts(model.base_model)
    records: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if not module.training:
            records.append((args[0].detach().float(), output.detach().float()))

    handle = head.register_forward_hook(hook)
    try:
        yield records
    finally:
        handle.remove()


@torch.no_grad()
def measure_latency(model: AdaptedModel, images: torch.Tensor, repeats: int = 5, warmup: int = 1) -> Latency:
    """Median wall time per batch of base (adapters off), unmerged and merged forward passes on `images`.

    The three alternate within each repeat, so a burst of load elsewhere hits them alike. "Merged" is a copy of
    the model with the adapters merged and every vislora wrapper removed (`unload(merge=True)`, what a deployment
    runs): it costs one more copy of the weights in memory, and `model` itself is never merged. An adapter that
    cannot merge (MoLoRA's gate depends on the input) gets no merged timing.
    """
    if model.merged:
        raise AdapterError("measure_latency needs an unmerged model; call unmerge() first")
    was_training = model.training
    model.eval()
    merged = _merged_copy(model)
    times: dict[str, list[float]] = {"base": [], "unmerged": [], "merged": []}
    merged_out = None
    try:
        for i in range(warmup + repeats):
            unmerged_seconds, unmerged_out = _timed(model, images)
            with model.disabled():
                base_seconds, _ = _timed(model, images)
            if merged is not None:
                merged_seconds, merged_out = _timed(merged, images)
            if i >= warmup:
                times["unmerged"].append(unmerged_seconds)
                times["base"].append(base_seconds)
                if merged is not None:
                    times["merged"].append(merged_seconds)
    finally:
        model.train(was_training)
    diff = math.nan
    if torch.is_tensor(merged_out) and torch.is_tensor(unmerged_out):
        diff = (merged_out - unmerged_out).abs().max().item()
    return Latency(batch_size=len(images), repeats=repeats, base=statistics.median(times["base"]),
                   unmerged=statistics.median(times["unmerged"]),
                   merged=statistics.median(times["merged"]) if times["merged"] else None, merged_max_abs_diff=diff)


def _timed(model: nn.Module, images: torch.Tensor) -> tuple[float, Any]:
    start = time.perf_counter()
    out = model(images)
    return time.perf_counter() - start, out


def _merged_copy(model: AdaptedModel) -> nn.Module | None:
    """A plain copy of the base model with the active adapters merged in, or None if they cannot merge."""
    clone = copy.deepcopy(model)
    try:
        return clone.unload(merge=True).eval()
    except AdapterError as exc:
        logger.info("no merged latency: %s", exc)
        return None
