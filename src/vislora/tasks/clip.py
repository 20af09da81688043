"""CLIP-style tasks on dual encoders: contrastive loss, zero-shot prompt classifiers, few-shot support sets,
retrieval recall, and CLIP-LoRA's few-shot recipe.

    logits = scale * image_emb @ text_emb.T        [images, texts], embeddings L2-normalised
    InfoNCE = (CE(logits, positives) + CE(logits.T, positives.T)) / 2
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from vislora.config import AdapterConfig
from vislora.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATES = ("a photo of a {}.",)
# CLIP-LoRA (Zanella & Ben Ayed, 2024): both towers, q/k/v, r=2, alpha=1, alpha/sqrt(r), dropout 0.25,
# AdamW lr 2e-4, cosine, 500 x shots iterations, batch 32.
CLIP_LORA = {"targets": ["q", "k", "v"], "rank": 2, "alpha": 1.0, "use_rslora": True, "dropout": 0.25}


# ---------------------------------------------------------------------------------------------- losses
def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, scale: torch.Tensor,
                     positives: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of pairs; embeddings [batch, dim] are L2-normalised.

    `positives` [batch, batch] (bool) marks which texts match which images; default: the diagonal. With
    `same_label(labels)` the captions of other images of the same class (other templates, other wordings) are
    positives too, the target spread evenly over them, instead of negatives. (Identical captions need no such
    help: their equal embeddings give the diagonal loss the same value and gradient.)
    """
    logits = scale * image_emb @ text_emb.T  # [images, texts]
    if positives is None:
        target = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    weights = positives.float()
    per_image = -(weights / weights.sum(1, keepdim=True) * F.log_softmax(logits, dim=1)).sum(1)
    per_text = -(weights.T / weights.T.sum(1, keepdim=True) * F.log_softmax(logits.T, dim=1)).sum(1)
    return (per_image.mean() + per_text.mean()) / 2


def sigmoid_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                 positives: torch.Tensor | None = None) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss: -sum log sigmoid(z_ij * (scale * <x_i, y_j> + bias)) / batch, z = +-1."""
    logits = scale * image_emb @ text_emb.T + bias  # [images, texts]
    if positives is None:
        positives = torch.eye(len(logits), dtype=torch.bool, device=logits.device)
    signs = positives.float() * 2 - 1
    return -F.logsigmoid(signs * logits).sum() / len(logits)


def same_label(labels: torch.Tensor) -> torch.Tensor | None:
    """[batch, batch] bool: True where two samples share a class; None for unlabelled samples (label -1)."""
    if (labels < 0).any():
        return None
    return labels[:, None] == labels[None, :]


# ---------------------------------------------------------------------------------------------- prompts
def class_prompts(classes: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
                  tokenizer: Any = None) -> list[list[str]]:
    """Prompts per class: every template filled with the class name (`{}` marks where it goes).

    A class whose name is empty, or whose every prompt would be cut by the tokenizer before the class name
    ends, is an error naming the class and the fix.
    """
    bad_templates = [t for t in templates if t.count("{}") != 1]
    if not templates or bad_templates:
        raise ConfigError(f"prompt templates need exactly one '{{}}' for the class name; got {bad_templates or []} "
                          "(example: 'a photo of a {}.')")
    prompts = []
    for name in classes:
        clean = " ".join(str(name).replace("_", " ").split())
        if not clean:
            raise ConfigError(f"class name {name!r} is empty: a prompt needs a name; give the classes readable "
                              "names (task.class_names)")
        filled = [t.format(clean) for t in templates]
        usable = [p for p in filled if tokenizer is None or _fits(tokenizer, p, clean)]
        if not usable:
            raise ConfigError(f"class {name!r} has no usable prompt: all {len(filled)} prompts are longer than the "
                              f"text encoder's {tokenizer.max_length} tokens before the class name ends; shorten "
                              "the class name or the templates")
        prompts.append(usable)
    return prompts


def _fits(tokenizer: Any, prompt: str, name: str) -> bool:
    """The class name ends inside the token limit (one token kept for the end-of-text token)."""
    head = prompt[: prompt.index(name) + len(name)]
    return tokenizer.token_count(head) <= tokenizer.max_length


def text_classifier(model: Any, classes: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
                    device: torch.device | str = "cpu",
                    embed: Callable[[list[str]], torch.Tensor] | None = None) -> torch.Tensor:
    """Class weights [classes, dim] from prompts: per class the mean of its prompts' embeddings, renormalised
    (prompt ensembling). Gradients flow, so the text tower's adapters train through it. `embed` (texts -> [n, dim]
    L2-normalised) replaces `model.embed_texts`, e.g. to route the prompts through one adapter."""
    prompts = class_prompts(classes, templates, model.tokenizer)
    flat = [p for group in prompts for p in group]
    embeddings = embed(flat) if embed is not None else model.embed_texts(flat, device)  # [prompts, dim]
    owner = torch.tensor([i for i, group in enumerate(prompts) for _ in group], device=embeddings.device)
    sums = torch.zeros(len(classes), embeddings.shape[1], device=embeddings.device).index_add(0, owner, embeddings)
    return F.normalize(sums, dim=-1)


def prompt_logits(model: Any, images: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """scale * image_emb @ classifier.T: logits [batch, classes]."""
    return model.logit_scale() * model.encode_image(images) @ classifier.T


# ---------------------------------------------------------------------------------------------- few-shot
def sample_shots(labels: Sequence[int], shots: int, seed: int = 0) -> list[int]:
    """`shots` indices per class (K-shot support set), the same for the same seed; sorted."""
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    short = {c: len(v) for c, v in by_class.items() if len(v) < shots}
    if short:
        raise ConfigError(f"{shots}-shot sampling needs {shots} images per class; classes {short} have fewer. Lower "
                          "task.shots or add images")
    rng = random.Random(seed)
    return sorted(i for c in sorted(by_class) for i in rng.sample(by_class[c], shots))


def clip_lora_config(model: Any, **overrides: Any) -> AdapterConfig:
    """CLIP-LoRA's adapter: q, k, v in both towers, r=2, alpha=1, rsLoRA scaling, dropout 0.25 (any field
    overridable); the projections are left as they are, as in the paper."""
    from vislora.towers import tower_adapter_config

    fields = {**CLIP_LORA, **overrides}
    targets = fields.pop("targets")
    return tower_adapter_config(model, targets, targets, train_heads=False, **fields)


# ---------------------------------------------------------------------------------------------- retrieval
@dataclass
class RetrievalResult:
    """recall@k in both directions; a query counts as found when any of its matches is in the top k."""

    image_to_text: dict[int, float]
    text_to_image: dict[int, float]

    def metrics(self) -> dict[str, float]:
        return {**{f"i2t_r@{k}": v for k, v in self.image_to_text.items()},
                **{f"t2i_r@{k}": v for k, v in self.text_to_image.items()}}


def retrieval_recall(image_emb: torch.Tensor, text_emb: torch.Tensor, text_image: Sequence[int] | torch.Tensor,
                     ks: Sequence[int] = (1, 5, 10)) -> RetrievalResult:
    """Recall@k of image->text and text->image search; `text_image[j]` is the image caption j describes.

    image_emb [images, dim], text_emb [texts, dim]; an image with several captions is found by any of them.
    """
    owner = torch.as_tensor(text_image, device=image_emb.device)  # [texts]
    if len(owner) != len(text_emb):
        raise ConfigError(f"text_image has {len(owner)} entries for {len(text_emb)} captions; give the image index "
                          "of every caption")
    similarity = image_emb @ text_emb.T  # [images, texts]
    match = owner[None, :] == torch.arange(len(image_emb), device=owner.device)[:, None]  # [images, texts]
    i2t_rank = _first_hit_rank(similarity, match)
    t2i_rank = _first_hit_rank(similarity.T, match.T)
    return RetrievalResult({k: (i2t_rank < k).float().mean().item() for k in ks},
                           {k: (t2i_rank < k).float().mean().item() for k in ks})


def _first_hit_rank(similarity: torch.Tensor, match: torch.Tensor) -> torch.Tensor:
    """0-based rank of each query's best-ranked match: [queries]."""
    order = similarity.argsort(dim=1, descending=True)  # [queries, candidates]
    hits = match.gather(1, order)
    rank = hits.float().argmax(dim=1)  # first True
    return torch.where(hits.any(dim=1), rank, torch.full_like(rank, hits.shape[1]))  # no match: never found
