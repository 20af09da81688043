"""The one image reader of training, evaluation and serving: 8-bit files, 16-bit grayscale PNG/TIFF and DICOM.

`load_image(source)` returns what the timm transforms of `build_transform` take:
- an ordinary 8-bit file (PNG, JPEG, WebP, BMP, GIF, TIFF): a PIL RGB image, exactly
  `Image.open(path).convert("RGB")`, so 8-bit pipelines see the same pixels as before;
- a 16-bit grayscale PNG or TIFF (Pillow mode I;16): a float32 tensor [3, H, W] = value / 65535, the gray on all three
  channels, no 8-bit rounding;
- a DICOM file (vislora.data.dicom): a float32 tensor [3, H, W] in [0, 1] after rescale, window and MONOCHROME1
  inversion.
PNG/TIFF with 16 bits per colour channel (48/64-bit RGB) are refused: Pillow reads them cut to 8 bits. DICOM is
recognised by content ('DICM' at byte 128), so bytes and files of any name work. With `max_pixels`, a larger image
is refused (TooLarge) from its header, before any pixel is decoded.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vislora.data import dicom
from vislora.data.dicom import WINDOW_PRESETS, Window, check_window
from vislora.errors import DataError

LoadedImage = Image.Image | torch.Tensor
Source = str | Path | bytes
FORMATS = "PNG, JPEG, WebP, BMP, GIF, TIFF (8-bit, or 16-bit grayscale) or DICOM"
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")

__all__ = ["WINDOW_PRESETS", "ImageHeader", "LoadedImage", "Window", "check_window", "image_header", "load_image",
           "preview"]


@dataclass(frozen=True)
class ImageHeader:
    """What a file's header says: size, bits per sample, modality ('photo' unless DICOM), the DICOM window
    (center, width) if it carries one, and its photometric interpretation (DICOM only)."""

    width: int
    height: int
    bits: int
    modality: str = "photo"
    format: str = ""
    window: tuple[float, float] | None = None
    photometric: str | None = None

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    @property
    def dicom(self) -> bool:
        return self.format == "DICOM"


def load_image(source: Source, *, window: Window = "auto", max_pixels: int | None = None) -> LoadedImage:
    """The image in `source` (a path or the file's bytes): a PIL RGB image for 8-bit files, a float32 tensor
    [3, H, W] in [0, 1] for 16-bit grayscale PNG/TIFF and DICOM (see the module docstring).

    `window` is the DICOM window: "auto" (the file's WindowCenter/WindowWidth, else min/max), "none" (min/max),
    a preset (lung, soft_tissue, bone, brain) or a (center, width) pair. Raises DataError naming the file and the
    fix (not an image, DICOM without pixel data, a missing DICOM decoder, 16-bit colour), TooLarge above
    `max_pixels` pixels.
    """
    window = check_window(window)
    name = _name(source)
    if dicom.is_dicom(_head(source)):
        pixels = dicom.read_dicom(source, name, window, max_pixels)
        return torch.from_numpy(np.ascontiguousarray(pixels))
    with _open(source, name) as image:
        dicom.check_pixels(*image.size, max_pixels, name)
        bits = source_bits(image)
        if bits <= 8:
            image.load()
            return image.convert("RGB")
        if image.mode in SIXTEEN_BIT_MODES and bits == 16:
            gray = np.asarray(image, dtype=np.float32) / 65535.0  # [H, W]
            return torch.from_numpy(gray)[None].repeat(3, 1, 1)  # [3, H, W]
    raise DataError(f"{name} has {bits} bits per sample in mode {image.mode} ({image.format}), which Pillow would cut "
                    "to 8 bits; save it as 16-bit grayscale PNG/TIFF or DICOM to keep the precision, or as 8-bit "
                    "RGB if 8 bits suffice")


def image_header(source: Source) -> ImageHeader:
    """The header of the image in `source` (a path or bytes), nothing decoded; DataError as `load_image`."""
    name = _name(source)
    if dicom.is_dicom(_head(source)):
        ds = dicom.read_header(source, name)
        width, height = dicom.pixel_count(ds, name)
        return ImageHeader(width, height, int(ds.get("BitsStored") or ds.get("BitsAllocated") or 0),
                           str(ds.get("Modality") or "unknown"), "DICOM", dicom.header_window(ds),
                           str(ds.get("PhotometricInterpretation") or "MONOCHROME2"))
    with _open(source, name) as image:
        return ImageHeader(*image.size, source_bits(image), format=image.format or "")


def source_bits(image: Image.Image) -> int:
    """Bits per sample stored in the file, which Pillow's mode may not show (a 48-bit RGB PNG opens as RGB)."""
    if image.mode.startswith("I;16"):
        return 16
    if image.format == "TIFF":
        bits = image.tag_v2.get(258, 8)  # BitsPerSample, one value per channel
        return max(bits) if isinstance(bits, tuple) else int(bits)
    rawmodes = [tile.args if isinstance(tile.args, str) else (tile.args or ("",))[0] for tile in image.tile]
    if any(";16" in str(rawmode) for rawmode in rawmodes):
        return 16
    return {"1": 1, "I": 32, "F": 32}.get(image.mode, 8)


def preview(image: LoadedImage) -> Image.Image:
    """An 8-bit RGB PIL image of a loaded image, for display (contact sheets); tensors are rounded to 8 bits."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8)  # [3, H, W]
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())


def _name(source: Source) -> str:
    return "the image" if isinstance(source, bytes) else str(source)


def _head(source: Source) -> bytes:
    """The first 132 bytes: enough to recognise DICOM."""
    if isinstance(source, bytes):
        return source[:132]
    with open(source, "rb") as handle:
        return handle.read(132)


def _open(source: Source, name: str) -> Image.Image:
    """The opened (not yet decoded) PIL image; DataError naming the formats when it is not an image."""
    try:
        return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except UnidentifiedImageError:
        dicom_hint = (" (a .dcm name, but no 'DICM' marker at byte 128: not a DICOM Part 10 file; rewrite it as one "
                      "with a DICOM tool, e.g. DCMTK's dcmconv +F in.dcm out.dcm)"
                      if str(source).lower().endswith((".dcm", ".dicom")) and not isinstance(source, bytes) else "")
        raise DataError(f"{name} is not in an image format vislora reads{dicom_hint}; give {FORMATS}") from None
