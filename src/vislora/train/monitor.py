"""Gradient-flow monitoring: per-layer gradient norms of the adapter weights, logged every step, with warnings.

Opt in with `run.monitor_gradients: true` (or pass `GradientMonitor()` in Trainer's callbacks). The norm of a
layer is ||(grad A, grad B[, grad m])||_2 over its trainable adapters, read in `on_gradients`: complete (after
accumulation and the data-parallel all-reduce) and before clipping. A's gradient is zero while B is zero
(B^T dL/dh = 0 at initialisation), so the pair is judged together, never A alone.

- vanishing: a layer's norm is below `vanishing_ratio` x the median layer norm of the same step (all layers
  zero: every one of them);
- exploding: a layer's norm is NaN/Inf, or above `exploding_ratio` x the median of its own last `window` norms.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import defaultdict, deque

import torch

from vislora.model import AdaptedModel
from vislora.train.callbacks import TrainerCallback
from vislora.train.view import TrainerView

logger = logging.getLogger(__name__)

MIN_HISTORY = 3  # steps of a layer's own history before a spike can be called exploding


def layer_gradient_norms(model: AdaptedModel) -> dict[str, float]:
    """||gradient|| of every adapter layer's trainable adapter tensors (A, B and what the method adds), by layer path.

    A trainable parameter without a gradient counts as zero: nothing reached it.
    """
    norms = {}
    for path, layer in model.layers().items():
        params = [p for adapter in layer.adapters.values() for p in adapter.parameters() if p.requires_grad]
        if not params:
            continue
        squares = [p.grad.detach().float().square().sum() for p in params if p.grad is not None]
        norms[path] = float(torch.stack(squares).sum().sqrt()) if squares else 0.0
    return norms


class GradientMonitor(TrainerCallback):
    """Logs `grad_norm/<layer>` plus min/median/max and counts of vanishing/exploding layers every logged step."""

    def __init__(self, vanishing_ratio: float = 1e-3, exploding_ratio: float = 100.0, window: int = 20) -> None:
        self.vanishing_ratio = vanishing_ratio
        self.exploding_ratio = exploding_ratio
        self.norms: dict[str, float] = {}
        self.vanishing: list[str] = []
        self.exploding: list[str] = []
        self._history: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=window))
        self._warned: set[tuple[str, str]] = set()

    def on_gradients(self, trainer: TrainerView) -> None:
        self.observe(layer_gradient_norms(trainer.adapted), trainer.loop.step + 1)

    def observe(self, norms: dict[str, float], step: int) -> None:
        """Judge one step's layer norms against each other and against each layer's history; warn once per layer."""
        self.norms = norms
        finite = [v for v in norms.values() if math.isfinite(v)]
        median = statistics.median(finite) if finite else 0.0
        if median > 0:
            self.vanishing = [p for p, v in norms.items() if v < self.vanishing_ratio * median]
        else:
            self.vanishing = [p for p, v in norms.items() if v == 0]
        self.exploding = [p for p, v in norms.items() if not math.isfinite(v) or (
            len(self._history[p]) >= MIN_HISTORY and v > self.exploding_ratio * statistics.median(self._history[p]))]
        for path, value in norms.items():
            if math.isfinite(value):
                self._history[path].append(value)
        self._warn("vanishing", self.vanishing, step, f"below {self.vanishing_ratio:g} x the median layer "
                   f"({median:.2e})")
        self._warn("exploding", self.exploding, step, f"NaN/Inf or above {self.exploding_ratio:g} x the layer's "
                   "recent median")

    def _warn(self, kind: str, paths: list[str], step: int, rule: str) -> None:
        new = [p for p in paths if (kind, p) not in self._warned]
        if not new:
            return
        self._warned.update((kind, p) for p in new)
        shown = ", ".join(f"{p} ({self.norms[p]:.2e})" for p in new[:3]) + (" ..." if len(new) > 3 else "")
        logger.warning("step %d: %s gradients in %d adapter layers, %s: %s", step, kind, len(new), rule, shown)

    def metrics(self, trainer: TrainerView) -> dict[str, float]:
        if not self.norms:
            return {}
        values = list(self.norms.values())
        return {**{f"grad_norm/{p}": v for p, v in self.norms.items()},
                "grad_norm_min": min(values), "grad_norm_median": statistics.median(values),
                "grad_norm_max": max(values), "grad_vanishing": len(self.vanishing),
                "grad_exploding": len(self.exploding)}
