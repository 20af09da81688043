"""Adapter arithmetic: a new adapter from a weighted sum of loaded ones (negative weights: task arithmetic).

how="exact": sum_i w_i delta_i written as one LoRA whose rank per pair is the sum of the parts' ranks,
    A = [A_1; A_2; ...], B = [w_1 s_1 B_1, w_2 s_2 B_2, ...] with scale 1: the weighted sum of the deltas up
    to float rounding. q/k/v slices stay slices when every part uses the same ones.
how="svd": the weighted sum as a dense matrix per layer, truncated to `rank` singular triplets; the relative
    Frobenius error ||sum - approximation|| / ||sum|| is reported per layer. DoRA adapters enter with their
    whole change g (W + delta_W) - W, which is not low-rank, so only "svd" takes them.
Modules trained in full (heads) combine alike: original + sum_i w_i (copy_i - original).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from vislora.adapters.linear import LoraLayer
from vislora.config import AdapterConfig
from vislora.errors import AdapterError, ConfigError, VisloraWarning
from vislora.targets import QKV, Target, resolve_targets

HOWS = ("exact", "svd")
Part = tuple[float, str]  # (weight, adapter name)


@dataclass(frozen=True)
class LayerCombination:
    """One adapted weight of a combined adapter."""

    path: str
    rank: int
    relative_error: float  # ||sum of deltas - combined delta||_F / ||sum of deltas||_F; 0 for how="exact"


@dataclass(frozen=True)
class CombineReport:
    """What combine() built, layer by layer."""

    name: str
    how: str
    weights: dict[str, float]
    layers: list[LayerCombination]

    @property
    def max_relative_error(self) -> float:
        return max((layer.relative_error for layer in self.layers), default=0.0)

    def __str__(self) -> str:
        mix = " + ".join(f"{w:g} * {n}" for n, w in self.weights.items())
        lines = [f"adapter {self.name!r} = {mix} ({self.how}); {len(self.layers)} layers, "
                 f"max relative error {self.max_relative_error:.2e}"]
        lines += [f"  {layer.path:<48} rank {layer.rank:>4}  rel. error {layer.relative_error:.2e}"
                  for layer in self.layers]
        return "\n".join(lines)


def combine(model, weights: Mapping[str, float], name: str, how: str = "exact",
            rank: int | None = None) -> CombineReport:
    """Install adapter `name` on `model` (an AdaptedModel) as the weighted combination; see the module docstring."""
    weights = _checked(model, weights, name, how, rank)
    parts: dict[str, list[Part]] = {}
    targets: dict[str, Target] = {}
    for adapter, weight in weights.items():
        for target in model.plans[adapter].targets:
            parts.setdefault(target.path, []).append((weight, adapter))
            targets.setdefault(target.path, target)
    pairs, report = {}, []
    for path, layer_parts in parts.items():
        layer = model._layers[targets[path].module_path]
        slices = _common_slices(layer, layer_parts)
        if how == "exact":
            a, b, error = *_concatenate(layer, layer_parts, slices), 0.0
        else:
            a, b, error = _truncate(layer, layer_parts, slices, rank)
        if a.shape[0] == 0:  # nothing left in this layer (an AdaLoRA layer pruned to rank 0)
            continue
        pairs[path] = (slices, a, b)
        report.append(LayerCombination(path, a.shape[0] // max(1, len(slices)), error))
    if not pairs:
        raise AdapterError(f"the combination {weights} changes no layer: every part has rank 0 everywhere")
    saved = sorted({p for adapter in weights for p in model.plans[adapter].modules_to_save})
    config = _config(pairs, saved)
    model._install(name, config, resolve_targets(model.base_model, config))
    with torch.no_grad():
        for path, (_, a, b) in pairs.items():
            layer = model._layers[targets[path].module_path]
            layer.lora_A[name].copy_(a)
            layer.lora_B[name].copy_(b)
        for path in saved:
            _combine_saved(model._saved[path], weights, name)
    model._apply_active()
    return CombineReport(name, how, dict(weights), report)


def _checked(model, weights: Mapping[str, float], name: str, how: str, rank: int | None) -> dict[str, float]:
    if how not in HOWS:
        raise ConfigError(f"how={how!r} is not a way to combine adapters; use 'exact' (concatenated ranks, no error) "
                          "or 'svd' (truncated to `rank`, error reported)")
    if how == "exact" and rank is not None:
        raise ConfigError(f"rank={rank} applies to how='svd' only; an exact combination has the sum of the ranks")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"rank must be a positive integer, got {rank!r}")
    if not isinstance(weights, Mapping) or not weights:
        raise ConfigError(f"weights must map adapter names to numbers, e.g. {{'a': 0.7, 'b': 0.3}}; got {weights!r}")
    model._check_known(list(weights))
    bad = {k: v for k, v in weights.items() if not isinstance(v, (int, float)) or not math.isfinite(v)}
    if bad:
        raise ConfigError(f"combination weights must be finite numbers, got {bad}")
    if model.merged:
        raise AdapterError(f"adapters {list(model.active_adapters)} are merged into the weights; call unmerge() "
                           "before combining adapters")
    dora = [n for n in weights if model.configs[n].method == "dora"]
    if how == "exact" and dora:
        raise AdapterError(f"DoRA adapter(s) {dora} rescale the whole weight, so their change is not low-rank and "
                           "cannot be combined exactly; use how='svd' with a rank")
    experts = [n for n in weights if model.configs[n].method == "molora"]
    if experts:
        raise AdapterError(f"MoLoRA adapter(s) {experts} change W through an input-dependent gate: they have no "
                           "single delta to combine")
    model._check_new_name(name)
    return {k: float(v) for k, v in weights.items()}


def _common_slices(layer: LoraLayer, parts: list[Part]) -> tuple[int, ...]:
    """The parts' q/k/v slices if all share them (and none is DoRA, whose change covers every row), else ()."""
    specs = [layer.specs[adapter] for _, adapter in parts]
    if any(spec.method in ("dora", "adalora") for spec in specs) or len({spec.slices for spec in specs}) != 1:
        return ()  # AdaLoRA exports whole-weight pairs of its kept triplets
    return specs[0].slices


def _concatenate(layer: LoraLayer, parts: list[Part], slices: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """[A_1; A_2; ...] and [w_1 s_1 B_1, ...] in the stored layout: (S*R, in) and (S, d, R), or (R, in), (out, R)."""
    a_parts, b_parts = [], []
    for weight, adapter in parts:
        factor = weight * layer.specs[adapter].scale
        if slices:
            a, b, rank = layer.export_pair(adapter)
            a_parts.append(a.view(len(slices), rank, -1))  # (S, r, in)
            b_parts.append(b * factor)  # (S, d, r)
        else:
            a, b = layer.export_dense(adapter)
            a_parts.append(a)  # (P*r, in)
            b_parts.append(b * factor)  # (out, P*r)
    if slices:
        return torch.cat(a_parts, dim=1).flatten(0, 1), torch.cat(b_parts, dim=-1)
    return torch.cat(a_parts), torch.cat(b_parts, dim=1)


def _truncate(
    layer: LoraLayer, parts: list[Part], slices: tuple[int, ...], rank: int | None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-k pair for the weighted sum of the parts' changes, and its relative error."""
    total = sum(weight * layer.change(adapter) for weight, adapter in parts)  # (out, in)
    if rank is None:  # the largest rank one part had per pair
        rank = max(layer.export_pair(adapter)[2] * (1 if slices else layer.specs[adapter].n_pairs)
                   for _, adapter in parts)
    blocks = total.unflatten(0, (len(QKV), -1))[list(slices)] if slices else total[None]  # (P, rows, in)
    k = min(rank, *blocks.shape[1:])
    u, s, vh = torch.linalg.svd(blocks, full_matrices=False)  # (P, rows, m), (P, m), (P, m, in)
    root = s[:, :k].sqrt()  # (P, k)
    a = root[:, :, None] * vh[:, :k]  # (P, k, in)
    b = u[:, :, :k] * root[:, None, :]  # (P, rows, k)
    approx = b @ a  # (P, rows, in)
    norm = blocks.norm()
    error = ((blocks - approx).norm() / norm).item() if norm > 0 else 0.0
    return (a.flatten(0, 1), b, error) if slices else (a[0], b[0], error)


def _config(pairs: dict[str, tuple[tuple[int, ...], torch.Tensor, torch.Tensor]], saved: list[str]) -> AdapterConfig:
    """A config that resolves to exactly these targets, each with its own rank and scale 1 (alpha = rank)."""
    targets, ranks = [], {}
    for path, (slices, a, _) in pairs.items():
        exact = f"re:{re.escape(path)}"
        targets.append(f"{exact}[{','.join(QKV[s] for s in slices)}]" if slices else exact)
        ranks["^" + re.escape(path)] = a.shape[0] // max(1, len(slices))
    first = next(iter(ranks.values()))
    with warnings.catch_warnings():  # a combined rank is the sum of its parts by construction, not a mistake
        warnings.simplefilter("ignore", VisloraWarning)
        return AdapterConfig(rank=first, alpha=first, targets=targets, rank_pattern=ranks,
                             alpha_pattern={k: float(v) for k, v in ranks.items()}, modules_to_save=saved)


def _combine_saved(saved, weights: dict[str, float], name: str) -> None:
    """copy_name = original + sum_i w_i (copy_i - original), tensor by tensor (non-float buffers: the original's)."""
    original = saved.original_module.state_dict()
    combined = {}
    for key, value in original.items():
        if not value.is_floating_point():
            combined[key] = value
            continue
        combined[key] = value + sum((w * (saved.copies[a].state_dict()[key] - value)
                                     for a, w in weights.items() if a in saved.copies), torch.zeros_like(value))
    saved.copies[name].load_state_dict(combined)
