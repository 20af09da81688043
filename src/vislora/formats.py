"""Adapter files: PEFT's directory layout and key names, safetensors only, atomic writes.

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
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vislora import __version__
from vislora.config import AdapterConfig
from vislora.errors import AdapterFileError, ConfigError, TargetError
from vislora.io import atomic_write, atomic_write_text
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


def _saved_rank(model: AdaptedModel, target: Target, name: str) -> int:
    return model._layers[target.module_path].export_pair(name)[2]


def _peft_pairs(model: AdaptedModel, plan: TargetPlan, name: str) -> dict[str, dict[str, Pair]]:
    """PEFT module path -> {key prefix: pair}; MHA pairs padded to one rank and one scale."""
    out: dict[str, dict[str, Pair]] = {}
    mha_paths = _mha_paths(model)
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


def _mha_paths(model: AdaptedModel) -> set[str]:
    from torch.nn import MultiheadAttention

    from vislora.targets import logical_modules

    return {p for p, m in logical_modules(model.base_model).items() if isinstance(m, MultiheadAttention)}


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


def _exact(path: str) -> str:
    """A PEFT rank/alpha_pattern key matching exactly this module path."""
    return "^" + re.escape(path)


def base_model_name(model: torch.nn.Module) -> str | None:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("hf_hub_id") or cfg.get("architecture") if isinstance(cfg, dict) else None
    return name or getattr(getattr(model, "config", None), "_name_or_path", None) or None


# ------------------------------------------------------------------ load
def load_adapter_into(model: AdaptedModel, path: Path, name: str, activate: bool | None) -> TargetPlan:
    """Check the adapter at `path` against `model` completely, then install it as `name`."""
    model._check_new_name(name)
    config_file, weights_file, extra_file = find_adapter_files(path)
    peft_config = read_json(config_file)
    extra = read_json(extra_file) if extra_file.is_file() else None
    config = _vislora_config(extra, config_file) if extra else config_from_peft(peft_config, config_file)
    try:
        plan = resolve_targets(model.base_model, config)
    except TargetError as exc:
        raise AdapterFileError(f"adapter {path} does not fit this model (was it trained on another one?): "
                               f"{exc}") from None
    tensors = read_safetensors(weights_file)
    expected = _expected_shapes(model, plan, config)
    check_fit(path, expected, tensors)
    model._install(name, config, plan)
    _copy_in(model, plan, name, tensors)
    if activate or (activate is None and not model.active_adapters):
        model.set_active(name)
    else:
        model._apply_active()
    return plan


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
            changed = sorted(k for k in config.model_fields if getattr(found, k) != getattr(config, k))
            raise AdapterFileError(f"adapter {path} was saved from another config than adapter {name!r} (differs in "
                                   f"{', '.join(changed)}); load it as a new adapter with load_adapter instead")
    plan = resolve_targets(model.base_model, config)
    tensors = read_safetensors(weights_file)
    check_fit(path, _expected_shapes(model, plan, config), tensors)
    _copy_in(model, plan, name, tensors)


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
    mha_paths = _mha_paths(model)
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


def _copy_in(model: AdaptedModel, plan: TargetPlan, name: str, tensors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        if model.configs[name].method == "molora":
            from vislora.formats_variants import copy_experts

            copy_experts(model, plan, name, tensors)
        else:
            _copy_pairs(model, plan, name, tensors)
        for module_path in plan.modules_to_save:
            copy = model._saved[module_path].copies[name]
            copy.load_state_dict({k: tensors[f"{PREFIX}{module_path}.{k}"] for k in copy.state_dict()})


def _copy_pairs(model: AdaptedModel, plan: TargetPlan, name: str, tensors: dict[str, torch.Tensor]) -> None:
    mha_paths = _mha_paths(model)
    for target in plan.targets:
        layer = model._layers[target.module_path]
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
        layer.import_pair(name, a, _unstack_slices(b, target) if target.slices else b)
        if name in layer.lora_magnitude:
            layer.lora_magnitude[name].copy_(tensors[f"{PREFIX}{key}.lora_magnitude_vector"])


def _shared_mha_scale(plan: TargetPlan, target: Target) -> float:
    """The scale _pad_mha gave an attention's pairs: in_proj's if adapted, else out_proj's."""
    mha = target.module_path if target.kind == "mha_in_proj" else target.path.rpartition(".")[0]
    in_proj = next((t for t in plan.targets if t.kind == "mha_in_proj" and t.module_path == mha), None)
    return in_proj.scale if in_proj is not None else target.scale
