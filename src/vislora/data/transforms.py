"""Input transforms through timm: size and normalisation read from the model, mild augmentation, MixUp.

Augmentation randomness is seeded per (seed, epoch, sample index), so a sample gets the same crop
whatever the number of workers or processes, and a resumed run sees exactly what an uninterrupted one saw.
"""

from __future__ import annotations

import logging
import random
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from vislora.data.images import Window, check_window
from vislora.errors import ConfigError, DataError, VisloraWarning

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


SIZE_FIELDS = ("size", "native_size", "position_embeddings", "train_sizes")


@dataclass(frozen=True)
class InputSpec:
    """What the model expects: square side in pixels (None: any size, images keep theirs, as a tiled model takes
    them), normalisation, resize interpolation; the DICOM `window` images are read with
    (vislora.data.images.load_image), so evaluation and serving read DICOM as training did; and how the backbone runs
    at that side (vislora.input_size): the side its position embeddings were made for and what was done to them, and
    the sides a mixed-resolution run trained at. None where unknown (runs that predate the record)."""

    size: int | None
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bicubic"
    window: Window = "auto"
    native_size: int | None = None
    position_embeddings: str | None = None
    train_sizes: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "window", check_window(self.window))  # a JSON list becomes a (center, width) tuple

    def preprocessing(self) -> dict[str, Any]:
        """Every field but the sizes: what must match for an adapter to run on another side of the same model."""
        return {name: value for name, value in asdict(self).items() if name not in SIZE_FIELDS}


class AugmentConfig(BaseModel):
    """Training augmentation. Mild by default; CutMix and AutoAugment are off (they destabilise low-rank adapters)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="False: the evaluation transform is used for training too.")
    scale: tuple[float, float] = Field((0.8, 1.0), description="RandomResizedCrop area range.")
    hflip: float = Field(0.5, ge=0, le=1, description="Horizontal flip probability.")
    color_jitter: float = Field(0.2, ge=0, description="Brightness/contrast/saturation jitter strength.")
    auto_augment: str | None = Field(None, description="timm AutoAugment policy, e.g. 'rand-m9-mstd0.5'.")
    mixup: float = Field(0.0, ge=0, description="MixUp alpha (0 = off), through timm.data.Mixup.")
    cutmix: float = Field(0.0, ge=0, description="CutMix alpha (0 = off).")
    label_smoothing: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _warn_strong(self) -> AugmentConfig:
        strong = [name for name, on in (("cutmix", self.cutmix > 0), ("auto_augment", self.auto_augment)) if on]
        if strong:
            warnings.warn(f"{' and '.join(strong)} turned on: strong augmentation often destabilises low-rank "
                          "adapters (loss spikes, lower accuracy); compare against the mild default before keeping it",
                          VisloraWarning, stacklevel=2)
        return self


def model_input_spec(model: nn.Module, size: int | None = None) -> InputSpec:
    """Native input size and normalisation from timm `pretrained_cfg`, an HF config/preprocessor, or open_clip."""
    pretrained_cfg = getattr(model, "pretrained_cfg", None)
    if pretrained_cfg:
        from timm.data import resolve_data_config

        cfg = resolve_data_config(model=model)
        built = getattr(getattr(model, "patch_embed", None), "img_size", None)  # a ViT built for another size
        native = built[-1] if built else cfg["input_size"][-1]
        return InputSpec(size or native, tuple(cfg["mean"]), tuple(cfg["std"]), cfg.get("interpolation", "bicubic"))
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "image_size"):
        mean, std = _hf_normalisation(config)
        native = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        return InputSpec(size or native, mean, std)
    visual = getattr(model, "visual", None)
    if visual is not None and hasattr(visual, "image_size"):
        native = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]
        mean = tuple(getattr(visual, "image_mean", None) or IMAGENET_MEAN)
        std = tuple(getattr(visual, "image_std", None) or IMAGENET_STD)
        return InputSpec(size or native, mean, std)
    if size is None:
        raise ConfigError(f"cannot read the input size of a {type(model).__name__}: it has no timm "
                          "pretrained_cfg, Hugging Face config.image_size or open_clip visual.image_size; give the "
                          "size (data.image_size in a train config, base.image_size in a serve config)")
    logger.info("no normalisation found on %s: using ImageNet mean/std", type(model).__name__)
    return InputSpec(size)


def _hf_normalisation(config: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    name = getattr(config, "_name_or_path", "")
    if name:
        try:
            from transformers import AutoImageProcessor

            processor = AutoImageProcessor.from_pretrained(name)
            return tuple(processor.image_mean), tuple(processor.image_std)
        except (OSError, ValueError, AttributeError, TypeError) as exc:
            logger.info("no image processor for %s (%s): using ImageNet mean/std", name, exc)
    return IMAGENET_MEAN, IMAGENET_STD


def build_transform(spec: InputSpec, train: bool, augment: AugmentConfig | None = None) -> nn.Module:
    """A timm transform: resize to `spec.size` (eval), or RandomResizedCrop + flip + jitter (train); with no
    `spec.size`, images keep their size (flip + jitter only when training)."""
    from timm.data import create_transform

    augment = augment or AugmentConfig()
    if spec.size is None:
        return _keep_size(spec, train and augment.enabled, augment)
    common = {"input_size": (3, spec.size, spec.size), "mean": spec.mean, "std": spec.std,
              "interpolation": spec.interpolation}
    if not train or not augment.enabled:
        return create_transform(**common, is_training=False, crop_pct=1.0)
    transform = create_transform(**common, is_training=True, scale=augment.scale, hflip=augment.hflip,
                                 color_jitter=augment.color_jitter, auto_augment=augment.auto_augment, re_prob=0.0)
    if augment.auto_augment:
        transform.transforms.insert(0, pil_only)  # a torchvision Compose
    return transform


def pil_only(image: Image.Image | torch.Tensor) -> Image.Image:
    """`image` if it is a PIL image; DataError for the float tensors of 16-bit and DICOM files, which timm's
    AutoAugment (PIL operations only) cannot take."""
    if isinstance(image, Image.Image):
        return image
    raise DataError("data.augment.auto_augment works on 8-bit images only, and this image is 16-bit or DICOM (read as "
                    "a float tensor to keep its precision); turn auto_augment off for such data")


def _keep_size(spec: InputSpec, train: bool, augment: AugmentConfig) -> nn.Module:
    """To a normalised tensor at the image's own size; flip and colour jitter first when training."""
    from timm.data.transforms import MaybeToTensor  # float tensors of 16-bit and DICOM files pass through
    from torchvision import transforms

    steps = [MaybeToTensor(), transforms.Normalize(spec.mean, spec.std)]
    if train:
        jitter = augment.color_jitter
        steps = [transforms.RandomHorizontalFlip(augment.hflip), transforms.ColorJitter(jitter, jitter, jitter),
                 *steps]
    return transforms.Compose(steps)


def build_mixup(augment: AugmentConfig, num_classes: int) -> Any | None:
    """timm Mixup when MixUp or CutMix is on, else None."""
    if augment.mixup <= 0 and augment.cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=augment.mixup, cutmix_alpha=augment.cutmix, label_smoothing=augment.label_smoothing,
                 num_classes=num_classes)


class SampleTransform:
    """Apply `transform` with torch and Python RNGs seeded by (seed, epoch, index); global RNG state is kept.

    Call `set_epoch` before each epoch (the trainer does).
    """

    def __init__(self, transform: Any, seed: int = 0, random_per_epoch: bool = True) -> None:
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.random_per_epoch = random_per_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, image: Image.Image | torch.Tensor, index: int) -> torch.Tensor:
        epoch = self.epoch if self.random_per_epoch else 0
        seed = int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0])
        state = random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                # the CPU generator only: the transforms draw from it, fork_rng restores only it, and
                # torch.manual_seed would also reseed every CUDA device (queuing a lazy call with a stack trace
                # per image when CUDA is not initialised: 2.5 ms of a 6 ms image on CPU)
                torch.default_generator.manual_seed(seed)
                random.seed(seed)
                return self.transform(image)
        finally:
            random.setstate(state)
