"""Pre-align a new DualEncoder: fit its projections (and temperature) on frozen tower features.

A `DualEncoder` that pairs two separately pretrained towers starts with random projections, so its zero-shot
classifier is chance. `prealign_projections` computes the frozen towers' pooled features once - images, and
prompts made from class names - and trains only `vision_proj`, `text_proj` and the logit scale with the symmetric
InfoNCE loss (same-class captions are positives). Cheap: the towers run once; the loop is matmuls.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vislora.dual_encoder import DualEncoder, pool_image
from vislora.errors import ConfigError
from vislora.tasks.clip import DEFAULT_TEMPLATES, class_prompts, contrastive_loss, same_label

logger = logging.getLogger(__name__)


@dataclass
class PrealignResult:
    """Loss at the first and last step, and the steps taken."""

    first_loss: float
    last_loss: float
    steps: int


@torch.no_grad()
def image_features(model: DualEncoder, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Frozen pooled image-tower features [n, width] of preprocessed images [n, 3, H, W]."""
    chunks = [pool_image(model.vision, images[i:i + batch_size], model.vision_pooling).float()
              for i in range(0, len(images), batch_size)]
    return torch.cat(chunks)


@torch.no_grad()
def text_features(model: DualEncoder, texts: list[str]) -> torch.Tensor:
    """Frozen pooled text-tower features [n, width] (the projection's input) of captions."""
    tokens = model.tokenize(texts)
    hidden = model.text(**tokens).last_hidden_state  # [n, tokens, width]
    if model.text_pooling == "cls":
        return hidden[:, 0].float()
    mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)).float()


def prealign_projections(model: DualEncoder, images: torch.Tensor, labels: Sequence[int], classes: Sequence[str],
                         templates: Sequence[str] = DEFAULT_TEMPLATES, steps: int = 300, batch_size: int = 256,
                         lr: float = 1e-3, seed: int = 0) -> PrealignResult:
    """Train `model`'s projections and logit scale in place on frozen features of `images` with captions made
    from `classes` (each image gets a random template each step)."""
    if not isinstance(model, DualEncoder):
        raise ConfigError(f"pre-alignment fits the new projections of a DualEncoder; a {type(model).__name__} "
                          "already has aligned towers")
    labels_t = torch.as_tensor(list(labels))
    if len(labels_t) != len(images):
        raise ConfigError(f"{len(images)} images but {len(labels_t)} labels; give one label per image")
    prompts = class_prompts(classes, templates, model.tokenizer)
    if any(len(p) != len(templates) for p in prompts):
        raise ConfigError("some prompts are too long for the text tower; shorten the templates")
    vision = image_features(model, images)  # [n, width_v]
    text = text_features(model, [p for group in prompts for p in group]).view(len(classes), len(templates), -1)
    params = [model.vision_proj.weight, model.text_proj.weight, model.logit_scale.log_scale]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        pick = torch.randint(len(vision), (min(batch_size, len(vision)),), generator=generator)
        template = torch.randint(len(templates), (len(pick),), generator=generator)
        batch_labels = labels_t[pick]
        image_emb = F.normalize(model.vision_proj(vision[pick]), dim=-1)  # [b, dim]
        text_emb = F.normalize(model.text_proj(text[batch_labels, template]), dim=-1)  # [b, dim]
        loss = contrastive_loss(image_emb, text_emb, model.logit_scale(), same_label(batch_labels))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    logger.info("pre-aligned projections: InfoNCE %.4f -> %.4f in %d steps", losses[0], losses[-1], steps)
    return PrealignResult(first_loss=losses[0], last_loss=losses[-1], steps=steps)
