"""Decode uploaded bytes into RGB images safely (size checked before pixels are decoded)."""

from __future__ import annotations

import base64
import binascii
import io
import warnings

from PIL import Image, UnidentifiedImageError

from vislora.errors import BadImage

FORMATS_HINT = "send PNG, JPEG, WebP, BMP or GIF bytes"


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """The RGB image in `data`; BadImage naming the problem if it is empty, not an image, truncated or too big."""
    if not data:
        raise BadImage(f"the image is empty (0 bytes); {FORMATS_HINT}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size  # read from the header: nothing decoded yet
            if width * height > max_pixels:
                raise BadImage(f"the image is {width}x{height} = {width * height:,} pixels, above the limit of "
                               f"{max_pixels:,} (limits.max_image_pixels); resize it before sending")
            image.load()
            return image.convert("RGB")
    except BadImage:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise BadImage(f"could not decode the upload ({len(data):,} bytes starting {data[:8]!r}) as an image: "
                       f"{exc}; {FORMATS_HINT}") from None


def decode_base64(text: str) -> bytes:
    """Bytes of a base64 string (a `data:image/...;base64,` prefix is allowed)."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadImage(f"the image field is not valid base64 ({exc}); encode the file's bytes, e.g. "
                       "base64.b64encode(open('cat.png', 'rb').read()).decode()") from None
