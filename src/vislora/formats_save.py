"""Writing adapter directories in PEFT's layout (see vislora.formats for the layout and the exact equivalents
written for shapes PEFT has no word for); every file is written atomically."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from vislora import __version__
from vislora.config import AdapterConfig
from vislora.formats import (
    CONFIG_FILE,
    EXTRA_FILE,
    FORMAT_VERSION,
    PREFIX,
    WEIGHTS_FILE,
    mha_module_paths,
    saved_config,
)
from vislora.io import atomic_write, atomic_write_text
from vislora.targets import QKV, Target, TargetPlan

if TYPE_CHECKING:
    from vislora.model import AdaptedModel


@dataclass
class Pair:
    """One low-rank pair in PEFT's layout: delta_W = scale * B @ A."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float
    magnitude: torch.Tensor | None = None  # [out], DoRA only


# ------------------------------------------------------------------ save
def save_adapter(model: AdaptedModel, path: Path, name: str) -> Path:
    """Write adapter `name` of `model` into directory `path` (created if missing)."""
    if model.configs[name].method in ("adalora", "molora"):
        from vislora.formats_variants import save_variant

        return save_variant(model, path, name)
    return save_lora(model, path, name)


def save_lora(model: AdaptedModel, path: Path, name: str, trained_as: AdapterConfig | None = None) -> Path:
    """Write a LoRA/DoRA/PiSSA adapter in PEFT's layout; `trained_as` records the config it was exported from."""
    config, plan = saved_config(model.configs[name]), model.plans[name]
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    pairs_by_module = _peft_pairs(model, plan, name)
    for peft_path, pairs in pairs_by_module.items():
        for key, pair in pairs.items():
            tensors[f"{PREFIX}{key}.lora_A.weight"] = pair.a
            tensors[f"{PREFIX}{key}.lora_B.weight"] = pair.b
            if pair.magnitude is not None:
                tensors[f"{PREFIX}{key}.lora_magnitude_vector"] = pair.magnitude
        rank, scale = next(iter(pairs.values())).a.shape[0], next(iter(pairs.values())).scale
        alpha = scale * (math.sqrt(rank) if config.use_rslora else rank)
        if rank != config.rank or not math.isclose(alpha, config.alpha, rel_tol=1e-12):
            ranks[_exact(peft_path)], alphas[_exact(peft_path)] = rank, alpha
    for module_path in plan.modules_to_save:
        copy = model._saved[module_path].copies[name]
        tensors.update({f"{PREFIX}{module_path}.{k}": v for k, v in copy.state_dict().items()})
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name(model.base_model),
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "use_dora": config.method == "dora",
        "target_modules": sorted(pairs_by_module),
        "rank_pattern": ranks,
        "alpha_pattern": alphas,
        "modules_to_save": plan.modules_to_save or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    extra = extra_record(config, [{"path": t.path, "slices": list(t.slices), "rank": _saved_rank(model, t, name),
                                   "scale": t.scale} for t in plan.targets])
    if trained_as is not None:
        extra["trained_as"] = trained_as.model_dump(mode="json")
    return write_adapter_dir(path, tensors, peft_config, extra)


def extra_record(config: AdapterConfig, targets: list[dict[str, Any]]) -> dict[str, Any]:
    """The content of vislora_adapter.json: what PEFT's config cannot say."""
    return {"format_version": FORMAT_VERSION, "library": f"vislora {__version__}",
            "adapter_config": config.model_dump(mode="json"), "targets": targets}


def write_adapter_dir(path: Path, tensors: dict[str, torch.Tensor], peft_config: dict[str, Any],
                      extra: dict[str, Any]) -> Path:
    """Write the three files of an adapter directory, each atomically (weights first, config last)."""
    path.mkdir(parents=True, exist_ok=True)
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path / WEIGHTS_FILE, lambda tmp: save_file(cpu, str(tmp), metadata={"format": "pt"}))
    atomic_write_text(path / EXTRA_FILE, json.dumps(extra, indent=2))
    atomic_write_text(path / CONFIG_FILE, json.dumps(peft_config, indent=2))
    return path


def _saved_rank(model: AdaptedModel, target: Target, name: str) -> int:
    return model._layers[target.module_path].export_pair(name)[2]


def _peft_pairs(model: AdaptedModel, plan: TargetPlan, name: str) -> dict[str, dict[str, Pair]]:
    """PEFT module path -> {key prefix: pair}; MHA pairs padded to one rank and one scale."""
    out: dict[str, dict[str, Pair]] = {}
    mha_paths = mha_module_paths(model)
    for target in plan.targets:
        layer = model._layers[target.module_path]
        a, b, _ = layer.export_pair(name)
        magnitude = layer.lora_magnitude[name].detach() if name in layer.lora_magnitude else None
        pair = Pair(a, _stack_slices(b, target) if target.slices else b, target.scale, magnitude)
        if target.kind == "mha_in_proj":
            out.setdefault(target.module_path, {})[target.module_path] = pair
        elif target.path.rpartition(".")[0] in mha_paths and target.path.endswith(".out_proj"):
            mha = target.path.rpartition(".")[0]
            out.setdefault(mha, {})[f"{mha}.base_layer.out_proj"] = pair
        else:
            out[target.path] = {target.path: pair}
    for mha in mha_paths & set(out):
        out[mha] = _pad_mha(out[mha], mha, model)
    return out


def _pad_mha(pairs: dict[str, Pair], mha: str, model: AdaptedModel) -> dict[str, Pair]:
    """Give in_proj and out_proj pairs one rank (zero padding) and one scale (folded into B)."""
    embed = model._layers[mha].in_features
    shapes = {mha: (3 * embed, embed), f"{mha}.base_layer.out_proj": (embed, embed)}
    rank = max(p.a.shape[0] for p in pairs.values())
    scale = pairs[mha].scale if mha in pairs else next(iter(pairs.values())).scale
    padded = {}
    for key, (n_out, n_in) in shapes.items():
        pair = pairs.get(key)
        a = torch.zeros(rank, n_in, dtype=next(iter(pairs.values())).a.dtype)
        b = torch.zeros(n_out, rank, dtype=a.dtype)
        magnitude = None
        if pair is not None:
            r = pair.a.shape[0]
            a[:r], b[:, :r] = pair.a, pair.b * (pair.scale / scale)
            magnitude = pair.magnitude
        elif any(p.magnitude is not None for p in pairs.values()):  # DoRA's identity: m = ||W|| gives g = 1
            magnitude = _mha_weight(model, key).detach().to(a.dtype).norm(dim=1)
        padded[key] = Pair(a, b, scale, magnitude)
    return padded


def _mha_weight(model: AdaptedModel, key: str) -> torch.Tensor:
    mha = model._layers[key.removesuffix(".base_layer.out_proj")].base_layer
    return mha.out_proj.weight if key.endswith(".out_proj") else mha.in_proj_weight


def _stack_slices(b: torch.Tensor, target: Target) -> torch.Tensor:
    """Per-slice B [S, d, r] -> block-sparse B [3d, S*r] of the equivalent stacked-rank LoRA."""
    n_slices, rows, rank = b.shape
    full = b.new_zeros(len(QKV), rows, n_slices, rank)
    for j, slice_name in enumerate(target.slices):
        full[QKV.index(slice_name), :, j] = b[j]
    return full.flatten(2).flatten(0, 1)


def _exact(path: str) -> str:
    """A PEFT rank/alpha_pattern key matching exactly this module path."""
    return "^" + re.escape(path)


def base_model_name(model: torch.nn.Module) -> str | None:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("hf_hub_id") or cfg.get("architecture") if isinstance(cfg, dict) else None
    return name or getattr(getattr(model, "config", None), "_name_or_path", None) or None


