"""Tiling large images: the grid of square tiles that covers an image, the tiles themselves, and the tiling config.

Along each axis of length L a tile side `size` and an `overlap` (both in image pixels) give the stride
size - overlap; tiles start at 0, stride, 2 * stride, ... and the last one is shifted to end at the border, so every
pixel is covered and neighbours share at least `overlap` pixels. An axis shorter than a tile is zero-padded at its
end (zero is the dataset mean once the image is normalised). A tile whose side differs from the model's input side is
resized to it (bilinear, antialiased).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from vislora.data.transforms import InputSpec
from vislora.errors import ConfigError

Aggregate = Literal["mean", "max", "attention"]
Position = tuple[int, int]  # (top, left) of a tile, in image pixels


class TilingConfig(BaseModel):
    """`data.tiling`: a classifier sees each image as tiles, whose features are pooled per image before the head."""

    model_config = ConfigDict(extra="forbid")

    size: int | None = Field(None, ge=1, description="Tile side in image pixels; default: the model's input side.")
    overlap: int = Field(0, ge=0, description="Pixels shared by neighbouring tiles (less than the tile side).")
    aggregate: Aggregate = Field("mean", description="How tile features become one per image: mean, max, or "
                                 "attention (gated attention-MIL, Ilse et al. 2018; trained and saved with the "
                                 "adapter).")
    tiles_per_step: int = Field(16, ge=1, description="Tiles per backbone call: peak memory follows this, not the "
                                "image size (training recomputes each call's activations in the backward pass).")
    image_size: int | None = Field(None, ge=8, description="Images are resized to this square side before tiling, "
                                   "so batches stack; null: each image keeps its size.")

    @model_validator(mode="after")
    def _overlap_below_size(self) -> TilingConfig:
        if self.size is not None:
            check_tiles(self.size, self.overlap)
        return self

    def resolved(self, input_size: int) -> TilingConfig:
        """This config with the tile side filled in: `size`, or the model's `input_size` when unset."""
        size = self.size or input_size
        check_tiles(size, self.overlap)
        return self.model_copy(update={"size": size})


def check_tiles(size: int, overlap: int) -> None:
    """Raise ConfigError unless `size` > 0 and 0 <= `overlap` < `size`."""
    if size < 1:
        raise ConfigError(f"the tile side must be a positive number of pixels, got size={size}")
    if not 0 <= overlap < size:
        raise ConfigError(f"tile overlap must be at least 0 and less than the tile side, got overlap={overlap} with "
                          f"size={size}; lower data.tiling.overlap or raise data.tiling.size")


def image_spec(spec: InputSpec, tiling: TilingConfig | None) -> InputSpec:
    """The transform of the images a model takes: `spec` itself, or for a tiled model whole images at
    tiling.image_size (size None: each keeps its own), normalised as `spec` says."""
    return spec if tiling is None else dataclasses.replace(spec, size=tiling.image_size)


def starts(length: int, size: int, overlap: int = 0) -> list[int]:
    """Where the tiles along one axis of `length` pixels start: every `size - overlap` pixels, the last one ending at
    the border ([0] when the axis is no longer than a tile)."""
    check_tiles(size, overlap)
    if length <= size:
        return [0]
    return [*range(0, length - size, size - overlap), length - size]


def tile_grid(height: int, width: int, size: int, overlap: int = 0) -> list[Position]:
    """(top, left) of every tile covering a `height` x `width` image, row by row."""
    return [(top, left) for top in starts(height, size, overlap) for left in starts(width, size, overlap)]


def pad_to(image: torch.Tensor, size: int) -> torch.Tensor:
    """`image` [C, H, W] zero-padded at the bottom and right to at least `size` on each side (itself if it is)."""
    height, width = image.shape[-2:]
    if height >= size and width >= size:
        return image
    return F.pad(image, (0, max(0, size - width), 0, max(0, size - height)))


def crop_tiles(image: torch.Tensor, positions: Sequence[Position], size: int,
               input_size: int | None = None) -> torch.Tensor:
    """The tiles of `image` [C, H, W] (already padded to `size`) at `positions`: [n, C, input_size, input_size]."""
    tiles = torch.stack([image[:, top:top + size, left:left + size] for top, left in positions])
    return resize_tiles(tiles, input_size)


def resize_tiles(tiles: torch.Tensor, input_size: int | None) -> torch.Tensor:
    """`tiles` [n, C, s, s] resized to [n, C, input_size, input_size] (as they are when the sides agree)."""
    if input_size is None or tiles.shape[-1] == input_size:
        return tiles
    return F.interpolate(tiles, size=(input_size, input_size), mode="bilinear", align_corners=False, antialias=True)


def tile(image: torch.Tensor, size: int, overlap: int = 0,
         input_size: int | None = None) -> tuple[torch.Tensor, list[Position]]:
    """(tiles [n, C, input_size, input_size], their (top, left) positions) covering `image` [C, H, W]; tiles are
    `size` image pixels wide, resized to `input_size` when given and different."""
    if image.dim() != 3:
        raise ConfigError(f"tile() takes one image [C, H, W], got a tensor of shape {tuple(image.shape)}")
    positions = tile_grid(image.shape[-2], image.shape[-1], size, overlap)
    return crop_tiles(pad_to(image, size), positions, size, input_size), positions
