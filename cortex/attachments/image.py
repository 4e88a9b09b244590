"""Image checks (from the header, before any decoding) and the copy a model is sent."""

from __future__ import annotations

import io
import warnings
from typing import NamedTuple

from PIL import Image, UnidentifiedImageError

from ..errors import BadAttachment

# Decoding costs 4 bytes a pixel: 25 megapixels is 100 MB at most, and any photo fits.
MAX_PIXELS = 25_000_000
# Providers scale larger images down anyway (OpenAI: 2,048 px on the longest side).
MODEL_SIDE = 2048
_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "WEBP": "image/webp"}


class ImageInfo(NamedTuple):
    width: int
    height: int
    content_type: str


def inspect(head: bytes) -> ImageInfo:
    """Width, height and type from an image's first bytes (its header), without decoding it.

    An image declaring more than `MAX_PIXELS` (a bomb: a few KB that decode to gigabytes) is
    refused here, before a single pixel is decoded.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(head)) as img:  # reads the header only
                width, height, fmt = img.width, img.height, img.format
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise BadAttachment("the image's header cannot be read") from exc
    except Image.DecompressionBombError as exc:
        raise BadAttachment("the image declares too many pixels") from exc
    if fmt not in _FORMATS:
        raise BadAttachment(f"image format {fmt} is not accepted")
    if width < 1 or height < 1 or width * height > MAX_PIXELS:
        raise BadAttachment(
            f"the image declares {width}x{height} pixels; at most {MAX_PIXELS:,} are accepted"
        )
    return ImageInfo(width, height, _FORMATS[fmt])


def for_model(data: bytes, content_type: str, *, side: int = MODEL_SIDE) -> tuple[str, bytes]:
    """The image a model is sent: as uploaded if it fits `side`, else scaled down (PNG, or
    JPEG for a JPEG). The header was checked at upload, so decoding is bounded."""
    with Image.open(io.BytesIO(data)) as img:
        if max(img.size) <= side:
            return content_type, data
        if img.format == "JPEG":
            img.draft("RGB", (side, side))  # decode at a fraction of the size where it can
        img.thumbnail((side, side))
        out = io.BytesIO()
        if img.format == "JPEG" or content_type == "image/jpeg":
            img.convert("RGB").save(out, "JPEG", quality=85)
            return "image/jpeg", out.getvalue()
        saved = img if img.mode in ("RGB", "RGBA", "L", "LA") else img.convert("RGBA")
        saved.save(out, "PNG", compress_level=1)  # a copy for one request: speed over size
        return "image/png", out.getvalue()
