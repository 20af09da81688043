"""Adapter files: PEFT's directory layout and key names, safetensors only; reading, checking and loading them
(writing, atomically: vislora.formats_save).

A directory holds `adapter_config.json` (a PEFT LoraConfig) and `adapter_model.safetensors` with keys
`base_model.model.<path>.lora_A.weight` [r, in], `.lora_B.weight` [out, r] and, for DoRA,
`.lora_magnitude_vector` [out], so PEFT loads what we save and we load what PEFT saves.
`vislora_adapter.json` keeps what PEFT's config cannot say (roles, q/k/v slices); it is optional when loading.

Shapes that PEFT has no word for are written as exact equivalents:
- q/k/v slices of a fused layer: one stacked-rank LoRA on the fused weight, A [S*r, in] and a
  block-sparse B [3d, S*r]; rank_pattern/alpha_pattern make PEFT's scale equal ours;
- nn.MultiheadAttention: PEFT's own layout (`<mha>.lora_A` for in_proj, `<mha>.base_layer.out_proj.lora_A`),
  both pairs zero-padded to one rank and B rescaled to one shared scale (PEFT refuses DoRA there);
- PiSSA: the pair relative to the untouched base weight, [A; A0] and [B, -B0] at rank 2r, as PEFT's own
  conversion writes it, so the file loads onto the original model.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from safetensors import safe_open

from vislora.config import AdapterConfig
from vislora.errors import AdapterFileError, ConfigError, TargetError
from vislora.targets import QKV, Target, TargetPlan, resolve_targets

if TYPE_CHECKING:
    from vislora.model import AdaptedModel

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
EXTRA_FILE = "vislora_adapter.json"
PREFIX = "base_model.model."
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
FORMAT_VERSION = 1
# PEFT LoraConfig fields whose non-default values change the computation in ways vislora does not model
_UNSUPPORTED_PEFT = {"fan_in_fan_out": False, "bias": "none", "lora_bias": False,
                     "layer_replication": None, "target_parameters": None, "trainable_token_indices": None,
                     "use_qalora": False, "use_bdlora": None}


def saved_config(config: AdapterConfig) -> AdapterConfig:
    """The config that describes the saved file: a PiSSA adapter is written as a plain LoRA of twice the rank
    (PEFT's conversion: alpha doubled, or times sqrt(2) with rsLoRA, so the scale stays)."""
    if config.init != "pissa":
        return config
    factor = math.sqrt(2) if config.use_rslora else 2.0
    return config.model_copy(update={
        "rank": 2 * config.rank, "alpha": factor * config.alpha, "init": "kaiming",
        "rank_pattern": {k: 2 * v for k, v in config.rank_pattern.items()},
        "alpha_pattern": {k: factor * v for k, v in config.alpha_pattern.items()},
    })


def mha_module_paths(model: AdaptedModel) -> set[str]:
    from torch.nn import MultiheadAttention

    from vislora.targets import logical_modules

    return {p for p, m in logical_modules(model.base_model).items() if isinstance(m, MultiheadAttention)}


def _unstack_slices(b_full: torch.Tensor, target: Target) -> torch.Tensor:
    """Inverse of _stack_slices; raises if B has weight outside the slice blocks."""
    n_slices, rank = len(target.slices), target.rank
    full = b_full.reshape(len(QKV), -1, n_slices, rank)
    b = torch.stack([full[QKV.index(s), :, j] for j, s in enumerate(target.slices)])
    rest = full.clone()
    for j, s in enumerate(target.slices):
        rest[QKV.index(s), :, j] = 0
    if rest.abs().max() > 0:
        raise AdapterFileError(f"{target.path}: lora_B has weights outside the q/k/v slices "
                               f"{list(target.slices)} that vislora_adapter.json declares; the file was edited "
                               "or belongs to another adapter")
    return b


# ------------------------------------------------------------------ load
class LayerPair(NamedTuple):
    module_path: str
    a: torch.Tensor  # [S*r, in] or [r, in]
    b: torch.Tensor  # [S, d, r] for q/k/v slices, else [out, r]
    magnitude: torch.Tensor | None  # [out], DoRA only


@dataclass
class CheckedAdapter:
    """An adapter directory read and checked against one model, ready to install with no further checks:
    `AdaptedModel.check_adapter(path)` makes it (slow: disk, shapes) and `load_adapter(checked, name)` installs it
    (fast), so a server can hold its model lock for the install only."""

    path: Path
    config: AdapterConfig
    plan: TargetPlan
    tensors: dict[str, torch.Tensor]  # file keys -> tensors
    pairs: dict[str, LayerPair] | None  # target path -> its pair in the layer's layout; None for MoLoRA


def check_adapter(model: AdaptedModel, path: Path) -> CheckedAdapter:
    """Read the adapter at `path` and check it against `model` completely; nothing in `model` changes."""
    config_file, weights_file, extra_file = find_adapter_files(path)
    peft_config = read_json(config_file)
    extra = read_json(extra_file) if extra_file.is_file() else None
    config = _vislora_config(extra, config_file) if extra else config_from_peft(peft_config, config_file)
    return _check_weights(model, path, config, weights_file)


def _check_weights(model: AdaptedModel, path: Path, config: AdapterConfig, weights_file: Path) -> CheckedAdapter:
    """Resolve `config` on `model`, read the weights and check them against what that plan needs."""
    try:
        plan = resolve_targets(model.base_model, config)
    except TargetError as exc:
        raise AdapterFileError(f"adapter {path} does not fit this model (was it trained on another one?): "
                               f"{exc}") from None
    tensors = read_safetensors(weights_file)
    check_fit(path, _expected_shapes(model, plan, config), tensors)
    pairs = None if config.method == "molora" else _layer_pairs(model, plan, tensors)
    return CheckedAdapter(path, config, plan, tensors, pairs)


def load_adapter_into(model: AdaptedModel, source: Path | CheckedAdapter, name: str, activate: bool | None
                      ) -> TargetPlan:
    """Check the adapter at `source` against `model` completely (unless it was checked already), then install it
    as `name`."""
    model._check_new_name(name)
    checked = source if isinstance(source, CheckedAdapter) else check_adapter(model, source)
    model._install(name, checked.config, checked.plan)
    try:
        _copy_in(model, checked, name)
    except Exception:
        model._remove(name)
        raise
    if activate or (activate is None and not model.active_adapters):
        model.set_active(name)
    else:
        model._apply_active()
    return checked.plan


def load_weights_into(model: AdaptedModel, path: Path, name: str) -> None:
    """Copy the adapter saved at `path` into adapter `name`'s existing parameters, which stay the same objects
    (an optimizer or a DistributedDataParallel wrapper holding them keeps working). The file must come from an
    adapter with the same config, e.g. a checkpoint of this run; nothing is copied if anything does not fit."""
    model._check_known([name])
    if model.configs[name].method == "adalora":
        from vislora.formats_variants import load_training_state

        return load_training_state(model, path, name)
    config_file, weights_file, extra_file = find_adapter_files(path)
    config = saved_config(model.configs[name])
    if extra_file.is_file():
        found = _vislora_config(read_json(extra_file), config_file)
        if found != config:
            changed = sorted(k for k in type(config).model_fields if getattr(found, k) != getattr(config, k))
            raise AdapterFileError(f"adapter {path} was saved from another config than adapter {name!r} (differs in "
                                   f"{', '.join(changed)}); load it as a new adapter with load_adapter instead")
    _copy_in(model, _check_weights(model, path, config, weights_file), name)


def find_adapter_files(path: Path) -> tuple[Path, Path, Path]:
    if path.suffix in PICKLE_SUFFIXES or (path.is_dir() and not (path / WEIGHTS_FILE).exists() and any(
        (path / f"adapter_model{s}").exists() for s in PICKLE_SUFFIXES
    )):
        raise AdapterFileError(
            f"refusing to load a pickle adapter file at {path}: unpickling can run arbitrary code. Convert it "
            "once on a machine you trust: python -c \"import torch, safetensors.torch as st; "
            "st.save_file(torch.load('adapter_model.bin', weights_only=True), 'adapter_model.safetensors')\""
        )
    folder = path.parent if path.suffix == ".safetensors" else path
    if not folder.is_dir():
        raise AdapterFileError(f"adapter directory {folder} does not exist")
    config_file, weights_file = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for needed in (config_file, weights_file):
        if not needed.is_file():
            raise AdapterFileError(f"{folder} is not an adapter directory: {needed.name} is missing "
                                   f"(found: {sorted(p.name for p in folder.iterdir()) or 'nothing'})")
    return config_file, weights_file, folder / EXTRA_FILE


def read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFileError(f"{file} is not valid JSON ({exc}); the file is corrupt or truncated") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{file} must hold a JSON object, found {type(data).__name__}")
    return data


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """Load every tensor of a safetensors file, turning any decoding failure into AdapterFileError."""
    try:
        with safe_open(str(file), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    except Exception as exc:  # safetensors raises several types for corrupt input
        raise AdapterFileError(f"{file} is not a readable safetensors file ({type(exc).__name__}: {exc}); it is "
                               "probably truncated or corrupt: save or copy it again") from None


def _vislora_config(extra: dict[str, Any], file: Path) -> AdapterConfig:
    version = extra.get("format_version")
    if version != FORMAT_VERSION:
        raise AdapterFileError(f"{file.parent / EXTRA_FILE} has format_version {version!r}; this vislora reads "
                               f"version {FORMAT_VERSION}. Upgrade vislora or re-save the adapter.")
    try:
        return AdapterConfig.parse(extra.get("adapter_config", {}))
    except ConfigError as exc:
        raise AdapterFileError(f"{file.parent / EXTRA_FILE}: {exc}") from None


def config_from_peft(peft: dict[str, Any], file: Path | None = None) -> AdapterConfig:
    """An AdapterConfig that reproduces a PEFT LoraConfig's targets, ranks and scales."""
    where = file or "PEFT config"
    if peft.get("peft_type") != "LORA":
        raise AdapterFileError(f"{where}: peft_type {peft.get('peft_type')!r} is not supported; vislora loads "
                               "LoRA adapters (peft_type 'LORA')")
    odd = {k: peft[k] for k, default in _UNSUPPORTED_PEFT.items()
           if k in peft and peft[k] not in (default, None, False, [], {})}
    if odd:
        raise AdapterFileError(f"{where}: options {odd} are not supported by vislora's LoRA loader yet; "
                               "re-train without them or merge the adapter with PEFT")
    init = peft.get("init_lora_weights", True)
    if isinstance(init, str) and init != "gaussian":
        raise AdapterFileError(
            f"{where}: init_lora_weights={init!r}: this adapter's weights are relative to the residual base model "
            f"that {init.split('_')[0]} initialisation made, which is not in the file. Save it with PEFT's "
            "save_pretrained(..., path_initial_model_for_weight_conversion=...) to get a plain LoRA, then load that"
        )
    targets = peft.get("target_modules")
    if not targets:
        raise AdapterFileError(f"{where}: target_modules is empty")
    # PEFT names are plain suffixes; as explicit regexes they cannot be read as vislora roles
    as_regex = [f"re:{targets}"] if isinstance(targets, str) else [f"re:(?:.*\\.)?{re.escape(t)}" for t in targets]
    exclude = peft.get("exclude_modules") or []
    exclude = [f"re:{exclude}"] if isinstance(exclude, str) else [f"re:(?:.*\\.)?{re.escape(t)}" for t in exclude]
    layers = peft.get("layers_to_transform")
    try:
        return AdapterConfig.parse({
            "rank": peft.get("r", 8),
            "alpha": peft.get("lora_alpha", 8),
            "dropout": peft.get("lora_dropout", 0.0),
            "use_rslora": peft.get("use_rslora", False),
            "method": "dora" if peft.get("use_dora") else "lora",
            "targets": as_regex,
            "exclude": exclude,
            "layers": [layers] if isinstance(layers, int) else layers,
            "rank_pattern": peft.get("rank_pattern") or {},
            "alpha_pattern": peft.get("alpha_pattern") or {},
            "modules_to_save": peft.get("modules_to_save") or [],
        })
    except ConfigError as exc:
        raise AdapterFileError(f"{where}: {exc}") from None


def _expected_shapes(model: AdaptedModel, plan: TargetPlan, config: AdapterConfig) -> dict[str, tuple]:
    """File keys and shapes the plan needs, in PEFT's layout (MoLoRA: vislora's own)."""
    if config.method == "molora":
        from vislora.formats_variants import expert_shapes

        return {**expert_shapes(plan, config), **_saved_module_shapes(model, plan)}
    shapes: dict[str, tuple] = {}
    mha_ranks: dict[str, int] = {}
    mha_paths = mha_module_paths(model)
    for target in plan.targets:
        rank = target.rank * max(1, len(target.slices))
        parent = target.path.rpartition(".")[0]
        if target.kind == "mha_in_proj" or (parent in mha_paths and target.path.endswith(".out_proj")):
            mha = target.module_path if target.kind == "mha_in_proj" else parent
            mha_ranks[mha] = max(mha_ranks.get(mha, 0), rank)
            continue
        shapes[f"{PREFIX}{target.path}.lora_A.weight"] = (rank, target.in_features)
        shapes[f"{PREFIX}{target.path}.lora_B.weight"] = (target.out_features, rank)
        if config.method == "dora":
            shapes[f"{PREFIX}{target.path}.lora_magnitude_vector"] = (target.out_features,)
    for mha, rank in mha_ranks.items():
        embed = model._layers[mha].in_features if mha in model._layers else _embed_dim(model, mha)
        for key, n_out in ((mha, 3 * embed), (f"{mha}.base_layer.out_proj", embed)):
            shapes[f"{PREFIX}{key}.lora_A.weight"] = (rank, embed)
            shapes[f"{PREFIX}{key}.lora_B.weight"] = (n_out, rank)
            if config.method == "dora":
                shapes[f"{PREFIX}{key}.lora_magnitude_vector"] = (n_out,)
    return {**shapes, **_saved_module_shapes(model, plan)}


def _saved_module_shapes(model: AdaptedModel, plan: TargetPlan) -> dict[str, tuple]:
    from vislora.targets import logical_modules

    modules = logical_modules(model.base_model)
    return {f"{PREFIX}{module_path}.{key}": tuple(value.shape) for module_path in plan.modules_to_save
            for key, value in modules[module_path].state_dict().items()}


def _embed_dim(model: AdaptedModel, mha: str) -> int:
    from vislora.targets import logical_modules

    return logical_modules(model.base_model)[mha].embed_dim


def check_fit(path: Path, expected: dict[str, tuple], tensors: dict[str, torch.Tensor]) -> None:
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    wrong = [f"{k}: file {tuple(tensors[k].shape)} vs model {expected[k]}" for k in expected
             if k in tensors and tuple(tensors[k].shape) != expected[k]]
    bad = [k for k, v in tensors.items() if k in expected and not torch.isfinite(v).all()]
    if not (missing or unexpected or wrong or bad):
        return
    parts = []
    for label, items in (("missing from the file", missing), ("not in this model", unexpected),
                         ("wrong shape (another model or rank?)", wrong), ("NaN/Inf values", bad)):
        if items:
            parts.append(f"{len(items)} {label}: {'; '.join(_strip(i) for i in items[:5])}"
                         + (" ..." if len(items) > 5 else ""))
    raise AdapterFileError(f"adapter {path} does not fit this model, nothing was loaded. " + " | ".join(parts))


def _strip(key: str) -> str:
    return key.removeprefix(PREFIX)


def _copy_in(model: AdaptedModel, checked: CheckedAdapter, name: str) -> None:
    with torch.no_grad():
        if checked.pairs is None:
            from vislora.formats_variants import copy_experts

            copy_experts(model, checked.plan, name, checked.tensors)
        for module_path, a, b, magnitude in (checked.pairs or {}).values():
            layer = model._layers[module_path]
            layer.import_pair(name, a, b)
            if name in layer.lora_magnitude:
                layer.lora_magnitude[name].copy_(magnitude)
        for module_path in checked.plan.modules_to_save:
            copy = model._saved[module_path].copies[name]
            copy.load_state_dict({k: checked.tensors[f"{PREFIX}{module_path}.{k}"] for k in copy.state_dict()})


def _layer_pairs(model: AdaptedModel, plan: TargetPlan, tensors: dict[str, torch.Tensor]) -> dict[str, LayerPair]:
    """Target path -> its pair as the layer stores it: MHA padding and shared scale undone, q/k/v slices unstacked
    (an error if B has weight outside its slices)."""
    mha_paths, pairs = mha_module_paths(model), {}
    for target in plan.targets:
        parent = target.path.rpartition(".")[0]
        if target.kind == "mha_in_proj":
            key = target.module_path
        elif parent in mha_paths and target.path.endswith(".out_proj"):
            key = f"{parent}.base_layer.out_proj"
        else:
            key = target.path
        a, b = tensors[f"{PREFIX}{key}.lora_A.weight"], tensors[f"{PREFIX}{key}.lora_B.weight"]
        if key != target.path:  # an MHA pair, padded to the attention's shared rank and scale
            rank = target.rank * max(1, len(target.slices))
            a, b = a[:rank], b[:, :rank] * (_shared_mha_scale(plan, target) / target.scale)
        pairs[target.path] = LayerPair(target.module_path, a, _unstack_slices(b, target) if target.slices else b,
                                       tensors.get(f"{PREFIX}{key}.lora_magnitude_vector"))
    return pairs


def _shared_mha_scale(plan: TargetPlan, target: Target) -> float:
    """The scale _pad_mha gave an attention's pairs: in_proj's if adapted, else out_proj's."""
    mha = target.module_path if target.kind == "mha_in_proj" else target.path.rpartition(".")[0]
    in_proj = next((t for t in plan.targets if t.kind == "mha_in_proj" and t.module_path == mha), None)
    return in_proj.scale if in_proj is not None else target.scale
