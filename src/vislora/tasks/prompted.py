"""Prompted attributes: a dual encoder scores each attribute of a multi-label vocabulary by its text prompts.

Each attribute has a readable name (`task.class_names`, default the attribute itself) filled into every template;
the prompts' text embeddings are averaged and renormalised (prompt ensembling, `tasks.clip.text_classifier`):

    prompt_a   = normalize(mean_t encode_text(template_t.format(name_a)))      [A, dim]
    logit[i,a] = scale * <image_i, prompt_a> + bias                           [N, A]   (SigLIP-style logits)
    score      = sigmoid(logit), or a softmax over the logits of a single-choice group (tasks.multilabel)

`scale` and `bias` are the model's `LogitScale`. SigLIP models bring their own bias; the others (CLIP, open_clip,
an image backbone paired with a text encoder) get a learned scalar bias starting at 0 (`add_logit_bias`), so their
zero-shot scores are sigmoid(scale * cos). One shared bias shifts every attribute alike, which leaves each
attribute's ranking (its AP) unchanged; per-attribute thresholds tuned on validation data (`tune_thresholds`) are
what calibrates the decisions, zero-shot and after training.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vislora.adapters.saved import ModulesToSave
from vislora.data.attributes import AttributeSet
from vislora.errors import ConfigError
from vislora.tasks.clip import DEFAULT_TEMPLATES, text_classifier
from vislora.tasks.multilabel import attribute_scores, saved_attributes, saved_thresholds

PROMPTED_TASK = "prompted_multilabel"


def prompt_names(attributes: Sequence[str], class_names: Mapping[str, str]) -> list[str]:
    """The readable name of each attribute in its prompts: `class_names[a]`, else `a` itself. A `class_names` key
    that is no attribute, or an empty readable name, is an error naming it."""
    unknown = [key for key in class_names if key not in attributes]
    if unknown:
        raise ConfigError(f"task.class_names names {unknown}, which are not attributes ({', '.join(attributes[:20])}); "
                          "fix the keys, or add the attributes to task.multilabel.attributes")
    names = [str(class_names.get(a, a)) for a in attributes]
    empty = [a for a, name in zip(attributes, names, strict=True) if not name.replace("_", " ").strip()]
    if empty:
        raise ConfigError(f"attributes {empty} have no prompt name (task.class_names maps them to an empty text); "
                          "give each a readable name, e.g. class_names: {" + f"{empty[0]}: striped" + "}")
    return names


def add_logit_bias(model: nn.Module) -> None:
    """Give a dual encoder whose `LogitScale` has no bias a scalar one, 0.0 (in the base module and in every
    adapter's saved copy of it), so prompted runs can train and save it; a model with a bias keeps its own."""
    module = getattr(model, "logit_scale", None)
    if module is None:
        raise ConfigError(f"a {type(model).__name__} has no logit_scale; prompted attributes need a dual encoder "
                          "(vislora.dual_encoder.build_dual_encoder)")
    scales = [module.original_module, *module.copies.values()] if isinstance(module, ModulesToSave) else [module]
    for scale in scales:
        if scale.bias is None:
            scale.bias = nn.Parameter(torch.zeros((), device=scale.log_scale.device),
                                      requires_grad=scale.log_scale.requires_grad)


def logit_bias(model: nn.Module) -> torch.Tensor:
    """The model's logit bias (of the active adapter's copy when the logit scale is saved per adapter); 0.0 when it
    has none."""
    bias = model.logit_scale.bias
    return bias if bias is not None else torch.zeros(())


def prompted_logits(images: torch.Tensor, prompts: torch.Tensor, scale: torch.Tensor | float,
                    bias: torch.Tensor | float) -> torch.Tensor:
    """scale * images @ prompts.T + bias: logits [N, A] of L2-normalised image embeddings [N, dim] against
    attribute prompt embeddings [A, dim]."""
    return scale * images @ prompts.T + bias  # [N, dim] @ [dim, A] -> [N, A]


def attribute_prompts(model: Any, names: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
                      device: torch.device | str = "cpu",
                      embed: Callable[[list[str]], torch.Tensor] | None = None) -> torch.Tensor:
    """Prompt embeddings [A, dim] of the attributes' readable `names` through the model's text tower (and its
    active adapters, or `embed`), templates ensembled; gradients flow into the text tower's adapters."""
    return text_classifier(model, names, templates, device, embed=embed)


@dataclass(frozen=True)
class PromptedHead:
    """A prompted multi-label head of one model state (the base, or an adapter): attributes, their prompt
    embeddings, the logit scale and bias, and the per-attribute thresholds tuned for it."""

    attributes: AttributeSet
    prompts: torch.Tensor  # [A, dim], rows L2-normalised
    scale: float
    bias: float
    thresholds: torch.Tensor  # [A]

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logits [N, A] of image embeddings [N, dim]."""
        return prompted_logits(images.float(), self.prompts.to(images.device), self.scale, self.bias)

    def scores(self, images: torch.Tensor) -> torch.Tensor:
        """Scores [N, A] in [0, 1] (sigmoid; softmax within single-choice groups)."""
        return attribute_scores(self.logits(images), self.attributes)

    def predict(self, images: torch.Tensor) -> list[list[tuple[str, float]]]:
        """Per image, the attributes whose score reaches their threshold, with the score, highest first."""
        scores = self.scores(images).cpu()
        above = scores >= self.thresholds
        return [sorted(((self.attributes.names[a], float(row[a])) for a in torch.nonzero(hit).flatten().tolist()),
                       key=lambda item: -item[1]) for row, hit in zip(scores, above, strict=True)]


def prompted_head(model: Any, task: Mapping[str, Any], zero_shot: bool = False,
                  embed: Callable[[list[str]], torch.Tensor] | None = None,
                  scale: float | None = None, bias: float | None = None) -> PromptedHead:
    """The head a prompted run's task.json describes, computed with `model` (its active adapters, or `embed` for
    the prompts; `scale`/`bias` override the model's logit scale and bias); `zero_shot` takes the thresholds tuned
    for the base model (task.json `zero_shot_thresholds`) instead of the adapter's."""
    if task.get("task") != PROMPTED_TASK:
        raise ConfigError(f"task.json says {task.get('task')!r}; a prompted head needs a {PROMPTED_TASK} run's adapter")
    attributes = saved_attributes(task)
    names = list(task.get("class_names") or attributes.names)  # readable names, in attribute order
    if len(names) != len(attributes):
        raise ConfigError(f"task.json lists {len(names)} prompt names (class_names) for {len(attributes)} attributes; "
                          "the file was edited or is corrupt: retrain, or restore it")
    with torch.no_grad():
        prompts = attribute_prompts(model, names, task.get("templates") or DEFAULT_TEMPLATES, embed=embed)
        scale = float(model.logit_scale()) if scale is None else scale
        bias = float(logit_bias(model)) if bias is None else bias
    saved = {**task, "thresholds": task.get("zero_shot_thresholds")} if zero_shot else task
    return PromptedHead(attributes, prompts.float().cpu(), scale, bias, saved_thresholds(saved))
