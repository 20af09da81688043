"""DICOM pixels through pydicom: modality LUT, VOI window to [0, 1], MONOCHROME1 inversion, colour to RGB.

Grayscale: stored values -> modality LUT (`RescaleSlope * x + RescaleIntercept`, or the file's Modality LUT
Sequence; pydicom's `apply_modality_lut`) -> a window onto [0, 1] -> `1 - y` for MONOCHROME1. The window is
the DICOM linear VOI function (PS3.3 C.11.2.1.2.1) scaled to [0, 1]:

    y = clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1)        (w = 1: a step at c - 0.5)

`window` picks (c, w): "auto" the file's own WindowCenter/WindowWidth (the first pair when several are given, and
the file's VOILUTFunction, LINEAR_EXACT `clip((x - c) / w + 0.5, 0, 1)` or SIGMOID `1 / (1 + exp(-4 (x - c) / w))`),
falling back to the data's min/max when the file has none; a preset of WINDOW_PRESETS (in Hounsfield units, for
CT); an explicit (center, width); "none": min/max, `(x - min) / (max - min)`. A VOI LUT Sequence is not applied.

Colour (RGB, YBR_* converted by pydicom, PALETTE COLOR through its lookup table) is scaled by its bit depth and
ignores the window. Multi-frame files are refused (one image per file). pydicom is an optional dependency
(`pip install 'vislora[medical]'`), imported when a DICOM file is read.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vislora.errors import ConfigError, DataError, TooLarge

logger = logging.getLogger(__name__)

Window = str | tuple[float, float]
# (center, width) in Hounsfield units: the usual CT viewing windows
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "soft_tissue": (40.0, 400.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
READ_ERRORS = (OSError, EOFError, ValueError, KeyError, AttributeError, TypeError, IndexError)


def check_window(window: Window | list[float]) -> Window:
    """`window` if valid ("auto", "none", a preset name, or a (center, width) pair with width >= 1), pairs as
    tuples of floats; ConfigError otherwise."""
    if isinstance(window, str):
        if window in ("auto", "none") or window in WINDOW_PRESETS:
            return window
        raise ConfigError(f"unknown DICOM window {window!r}; use 'auto' (the file's own), 'none' (the data's "
                          f"min/max), a preset ({', '.join(WINDOW_PRESETS)}) or a [center, width] pair")
    try:
        center, width = (float(value) for value in window)
    except (TypeError, ValueError):
        raise ConfigError(f"DICOM window {window!r} is neither a name nor a [center, width] pair of numbers; "
                          "e.g. [40, 400] for a soft-tissue window") from None
    if not width >= 1:
        raise ConfigError(f"DICOM window width {width:g} is below 1; give a width of at least 1, e.g. [40, 400]")
    return center, width


def is_dicom(head: bytes) -> bool:
    """True for a DICOM Part 10 file: 128 bytes of preamble, then 'DICM'."""
    return head[128:132] == b"DICM"


def read_header(source: str | Path | bytes, name: str) -> Any:
    """The file's data elements up to (not including) the pixel data."""
    return _dcmread(source, name, stop_before_pixels=True)


def header_window(ds: Any) -> tuple[float, float] | None:
    """The file's first (WindowCenter, WindowWidth), or None when it gives none."""
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center in (None, "") or width in (None, ""):
        return None
    first = [value[0] if _multi(value) else value for value in (center, width)]
    return float(first[0]), float(first[1])


def pixel_count(ds: Any, name: str) -> tuple[int, int]:
    """(width, height) of a DICOM header; DataError when it describes no image."""
    if "Rows" not in ds or "Columns" not in ds:
        raise _no_pixels(ds, name)
    return int(ds.Columns), int(ds.Rows)


def read_dicom(source: str | Path | bytes, name: str, window: Window = "auto",
               max_pixels: int | None = None) -> np.ndarray:
    """Float32 pixels [3, H, W] in [0, 1] of a single-frame DICOM file (see the module docstring)."""
    if max_pixels is not None:
        width, height = pixel_count(read_header(source, name), name)
        check_pixels(width, height, max_pixels, name)
    ds = _dcmread(source, name)  # the pixel data is read as bytes, not decoded
    import pydicom.pixels as dicom_pixels  # pydicom is there: _dcmread said so

    if not any(tag in ds for tag in PIXEL_TAGS):
        raise _no_pixels(ds, name)
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise DataError(f"{name} is a multi-frame DICOM file ({frames} frames); vislora reads one image per file: "
                        "split the frames into single-frame files (e.g. one per slice) and list each")
    pixels = _decode(ds, name)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric == "PALETTE COLOR":
        rgb = dicom_pixels.apply_color_lut(pixels, ds)  # [H, W, 3] uint8/uint16 by the table's bit depth
        return (rgb / np.iinfo(rgb.dtype).max).astype(np.float32).transpose(2, 0, 1)
    if pixels.ndim == 3:  # [H, W, 3] RGB (pydicom has converted YBR_* already)
        return (pixels / float(2 ** int(ds.BitsStored) - 1)).astype(np.float32).transpose(2, 0, 1)
    values = np.asarray(dicom_pixels.apply_modality_lut(pixels, ds), dtype=np.float64)  # [H, W]
    gray = windowed(values, *_window_for(ds, window, name))
    if photometric == "MONOCHROME1":  # low values are white
        gray = 1.0 - gray
    return np.repeat(gray.astype(np.float32)[None], 3, axis=0)


def windowed(values: np.ndarray, center: float | None, width: float | None, function: str = "LINEAR") -> np.ndarray:
    """`values` mapped onto [0, 1] by the VOI function `function` with (center, width); min/max when center is
    None (all zeros for a constant image)."""
    if center is None or width is None:
        low, high = float(values.min()), float(values.max())
        return (values - low) / (high - low) if high > low else np.zeros_like(values)
    return VOI_FUNCTIONS.get(function, _linear)(values, center, width)


def _linear(x: np.ndarray, c: float, w: float) -> np.ndarray:
    if w <= 1:
        return (x > c - 0.5).astype(np.float64)
    return np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0.0, 1.0)


def _linear_exact(x: np.ndarray, c: float, w: float) -> np.ndarray:
    return np.clip((x - c) / w + 0.5, 0.0, 1.0)


def _sigmoid(x: np.ndarray, c: float, w: float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))


VOI_FUNCTIONS: dict[str, Callable[[np.ndarray, float, float], np.ndarray]] = {
    "LINEAR": _linear, "LINEAR_EXACT": _linear_exact, "SIGMOID": _sigmoid}


def check_pixels(width: int, height: int, max_pixels: int | None, name: str) -> None:
    """TooLarge when width x height is above `max_pixels` (None: no limit)."""
    if max_pixels is not None and width * height > max_pixels:
        raise TooLarge(f"{name} is {width}x{height} = {width * height:,} pixels, above the limit of "
                       f"{max_pixels:,} pixels; downscale it, or raise the limit")


def _window_for(ds: Any, window: Window, name: str) -> tuple[float | None, float | None, str]:
    """(center, width, VOI function) for `window` on this file; (None, None, ...) means min/max."""
    window = check_window(window)
    if window == "auto":
        own = header_window(ds)
        if own is None:
            logger.debug("%s has no WindowCenter/WindowWidth: windowed by its min/max", name)
            return None, None, "LINEAR"
        function = str(ds.get("VOILUTFunction") or "LINEAR").upper()
        return own[0], own[1], function
    if window == "none":
        return None, None, "LINEAR"
    center, width = WINDOW_PRESETS[window] if isinstance(window, str) else window
    return center, width, "LINEAR"


def _decode(ds: Any, name: str) -> np.ndarray:
    """The stored pixel values; DataError naming the transfer syntax and what to install when no decoder can."""
    from pydicom.pixels import get_decoder

    syntax = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
    if syntax is None:
        raise DataError(f"{name} has no Transfer Syntax UID in its file meta information, so its pixel data "
                        "cannot be decoded; rewrite the file with a DICOM tool (e.g. dcmconv, gdcmconv)")
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise DataError(f"{name}: pydicom has no decoder for transfer syntax {syntax.name} ({syntax}); "
                        "convert the file to an uncompressed transfer syntax (e.g. gdcmconv --raw)") from None
    if not decoder.is_available:
        raise DataError(f"{name}: its pixel data is compressed as {syntax.name} ({syntax}) and no decoder for it is "
                        f"installed; install one: {_install_hint(decoder)}")
    try:
        return ds.pixel_array
    except RuntimeError as exc:  # every available decoder plugin failed on it
        hint = f"; install another decoder: {_install_hint(decoder)}" if decoder.missing_dependencies else ""
        raise DataError(f"{name}: the installed decoders cannot read its {syntax.name} ({syntax}) pixel data "
                        f"({_brief(exc)}){hint}") from None
    except READ_ERRORS as exc:
        raise DataError(f"{name}: its DICOM pixel data cannot be decoded ({_brief(exc)}); the file may be "
                        "truncated or corrupt") from None


def _install_hint(decoder: Any) -> str:
    """'pip install pylibjpeg pylibjpeg-libjpeg, or pip install python-gdcm' from pydicom's missing dependencies
    ('pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1')."""
    options = []
    for line in decoder.missing_dependencies:
        needs = [re.split(r"[<>=!~ ]", item.strip())[0] for item in line.partition("requires")[2].split(" and ")]
        packages = ["python-gdcm" if package == "gdcm" else package for package in needs if package != "numpy"]
        options.append("pip install " + " ".join(packages))
    return ", or ".join(options) or "a pydicom pixel data plugin (pylibjpeg or python-gdcm)"


def _no_pixels(ds: Any, name: str) -> DataError:
    modality = ds.get("Modality") or "no Modality"
    sop = ds.get("SOPClassUID")
    kind = f"{sop.name} ({modality})" if sop is not None else modality
    return DataError(f"{name} is a DICOM {kind} object that holds no PixelData: it is not an image; remove it from "
                     "the image list (e.g. keep only files whose SOP class is an image storage class)")


def _dcmread(source: str | Path | bytes, name: str, stop_before_pixels: bool = False) -> Any:
    try:
        import pydicom
    except ImportError:
        raise DataError(f"{name} is a DICOM file, and reading DICOM needs pydicom: pip install 'vislora[medical]' "
                        "(or pip install pydicom)") from None
    target = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        return pydicom.dcmread(target, stop_before_pixels=stop_before_pixels)
    except (pydicom.errors.InvalidDicomError, *READ_ERRORS) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise DataError(f"{name} cannot be read as DICOM ({_brief(exc)}); the file is truncated or "
                        "corrupt") from None


def _multi(value: Any) -> bool:
    from pydicom.multival import MultiValue

    return isinstance(value, MultiValue | list | tuple)


def _brief(exc: BaseException) -> str:
    """The exception's message on one line (pydicom's span several)."""
    text = " ".join(str(exc).split())
    return text[:400] if text else type(exc).__name__
