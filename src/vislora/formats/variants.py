"""Files of adapters whose training needs more than their PEFT file to go on exactly (AdaLoRA).

The adapter directory holds the exactly equivalent plain LoRA of the kept triplets (E folded into A, per-layer ranks
in rank_pattern), which PEFT and vislora load like any LoRA; layers whose every triplet was pruned are left out.
Beside it, vislora_state.safetensors keeps the adapter's full tensors (its whole list: A, B, E per layer), the copies
of modules trained in full and the training hooks' state (the rank allocator's scores), which
`load_adapter_weights` reads back.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from vislora.arithmetic import combine
from vislora.errors import AdapterError, AdapterFileError
from vislora.formats.read import check_fit, find_adapter_files, read_json, read_safetensors
from vislora.formats.write import write_lora
from vislora.io import atomic_write
from vislora.model import AdaptedModel, AdapterWeights

STATE_FILE = "vislora_state.safetensors"


def write_with_state(model: AdaptedModel, path: Path, name: str) -> Path:
    """The pruned LoRA export of adapter `name` and, beside it, its training state."""
    if model.merged:
        raise AdapterError(f"call unmerge() before saving adapter {name!r}: its export is computed from the "
                           "unmerged triplets")
    if not any(model.adapter_ranks(name).values()):
        raise AdapterError(f"AdaLoRA adapter {name!r} has no triplet with a non-zero singular value yet (E starts at "
                           "0 and grows in training): there is nothing to export. Train it for a step first")
    trainable = [n for n in model.adapters if model.is_training(n)]
    export = _free_name(model, f"{name}-export")
    combine(model, {name: 1.0}, export)  # exact: the kept triplets, scale folded into B
    try:
        write_lora(model, path, export, trained_as=model.configs[name])
    finally:
        model.delete_adapter(export)
        model.set_trainable(trainable)
    state = training_state(model, name)
    atomic_write(path / STATE_FILE, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    return path


def training_state(model: AdaptedModel, name: str) -> dict[str, torch.Tensor]:
    """Every tensor of adapter `name` (`<layer path>.<tensor>`, `saved.<module>.<key>`) and its hooks' state."""
    state = {f"{path}.{key}": value for path, adapter in model.layers_of(name).items()
             for key, value in adapter.named_parameters()}
    for path, copy in model.saved_modules(name).items():
        state.update({f"saved.{path}.{k}": v for k, v in copy.state_dict().items()})
    state.update({f"allocator.{k}": v for k, v in model.hooks[name].state().items()})
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def load_training_state(model: AdaptedModel, path: Path, name: str) -> None:
    """Restore adapter `name` and its hooks exactly from a directory `write_with_state` wrote."""
    config_file, _, extra_file = find_adapter_files(path)
    state_file = config_file.parent / STATE_FILE
    if not state_file.is_file():
        raise AdapterFileError(f"{config_file.parent} has no {STATE_FILE}: it holds an exported LoRA, not the "
                               "training state; load it as a new adapter with load_adapter instead")
    trained_as = read_json(extra_file).get("trained_as") if extra_file.is_file() else None
    if trained_as != model.configs[name].model_dump(mode="json"):
        raise AdapterFileError(f"adapter {path} was trained with another config than adapter {name!r}; load it as a "
                               "new adapter with load_adapter instead")
    tensors = read_safetensors(state_file)
    expected = {k: tuple(v.shape) for k, v in training_state(model, name).items() if not k.startswith("allocator.")}
    check_fit(path, expected, {k: v for k, v in tensors.items() if not k.startswith("allocator.")})
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for target in model.plans[name].targets:
        prefix = f"{target.module_path}."
        layers[target.path] = {k[len(prefix):]: v for k, v in tensors.items()
                               if k.startswith(prefix) and "." not in k[len(prefix):]}
    saved = {path: {k[len(f"saved.{path}."):]: v for k, v in tensors.items() if k.startswith(f"saved.{path}.")}
             for path in model.plans[name].modules_to_save}
    model.import_weights(name, AdapterWeights(model.configs[name], model.plans[name], layers, saved, str(path)))
    model.hooks[name].load_state({k[len("allocator."):]: v for k, v in tensors.items()
                                  if k.startswith("allocator.")})


def _free_name(model: AdaptedModel, base: str) -> str:
    name, n = base, 1
    while name in model.configs:
        n += 1
        name = f"{base}{n}"
    return name
