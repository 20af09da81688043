"""Run a backbone at any square input side, and say how: position embeddings resampled, interpolated or resized.

A vision transformer learns one position embedding per patch of the grid it was trained on (its native side).
At another side each family adapts them its own way:

- timm: `create_model(img_size=S)` resamples a checkpoint's embeddings once (`resample_abs_pos_embed`, bicubic,
  through the model's checkpoint filter) and `model.set_input_size` does the same to a built model
  ("timm-resample"); a model built with `dynamic_img_size=True` resamples them every forward ("timm-dynamic").
- Hugging Face: `forward(..., interpolate_pos_encoding=True)` interpolates every forward (ViT, CLIP, SigLIP); our
  wrappers always pass it where the forward takes it (at the native side it returns the embeddings unchanged);
  DINOv2 always interpolates ("hf-interpolate").
- open_clip: `visual.positional_embedding` resized once with open_clip's own `resize_pos_embed`
  ("open_clip-resize"); a timm trunk inside open_clip uses timm's `set_input_size`.

A backbone without position embeddings (a CNN) takes any side as it is ("none"); one run at its native side is
"native". `fit_input_size` records the choice on the backbone and `input_size_of` reads it back, so the trainer
can write it into task.json (`InputSpec.native_size`, `InputSpec.position_embeddings`).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vislora.data.transforms import InputSpec, model_input_spec
from vislora.errors import ConfigError

logger = logging.getLogger(__name__)

PositionEmbeddings = Literal["native", "none", "timm-resample", "timm-dynamic", "hf-interpolate", "open_clip-resize"]
MIN_SIDE = 8
_RECORD = "vislora_input_size"  # attribute fit_input_size leaves on the backbone


@dataclass(frozen=True)
class InputSize:
    """How a backbone runs at `size`: the side its position embeddings were made for, what was done to them, and
    its patch side (None for a CNN)."""

    size: int
    native_size: int | None
    position_embeddings: PositionEmbeddings
    patch_size: int | None = None


def spec_with_size(spec: InputSpec, backbone: nn.Module) -> InputSpec:
    """`spec` with the backbone's native side and position-embedding method (`input_size_of`) filled in."""
    record = input_size_of(backbone, spec.size)
    return replace(spec, native_size=record.native_size, position_embeddings=record.position_embeddings)


def input_size_of(backbone: nn.Module, size: int | None = None) -> InputSize:
    """How `backbone` runs at `size` (default: the side it is built for): the record `fit_input_size` left, or
    what the model itself says."""
    record = getattr(backbone, _RECORD, None)
    if record is not None and size in (None, record.size):
        return record
    family = family_of(backbone)
    if family == "hf":
        return _hf_record(backbone, size)
    if family == "open_clip":
        visual = _open_clip_visual(backbone)
        native = record.native_size if record else _side(visual.image_size)
        return InputSize(size or native, native, "native" if size in (None, native) else "open_clip-resize",
                         _open_clip_patch(visual))
    if family == "timm":
        return _timm_record(backbone, size, record.native_size if record else _timm_built_side(backbone))
    if size is None:
        raise ConfigError(f"cannot tell the input side of a {type(backbone).__name__}; give the size")
    return InputSize(size, None, "none")


def family_of(backbone: nn.Module) -> str:
    """"timm", "hf", "open_clip" (a CLIP model or its image tower) or "other" (any module that takes images as they
    come)."""
    if _open_clip_visual(backbone) is not None:
        return "open_clip"
    if _hf_vision_config(backbone) is not None:
        return "hf"
    if hasattr(backbone, "pretrained_cfg"):
        return "timm"
    return "other"


def fit_input_size(backbone: nn.Module, size: int | None, native_size: int | None = None) -> InputSize:
    """Make a built `backbone` run at `size` and record how (see the module docstring); `native_size` is the side
    its position embeddings were made for when the model cannot tell (a timm model built at a run's side).

    timm models that cannot change size after building are refused here; build them with `build_timm`."""
    family = family_of(backbone)
    earlier = getattr(backbone, _RECORD, None)
    native_size = native_size or (earlier.native_size if earlier else None)
    if family == "timm":
        record = _fit_timm(backbone, size, native_size)
    elif family == "open_clip":
        record = _fit_open_clip(backbone, size, native_size)
    elif family == "hf":
        record = _hf_record(backbone, size)
        if record.position_embeddings == "hf-interpolate" and not _hf_interpolates(backbone):
            raise ConfigError(f"{type(backbone).__name__} cannot interpolate its position embeddings: it runs only at "
                              f"{record.native_size} px, not {size}; drop data.image_size (or set it to "
                              f"{record.native_size})")
    else:
        record = input_size_of(backbone, size)
    setattr(backbone, _RECORD, record)
    return record


# ---------------------------------------------------------------------------------------------- timm
def build_timm(load: Callable[..., nn.Module], size: int | None, kwargs: dict[str, Any], pretrained: bool,
               native_size: int | None = None, dynamic: bool = False) -> nn.Module:
    """A timm model from `load(**kwargs)` that runs at `size`, its choice recorded (`input_size_of`).

    It is created at kwargs' `img_size`, else `native_size` (the side a run recorded: a randomly initialised base is
    then drawn as that run drew it), else `size` (timm resamples a checkpoint's position embeddings as it loads
    them), then resampled to `size` if that differs. `dynamic` builds it with `dynamic_img_size=True`, so every
    forward may take another side (a multiple of the patch). A model without `img_size` (a CNN) is built as is.
    """
    created = kwargs.get("img_size") or native_size or size
    extra = {"dynamic_img_size": True} if dynamic else {}
    try:
        model = load(**({"img_size": created} if created else {}), **extra, **{
            k: v for k, v in kwargs.items() if k != "img_size"})
    except TypeError as exc:
        if "dynamic_img_size" in str(exc):
            raise ConfigError(f"this timm model cannot run at several sizes (it takes no dynamic_img_size): {exc}; "
                              "drop data.image_sizes or use a ViT") from None
        model = load(**kwargs)  # no img_size argument: a CNN takes any size
    if size is not None and created not in (None, size) and not dynamic and not hasattr(model, "set_input_size"):
        model = load(img_size=size, **{k: v for k, v in kwargs.items() if k != "img_size"})
        created = size
    native = _timm_checkpoint_side(model) if pretrained else created
    fit_input_size(model, size, native)
    return model


def _fit_timm(model: nn.Module, size: int | None, native: int | None) -> InputSize:
    built = _timm_built_side(model)
    fixed = hasattr(model, "patch_embed") and not getattr(model, "dynamic_img_size", False)  # a CNN takes any side
    if fixed and size is not None and size != built:
        if not hasattr(model, "set_input_size"):
            raise ConfigError(f"{type(model).__name__} was built for {built} px and cannot be resized to {size} px "
                              f"after building; build it with img_size={size} (vislora.input_size.build_timm)")
        model.set_input_size(img_size=(size, size))
        logger.info("%s: position embeddings resampled from %d to %d px", type(model).__name__, built, size)
    return _timm_record(model, size, native or built)


def _timm_record(model: nn.Module, size: int | None, native: int | None) -> InputSize:
    patch_embed = getattr(model, "patch_embed", None)
    built = _timm_built_side(model)
    size = size or built or native
    if patch_embed is None or getattr(model, "pos_embed", None) is None:
        return InputSize(size, native, "none", _side(patch_embed.patch_size) if patch_embed is not None else None)
    patch = _side(patch_embed.patch_size)
    if getattr(model, "dynamic_img_size", False):
        return InputSize(size, native, "timm-dynamic" if size != native else "native", patch)
    return InputSize(size, native, "native" if size == native else "timm-resample", patch)


def _timm_built_side(model: nn.Module) -> int | None:
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    return _side(img_size) if img_size is not None else _timm_checkpoint_side(model)


def _timm_checkpoint_side(model: nn.Module) -> int | None:
    input_size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    return int(input_size[-1]) if input_size else None


# ---------------------------------------------------------------------------------------------- Hugging Face
def hf_image_kwargs(forward: Callable[..., Any]) -> dict[str, bool]:
    """`{"interpolate_pos_encoding": True}` when the HF image forward (a model, or a method such as
    `get_image_features`) takes it, else {}: at the native side it changes nothing, at any other it interpolates."""
    function = type(forward).forward if isinstance(forward, nn.Module) else getattr(forward, "__func__", forward)
    return {"interpolate_pos_encoding": True} if _takes_interpolate(function) else {}


@functools.cache
def _takes_interpolate(function: Callable[..., Any]) -> bool:
    return "interpolate_pos_encoding" in inspect.signature(function).parameters


def _hf_vision_config(backbone: nn.Module) -> Any:
    config = getattr(backbone, "config", None)
    if config is None:
        return None
    if hasattr(config, "image_size"):
        return config
    vision = getattr(config, "vision_config", None)
    return vision if hasattr(vision, "image_size") else None


def _hf_record(backbone: nn.Module, size: int | None) -> InputSize:
    config = _hf_vision_config(backbone)
    native, patch = _side(config.image_size), getattr(config, "patch_size", None)
    size = size or native
    return InputSize(size, native, "native" if size == native else "hf-interpolate",
                     _side(patch) if patch is not None else None)


def _hf_interpolates(backbone: nn.Module) -> bool:
    """Whether an HF vision model can run at another side: its embeddings interpolate (DINOv2 always does, ViT,
    CLIP and SigLIP when the forward is asked to)."""
    return any(callable(getattr(module, "interpolate_pos_encoding", None)) for module in backbone.modules())


# ---------------------------------------------------------------------------------------------- open_clip
def _open_clip_visual(backbone: nn.Module) -> nn.Module | None:
    """The open_clip image tower of a CLIP model, or the backbone itself if it is one; None otherwise."""
    if hasattr(backbone, "encode_image") and hasattr(getattr(backbone, "visual", None), "image_size"):
        return backbone.visual
    is_tower = type(backbone).__module__.startswith("open_clip.") and hasattr(backbone, "image_size")
    return backbone if is_tower else None


def _fit_open_clip(backbone: nn.Module, size: int | None, native: int | None = None) -> InputSize:
    """Resize the image tower's position embeddings to `size` with open_clip's own `resize_pos_embed` (bicubic,
    antialiased, class token kept), as `open_clip.create_model(force_image_size=size)` does to a checkpoint.
    `native`: the side they were made for, when an earlier fit resized them."""
    visual = _open_clip_visual(backbone)
    current = _side(visual.image_size)
    native = native or current
    patch = _open_clip_patch(visual)
    trunk = hasattr(visual, "set_input_size")  # a timm trunk
    if size is None or size == current:
        return InputSize(current, native, "native" if current == native else
                         "timm-resample" if trunk else "open_clip-resize", patch)
    if trunk:
        visual.set_input_size(size)
        return InputSize(size, native, "timm-resample", patch)
    from open_clip.model import resize_pos_embed

    old = visual.positional_embedding
    visual.image_size = (size, size)
    visual.grid_size = (size // patch, size // patch)
    state = {"visual.positional_embedding": old.detach()}
    resize_pos_embed(state, SimpleNamespace(visual=visual))  # it reads the new grid from model.visual
    visual.positional_embedding = nn.Parameter(state["visual.positional_embedding"].to(old.dtype),
                                               requires_grad=old.requires_grad)
    logger.info("open_clip image tower: position embeddings resized from %d to %d px", current, size)
    return InputSize(size, native, "open_clip-resize", patch)


def _open_clip_patch(visual: nn.Module) -> int | None:
    patch = getattr(visual, "patch_size", None)
    return _side(patch) if patch is not None else None


# ---------------------------------------------------------------------------------------------- several sides
def runs_at_any_size(backbone: nn.Module) -> bool:
    """Whether one built `backbone` takes any side per forward (a multiple of its patch): a timm model with
    `dynamic_img_size` or without position embeddings, an HF model that interpolates; not open_clip."""
    family = family_of(backbone)
    if family == "timm":
        return getattr(backbone, "dynamic_img_size", False) or input_size_of(backbone).position_embeddings == "none"
    if family == "hf":
        return _hf_interpolates(backbone)
    return family == "other"


def stored_side(backbone: nn.Module) -> int | None:
    """The side of the position-embedding grid a backbone stores (what per-forward interpolation starts from)."""
    family = family_of(backbone)
    if family == "hf":
        return _side(_hf_vision_config(backbone).image_size)
    return _timm_built_side(backbone) if family == "timm" else None


def check_sides(backbone: nn.Module, sides: Sequence[int]) -> None:
    """Refuse sides the backbone cannot take in one build: under MIN_SIDE, not a multiple of its patch, or several
    sides for a model fixed to one."""
    patch = input_size_of(backbone).patch_size
    bad = [side for side in sides if side < MIN_SIDE or (patch and side % patch)]
    if bad:
        raise ConfigError(f"data.image_sizes {list(sides)} holds {bad}: every side must be at least {MIN_SIDE} px"
                          + (f" and a multiple of the patch size {patch} (e.g. {_multiples(patch, bad[0])})"
                             if patch else ""))
    if len(set(sides)) > 1 and not runs_at_any_size(backbone):
        raise ConfigError(f"data.image_sizes {list(sides)}: a {type(backbone).__name__} runs at one side per build "
                          "(its position embeddings are resized once); train at one data.image_size, or use a timm "
                          "ViT or a Hugging Face model")


def _multiples(patch: int, side: int) -> str:
    low = max(patch, side // patch * patch, MIN_SIDE)
    return f"{low} or {low + patch}"


def run_input_spec(backbone: nn.Module, size: int | None, sides: Sequence[int] | None = None) -> InputSpec:
    """A run's input transform at `size` (model_input_spec) with how the backbone runs there; with `sides` (a
    mixed-resolution run, data.image_sizes) those sides too, checked against the backbone (`check_sides`)."""
    spec = spec_with_size(model_input_spec(backbone, size), backbone)
    if not sides:
        return spec
    check_sides(backbone, sides)
    return replace(spec, train_sizes=tuple(sorted(set(sides))))


def sized_batch(batch: dict[str, Any], spec: InputSpec, seed: int, step: int) -> dict[str, Any]:
    """`batch` with its images at the side optimizer step `step` draws from `spec.train_sizes` (unchanged without
    them)."""
    if not spec.train_sizes or "image" not in batch:
        return batch
    side = step_side(spec.train_sizes, seed, step)
    return {**batch, "image": resize_images(batch["image"], side, spec.interpolation)}


def step_side(sides: Sequence[int], seed: int, step: int) -> int:
    """The side optimizer step `step` trains at: drawn from `sides` by (seed, step) alone, so a resumed run draws
    what an uninterrupted one did."""
    draw = int(np.random.SeedSequence([seed, step, 0x51DE]).generate_state(1)[0])
    return sorted(sides)[draw % len(sides)]


def resize_images(images: torch.Tensor, side: int, interpolation: str = "bicubic") -> torch.Tensor:
    """Normalised images [batch, 3, H, W] resized to [batch, 3, side, side] (antialiased when shrinking)."""
    if images.shape[-2:] == (side, side):
        return images
    mode = interpolation if interpolation in ("bilinear", "bicubic") else "bilinear"
    return F.interpolate(images, size=(side, side), mode=mode, antialias=True, align_corners=False)


def _side(value: Any) -> int:
    """A square side from an int or an (h, w) pair."""
    return int(value) if isinstance(value, int) else int(value[-1])
