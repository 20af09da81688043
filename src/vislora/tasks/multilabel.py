"""Multi-label tagging: a classifier with one logit per attribute, its losses, its scores, its saved thresholds.

The model is `build_classifier(spec, len(attributes))` (vislora.tasks.classification). Attributes outside
single-choice groups are independent yes/no outputs; each single-choice group is one choice among its attributes.

Scores: sigmoid(logit) per free attribute; softmax over the group's logits within a single-choice group.

Loss, averaged over the batch and over the decisions (free attributes + single-choice groups):

    loss = (sum_free l_a + sum_groups CE_g) / (free attributes + groups)

- bce:        l_a = -(w_a y log p + (1 - y) log(1 - p)), p = sigmoid(x), w_a the positive weight (pos_weight)
- asymmetric: ASL (Ridnik et al. 2021): p_m = max(p - clip, 0),
              l_a = -(w_a y (1 - p)^gamma_pos log p + (1 - y) p_m^gamma_neg log(1 - p_m))
- CE_g: cross-entropy over the group's logits, target the group's one label.

Without groups and with w = 1, bce is torch's `binary_cross_entropy_with_logits` (mean).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from vislora.data.attributes import AttributeSet
from vislora.errors import ConfigError

LossKind = Literal["bce", "asymmetric"]
ASL_EPS = 1e-8  # log clamp of the asymmetric loss, as the reference implementation


@dataclass(frozen=True)
class MultilabelLoss:
    """The loss of a multi-label head over `attributes` (see the module docstring); `pos_weight` [attributes] or
    None."""

    attributes: AttributeSet
    kind: LossKind = "bce"
    pos_weight: torch.Tensor | None = None
    gamma_neg: float = 4.0
    gamma_pos: float = 0.0
    clip: float = 0.05

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean loss of logits [B, A] against multi-hot targets [B, A]."""
        groups = self.attributes.group_indices()
        grouped = {i for members in groups.values() for i in members}
        free = [i for i in range(logits.shape[1]) if i not in grouped]
        total = logits.new_zeros(())
        if free:
            x, y = logits[:, free], targets[:, free].to(logits.dtype)  # [B, F]
            weight = None if self.pos_weight is None else self.pos_weight[free].to(logits)
            per = self._binary(x, y, weight)  # [B, F]
            total = total + per.sum(1).mean()
        for members in groups.values():
            index = targets[:, members].argmax(1)  # [B]: the group's one label
            total = total + F.cross_entropy(logits[:, members], index)
        return total / (len(free) + len(groups))

    def _binary(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        if self.kind == "bce":
            return F.binary_cross_entropy_with_logits(x, y, pos_weight=weight, reduction="none")
        p = torch.sigmoid(x)
        p_m = (p - self.clip).clamp(min=0) if self.clip > 0 else p  # probability shifting of negatives
        positive = (1 - p).pow(self.gamma_pos) * torch.log(p.clamp(min=ASL_EPS))
        negative = p_m.pow(self.gamma_neg) * torch.log((1 - p_m).clamp(min=ASL_EPS))
        if weight is not None:
            positive = positive * weight
        return -(y * positive + (1 - y) * negative)


def pos_weights(setting: str | Mapping[str, float], attributes: AttributeSet, counts: Mapping[str, int],
                n_images: int) -> torch.Tensor | None:
    """Positive weights [attributes]: None for 'none'; 'auto' = negatives / positives of each attribute in training
    (1.0 for an attribute without positives); a mapping name -> weight (unnamed attributes 1.0)."""
    if setting == "none":
        return None
    if setting == "auto":
        return torch.tensor([(n_images - counts[a]) / counts[a] if counts[a] else 1.0 for a in attributes.names])
    if isinstance(setting, Mapping):
        unknown = [name for name in setting if name not in attributes.names]
        if unknown:
            raise ConfigError(f"task.multilabel.pos_weight names {unknown}, which are not attributes "
                              f"({', '.join(attributes.names[:20])}); fix the names")
        return torch.tensor([float(setting.get(a, 1.0)) for a in attributes.names])
    raise ConfigError(f"task.multilabel.pos_weight must be none, auto or a mapping attribute -> weight, got "
                      f"{setting!r}")


def attribute_scores(logits: torch.Tensor, attributes: AttributeSet) -> torch.Tensor:
    """Scores [B, A] in [0, 1]: sigmoid per attribute, softmax within each single-choice group."""
    scores = torch.sigmoid(logits)
    for members in attributes.group_indices().values():
        scores[:, members] = torch.softmax(logits[:, members], dim=-1)
    return scores


def saved_attributes(task: Mapping[str, Any]) -> AttributeSet:
    """The AttributeSet a multilabel task.json records."""
    if "attributes" not in task:
        raise ConfigError("this task.json has no `attributes`: it is not a multilabel adapter of `vislora train`")
    return AttributeSet.from_dict(task["attributes"])


def saved_thresholds(task: Mapping[str, Any], default: float = 0.5) -> torch.Tensor:
    """The per-attribute thresholds [A] a multilabel task.json records (`default` for each when none were tuned)."""
    names = saved_attributes(task).names
    tuned = (task.get("thresholds") or {}).get("values")
    if tuned is None:
        return torch.full((len(names),), default)
    return torch.tensor(tuned, dtype=torch.float32)


def exported_task(task: Mapping[str, Any] | None) -> dict[str, Any]:
    """What an export (merged folder, ONNX) records of the adapter's task.json so the tags can be read off its
    logits: the task kind, and for multilabel adapters the attributes and thresholds."""
    return {k: v for k, v in (task or {}).items() if k in ("task", "attributes", "thresholds")}
