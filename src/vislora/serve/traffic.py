"""Rollouts: a name that splits requests between adapters by weight, with an optional shadow (an adapter, or
"@base": the base model) whose runs are compared with the primary's (`record_shadow`).

Draws come from one seeded generator, so a server started with the same seed and fed the same sequence of
requests splits them the same way.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass

import torch

from vislora.serve.batcher import Job
from vislora.serve.config import BASE_SHADOW, RolloutConfig
from vislora.serve.metrics import NO_ADAPTER, ServeMetrics
from vislora.serve.records import LoadedAdapter, top1

Computed = tuple[torch.Tensor | None, torch.Tensor]  # (logits or None, features) of one sample


@dataclass(frozen=True)
class Assignment:
    """Who computes one request: the adapter whose answer is returned, and maybe a shadow."""

    adapter: str | None
    rollout: str | None = None  # the rollout the request named, if any
    shadow: str | None = None

    def counted(self) -> list[str]:
        """The adapters this request is counted in flight for (the base model needs no count)."""
        return [n for n in (self.adapter, self.shadow) if n is not None and n != BASE_SHADOW]


def shadow_route(shadow: str | None) -> str | None:
    """The route of a shadow run: its adapter, or None (the base model) for "@base"."""
    return None if shadow == BASE_SHADOW else shadow


class TrafficPolicy:
    """Named rollouts (feature-flag style) resolved with a seeded generator; thread-safe."""

    def __init__(self, rollouts: dict[str, RolloutConfig] | None = None, seed: int = 0) -> None:
        self._rollouts: dict[str, RolloutConfig] = dict(rollouts or {})
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    @property
    def rollouts(self) -> dict[str, RolloutConfig]:
        """A copy of the rollouts by name."""
        with self._lock:
            return dict(self._rollouts)

    def set(self, name: str, rollout: RolloutConfig) -> None:
        with self._lock:
            self._rollouts[name] = rollout

    def remove(self, name: str) -> RolloutConfig | None:
        with self._lock:
            return self._rollouts.pop(name, None)

    def using(self, adapter: str) -> list[str]:
        """Rollouts that send traffic (primary or shadow) to `adapter`."""
        with self._lock:
            return sorted(name for name, r in self._rollouts.items() if adapter in r.adapters())

    def assign(self, name: str | None) -> Assignment:
        """The rollout's weighted draw (and shadow draw) if `name` is a rollout; else `name` itself."""
        with self._lock:
            rollout = self._rollouts.get(name) if name is not None else None
            if rollout is None:
                return Assignment(name)
            names = [n for n, w in rollout.weights.items() if w > 0]
            adapter = self._rng.choices(names, weights=[rollout.weights[n] for n in names])[0]
            shadow = rollout.shadow if rollout.shadow and self._rng.random() < rollout.shadow_fraction else None
        return Assignment(adapter, name, shadow if shadow != adapter else None)


def record_shadow(metrics: ServeMetrics, job: Job, primary: Computed, shadow: Computed,
                  records: dict[str, LoadedAdapter], base_classes: tuple[str, ...] | None = None
                  ) -> tuple[float, str | None]:
    """Record 1 - cosine of a shadow run's features against its primary's, and whether their top-1 labels agree
    when both predict labels (texts do not; nor a base shadow without `base_classes`). A rollout's primary is
    always an adapter; its shadow an adapter or "@base", whose cosine is also the drift against the base
    (vislora_base_cosine{rollout, adapter}). Returns the drift and the shadow's top-1 label (None without class
    scores)."""
    (logits, features), (shadow_logits, shadow_features) = primary, shadow
    cosine = float(torch.nn.functional.cosine_similarity(features, shadow_features, dim=0))
    base = job.shadow == BASE_SHADOW
    label = top1(logits, records[job.adapter].classes)
    shadow_label = top1(shadow_logits, base_classes if base else records[job.shadow].classes)
    if label is not None and shadow_label is not None:
        metrics.shadow.labels(job.rollout, job.adapter, job.shadow, str(label == shadow_label).lower()).inc()
    drift = max(1.0 - cosine, 0.0)
    metrics.drift.labels(job.rollout).observe(drift)
    if base:
        metrics.base_cosine.labels(job.rollout, job.adapter).observe(cosine)
    metrics.samples.labels(NO_ADAPTER if base else job.shadow, "shadow").inc()
    return drift, shadow_label
