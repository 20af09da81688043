"""Adapter diagnostics: per-layer norms, singular values, effective rank, rank utilisation, a health verdict.

Every low-rank pair (a layer, or one q/k/v slice of a fused layer) is read as delta_W = scale * B @ A; see
`vislora.diagnostics.spectrum` for the figures and `vislora.diagnostics.verdict` for the rules.
`diagnose(model)` reads a live AdaptedModel; `inspect_adapter(dir)` reads a saved adapter directory (PEFT
layout) without any model, and with `base` also the relative change ||delta_W|| / ||W||.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vislora.adapters.layer import LoraLayer
from vislora.adapters.mha import LoraMultiheadAttention
from vislora.diagnostics.files import read_adapter_pairs
from vislora.diagnostics.records import Diagnosis, GroupSummary, LayerDiagnostics, Stats, Verdict
from vislora.diagnostics.spectrum import analyse_pair, effective_rank, energy_rank, low_rank_singular_values
from vislora.diagnostics.verdict import verdict
from vislora.errors import AdapterError, ConfigError
from vislora.model import AdaptedModel
from vislora.targets import QKV, path_order

__all__ = [
    "Diagnosis",
    "GroupSummary",
    "LayerDiagnostics",
    "Stats",
    "Verdict",
    "analyse_pair",
    "build_diagnosis",
    "diagnose",
    "effective_rank",
    "energy_rank",
    "inspect_adapter",
    "low_rank_singular_values",
    "verdict",
]


def diagnose(model: AdaptedModel, adapter: str | None = None, threshold: float = 0.9) -> Diagnosis:
    """Per-layer diagnostics, summaries and a health verdict of one adapter of a live AdaptedModel.

    `adapter` defaults to the only (or the only active) adapter. Relative norms use the original base weights.
    """
    _check_threshold(threshold)
    name = _pick_adapter(model, adapter)
    if model.merged:
        raise AdapterError(f"adapters {list(model.active_adapters)} are merged into the base weights, so W and "
                           "delta_W cannot be told apart; call model.unmerge() before diagnose()")
    layers: list[LayerDiagnostics] = []
    method = model.configs[name].method
    with torch.no_grad():
        for path, layer in model.layers().items():
            if name in layer.adapters:
                layers += _layer_pairs(path, layer, name, method, threshold)
    return build_diagnosis(name, "model", threshold, layers)


def inspect_adapter(path: str | Path, base: nn.Module | None = None, threshold: float = 0.9) -> Diagnosis:
    """Diagnostics of a saved adapter directory (vislora or PEFT), read from its files alone.

    With `base` (the model the adapter was trained on, or its backbone) every layer also gets ||W|| and the
    relative change; the base weights are found by module path (a leading wrapper such as `backbone.` may
    differ) and must have the adapter's shapes.
    """
    _check_threshold(threshold)
    layers = [analyse_pair(p.path, p.module, p.a, p.b, p.scale, p.method, threshold, p.weight, p.change,
                           p.finite) for p in read_adapter_pairs(Path(path), base)]
    return build_diagnosis(Path(path).name, str(path), threshold, layers)


def build_diagnosis(adapter: str, source: str, threshold: float, layers: list[LayerDiagnostics]) -> Diagnosis:
    """Summaries per module type and per depth, and the verdict, over analysed layers (sorted naturally by path:
    block 2 before block 10, whether they came from a model or from a file's sorted keys)."""
    layers = sorted(layers, key=lambda layer: path_order(layer.path))
    return Diagnosis(adapter=adapter, source=source, threshold=threshold, layers=layers,
                     by_module=_summaries(layers, lambda layer: layer.module),
                     by_depth=_summaries(layers, lambda layer: "-" if layer.depth is None else str(layer.depth)),
                     verdict=verdict(layers, threshold))


def _layer_pairs(path: str, layer: LoraLayer, name: str, method: str, threshold: float) -> list[LayerDiagnostics]:
    """One entry per pair of adapter `name` on `layer`: the whole weight, each q/k/v block, or each MoLoRA expert."""
    adapter = layer.adapters[name]
    weight = layer.original_weight()  # [out, in] (a PiSSA residual added back)
    finite = all(bool(torch.isfinite(p).all()) for p in adapter.parameters())
    module = path.rpartition(".")[2]
    if isinstance(layer, LoraMultiheadAttention):  # named as in the file: `<attention>.in_proj`
        path, module = f"{path}.in_proj", "in_proj"
    if adapter.refusal is not None:  # no single delta_W (MoLoRA): each expert its own pair
        tensors = adapter.export_tensors()
        a, b = tensors["lora_A"], tensors["lora_B"]  # (X*r, in), (X, out, r)
        rank = b.shape[-1]
        return [analyse_pair(f"{path}[expert {e}]", module, a[e * rank:(e + 1) * rank], b[e], adapter.scale,
                             method, threshold, weight) for e in range(b.shape[0])]
    pair = adapter.export_pair()  # relative to the original W (PiSSA: [A; A0], [B, -B0])
    change = None if adapter.exact_sum else layer.change(name)  # DoRA: g (W + delta_W) - W
    if not pair.layout.blocks:
        return [analyse_pair(path, module, pair.a, pair.b, adapter.scale, method, threshold, weight, change, finite)]
    rows = layer.out_features // len(QKV)
    out = []
    for j, index in enumerate(pair.layout.blocks):
        block = slice(index * rows, (index + 1) * rows)
        out.append(analyse_pair(f"{path}[{QKV[index]}]", f"{module}[{QKV[index]}]",
                                pair.a[j * pair.rank:(j + 1) * pair.rank], pair.b[j], adapter.scale, method,
                                threshold, weight[block], None if change is None else change[block], finite))
    return out


def _pick_adapter(model: AdaptedModel, adapter: str | None) -> str:
    if adapter is not None:
        if adapter not in model.adapters:
            raise AdapterError(f"unknown adapter {adapter!r}; loaded: {list(model.adapters) or 'none'}")
        return adapter
    if len(model.adapters) == 1:
        return model.adapters[0]
    if len(model.active_adapters) == 1:
        return model.active_adapters[0]
    raise AdapterError(f"the model holds adapters {list(model.adapters)} ({len(model.active_adapters)} active); "
                       "name the one to diagnose: diagnose(model, adapter='...')")


def _check_threshold(threshold: float) -> None:
    if not 0 < threshold <= 1:
        raise ConfigError(f"energy threshold must be in (0, 1], got {threshold}; e.g. 0.9 for 90% of the energy")


def _summaries(layers: list[LayerDiagnostics], key: Any) -> dict[str, GroupSummary]:
    groups: dict[str, list[LayerDiagnostics]] = defaultdict(list)
    for layer in layers:
        groups[key(layer)].append(layer)
    out = {}
    for name, members in groups.items():
        ok = [m for m in members if m.finite]
        out[name] = GroupSummary(
            layers=len(members), utilisation=Stats.of(m.utilisation for m in ok),
            effective_rank=Stats.of(m.effective_rank for m in ok),
            relative_norm=Stats.of(m.relative_norm for m in ok if m.relative_norm is not None))
    return out
