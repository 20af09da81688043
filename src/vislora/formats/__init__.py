"""Adapter files: PEFT's directory layout and key names, safetensors only (read, write, and the files of variants
PEFT has no layout for). See vislora.formats.peft for the layout and vislora.formats.read for what is checked."""

from __future__ import annotations

from pathlib import Path

from vislora.adapters.methods import method_class
from vislora.errors import AdapterFileError
from vislora.formats.peft import PREFIX
from vislora.formats.read import (
    ADAPTER_FILES,
    CONFIG_FILE,
    EXTRA_FILE,
    PICKLE_SUFFIXES,
    WEIGHTS_FILE,
    check_adapter,
    config_from_peft,
    find_adapter_files,
    load_adapter,
    read_json,
    read_safetensors,
    read_weights,
    vislora_config,
)
from vislora.formats.variants import STATE_FILE, load_training_state, write_with_state
from vislora.formats.write import write_lora
from vislora.model import AdaptedModel


def save_adapter(model: AdaptedModel, path: str | Path, name: str = "default") -> Path:
    """Write adapter `name` of `model` as a PEFT-compatible directory (created if missing; atomic writes)."""
    model.check_known([name])
    if method_class(model.configs[name]).keeps_training_state:
        return write_with_state(model, Path(path), name)
    return write_lora(model, Path(path), name)


def load_adapter_weights(model: AdaptedModel, path: str | Path, name: str = "default") -> None:
    """Copy a saved adapter (e.g. a checkpoint of this run) into adapter `name` in place: the parameter objects stay,
    so optimizers and DDP wrappers holding them keep working. The file must come from the same config; nothing is
    copied if anything does not fit."""
    path = Path(path)
    model.check_known([name])
    method = method_class(model.configs[name])
    if method.keeps_training_state:
        return load_training_state(model, path, name)
    config_file, weights_file, extra_file = find_adapter_files(path)
    config = method.saved_config(model.configs[name])
    if extra_file.is_file():
        found = vislora_config(read_json(extra_file), config_file)
        if found != config:
            changed = sorted(k for k in type(config).model_fields if getattr(found, k) != getattr(config, k))
            raise AdapterFileError(f"adapter {path} was saved from another config than adapter {name!r} (differs in "
                                   f"{', '.join(changed)}); load it as a new adapter with load_adapter instead")
    model.import_weights(name, read_weights(model, path, config, weights_file))
    return None


__all__ = ["ADAPTER_FILES", "CONFIG_FILE", "EXTRA_FILE", "PICKLE_SUFFIXES", "PREFIX", "STATE_FILE", "WEIGHTS_FILE",
           "check_adapter", "config_from_peft", "find_adapter_files", "load_adapter", "load_adapter_weights",
           "read_json", "read_safetensors", "save_adapter"]
