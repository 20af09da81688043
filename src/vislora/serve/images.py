"""Decode uploaded bytes with vislora.data.load_image, the reader training used (size checked before pixels are
decoded): 8-bit images as PIL RGB, 16-bit grayscale PNG/TIFF and DICOM as float tensors [3, H, W]."""

from __future__ import annotations

import base64
import binascii
import warnings

from PIL import Image, UnidentifiedImageError

from vislora.data.images import LoadedImage, Window, load_image
from vislora.errors import BadImage, DataError, TooLarge

FORMATS_HINT = "send PNG, JPEG, WebP, BMP, GIF, 16-bit grayscale PNG/TIFF or DICOM bytes"
LIMIT = "limits.max_image_pixels"


def decode_image(data: bytes, max_pixels: int, window: Window = "auto") -> LoadedImage:
    """The image in `data` read as training read it (`window`: the run's DICOM window); BadImage naming the problem
    if it is empty, not an image, truncated or a DICOM the server cannot decode, TooLarge (413) above `max_pixels`."""
    if not data:
        raise BadImage(f"the image is empty (0 bytes); {FORMATS_HINT}")
    what = f"could not decode the upload ({len(data):,} bytes starting {data[:8]!r})"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return load_image(data, window=window, max_pixels=max_pixels)
    except TooLarge as exc:
        raise TooLarge(f"{exc} ({LIMIT})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise TooLarge(f"{what}: {exc}; the server refuses images above {max_pixels:,} pixels ({LIMIT}) and above "
                       "Pillow's decompression-bomb limit") from None
    except DataError as exc:  # its message names the fix
        raise BadImage(f"{what}: {exc}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise BadImage(f"{what} as an image: {exc}; {FORMATS_HINT}") from None


def decode_base64(text: str) -> bytes:
    """Bytes of a base64 string (a `data:image/...;base64,` prefix is allowed)."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadImage(f"the image field is not valid base64 ({exc}); encode the file's bytes, e.g. "
                       "base64.b64encode(open('cat.png', 'rb').read()).decode()") from None
