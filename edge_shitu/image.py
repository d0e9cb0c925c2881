"""Image loading, OpenCV-compatible resizing, normalisation and cropping (numpy + Pillow only).

The reference pipeline reads photos with ``cv2.imread(path)[:, :, ::-1]`` and resizes them with
``cv2.resize``. This module reproduces both without OpenCV:

* :func:`load_image` decodes JPEG, PNG, WebP and BMP (sniffed from the content, not the file
  name), applies the EXIF orientation and drops alpha, as ``cv2.imread(path, IMREAD_COLOR)`` does.
* :func:`resize_cubic` and :func:`resize_linear` follow ``cv2.resize`` with ``INTER_CUBIC`` and
  ``INTER_LINEAR`` (half-pixel centres, replicated borders, OpenCV's fixed-point and rounding
  rules), separably in float32 with cached tap tables.
* :func:`normalize_chw` and :func:`to_batch` build model inputs; :func:`crop` cuts detections
  out of an image without the reference's wrap-around and empty-crop bugs.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import os
import warnings
from typing import BinaryIO, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ImageDecodeError, InvalidDtypeError, InvalidInputError, MissingFileError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageSource",
    "load_image",
    "resize_cubic",
    "resize_cubic_scale",
    "resize_linear",
    "normalize_chw",
    "to_batch",
    "crop",
]

_log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 89_478_485
"""Largest image :func:`load_image` decodes by default (Pillow's own ``MAX_IMAGE_PIXELS``)."""

ImageSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, Image.Image, np.ndarray]
"""What :func:`load_image` accepts: a path, encoded bytes, a PIL image or a uint8 RGB array."""

_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
_EXPECTED = "expected JPEG, PNG, WebP or BMP"
_ORIENTATION_TAG = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")

# OpenCV's fixed-point resize works with 11-bit coefficients (INTER_RESIZE_COEF_BITS).
_COEF_SCALE = 2048
_CUBIC_A = -0.75
# Below this many source pixels along either axis, the IPP build of OpenCV falls back from
# IPP's float cubic resize to OpenCV's own fixed-point one.
_IPP_MIN_SIDE = 4
# Target size of the float32 block the vertical pass converts at once (elements): big enough
# to amortise Python overhead, small enough to stay in cache.
_BLOCK_ELEMENTS = 1 << 19
# Output pixels per dense weight block of a banded matmul (see _band_plan): measured best
# between 4 and 16 for 640-pixel outputs from 500- to 4000-pixel sources.
_BAND = 8


# --------------------------------------------------------------------------------------------
# Loading


def load_image(
    source: ImageSource,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: Optional[str] = None,
) -> np.ndarray:
    """Load an image as an RGB uint8 array, as ``cv2.imread(path)[:, :, ::-1]`` would.

    Files are recognised by their content (a WebP file named ``.jpg`` loads fine). The EXIF
    orientation is applied, to PIL images too (``ImageOps.exif_transpose`` removes the tag,
    so an already transposed image is left alone). Alpha is dropped without compositing;
    grey, palette, CMYK and 16-bit images become 8-bit RGB as OpenCV converts them (16-bit
    samples keep their high byte). Multi-frame files give their first frame. The result
    equals OpenCV's on every file tested.

    Args:
      source: a path (``str`` or ``os.PathLike``), the encoded bytes of a file, a
        ``PIL.Image.Image``, or a uint8 array of shape ``(H, W, 3)`` (RGB) or ``(H, W)`` (grey).
        Arrays are validated and returned without copying when already C-contiguous RGB.
      max_pixels: refuse images with more than this many pixels, checked from the header
        before any pixel is decoded (decompression-bomb guard). Pillow's own hard limit
        (``2 * PIL.Image.MAX_IMAGE_PIXELS``) still applies on top of it.
      name: what to call the image in error messages; defaults to the path, ``<bytes>``,
        ``<PIL image>`` or ``<array>``.

    Returns:
      uint8 array of shape ``(H, W, 3)``, RGB, C-contiguous.

    Raises:
      MissingFileError: the path does not exist.
      InvalidInputError: the path is a directory, the source is of an unsupported type, an
        array has the wrong shape or is empty, or ``max_pixels`` is not a positive integer.
      InvalidDtypeError: an array source is not uint8.
      ImageDecodeError: the file is empty, truncated, corrupt, not an image, in a format other
        than JPEG/PNG/WebP/BMP, or larger than ``max_pixels``.
    """
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or max_pixels < 1:
        raise InvalidInputError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    max_pixels = int(max_pixels)

    if isinstance(source, np.ndarray):
        return _rgb_from_array(source, name or "<array>")
    if isinstance(source, Image.Image):
        label = name or "<PIL image>"
        _check_pixels(source.size, max_pixels, label)
        try:
            source.load()
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - Pillow raises many unrelated types here.
            raise _decode_error(label, exc) from exc
        return _rgb_from_pil(source, label)
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = name or "<bytes>"
        data = bytes(source)
        if not data:
            raise ImageDecodeError(f"{label}: cannot decode image: no data (0 bytes); {_EXPECTED}")
        return _decode(io.BytesIO(data), label, max_pixels)
    if isinstance(source, (str, os.PathLike)):
        path = os.fsdecode(os.fspath(source))
        label = name or path
        if os.path.isdir(path):
            raise InvalidInputError(f"{label}: is a directory, expected an image file")
        try:
            fp = open(path, "rb")  # noqa: SIM115 - closed by the with-block below.
        except FileNotFoundError as exc:
            raise MissingFileError(f"{label}: no such image file") from exc
        with fp:
            if os.fstat(fp.fileno()).st_size == 0:
                raise ImageDecodeError(f"{label}: cannot decode image: file is empty (0 bytes); {_EXPECTED}")
            return _decode(fp, label, max_pixels)
    raise InvalidInputError(
        "expected a path, bytes, a PIL.Image.Image or a uint8 (H, W, 3) array, "
        f"got {type(source).__name__}"
    )


def _decode(fp: BinaryIO, label: str, max_pixels: int) -> np.ndarray:
    try:
        # Pillow would emit DecompressionBombWarning from open(); the size check below is ours.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(fp, formats=_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"{label}: image too large to decode safely: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(
            f"{label}: cannot decode image: {_identify(fp)}; {_EXPECTED}"
        ) from exc
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow raises many unrelated types here.
        raise _decode_error(label, exc) from exc
    with im:
        _check_pixels(im.size, max_pixels, label)
        try:
            im.load()
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - Pillow raises many unrelated types here.
            raise _decode_error(label, exc) from exc
        return _rgb_from_pil(im, label)


def _identify(fp: BinaryIO) -> str:
    """Say what an undecodable file is, for the error message (header only, no pixels)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(fp) as other:
                return f"unsupported format {other.format}"
    except Exception:  # noqa: BLE001 - only used to improve an error message.
        return "not a recognised image file"


def _decode_error(label: str, exc: BaseException) -> ImageDecodeError:
    reason = str(exc) or type(exc).__name__
    return ImageDecodeError(f"{label}: cannot decode image: {reason}; {_EXPECTED}")


def _check_pixels(size: Tuple[int, int], max_pixels: int, label: str) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"{label}: image is {width}x{height} = {width * height} pixels, more than "
            f"max_pixels={max_pixels}; refusing to decode it (decompression-bomb guard)"
        )


def _rgb_from_pil(im: Image.Image, label: str) -> np.ndarray:
    im = _apply_orientation(im, label)
    mode = im.mode
    if mode == "RGB":
        return np.array(im, dtype=np.uint8)
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        # OpenCV reduces 16-bit samples to 8 bits by dropping the low byte; Pillow's own
        # conversion would clip them at 255 instead.
        values = np.asarray(im).astype(np.int64)
        grey = (np.clip(values, 0, 65535) >> 8).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if mode == "F":
        grey = np.clip(np.rint(np.asarray(im, dtype=np.float32)), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if mode in ("P", "PA"):
        # A plain palette lookup: Image.convert("RGB") warns on palettes with per-entry alpha.
        palette = np.zeros((256, 3), dtype=np.uint8)
        entries = np.asarray(im.getpalette("RGB") or [], dtype=np.uint8).reshape(-1, 3)[:256]
        palette[: len(entries)] = entries
        indices = np.asarray(im)
        return palette[indices[:, :, 0] if indices.ndim == 3 else indices]
    if mode == "CMYK":
        # OpenCV's CMYK conversion on the inverted (Adobe) samples libjpeg returns, which
        # Pillow has already inverted back; Pillow's own formula differs by 1 on most pixels.
        ink = np.asarray(im).astype(np.int32)
        white = 255 - ink[:, :, 3:4]
        return (white - ((ink[:, :, :3] * white) >> 8)).astype(np.uint8)
    try:
        if mode in ("La", "RGBa"):
            im = im.convert(mode.upper())  # un-premultiply first; Pillow cannot go straight to RGB
        rgb = im.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageDecodeError(f"{label}: cannot convert image mode {mode} to RGB: {exc}") from exc
    return np.array(rgb, dtype=np.uint8)


def _apply_orientation(im: Image.Image, label: str) -> Image.Image:
    try:
        orientation = im.getexif().get(_ORIENTATION_TAG, 1)
    except Exception as exc:  # noqa: BLE001 - a broken EXIF block must not lose the pixels.
        _log.warning("%s: ignoring unreadable EXIF data (%s)", label, exc)
        return im
    method = _TRANSPOSE.get(orientation) if isinstance(orientation, int) else None
    return im if method is None else im.transpose(method)


def _rgb_from_array(arr: np.ndarray, label: str) -> np.ndarray:
    if arr.dtype != np.uint8:
        raise InvalidDtypeError(f"{label}: expected a uint8 image array, got dtype {arr.dtype}")
    if arr.ndim == 2:
        _check_not_empty(arr.shape, label)
        return np.ascontiguousarray(np.repeat(arr[:, :, None], 3, axis=2))
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise InvalidInputError(
            f"{label}: expected an image array of shape (H, W, 3) RGB or (H, W) grey, got {arr.shape}"
        )
    _check_not_empty(arr.shape, label)
    return np.ascontiguousarray(arr)


def _check_not_empty(shape: Tuple[int, ...], label: str) -> None:
    if shape[0] < 1 or shape[1] < 1:
        raise InvalidInputError(f"{label}: expected an image of at least 1x1 pixels, got shape {shape}")


# --------------------------------------------------------------------------------------------
# Resizing


def resize_cubic(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize like ``cv2.resize(img, (width, height), interpolation=cv2.INTER_CUBIC)``.

    Keys cubic (a = -0.75), half-pixel centres, replicated borders, rounded and saturated to
    uint8. Sources at least 4x4 use exact float weights like the IPP-accelerated OpenCV wheels
    for x86 (identical to OpenCV on ~99.999 % of values, off by 1 elsewhere); smaller sources use
    OpenCV's 11-bit fixed-point weights, as OpenCV itself does for them (OpenCV builds without
    IPP, e.g. on ARM, use those everywhere: expect 1-level differences on a few % of values
    there). The reference detector's call
    ``cv2.resize(im, None, fx=640/w, fy=640/h, interpolation=2)`` gives exactly the same result
    as ``resize_cubic(im, 640, 640)``.

    Args:
      img: uint8 ``(H, W, C)`` or ``(H, W)``; any strides.
      width: output width in pixels, >= 1.
      height: output height in pixels, >= 1.

    Returns:
      uint8 ``(height, width, C)`` (or ``(height, width)``), C-contiguous, a new array.

    Raises:
      InvalidDtypeError: ``img`` is not uint8.
      InvalidInputError: ``img`` is not 2-D/3-D or is empty, or a size is not a positive int.
    """
    src = _check_resize_source(img)
    width, height = _check_size(width, "width"), _check_size(height, "height")
    h, w = src.shape[:2]
    return _resize_cubic(img, src, width, height, width / w, height / h)


def resize_cubic_scale(img: np.ndarray, fx: float, fy: float) -> np.ndarray:
    """Resize like ``cv2.resize(img, None, fx=fx, fy=fy, interpolation=cv2.INTER_CUBIC)``.

    The output size is ``(round(W * fx), round(H * fy))`` and, as in OpenCV, the coordinate
    mapping uses ``fx``/``fy`` themselves rather than the ratio of the rounded sizes. For the
    reference call ``fx = 640 / W, fy = 640 / H`` this equals ``resize_cubic(img, 640, 640)``.

    Args:
      img: uint8 ``(H, W, C)`` or ``(H, W)``.
      fx: horizontal scale factor, > 0.
      fy: vertical scale factor, > 0.

    Returns:
      uint8 ``(round(H * fy), round(W * fx), C)``, C-contiguous.

    Raises:
      InvalidDtypeError: ``img`` is not uint8.
      InvalidInputError: ``img`` is malformed, a factor is not a finite positive number, or the
        output would be empty.
    """
    src = _check_resize_source(img)
    h, w = src.shape[:2]
    fx, fy = _check_factor(fx, "fx"), _check_factor(fy, "fy")
    width, height = round(w * fx), round(h * fy)
    if width < 1 or height < 1:
        raise InvalidInputError(
            f"fx={fx}, fy={fy} turn a {w}x{h} image into {width}x{height}; expected at least 1x1"
        )
    return _resize_cubic(img, src, width, height, fx, fy)


def resize_linear(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize like ``cv2.resize(img, (width, height))`` (``INTER_LINEAR``).

    Reproduces OpenCV's 11-bit fixed-point bilinear resize for uint8, including the
    truncations of its vectorised vertical pass, so the result is bit-identical to
    opencv-python on x86.

    Args:
      img: uint8 ``(H, W, C)`` or ``(H, W)``; any strides (a :func:`crop` view is fine).
      width: output width in pixels, >= 1.
      height: output height in pixels, >= 1.

    Returns:
      uint8 ``(height, width, C)`` (or ``(height, width)``), C-contiguous, a new array.

    Raises:
      InvalidDtypeError: ``img`` is not uint8.
      InvalidInputError: ``img`` is not 2-D/3-D or is empty, or a size is not a positive int.
    """
    src = _check_resize_source(img)
    width, height = _check_size(width, "width"), _check_size(height, "height")
    h, w = src.shape[:2]
    if (width, height) == (w, h):
        return np.array(img, order="C")
    columns = _linear_columns(w, width, width / w, src.shape[2])
    yi, yw = _linear_taps(h, height, height / h, False)
    out = _resize_fixed_linear(src, columns, yi, yw)
    return out.reshape(height, width) if img.ndim == 2 else out


def _resize_cubic(
    img: np.ndarray, src: np.ndarray, width: int, height: int, inv_x: float, inv_y: float
) -> np.ndarray:
    h, w = src.shape[:2]
    if (width, height) == (w, h):
        return np.array(img, order="C")
    channels = src.shape[2]
    exact = min(w, h) >= _IPP_MIN_SIDE
    rows = _resize_rows(src, height, inv_y, exact)
    columns = _band_plan(w, width, inv_x, exact, channels)
    out = _round_u8(_resize_columns(rows, columns, width * channels))
    out = out.reshape(height, width, channels)
    return out.reshape(height, width) if img.ndim == 2 else out


def _check_resize_source(img: np.ndarray) -> np.ndarray:
    """Validate a resize input and return it as ``(H, W, C)`` (a view)."""
    if not isinstance(img, np.ndarray):
        raise InvalidInputError(f"expected a uint8 image array, got {type(img).__name__}")
    if img.dtype != np.uint8:
        raise InvalidDtypeError(f"expected a uint8 image array, got dtype {img.dtype}")
    if img.ndim not in (2, 3):
        raise InvalidInputError(f"expected an image of shape (H, W, C) or (H, W), got {img.shape}")
    if img.shape[0] < 1 or img.shape[1] < 1 or (img.ndim == 3 and img.shape[2] < 1):
        raise InvalidInputError(f"expected a non-empty image, got shape {img.shape}")
    return img[:, :, None] if img.ndim == 2 else img


def _check_size(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InvalidInputError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _check_factor(value: float, what: str) -> float:
    try:
        factor = float(value)
    except (TypeError, ValueError):
        factor = math.nan
    if isinstance(value, bool) or not math.isfinite(factor) or factor <= 0:
        raise InvalidInputError(f"{what} must be a finite number > 0, got {value!r}")
    return factor


@functools.lru_cache(maxsize=128)
def _cubic_taps(src: int, dst: int, inv_scale: float, exact: bool) -> Tuple[np.ndarray, np.ndarray]:
    """Source indices int64 ``(dst, 4)`` (clamped = replicated border) and float32 weights."""
    d = np.arange(dst, dtype=np.float64)
    if exact:
        pos = (d + 0.5) * (1.0 / inv_scale) - 0.5
        left = np.floor(pos)
        t = pos - left
        weights = _keys(t[:, None] - np.arange(-1, 3)[None, :]).astype(np.float32)
    else:
        # OpenCV's generic path: float32 coordinates, interpolateCubic() in float32, then
        # coefficients rounded to 11 bits.
        pos = ((d + 0.5) * (1.0 / inv_scale) - 0.5).astype(np.float32)
        left = np.floor(pos)
        x = (pos - left).astype(np.float32)
        a, one = np.float32(_CUBIC_A), np.float32(1)
        xp1, xm1 = x + one, one - x
        c0 = ((a * xp1 - np.float32(5) * a) * xp1 + np.float32(8) * a) * xp1 - np.float32(4) * a
        c1 = ((a + np.float32(2)) * x - (a + np.float32(3))) * x * x + one
        c2 = ((a + np.float32(2)) * xm1 - (a + np.float32(3))) * xm1 * xm1 + one
        c3 = one - c0 - c1 - c2
        coef = np.stack([c0, c1, c2, c3], axis=1)
        weights = (np.rint(coef * np.float32(_COEF_SCALE)) / _COEF_SCALE).astype(np.float32)
    idx = np.clip(left.astype(np.int64)[:, None] + np.arange(-1, 3)[None, :], 0, src - 1)
    return _frozen(idx), _frozen(weights)


def _keys(x: np.ndarray) -> np.ndarray:
    a = _CUBIC_A
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


@functools.lru_cache(maxsize=128)
def _linear_taps(src: int, dst: int, inv_scale: float, clamp: bool) -> Tuple[np.ndarray, np.ndarray]:
    """Source indices int64 ``(dst, 2)`` and int64 11-bit weights, as OpenCV computes them.

    OpenCV pins the weight to the edge pixel outside the image horizontally (``clamp``) but only
    clamps the row indices vertically, keeping the fractional weights.
    """
    d = np.arange(dst, dtype=np.float64)
    pos = ((d + 0.5) * (1.0 / inv_scale) - 0.5).astype(np.float32)
    left = np.floor(pos).astype(np.int64)
    frac = (pos - left.astype(np.float32)).astype(np.float32)
    if clamp:
        outside = (left < 0) | (left >= src - 1)
        frac[outside] = 0
        left = np.clip(left, 0, src - 1)
    coef = np.stack([np.float32(1) - frac, frac], axis=1) * np.float32(_COEF_SCALE)
    weights = np.rint(coef).astype(np.int64)
    idx = np.clip(left[:, None] + np.arange(2)[None, :], 0, src - 1)
    return _frozen(idx), _frozen(weights)


def _frozen(arr: np.ndarray) -> np.ndarray:
    arr = np.ascontiguousarray(arr)
    arr.setflags(write=False)
    return arr


_Band = Tuple[Tuple[int, int, int, int, np.ndarray], ...]


@functools.lru_cache(maxsize=128)
def _band_plan(src: int, dst: int, inv_scale: float, exact: bool, channels: int) -> _Band:
    """Cubic taps as dense weight blocks, one per run of ``_BAND`` output pixels.

    Each entry is ``(d0, d1, s0, s1, weights)``: output pixels ``d0:d1`` read source pixels
    ``s0:s1`` only, through float32 ``weights`` of shape ``((s1 - s0) * C, (d1 - d0) * C)``
    (the per-pixel weights times the identity over channels, so interleaved rows can be used
    as they are). A banded matmul wastes multiplications on zeros but runs in BLAS, several
    times faster than gathering the taps with numpy.
    """
    idx, weights = _cubic_taps(src, dst, inv_scale, exact)
    eye = np.eye(channels, dtype=np.float32)
    plan = []
    for d0 in range(0, dst, _BAND):
        d1 = min(dst, d0 + _BAND)
        s0, s1 = int(idx[d0:d1].min()), int(idx[d0:d1].max()) + 1
        block = np.zeros((s1 - s0, d1 - d0), dtype=np.float64)
        # np.add.at: clamped border taps repeat a source pixel and must add up.
        np.add.at(block, (idx[d0:d1] - s0, np.arange(d1 - d0)[:, None]), weights[d0:d1].astype(np.float64))
        dense = np.kron(block.astype(np.float32), eye)
        plan.append((d0, d1, s0, s1, _frozen(dense)))
    return tuple(plan)


def _resize_rows(src: np.ndarray, dst: int, inv_scale: float, exact: bool) -> np.ndarray:
    """Vertical cubic pass of uint8 ``(H, W, C)``: float32 ``(dst, W * C)``.

    Enlarging, every source row is converted once and a banded matmul does the rest.
    Shrinking, only the 4 tap rows of each output row are gathered, converted and reduced with
    one small matmul per output row, a block at a time (measured faster than the banded matmul
    even for a 2x reduction).
    """
    h, w, c = src.shape
    row = w * c
    out = np.empty((dst, row), dtype=np.float32)
    if dst >= h:
        flat = src.reshape(h, row) if src.flags.c_contiguous else np.ascontiguousarray(src).reshape(h, row)
        converted = flat.astype(np.float32)
        for d0, d1, s0, s1, weights in _band_plan(h, dst, inv_scale, exact, 1):
            np.matmul(weights.T, converted[s0:s1], out=out[d0:d1])
        return out
    idx, weights = _cubic_taps(h, dst, inv_scale, exact)
    taps = idx.shape[1]
    block = max(1, min(dst, _BLOCK_ELEMENTS // (taps * row)))
    work = np.empty((block * taps, row), dtype=np.float32)
    row_weights = weights[:, None, :]
    for d0 in range(0, dst, block):
        d1 = min(dst, d0 + block)
        n = d1 - d0
        converted = work[: n * taps]
        np.copyto(converted, src.take(idx[d0:d1].reshape(-1), axis=0).reshape(n * taps, row))
        np.matmul(row_weights[d0:d1], converted.reshape(n, taps, row), out=out[d0:d1, None, :])
    return out


def _resize_columns(rows: np.ndarray, plan: _Band, width: int) -> np.ndarray:
    """Horizontal pass: float32 ``(N, W * C)`` rows to ``(N, width)`` with a band plan."""
    out = np.empty((rows.shape[0], width), dtype=np.float32)
    channels = width // plan[-1][1]
    for d0, d1, s0, s1, weights in plan:
        np.matmul(rows[:, s0 * channels : s1 * channels], weights, out=out[:, d0 * channels : d1 * channels])
    return out


def _round_u8(values: np.ndarray) -> np.ndarray:
    np.rint(values, out=values)
    np.clip(values, 0, 255, out=values)
    return values.astype(np.uint8)


def _resize_fixed_linear(
    src: np.ndarray, columns: Tuple[np.ndarray, np.ndarray], yi: np.ndarray, yw: np.ndarray
) -> np.ndarray:
    """OpenCV's uint8 INTER_LINEAR in integers: uint8 ``(H, W, C)`` to ``(dh, dw, C)``.

    Horizontal pass: exact sums of 11-bit weights. Vertical pass as in OpenCV's SIMD kernel
    (``VResizeLinearVec_32s8u``): each row sum is shifted right by 4, multiplied by its 11-bit
    weight keeping the high 16 bits, and the sum rounded with ``(v + 2) >> 2``.
    """
    h, w, c = src.shape
    flat_idx, flat_w = columns
    dh, dw = yi.shape[0], flat_idx.shape[1] // c
    used, inverse = np.unique(yi, return_inverse=True)
    inverse = inverse.reshape(yi.shape)
    # Only the rows the vertical pass reads, and of those only the tap columns.
    lines = src.take(used, axis=0).reshape(len(used), w * c)
    acc = lines.take(flat_idx[0], axis=1).astype(np.int32)
    acc *= flat_w[0]
    part = lines.take(flat_idx[1], axis=1).astype(np.int32)
    part *= flat_w[1]
    acc += part
    acc >>= 4
    top = acc.take(inverse[:, 0], axis=0)
    bottom = acc.take(inverse[:, 1], axis=0)
    top *= yw[:, 0, None].astype(np.int32)
    bottom *= yw[:, 1, None].astype(np.int32)
    top >>= 16
    bottom >>= 16
    top += bottom
    top += 2
    top >>= 2
    np.clip(top, 0, 255, out=top)
    return top.astype(np.uint8).reshape(dh, dw, c)


@functools.lru_cache(maxsize=128)
def _linear_columns(src: int, dst: int, inv_scale: float, channels: int) -> Tuple[np.ndarray, np.ndarray]:
    """Column taps over a flattened ``(W * C)`` row: int64 indices, int32 weights ``(2, dst * C)``."""
    idx, weights = _linear_taps(src, dst, inv_scale, True)
    flat = idx.T[:, :, None] * channels + np.arange(channels)[None, None, :]
    wide = np.repeat(weights.T, channels, axis=1).astype(np.int32)
    return _frozen(flat.reshape(2, -1)), _frozen(wide)


# --------------------------------------------------------------------------------------------
# Model inputs


def normalize_chw(
    img: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    scale: float = 1.0 / 255.0,
    *,
    out: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Normalise an image per channel and transpose it to CHW.

    Computes ``(img * scale - mean) / std`` per channel as one float32 multiply-add with
    folded constants; the result is within 1e-6 of the reference formula
    ``(img.astype(float32) * float32(scale) - mean) / std``.

    Args:
      img: uint8 ``(H, W, C)`` with ``C == len(mean)`` (RGB for the PP-ShiTu models).
      mean: per-channel mean, in the scaled unit (e.g. ImageNet ``0.485, 0.456, 0.406``).
      std: per-channel standard deviation, non-zero.
      scale: multiplier applied to the raw uint8 values first.
      out: optional float32 ``(C, H, W)`` C-contiguous array to write into (e.g. a slot of a
        batch), returned.

    Returns:
      float32 ``(C, H, W)``.

    Raises:
      InvalidDtypeError: ``img`` is not uint8, or ``out`` is not float32.
      InvalidInputError: wrong shapes, ``mean``/``std`` of the wrong length, a zero or
        non-finite ``std``/``mean``/``scale``.
    """
    if not isinstance(img, np.ndarray):
        raise InvalidInputError(f"expected a uint8 (H, W, C) array, got {type(img).__name__}")
    if img.dtype != np.uint8:
        raise InvalidDtypeError(f"expected a uint8 (H, W, C) image, got dtype {img.dtype}")
    if img.ndim != 3 or img.shape[0] < 1 or img.shape[1] < 1:
        raise InvalidInputError(f"expected a uint8 image of shape (H, W, C), got {img.shape}")
    h, w, c = img.shape
    mean64 = _per_channel(mean, c, "mean")
    std64 = _per_channel(std, c, "std")
    if np.any(std64 == 0):
        raise InvalidInputError(f"std must be non-zero, got {list(std64)}")
    scale32 = np.float32(scale)
    if not np.isfinite(scale32):
        raise InvalidInputError(f"scale must be finite, got {scale!r}")
    if out is None:
        out = np.empty((c, h, w), dtype=np.float32)
    elif not isinstance(out, np.ndarray) or out.dtype != np.float32:
        raise InvalidDtypeError(f"out must be a float32 array, got {getattr(out, 'dtype', type(out))}")
    elif out.shape != (c, h, w) or not out.flags.c_contiguous:
        raise InvalidInputError(
            f"out must be a C-contiguous float32 array of shape {(c, h, w)}, got {out.shape}"
        )
    gain = (np.float64(scale32) / std64).astype(np.float32)
    bias = (-mean64 / std64).astype(np.float32)
    for ch in range(c):
        np.multiply(img[:, :, ch], gain[ch], out=out[ch])
        out[ch] += bias[ch]
    return out


def _per_channel(values: Sequence[float], channels: int, what: str) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{what} must be {channels} numbers, got {values!r}") from exc
    if arr.shape != (channels,):
        raise InvalidInputError(f"{what} must have one value per channel ({channels}), got {arr.size}")
    if not np.all(np.isfinite(arr)):
        raise InvalidInputError(f"{what} must be finite, got {list(arr)}")
    return arr


def to_batch(images: Sequence[np.ndarray]) -> np.ndarray:
    """Stack CHW images into one NCHW batch.

    Args:
      images: one or more float32 ``(C, H, W)`` arrays of identical shape.

    Returns:
      float32 ``(N, C, H, W)``, C-contiguous.

    Raises:
      InvalidInputError: no images, or shapes that are not ``(C, H, W)`` or differ.
      InvalidDtypeError: an image is not float32.
    """
    images = list(images)
    if not images:
        raise InvalidInputError("expected at least one (C, H, W) image to batch, got none")
    first = images[0]
    for i, chw in enumerate(images):
        if not isinstance(chw, np.ndarray):
            raise InvalidInputError(
                f"image {i}: expected a float32 (C, H, W) array, got {type(chw).__name__}"
            )
        if chw.dtype != np.float32:
            raise InvalidDtypeError(f"image {i}: expected float32, got dtype {chw.dtype}")
        if chw.ndim != 3 or chw.shape != first.shape:
            raise InvalidInputError(f"image {i}: expected shape {first.shape} (C, H, W), got {chw.shape}")
    return np.stack(images)


# --------------------------------------------------------------------------------------------
# Cropping


def crop(img: np.ndarray, box: Sequence[float]) -> np.ndarray:
    """Cut a box out of an image.

    The box covers the pixels from ``floor(x1)`` to ``ceil(x2)`` (exclusive) and likewise in y,
    at least one pixel each way, clipped to the image. Unlike the reference's
    ``img[int(y1):int(y2), int(x1):int(x2)]``, negative coordinates do not wrap around and a
    zero-size box still gives a 1-pixel crop.

    Args:
      img: uint8 ``(H, W, C)``.
      box: ``(x1, y1, x2, y2)`` in pixels (floats), ``x1 <= x2`` and ``y1 <= y2``.

    Returns:
      uint8 ``(h, w, C)`` view into ``img`` with ``h, w >= 1``.

    Raises:
      InvalidDtypeError: ``img`` is not uint8.
      InvalidInputError: ``img`` is not ``(H, W, C)``, the box is not four finite numbers in
        order, or it lies entirely outside the image.
    """
    if not isinstance(img, np.ndarray):
        raise InvalidInputError(f"expected a uint8 (H, W, C) array, got {type(img).__name__}")
    if img.dtype != np.uint8:
        raise InvalidDtypeError(f"expected a uint8 (H, W, C) image, got dtype {img.dtype}")
    if img.ndim != 3 or img.shape[0] < 1 or img.shape[1] < 1:
        raise InvalidInputError(f"expected a uint8 image of shape (H, W, C), got {img.shape}")
    try:
        x1, y1, x2, y2 = (float(v) for v in box)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"expected a box (x1, y1, x2, y2) of four numbers, got {box!r}") from exc
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise InvalidInputError(f"box coordinates must be finite, got {box!r}")
    if x2 < x1 or y2 < y1:
        raise InvalidInputError(f"expected a box with x1 <= x2 and y1 <= y2, got {box!r}")
    h, w = img.shape[:2]
    xa, xb = _span(x1, x2, w)
    ya, yb = _span(y1, y2, h)
    if xb <= xa or yb <= ya:
        raise InvalidInputError(f"box {box!r} lies entirely outside the {w}x{h} image")
    return img[ya:yb, xa:xb]


def _span(lo: float, hi: float, size: int) -> Tuple[int, int]:
    start, stop = math.floor(lo), math.ceil(hi)
    if stop == start:
        stop = start + 1
    return max(start, 0), min(stop, size)
