"""Low-rank pairs read from a saved adapter directory (PEFT layout), optionally matched to a base model's weights.

Keys are `base_model.model.<path>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r] (DoRA adds
`.lora_magnitude_vector` [out]); an nn.MultiheadAttention keeps its out_proj pair under
`<mha>.base_layer.out_proj`. The scale follows PEFT's rule: alpha / r (alpha / sqrt(r) with use_rslora), r and
alpha taken from rank_pattern / alpha_pattern when a key matches the end of the module path. vislora's own
`vislora_adapter.json`, when present, tells which q/k/v slices a stacked fused-qkv pair holds. A MoLoRA file
(vislora's own peft_type) stores B as [experts, out, r]: each expert is read as its own pair, at the scale
vislora_adapter.json records.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vislora import formats
from vislora.errors import AdapterFileError
from vislora.targets import QKV

LORA_A, LORA_B, MAGNITUDE = ".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector"
MHA_OUT = ".base_layer.out_proj"


@dataclass
class SavedPair:
    """One pair as stored, with the original weight rows it updates when a base model was given."""

    path: str
    module: str
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float
    method: str
    weight: torch.Tensor | None  # [out, in]
    change: torch.Tensor | None  # DoRA: g (W + delta_W) - W [out, in]
    finite: bool  # the magnitude vector (DoRA) is finite


def read_adapter_pairs(path: Path, base: nn.Module | None = None) -> list[SavedPair]:
    """Every low-rank pair of the adapter at `path`: q/k/v slices (named by vislora_adapter.json) and MoLoRA
    experts split apart."""
    config_file, weights_file, extra_file = formats.find_adapter_files(path)
    peft = formats.read_json(config_file)
    extra = formats.read_json(extra_file) if extra_file.is_file() else {}
    tensors = formats.read_safetensors(weights_file)
    targets = {t["path"]: t for t in extra.get("targets", [])}
    weights = dict(base.state_dict()) if base is not None else None
    modules = dict(base.named_modules()) if base is not None else {}
    keys = [k[len(formats.PREFIX):-len(LORA_A)] for k in tensors if k.startswith(formats.PREFIX) and
            k.endswith(LORA_A)]
    if not keys:
        raise AdapterFileError(f"{weights_file} holds no `<path>.lora_A.weight` tensors: it is not a LoRA adapter "
                               f"(keys: {', '.join(sorted(tensors)[:5]) or 'none'})")
    pairs: list[SavedPair] = []
    for key in keys:
        a, b = tensors[f"{formats.PREFIX}{key}{LORA_A}"], tensors.get(f"{formats.PREFIX}{key}{LORA_B}")
        pieces = 1 if b is None or b.dim() != 3 else b.shape[0]  # MoLoRA: B [experts, out, r]
        if b is None or a.dim() != 2 or b.dim() not in (2, 3) or b.shape[-1] * pieces != a.shape[0]:
            raise AdapterFileError(f"{weights_file}: {key} has lora_A {tuple(a.shape)} and lora_B "
                                   f"{None if b is None else tuple(b.shape)}; expected [r, in] and [out, r]")
        module_path, module = _module_of(key, targets, modules)
        scale = _scale(peft, targets.get(module_path), key.removesuffix(MHA_OUT), config_file)
        weight = None if weights is None else _base_weight(weights, module_path, (b.shape[-2], a.shape[1]), path)
        if b.dim() == 3:
            rank = b.shape[-1]
            pairs += [SavedPair(f"{module_path}[expert {e}]", module, a[e * rank:(e + 1) * rank], b[e], scale,
                                "molora", weight, None, True) for e in range(pieces)]
            continue
        magnitude = tensors.get(f"{formats.PREFIX}{key}{MAGNITUDE}")
        change = None if magnitude is None or weight is None else dora_change(weight, a, b, scale, magnitude)
        finite = magnitude is None or bool(torch.isfinite(magnitude).all())
        method = "lora" if magnitude is None else "dora"
        target = targets.get(module_path, {})
        chosen, rank = tuple(target.get("slices") or ()), int(target.get("rank", a.shape[0]))
        if not chosen:
            pairs.append(SavedPair(module_path, module, a, b, scale, method, weight, change, finite))
            continue
        rows = b.shape[0] // len(QKV)
        for j, name in enumerate(chosen):
            block = slice(QKV.index(name) * rows, (QKV.index(name) + 1) * rows)
            pairs.append(SavedPair(f"{module_path}[{name}]", f"{module}[{name}]", a[j * rank:(j + 1) * rank],
                                   b[block, j * rank:(j + 1) * rank], scale, method,
                                   None if weight is None else weight[block],
                                   None if change is None else change[block], finite))
    return pairs


def _scale(peft: dict[str, Any], target: dict[str, Any] | None, owner: str, config_file: Path) -> float:
    """PEFT's scale for a LoRA file; vislora's recorded scale for its own kinds (MoLoRA)."""
    if peft.get("peft_type", "LORA") == "LORA":
        return peft_scale(peft, owner)
    if target is None or "scale" not in target:
        raise AdapterFileError(f"{config_file}: peft_type {peft.get('peft_type')!r} and no scale recorded for {owner} "
                               "in vislora_adapter.json; the adapter directory is incomplete")
    return float(target["scale"])


def peft_scale(peft: dict[str, Any], module_path: str) -> float:
    """scale = alpha / r (or alpha / sqrt(r) with use_rslora) with PEFT's rank/alpha_pattern matching rule."""
    rank = _pattern_value(peft.get("rank_pattern") or {}, module_path, peft.get("r", 8))
    alpha = _pattern_value(peft.get("alpha_pattern") or {}, module_path, peft.get("lora_alpha", 8))
    return alpha / math.sqrt(rank) if peft.get("use_rslora") else alpha / rank


def dora_change(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
                magnitude: torch.Tensor) -> torch.Tensor:
    """g (W + dW) - W with dW = scale * B @ A and g = m / ||W + dW||_row, as DoRA computes its weight."""
    w = weight.detach().double()
    adapted = w + scale * b.double() @ a.double()  # (out, r) @ (r, in) -> (out, in)
    g = magnitude.double() / adapted.norm(dim=1)  # (out,)
    return g[:, None] * adapted - w


def _pattern_value(pattern: dict[str, Any], path: str, default: float) -> float:
    """PEFT's rule: the first key that matches the end of the module path on a dot boundary."""
    return next((value for key, value in pattern.items() if re.match(rf"(.*\.)?({key})$", path)), default)


def _module_of(key: str, targets: dict[str, Any], modules: dict[str, nn.Module]) -> tuple[str, str]:
    """(module path as vislora names it, module type) of a file key."""
    if key.endswith(MHA_OUT):
        return key.removesuffix(MHA_OUT) + ".out_proj", "out_proj"
    if f"{key}.in_proj" in targets or isinstance(_find_module(modules, key), nn.MultiheadAttention):
        return f"{key}.in_proj", "in_proj"
    return key, key.rpartition(".")[2]


def _find_module(modules: dict[str, nn.Module], path: str) -> nn.Module | None:
    return next((modules[p] for p in _candidates(path) if p in modules), None)


def _base_weight(weights: dict[str, torch.Tensor], module_path: str, shape: tuple[int, int],
                 adapter: Path) -> torch.Tensor:
    """The base weight [out, in] a pair updates; a leading wrapper segment (`backbone.`) may differ."""
    if module_path.endswith(".in_proj"):
        name = module_path.removesuffix(".in_proj") + ".in_proj_weight"
    else:
        name = module_path + ".weight"
    found = next((weights[c] for c in _candidates(name) if c in weights), None)
    if found is None:
        found = next((w for n, w in weights.items() if n.endswith("." + name)), None)
    if found is None:
        raise AdapterFileError(f"the base model has no weight for {module_path} of adapter {adapter} (looked for "
                               f"{name}); give the model the adapter was trained on")
    if tuple(found.shape) != shape:
        raise AdapterFileError(f"{module_path}: the base model's weight is {tuple(found.shape)} but the adapter "
                               f"updates {shape}; give the model the adapter was trained on")
    return found


def _candidates(name: str) -> list[str]:
    """`name` and every suffix of it on a dot boundary: a.b.c.weight, b.c.weight, c.weight."""
    parts = name.split(".")
    return [".".join(parts[i:]) for i in range(len(parts) - 1)]
