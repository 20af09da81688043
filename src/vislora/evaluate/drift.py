"""Embedding drift: how far the adapter moves each image's pooled features away from the base model's.

drift_i = cos(base_i, adapted_i); summarised by mean, median, 5th percentile and minimum, with a histogram. A mean
below ~0.99 means indices or caches built from the base model's embeddings must be rebuilt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class Drift:
    """Cosine similarity between base and adapted embeddings of the same images, and its histogram."""

    mean: float
    median: float
    p5: float
    min: float
    counts: list[int]
    edges: list[float]


def embedding_drift(base: torch.Tensor, adapted: torch.Tensor, bins: int = 20) -> Drift:
    """Per-image cosine similarity of base [N, D] and adapted [N, D] embeddings: summary and histogram."""
    cos = F.cosine_similarity(base.detach().double(), adapted.detach().double(), dim=-1)  # [N]
    low = min(math.floor(cos.min().item() * 100) / 100, 0.99)  # a multiple of 0.01 below the smallest value
    counts, edges = np.histogram(cos.numpy(), bins=bins, range=(low, 1.0 + 1e-9))
    return Drift(mean=cos.mean().item(), median=cos.median().item(), p5=torch.quantile(cos, 0.05).item(),
                 min=cos.min().item(), counts=counts.tolist(), edges=[round(e, 6) for e in edges.tolist()])
