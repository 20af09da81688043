"""Latency of an adapted model: the base model (adapters off), the adapters unmerged, and the adapters merged.

Each is the median wall time per batch of the same images. Merged is what a deployment runs (a copy with the
adapters folded into the weights, W' = W + scale * B @ A, and every vislora wrapper removed), so it should cost
what the base model costs.
"""

from __future__ import annotations

import copy
import logging
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vislora.errors import AdapterError
from vislora.model import AdaptedModel

logger = logging.getLogger(__name__)


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
    if images.is_cuda:  # the GPU runs the pass after the call returns: wait for it before reading the clock
        torch.cuda.synchronize(images.device)
    return time.perf_counter() - start, out


def _merged_copy(model: AdaptedModel) -> nn.Module | None:
    """A plain copy of the base model with the active adapters merged in, or None if they cannot merge."""
    clone = copy.deepcopy(model)
    try:
        return clone.unload(merge=True).eval()
    except AdapterError as exc:
        logger.info("no merged latency: %s", exc)
        return None
