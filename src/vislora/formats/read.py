"""Reading adapter directories (vislora's or PEFT's), checking them against a model, loading them into it.

A directory holds `adapter_config.json` (a PEFT LoraConfig), `adapter_model.safetensors` (see vislora.formats.peft
for the key layout) and, from vislora, `vislora_adapter.json` with what PEFT's config cannot say (roles, q/k/v
slices, the method); the last is optional when loading. Pickle files are refused. Everything is checked (shapes,
target names, finite values) before any weight of the model is touched.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from vislora.adapters.methods import method_class
from vislora.config import AdapterConfig
from vislora.errors import AdapterFileError, ConfigError, TargetError
from vislora.formats.peft import PAIR, PEFT_LORA, PREFIX, FileLayout, shared_scale, unstack_blocks
from vislora.model import AdaptedModel, AdapterWeights
from vislora.targets import TargetPlan, logical_modules, resolve_targets

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
EXTRA_FILE = "vislora_adapter.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
FORMAT_VERSION = 1
ADAPTER_FILES = (f"an adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE}, as vislora's save_adapter and PEFT's "
                 "save_pretrained write them")
# PEFT LoraConfig fields whose non-default values change the computation in ways vislora does not model
_UNSUPPORTED_PEFT = {"fan_in_fan_out": False, "bias": "none", "lora_bias": False,
                     "layer_replication": None, "trainable_token_indices": None,
                     "use_qalora": False, "use_bdlora": None}


def check_adapter(model: AdaptedModel, path: str | Path) -> AdapterWeights:
    """Read the adapter at `path` and check it against `model` completely; nothing in `model` changes.
    `model.install(name, weights)` then only puts it in place."""
    path = Path(path)
    config_file, weights_file, extra_file = find_adapter_files(path)
    peft = read_json(config_file)
    extra = read_json(extra_file) if extra_file.is_file() else None
    config = vislora_config(extra, config_file) if extra else config_from_peft(peft, config_file)
    return read_weights(model, path, config, weights_file)


def load_adapter(model: nn.Module, path: str | Path | AdapterWeights, name: str = "default",
                 activate: bool | None = None) -> AdaptedModel:
    """Load a saved adapter (vislora or PEFT directory, or weights `check_adapter` read) as adapter `name`.

    `model` is an AdaptedModel, or a plain base model that gets wrapped (and is left as it was if loading fails).
    Returns the AdaptedModel.
    """
    adapted = model if isinstance(model, AdaptedModel) else AdaptedModel(model)
    try:
        adapted.check_new_name(name)
        weights = path if isinstance(path, AdapterWeights) else check_adapter(adapted, path)
        adapted.install(name, weights, activate)
    except Exception:
        if adapted is not model:
            adapted.unload(merge=False)
        raise
    return adapted


def read_weights(model: AdaptedModel, path: Path, config: AdapterConfig, weights_file: Path) -> AdapterWeights:
    """Resolve `config` on `model`, read the weights and check them against what that plan needs."""
    modules = logical_modules(model.base_model)  # walked once: a hot load among many adapters pays for each walk
    try:
        plan = resolve_targets(model.base_model, config, modules)
    except TargetError as exc:
        raise AdapterFileError(f"adapter {path} does not fit this model (was it trained on another one?): "
                               f"{exc}") from None
    tensors = read_safetensors(weights_file)
    check_fit(path, expected_shapes(model.base_model, plan, config, modules), tensors)
    return AdapterWeights(config, plan, layer_tensors(model.base_model, plan, config, tensors, modules),
                          saved_tensors(plan, tensors), str(path))


def expected_shapes(base: nn.Module, plan: TargetPlan, config: AdapterConfig,
                    modules: dict[str, nn.Module] | None = None) -> dict[str, tuple[int, ...]]:
    """File keys and shapes the plan needs (PEFT's layout where the method has one); `modules`: the base's
    `logical_modules`, if the caller has them."""
    modules = logical_modules(base) if modules is None else modules
    method = method_class(config)
    shapes: dict[str, tuple[int, ...]] = {}
    layout = FileLayout.of(base, plan, modules)
    mha_ranks: dict[str, int] = {}
    for target in plan.targets:
        own = method.file_shapes(target, config)
        module = layout.module(target) if method.peft_type == PEFT_LORA else target.path
        mha = layout.attention(target) if method.peft_type == PEFT_LORA else None
        for name, shape in own.items():
            if mha is None or name not in PAIR:
                shapes[f"{PREFIX}{module}.{method.peft_keys[name]}"] = shape
        if mha is not None:
            mha_ranks[mha] = max(mha_ranks.get(mha, 0), own["lora_A"][0])
            if "lora_magnitude" in own:  # PEFT keeps both of an attention's magnitudes
                other = f"{mha}.base_layer.out_proj" if target.kind == "mha_in_proj" else mha
                size = layout.attentions[mha] * (3 if other == mha else 1)
                shapes.setdefault(f"{PREFIX}{other}.{method.peft_keys['lora_magnitude']}", (size,))
    for mha, rank in mha_ranks.items():
        embed = layout.attentions[mha]
        for key, n_out in ((mha, 3 * embed), (f"{mha}.base_layer.out_proj", embed)):
            shapes[f"{PREFIX}{key}.lora_A.weight"] = (rank, embed)
            shapes[f"{PREFIX}{key}.lora_B.weight"] = (n_out, rank)
    shapes.update({f"{PREFIX}{module_path}.{key}": tuple(value.shape) for module_path in plan.modules_to_save
                   for key, value in modules[module_path].state_dict().items()})
    return shapes


def layer_tensors(base: nn.Module, plan: TargetPlan, config: AdapterConfig, tensors: dict[str, torch.Tensor],
                  modules: dict[str, nn.Module] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Target path -> its tensors as the adapter exports them: an attention's padding and shared scale undone,
    q/k/v blocks unstacked (an error if B has weight outside its blocks)."""
    method = method_class(config)
    layout, out = FileLayout.of(base, plan, modules), {}
    for target in plan.targets:
        if method.peft_type != PEFT_LORA:
            out[target.path] = {name: tensors[f"{PREFIX}{target.path}.{suffix}"]
                                for name, suffix in method.peft_keys.items()}
            continue
        key = layout.module(target)
        own = {name: tensors[f"{PREFIX}{key}.{method.peft_keys[name]}"] for name in method.peft_keys}
        mha = layout.attention(target)
        rank = target.rank * max(1, len(target.slices))
        if mha is not None:  # padded to the attention's shared rank and scale
            own["lora_A"] = own["lora_A"][:rank]
            own["lora_B"] = own["lora_B"][:, :rank] * (shared_scale(plan, mha) / target.scale)
        if target.slices:
            own["lora_B"] = unstack_blocks(own["lora_B"], target, own["lora_A"].shape[0] // len(target.slices))
        out[target.path] = own
    return out


def saved_tensors(plan: TargetPlan, tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Module path -> the state dict of the adapter's copy of a module trained in full."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for path in plan.modules_to_save:
        prefix = f"{PREFIX}{path}."
        out[path] = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    return out


def find_adapter_files(path: Path) -> tuple[Path, Path, Path]:
    """(config, weights, vislora extra) files of the adapter directory `path` (or of its weights file)."""
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
    missing = [needed.name for needed in (config_file, weights_file) if not needed.is_file()]
    if missing:  # the folder's other files are not listed: they may be anyone's
        raise AdapterFileError(f"{folder} is not an adapter directory: {' and '.join(missing)} "
                               f"{'is' if len(missing) == 1 else 'are'} missing ({ADAPTER_FILES})")
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


def vislora_config(extra: dict[str, Any], file: Path) -> AdapterConfig:
    """The AdapterConfig recorded in vislora_adapter.json."""
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
    if peft.get("peft_type") != PEFT_LORA:
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
    targets = [*_as_regexes(peft.get("target_modules")), *_as_regexes(peft.get("target_parameters"))]
    if not targets:
        raise AdapterFileError(f"{where}: target_modules is empty")
    layers = peft.get("layers_to_transform")
    try:
        return AdapterConfig.parse({
            "rank": peft.get("r", 8),
            "alpha": peft.get("lora_alpha", 8),
            "dropout": peft.get("lora_dropout", 0.0),
            "use_rslora": peft.get("use_rslora", False),
            "method": "dora" if peft.get("use_dora") else "lora",
            "targets": targets,
            "exclude": _as_regexes(peft.get("exclude_modules")),
            "layers": [layers] if isinstance(layers, int) else layers,
            "rank_pattern": peft.get("rank_pattern") or {},
            "alpha_pattern": peft.get("alpha_pattern") or {},
            "modules_to_save": peft.get("modules_to_save") or [],
        })
    except ConfigError as exc:
        raise AdapterFileError(f"{where}: {exc}") from None


def _as_regexes(names: str | list[str] | None) -> list[str]:
    """PEFT's names (plain suffixes, or one regex string) as explicit vislora regexes, never read as roles."""
    if not names:
        return []
    if isinstance(names, str):
        return [f"re:{names}"]
    return [f"re:(?:.*\\.)?{re.escape(t)}" for t in names]


def check_fit(path: Path, expected: dict[str, tuple], tensors: dict[str, torch.Tensor]) -> None:
    """Raise AdapterFileError listing every missing, unexpected, mis-shaped or non-finite tensor."""
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
            parts.append(f"{len(items)} {label}: {'; '.join(i.removeprefix(PREFIX) for i in items[:5])}"
                         + (" ..." if len(items) > 5 else ""))
    raise AdapterFileError(f"adapter {path} does not fit this model, nothing was loaded. " + " | ".join(parts))
