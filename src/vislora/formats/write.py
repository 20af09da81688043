"""Writing adapter directories in PEFT's layout (see vislora.formats.peft), every file atomically.

What each adapter writes comes from its own `export_tensors()`: A and B relative to the original W (a PiSSA adapter's
[A; A0], [B, -B0] at rank 2r, so the file loads onto the untouched base model), plus what its method adds (DoRA's
magnitude; MoLoRA's gates, under vislora's own peft_type, which PEFT refuses instead of loading something else).
AdaLoRA's file is the exactly equivalent LoRA of its kept triplets (vislora.formats.variants).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from vislora.adapters.methods import method_class
from vislora.config import AdapterConfig
from vislora.formats.peft import PEFT_LORA, PREFIX, FileLayout, stack_blocks
from vislora.formats.read import CONFIG_FILE, EXTRA_FILE, FORMAT_VERSION, WEIGHTS_FILE
from vislora.io import atomic_write, atomic_write_text
from vislora.model import AdaptedModel
from vislora.targets import logical_modules
from vislora.version import __version__


def write_lora(model: AdaptedModel, path: Path, name: str, trained_as: AdapterConfig | None = None) -> Path:
    """Write adapter `name` in PEFT's layout; `trained_as` records the config it was exported from."""
    model.check_known([name])
    method = method_class(model.configs[name])
    if method.peft_type != PEFT_LORA:
        return _write_own(model, path, name)
    config, plan = method.saved_config(model.configs[name]), model.plans[name]
    layers, layout = model.layers_of(name), FileLayout.of(model.base_model, plan)
    grouped: dict[str, dict[str, dict[str, torch.Tensor]]] = {}  # PEFT's target name -> {file key: tensors}
    scales: dict[str, float] = {}
    ranks: dict[str, int] = {}
    for target in plan.targets:
        own = layers[target.module_path].export_tensors()
        if target.slices:
            own["lora_B"] = stack_blocks(own["lora_B"], target)
        key = layout.module(target)
        grouped.setdefault(layout.attention(target) or target.path, {})[key] = own
        scales[key], ranks[target.path] = target.scale, own["lora_A"].shape[0] // max(1, len(target.slices))
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for module, pairs in grouped.items():
        if module in layout.attentions:
            pairs, scale = _pad_attention(pairs, module, scales, model.base_model, layout.attentions[module])
        else:
            scale = scales[next(iter(pairs))]
        for key, own in pairs.items():
            tensors.update({f"{PREFIX}{key}.{method.peft_keys[k]}": v for k, v in own.items()})
        rank = next(iter(pairs.values()))["lora_A"].shape[0]
        alpha = scale * (math.sqrt(rank) if config.use_rslora else rank)
        if rank != config.rank or not math.isclose(alpha, config.alpha, rel_tol=1e-12):
            rank_pattern[_exact(module)], alpha_pattern[_exact(module)] = rank, alpha
    for module_path, copy in model.saved_modules(name).items():
        tensors.update({f"{PREFIX}{module_path}.{k}": v for k, v in copy.state_dict().items()})
    peft_config = {
        "peft_type": PEFT_LORA,
        "task_type": None,
        "base_model_name_or_path": base_model_name(model.base_model),
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "use_dora": False,
        **method.peft_options,
        "target_modules": sorted({layout.attention(t) or t.path for t in plan.targets if t.kind != "parameter"}),
        "target_parameters": sorted(t.path for t in plan.targets if t.kind == "parameter") or None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "modules_to_save": plan.modules_to_save or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    extra = extra_record(config, [{"path": t.path, "slices": list(t.slices), "rank": ranks[t.path],
                                   "scale": t.scale} for t in plan.targets])
    if trained_as is not None:
        extra["trained_as"] = trained_as.model_dump(mode="json")
    return write_adapter_dir(path, tensors, peft_config, extra)


def _write_own(model: AdaptedModel, path: Path, name: str) -> Path:
    """An adapter with no PEFT layout (MoLoRA): its tensors as they are, keyed by target path."""
    config, plan = model.configs[name], model.plans[name]
    method, layers = method_class(config), model.layers_of(name)
    tensors = {f"{PREFIX}{t.path}.{method.peft_keys[k]}": v for t in plan.targets
               for k, v in layers[t.module_path].export_tensors().items()}
    for module_path, copy in model.saved_modules(name).items():
        tensors.update({f"{PREFIX}{module_path}.{k}": v for k, v in copy.state_dict().items()})
    peft_config = {"peft_type": method.peft_type, "base_model_name_or_path": base_model_name(model.base_model),
                   "note": "a vislora adapter PEFT has no layout for: load it with vislora.load_adapter"}
    targets = [{"path": t.path, "rank": t.rank, "scale": t.scale} for t in plan.targets]
    return write_adapter_dir(path, tensors, peft_config, extra_record(config, targets))


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


def _pad_attention(pairs: dict[str, dict[str, torch.Tensor]], mha: str, scales: dict[str, float],
                   base: nn.Module, embed: int) -> tuple[dict[str, dict[str, torch.Tensor]], float]:
    """Give an attention's in_proj and out_proj pairs one rank (zero padding) and one scale (folded into B)."""
    out_proj = f"{mha}.base_layer.out_proj"
    shapes = {mha: (3 * embed, embed), out_proj: (embed, embed)}
    rank = max(own["lora_A"].shape[0] for own in pairs.values())
    scale = scales[mha] if mha in pairs else scales[out_proj]
    dtype = next(iter(pairs.values()))["lora_A"].dtype
    dora = any("lora_magnitude" in own for own in pairs.values())
    module = logical_modules(base)[mha]
    padded = {}
    for key, (n_out, n_in) in shapes.items():
        own = pairs.get(key)
        a, b = torch.zeros(rank, n_in, dtype=dtype), torch.zeros(n_out, rank, dtype=dtype)
        entry: dict[str, torch.Tensor] = {}
        if own is not None:
            r = own["lora_A"].shape[0]
            a[:r], b[:, :r] = own["lora_A"], own["lora_B"] * (scales[key] / scale)
            entry = {k: v for k, v in own.items() if k not in ("lora_A", "lora_B")}
        elif dora:  # DoRA's identity: m = ||W|| gives g = 1
            weight = module.out_proj.weight if key == out_proj else module.in_proj_weight
            entry = {"lora_magnitude": weight.detach().to(dtype).norm(dim=1)}
        padded[key] = {"lora_A": a, "lora_B": b, **entry}
    return padded, scale


def _exact(path: str) -> str:
    """A PEFT rank/alpha_pattern key matching exactly this module path."""
    return "^" + re.escape(path)


def base_model_name(model: nn.Module) -> str | None:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("hf_hub_id") or cfg.get("architecture") if isinstance(cfg, dict) else None
    return name or getattr(getattr(model, "config", None), "_name_or_path", None) or None
