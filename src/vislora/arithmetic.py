"""Adapter arithmetic: a new adapter from a weighted sum of loaded ones (negative weights: task arithmetic).

how="exact": sum_i w_i delta_i written as one LoRA whose rank per pair is the sum of the parts' ranks,
    A = [A_1; A_2; ...], B = [w_1 s_1 B_1, w_2 s_2 B_2, ...] with scale 1: the weighted sum of the deltas up
    to float rounding. q/k/v blocks stay blocks when every part uses the same ones.
how="svd": the weighted sum as a dense matrix per layer, truncated to `rank` singular triplets; the relative
    Frobenius error ||sum - approximation|| / ||sum|| is reported per layer. Adapters whose change of W is not
    low-rank (DoRA's g (W + delta_W) - W) enter only here.
Modules trained in full (heads) combine alike: original + sum_i w_i (copy_i - original).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from vislora.adapters.layer import LoraLayer
from vislora.adapters.layout import Blocks, Whole
from vislora.adapters.methods import method_class
from vislora.config import AdapterConfig
from vislora.errors import AdapterError, ConfigError, VisloraWarning
from vislora.model import AdaptedModel, AdapterWeights
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


def combine(model: AdaptedModel, weights: Mapping[str, float], name: str, how: str = "exact",
            rank: int | None = None) -> CombineReport:
    """Add adapter `name` = sum of weights[a] * (adapter a's change of W) to `model`; negative weights subtract.

    how="exact" concatenates the ranks (equal to the weighted sum of deltas up to float rounding); how="svd"
    truncates the summed delta of each layer to `rank` (default: the largest contributing rank) and reports the
    relative approximation error per layer. The new adapter is not activated.
    """
    weights = _checked(model, weights, name, how, rank)
    parts: dict[str, list[Part]] = {}
    targets: dict[str, Target] = {}
    for adapter, weight in weights.items():
        for target in model.plans[adapter].targets:
            parts.setdefault(target.path, []).append((weight, adapter))
            targets.setdefault(target.path, target)
    layers = model.layers()
    pairs, report = {}, []
    for path, layer_parts in parts.items():
        layer = layers[targets[path].module_path]
        layout = _common_layout(layer, layer_parts)
        if how == "exact":
            a, b, error = *_concatenate(layer, layer_parts, layout), 0.0
        else:
            a, b, error = _truncate(layer, layer_parts, layout, rank)
        if a.shape[0] == 0:  # nothing left in this layer (an AdaLoRA layer pruned to rank 0)
            continue
        pairs[path] = (layout, a, b)
        report.append(LayerCombination(path, a.shape[0] // layout.pairs, error))
    if not pairs:
        raise AdapterError(f"the combination {weights} changes no layer: every part has rank 0 everywhere")
    saved = sorted({p for adapter in weights for p in model.plans[adapter].modules_to_save})
    config = _config(pairs, saved)
    tensors = {path: {"lora_A": a, "lora_B": b} for path, (_, a, b) in pairs.items()}
    modules = {path: _combine_saved(model, path, weights) for path in saved}
    model.install(name, AdapterWeights(config, resolve_targets(model.base_model, config), tensors, modules,
                                       f"combine({weights})"), activate=False)
    return CombineReport(name, how, dict(weights), report)


def _checked(model: AdaptedModel, weights: Mapping[str, float], name: str, how: str, rank: int | None
             ) -> dict[str, float]:
    if how not in HOWS:
        raise ConfigError(f"how={how!r} is not a way to combine adapters; use 'exact' (concatenated ranks, no error) "
                          "or 'svd' (truncated to `rank`, error reported)")
    if how == "exact" and rank is not None:
        raise ConfigError(f"rank={rank} applies to how='svd' only; an exact combination has the sum of the ranks")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"rank must be a positive integer, got {rank!r}")
    if not isinstance(weights, Mapping) or not weights:
        raise ConfigError(f"weights must map adapter names to numbers, e.g. {{'a': 0.7, 'b': 0.3}}; got {weights!r}")
    model.check_known(list(weights))
    bad = {k: v for k, v in weights.items() if not isinstance(v, (int, float)) or not math.isfinite(v)}
    if bad:
        raise ConfigError(f"combination weights must be finite numbers, got {bad}")
    if model.merged:
        raise AdapterError(f"adapters {list(model.active_adapters)} are merged into the weights; call unmerge() "
                           "before combining adapters")
    methods = {n: method_class(model.configs[n]) for n in weights}
    refusing = [n for n, method in methods.items() if method.refusal is not None]
    if refusing:
        method = methods[refusing[0]]
        raise AdapterError(f"{method.__name__} adapter(s) {refusing} cannot be combined: each is {method.refusal}, "
                           "so there is no single delta to combine")
    not_low_rank = [n for n, method in methods.items() if not method.exact_sum]
    if how == "exact" and not_low_rank:
        method = methods[not_low_rank[0]]
        raise AdapterError(f"{method.__name__} adapter(s) {not_low_rank} change W by more than a low-rank delta, so "
                           "they cannot be combined exactly; use how='svd' with a rank")
    model.check_new_name(name)
    return {k: float(v) for k, v in weights.items()}


def _common_layout(layer: LoraLayer, parts: list[Part]) -> Whole:
    """The parts' q/k/v blocks if they all export in them, else the whole weight (a change that covers every row,
    AdaLoRA's whole-weight export, parts on different blocks)."""
    layouts = {layer.adapters[adapter].export_pair().layout if layer.adapters[adapter].exact_sum else Whole()
               for _, adapter in parts}
    return layouts.pop() if len(layouts) == 1 else Whole()


def _concatenate(layer: LoraLayer, parts: list[Part], layout: Whole) -> tuple[torch.Tensor, torch.Tensor]:
    """[A_1; A_2; ...] and [w_1 s_1 B_1, ...] in the layer's layout: (S*R, in) and (S, d, R), or (R, in), (out, R)."""
    a_parts, b_parts = [], []
    for weight, adapter in parts:
        module = layer.adapters[adapter]
        pair = module.export_pair()
        factor = weight * module.scale
        if isinstance(layout, Blocks):
            a_parts.append(pair.a.view(layout.pairs, pair.rank, -1))  # (S, r, in)
            b_parts.append(pair.b * factor)  # (S, d, r)
        else:
            a_parts.append(pair.a)  # (P*r, in)
            b_parts.append(pair.dense_b() * factor)  # (out, P*r)
    if isinstance(layout, Blocks):
        return torch.cat(a_parts, dim=1).flatten(0, 1), torch.cat(b_parts, dim=-1)
    return torch.cat(a_parts), torch.cat(b_parts, dim=1)


def _truncate(layer: LoraLayer, parts: list[Part], layout: Whole, rank: int | None
              ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-k pair for the weighted sum of the parts' changes, and its relative error."""
    total = sum(weight * layer.change(adapter) for weight, adapter in parts)  # (out, in)
    if rank is None:  # the largest rank one part had per pair
        rank = max(layer.adapters[adapter].export_pair().rank * (1 if layout.blocks else
                                                                 layer.adapters[adapter].layout.pairs)
                   for _, adapter in parts)
    blocks = torch.stack(layout.parts(total))  # (P, rows, in)
    k = min(rank, *blocks.shape[1:])
    u, s, vh = torch.linalg.svd(blocks, full_matrices=False)  # (P, rows, m), (P, m), (P, m, in)
    root = s[:, :k].sqrt()  # (P, k)
    a = root[:, :, None] * vh[:, :k]  # (P, k, in)
    b = u[:, :, :k] * root[:, None, :]  # (P, rows, k)
    approx = b @ a  # (P, rows, in)
    norm = blocks.norm()
    error = ((blocks - approx).norm() / norm).item() if norm > 0 else 0.0
    return (a.flatten(0, 1), b, error) if layout.blocks else (a[0], b[0], error)


def _config(pairs: dict[str, tuple[Whole, torch.Tensor, torch.Tensor]], saved: list[str]) -> AdapterConfig:
    """A config that resolves to exactly these targets, each with its own rank and scale 1 (alpha = rank)."""
    targets, ranks = [], {}
    for path, (layout, a, _) in pairs.items():
        exact = f"re:{re.escape(path)}"
        targets.append(f"{exact}[{','.join(QKV[s] for s in layout.blocks)}]" if layout.blocks else exact)
        ranks["^" + re.escape(path)] = a.shape[0] // layout.pairs
    first = next(iter(ranks.values()))
    with warnings.catch_warnings():  # a combined rank is the sum of its parts by construction, not a mistake
        warnings.simplefilter("ignore", VisloraWarning)
        return AdapterConfig(rank=first, alpha=first, targets=targets, rank_pattern=ranks,
                             alpha_pattern={k: float(v) for k, v in ranks.items()}, modules_to_save=saved)


def _combine_saved(model: AdaptedModel, path: str, weights: dict[str, float]) -> dict[str, torch.Tensor]:
    """original + sum_i w_i (copy_i - original), tensor by tensor (non-float buffers: the original's)."""
    original = model.tree.saved[path].original_module.state_dict()
    copies = {a: model.saved_modules(a)[path].state_dict() for a in weights if path in model.saved_modules(a)}
    combined = {}
    for key, value in original.items():
        if not value.is_floating_point():
            combined[key] = value
            continue
        combined[key] = value + sum((w * (copies[a][key] - value) for a, w in weights.items() if a in copies),
                                    torch.zeros_like(value))
    return combined
