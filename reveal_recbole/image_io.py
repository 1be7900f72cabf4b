"""Decoding item images from untrusted bytes: one place that says which images are accepted.

The image download (``dataset_prep/download_images.py``) and feature extraction (FVE) both read
files from the wild. Pillow only refuses images above twice ``Image.MAX_IMAGE_PIXELS`` (179 M
pixels) and merely warns below that, so a few hundred bytes of PNG can still ask for gigabytes.
:func:`decode_image` checks the size in the header, before any pixel is decoded, against
:data:`MAX_IMAGE_PIXELS`: far above any product photo, far below what fills memory.
"""
from __future__ import annotations

import io
import re
import struct

from PIL import Image

MAX_IMAGE_PIXELS = 40_000_000  # e.g. 6325 x 6325; Amazon product images are at most ~2-3 M pixels


class ImageRejected(ValueError):
    """The bytes are not an image we accept (undecodable, truncated, or too many pixels)."""


def decode_image(
    data: bytes, draft_size: tuple[int, int] | None = None, max_pixels: int = MAX_IMAGE_PIXELS
) -> Image.Image:
    """``data`` fully decoded as an RGB image; :class:`ImageRejected` says why when it is not.

    ``draft_size``: JPEGs larger than twice that are decoded at a reduced DCT scale (faster).
    The returned image keeps ``format`` (``"JPEG"``, ``"PNG"``, ...) of the source.
    """
    if not data:
        raise ImageRejected("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageRejected(
                    f"{width}x{height} = {width * height:,} pixels is over the limit of {max_pixels:,} "
                    "(decompression-bomb guard)"
                )
            source_format = image.format
            if draft_size is not None and source_format == "JPEG":
                image.draft("RGB", draft_size)
            rgb = image.convert("RGB")  # decodes every pixel: truncated data fails here
    except ImageRejected:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError) as error:
        reason = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "the data", " ".join(str(error).split()))
        raise ImageRejected(f"not a readable image ({type(error).__name__}: {reason})") from error
    rgb.format = source_format
    return rgb
