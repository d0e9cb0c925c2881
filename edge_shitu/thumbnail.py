"""Small JPEG thumbnails of gallery items: what a gallery browser shows for each stored code.

A thumbnail is a baseline JPEG of the crop that was embedded, its longer side at most
:data:`THUMBNAIL_SIZE` pixels (a few KB). Galleries store them beside the items (see
:mod:`edge_shitu.gallery_format`) and refuse blobs that are not JPEG or larger than
:data:`MAX_THUMBNAIL_BYTES`.
"""

from __future__ import annotations

import io
from typing import Optional, Sequence

import numpy as np

from edge_shitu.errors import InvalidDtypeError, InvalidInputError

__all__ = ["make_thumbnail", "check_thumbnail", "THUMBNAIL_SIZE", "THUMBNAIL_QUALITY", "MAX_THUMBNAIL_BYTES",
           "JPEG_MAGIC"]

THUMBNAIL_SIZE = 160
"""Default longest side of a thumbnail, in pixels."""

THUMBNAIL_QUALITY = 80
"""Default JPEG quality (1..95)."""

MAX_THUMBNAIL_BYTES = 64 * 1024
"""The largest thumbnail a gallery accepts, in bytes."""

JPEG_MAGIC = b"\xff\xd8\xff"
"""The first bytes of every JPEG file (SOI marker and the next marker's 0xFF)."""


def make_thumbnail(image: np.ndarray, box: Optional[Sequence[float]] = None, *, size: int = THUMBNAIL_SIZE,
                   quality: int = THUMBNAIL_QUALITY) -> bytes:
    """Encodes a small JPEG of an image or of a box in it.

    The crop is scaled (bicubic, keeping its aspect ratio) so that its longer side is at most
    ``size``; it is never enlarged. The JPEG is baseline (not progressive), without metadata.

    Args:
      image: uint8 ``(H, W, 3)`` RGB image.
      box: optional ``(x1, y1, x2, y2)`` in pixels (floats allowed), clipped to the image as by
        :func:`edge_shitu.image.crop`; None for the whole image.
      size: longest side of the thumbnail in pixels, >= 1.
      quality: JPEG quality, 1..95.

    Returns:
      The JPEG file's bytes, at most :data:`MAX_THUMBNAIL_BYTES`.

    Raises:
      InvalidDtypeError: ``image`` is not uint8.
      InvalidInputError: ``image`` is not an ``(H, W, 3)`` array, ``box`` is not four finite numbers
        in order or lies outside the image, ``size`` or ``quality`` is out of range, or the encoded
        thumbnail exceeds :data:`MAX_THUMBNAIL_BYTES` (use a smaller ``size`` or ``quality``).
    """
    from PIL import Image

    from edge_shitu.image import crop

    if not isinstance(image, np.ndarray):
        raise InvalidInputError(f"expected a uint8 (H, W, 3) RGB array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise InvalidDtypeError(f"expected a uint8 (H, W, 3) RGB image, got dtype {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise InvalidInputError(f"expected a uint8 RGB image of shape (H, W, 3), got {image.shape}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise InvalidInputError(f"size must be an integer >= 1, got {size!r}")
    if isinstance(quality, bool) or not isinstance(quality, (int, np.integer)) or not 1 <= quality <= 95:
        raise InvalidInputError(f"quality must be an integer in [1, 95], got {quality!r}")
    region = image if box is None else crop(image, box)
    h, w = region.shape[:2]
    scale = min(1.0, int(size) / max(h, w))
    width, height = max(1, round(w * scale)), max(1, round(h * scale))
    picture = Image.fromarray(np.ascontiguousarray(region))
    if (width, height) != (w, h):
        picture = picture.resize((width, height), Image.Resampling.BICUBIC, reducing_gap=2.0)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=int(quality), optimize=False, progressive=False)
    data = buffer.getvalue()
    if len(data) > MAX_THUMBNAIL_BYTES:
        raise InvalidInputError(f"the {width}x{height} thumbnail takes {len(data)} bytes, more than the "
                                f"{MAX_THUMBNAIL_BYTES} a gallery accepts; use a smaller size or quality")
    return data


def check_thumbnail(blob: object, name: str = "thumbnail") -> bytes:
    """Checks that a value is a thumbnail a gallery can store.

    Args:
      blob: the candidate, which must be ``bytes`` starting with :data:`JPEG_MAGIC` and at most
        :data:`MAX_THUMBNAIL_BYTES` long.
      name: what to call it in messages.

    Returns:
      ``blob`` (as ``bytes``).

    Raises:
      InvalidInputError: ``blob`` is not bytes, not a JPEG, or too large.
    """
    if not isinstance(blob, bytes):
        raise InvalidInputError(f"{name} must be JPEG bytes or None, got {type(blob).__name__}")
    if not blob.startswith(JPEG_MAGIC):
        raise InvalidInputError(f"{name} must be a JPEG (bytes starting with FF D8 FF), got bytes starting "
                                f"with {blob[:3].hex(' ').upper() or 'nothing'}")
    if len(blob) > MAX_THUMBNAIL_BYTES:
        raise InvalidInputError(f"{name} must be at most {MAX_THUMBNAIL_BYTES} bytes, got {len(blob)}")
    return blob
