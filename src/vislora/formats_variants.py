"""Files of adapters PEFT has no exact layout for: AdaLoRA and MoLoRA.

AdaLoRA: the adapter directory holds the exactly equivalent plain LoRA of the kept triplets (E folded into A,
per-layer ranks in rank_pattern), which PEFT and vislora load like any LoRA; layers whose every triplet was pruned
are left out. Beside it, vislora_state.safetensors keeps what training needs to go on exactly: the full A, B, E,
the copies of modules trained in full, and the rank allocator's scores. AdaptedModel.load_adapter_weights reads it.

MoLoRA: vislora's own keys in adapter_model.safetensors (`<path>.lora_A.weight` [X*r, in], `.lora_B.weight`
[X, out, r], `.lora_gate.weight` [X, in]) under peft_type "VISLORA_MOLORA", which PEFT refuses instead of loading
something else; vislora_adapter.json carries the config.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from vislora.adapters import variants
from vislora.errors import AdapterError, AdapterFileError
from vislora.formats import PREFIX, check_fit, find_adapter_files, read_json, read_safetensors
from vislora.formats_save import base_model_name, extra_record, save_lora, write_adapter_dir
from vislora.io import atomic_write

if TYPE_CHECKING:
    from vislora.config import AdapterConfig
    from vislora.model import AdaptedModel
    from vislora.targets import TargetPlan

STATE_FILE = "vislora_state.safetensors"
MOLORA_PEFT_TYPE = "VISLORA_MOLORA"


def save_variant(model: AdaptedModel, path: Path, name: str) -> Path:
    """Write an AdaLoRA or MoLoRA adapter (see the module docstring)."""
    if model.configs[name].method == "molora":
        return _save_experts(model, path, name)
    return _save_pruned(model, path, name)


# ------------------------------------------------------------------ AdaLoRA
def _save_pruned(model: AdaptedModel, path: Path, name: str) -> Path:
    if model.merged:
        raise AdapterError(f"call unmerge() before saving AdaLoRA adapter {name!r}: its export is computed from the "
                           "unmerged triplets")
    ranks = model.adapter_ranks(name)
    if not any(ranks.values()):
        raise AdapterError(f"AdaLoRA adapter {name!r} has no triplet with a non-zero singular value yet (E starts at "
                           "0 and grows in training): there is nothing to export. Train it for a step first")
    trainable = [n for n in model.adapters if variants.is_training(model, n)]
    export = _free_name(model, f"{name}-export")
    model.combine({name: 1.0}, export)  # exact: the kept triplets, scale folded into B
    try:
        save_lora(model, path, export, trained_as=model.configs[name])
    finally:
        model.delete_adapter(export)
        model.set_trainable(trainable)
    state = _training_state(model, name)
    atomic_write(path / STATE_FILE, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    return path


def _training_state(model: AdaptedModel, name: str) -> dict[str, torch.Tensor]:
    state = {}
    for path, layer in variants.layers_of(model, name).items():
        for kind, store in (("lora_A", layer.lora_A), ("lora_B", layer.lora_B), ("lora_E", layer.lora_E)):
            state[f"{path}.{kind}"] = store[name]
    for path, saved in model._saved.items():
        if name in saved.copies:
            state.update({f"saved.{path}.{k}": v for k, v in saved.copies[name].state_dict().items()})
    state.update({f"allocator.{k}": v for k, v in model._allocators[name].state().items()})
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def load_training_state(model: AdaptedModel, path: Path, name: str) -> None:
    """Restore an AdaLoRA adapter and its allocator exactly from a directory _save_pruned wrote."""
    config_file, _, extra_file = find_adapter_files(path)
    state_file = config_file.parent / STATE_FILE
    if not state_file.is_file():
        raise AdapterFileError(f"{config_file.parent} has no {STATE_FILE}: it holds an exported LoRA, not the AdaLoRA "
                               "training state; load it as a new adapter with load_adapter instead")
    trained_as = read_json(extra_file).get("trained_as") if extra_file.is_file() else None
    if trained_as != model.configs[name].model_dump(mode="json"):
        raise AdapterFileError(f"adapter {path} was trained with another config than adapter {name!r}; load it as a "
                               "new adapter with load_adapter instead")
    tensors = read_safetensors(state_file)
    current = _training_state(model, name)
    expected = {k: tuple(v.shape) for k, v in current.items() if not k.startswith("allocator.")}
    check_fit(path, expected, {k: v for k, v in tensors.items() if not k.startswith("allocator.")})
    with torch.no_grad():
        for key, value in tensors.items():
            if key.startswith("saved.") or key.startswith("allocator."):
                continue
            layer_path, kind = key.rsplit(".", 1)
            getattr(model._layers[layer_path], kind)[name].copy_(value)
        for module_path, saved in model._saved.items():
            if name in saved.copies:
                prefix = f"saved.{module_path}."
                saved.copies[name].load_state_dict({k[len(prefix):]: v for k, v in tensors.items()
                                                     if k.startswith(prefix)})
    model._allocators[name].load_state({k[len("allocator."):]: v for k, v in tensors.items()
                                        if k.startswith("allocator.")})


def _free_name(model: AdaptedModel, base: str) -> str:
    name, n = base, 1
    while name in model.configs:
        n += 1
        name = f"{base}{n}"
    return name


# ------------------------------------------------------------------ MoLoRA
def _save_experts(model: AdaptedModel, path: Path, name: str) -> Path:
    plan = model.plans[name]
    tensors = {}
    for target in plan.targets:
        layer = model._layers[target.module_path]
        for kind, store in (("lora_A", layer.lora_A), ("lora_B", layer.lora_B), ("lora_gate", layer.lora_gate)):
            tensors[f"{PREFIX}{target.path}.{kind}.weight"] = store[name]
    for module_path in plan.modules_to_save:
        copy = model._saved[module_path].copies[name]
        tensors.update({f"{PREFIX}{module_path}.{k}": v for k, v in copy.state_dict().items()})
    peft_config = {"peft_type": MOLORA_PEFT_TYPE, "base_model_name_or_path": base_model_name(model.base_model),
                   "note": "a vislora mixture-of-LoRA-experts adapter: load it with vislora.load_adapter"}
    targets = [{"path": t.path, "rank": t.rank, "scale": t.scale} for t in plan.targets]
    return write_adapter_dir(path, tensors, peft_config, extra_record(model.configs[name], targets))


def expert_shapes(plan: TargetPlan, config: AdapterConfig) -> dict[str, tuple]:
    """File keys and shapes of a MoLoRA adapter's experts and gates."""
    experts, shapes = config.molora.experts, {}
    for target in plan.targets:
        key = f"{PREFIX}{target.path}"
        shapes[f"{key}.lora_A.weight"] = (experts * target.rank, target.in_features)
        shapes[f"{key}.lora_B.weight"] = (experts, target.out_features, target.rank)
        shapes[f"{key}.lora_gate.weight"] = (experts, target.in_features)
    return shapes


def copy_experts(model: AdaptedModel, plan: TargetPlan, name: str, tensors: dict[str, torch.Tensor]) -> None:
    for target in plan.targets:
        layer = model._layers[target.module_path]
        for kind, store in (("lora_A", layer.lora_A), ("lora_B", layer.lora_B), ("lora_gate", layer.lora_gate)):
            store[name].copy_(tensors[f"{PREFIX}{target.path}.{kind}.weight"])
