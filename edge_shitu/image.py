"""Image loading, OpenCV-compatible resizing, normalisation and cropping (numpy + Pillow only).

The reference pipeline reads photos with ``cv2.imread(path)[:, :, ::-1]`` and resizes them with
``cv2.resize``. This module reproduces both without OpenCV:

* :func:`load_image` decodes JPEG, PNG, WebP and BMP (sniffed from the content, not the file
  name), applies the EXIF orientation and drops alpha, as ``cv2.imread(path, IMREAD_COLOR)`` does.
* :func:`resize_cubic` and :func:`resize_linear` follow ``cv2.resize`` with ``INTER_CUBIC`` and
  ``INTER_LINEAR`` (half-pixel centres, replicated borders, OpenCV's fixed-point and rounding
  rules), separably in float32 with cached tap tables.
* :func:`normalize_chw` and :func:`to_batch` build model inputs, and
  :func:`resize_normalize_chw` resizes and normalises in one go; :func:`crop` cuts detections
  out of an image without the reference's wrap-around and empty-crop bugs.

Memory of decoding: Pillow's decoded image (4 bytes per pixel for colour, 1 for grey or
palette images) plus the 3-byte-per-pixel result, with no other full-size copy. The peak of
:func:`load_image` on a file of ``n`` pixels is therefore about ``7 * n`` bytes for JPEG, PNG
and BMP, ``10 * n`` for progressive JPEG with full-resolution colour (4:4:4, where libjpeg keeps
every DCT coefficient) and ``16 * n`` for WebP (libwebp's canvas and Pillow's copy of it).
:data:`DEFAULT_MAX_PIXELS` bounds a JPEG or PNG decode near 350 MB; to bound every format by a
budget of ``B`` bytes, pass ``max_pixels=B // 16``.
"""

from __future__ import annotations

import errno
import functools
import io
import math
import os
import stat
import struct
import threading
from typing import BinaryIO, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from .errors import (
    EdgeShituError,
    ImageDecodeError,
    InvalidDtypeError,
    InvalidInputError,
    MissingFileError,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageSource",
    "load_image",
    "resize_cubic",
    "resize_cubic_scale",
    "resize_linear",
    "normalize_chw",
    "resize_normalize_chw",
    "Workspace",
    "to_batch",
    "crop",
]

DEFAULT_MAX_PIXELS = 8192 * 6144
"""Largest image :func:`load_image` decodes by default: 50,331,648 pixels (an 8192x6144 frame).

Admits the 48-50 Mpx photos of current phone sensors and any smaller camera; decoding a JPEG or
PNG that large peaks at about 350 MB (7 bytes per pixel, see the module docstring)."""

ImageSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, Image.Image, np.ndarray]
"""What :func:`load_image` accepts: a path, encoded bytes, a PIL image or a uint8 RGB array."""

_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
_EXPECTED = "expected JPEG, PNG, WebP or BMP"
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")

# O_NONBLOCK: a FIFO put in place between the stat() and the open() must not block open()
# until a writer appears; O_NOCTTY: a terminal put there must not become ours.
_OPEN_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOCTTY", 0) | _OPEN_NONBLOCK
_SPECIAL_FILES = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)

# JPEG markers without a length field (TEM, RSTn, SOI); 0x00 is a stuffed 0xFF byte.
_JPEG_STANDALONE = frozenset([0x00, 0x01, *range(0xD0, 0xD9)])
_JPEG_SOS, _JPEG_EOI, _JPEG_APP1, _JPEG_APP2 = 0xDA, 0xD9, 0xE1, 0xE2
# Bound on the bytes and markers examined before the image data, so junk cannot keep the
# header scan busy; real headers have a few dozen segments.
_JPEG_MAX_STEPS = 1 << 14

_EXIF_ORIENTATION = 0x0112
# TIFF field types holding one integer inline: BYTE, SHORT, LONG, SBYTE, SSHORT, SLONG.
_TIFF_INTEGERS = {1: "B", 3: "H", 4: "I", 6: "b", 8: "h", 9: "i"}
# How each EXIF orientation moves a strip of stored rows: the Pillow transpose that makes it
# upright, and where it lands in the upright result (counted from the far end or not, as
# rows or as columns).
_ORIENTATIONS: Dict[int, Tuple[Optional[Image.Transpose], bool, bool]] = {
    1: (None, False, False),
    2: (Image.Transpose.FLIP_LEFT_RIGHT, False, False),
    3: (Image.Transpose.ROTATE_180, True, False),
    4: (Image.Transpose.FLIP_TOP_BOTTOM, True, False),
    5: (Image.Transpose.TRANSPOSE, False, True),
    6: (Image.Transpose.ROTATE_270, True, True),
    7: (Image.Transpose.TRANSVERSE, True, True),
    8: (Image.Transpose.ROTATE_90, False, True),
}
# Pixels per strip copied from Pillow's image into the result: the strip's temporary copies
# stay around a megabyte whatever the image size.
_STRIP_PIXELS = 1 << 18
# Pillow's raw encoder (what Image.tobytes() drives), a private interface, stable since PIL; None in a Pillow
# without it, which then takes the strip path of _rgb_from_pil.
_RAW_ENCODER = getattr(Image, "_getencoder", None)

# Modes whose RGB samples Pillow's raw encoder packs straight into the result (see _pack_rgb).
_PACKED_MODES = ("RGB", "RGBA", "RGBX")
# Bytes asked of the raw encoder per call (at least one row): each call returns a new bytes object, and
# Pillow's own 64 KiB block means up to dozens of calls per photo; a quarter megabyte is four times fewer,
# still small (docs/benchmarks.md, "On the machine the issue was measured on").
_PACK_CHUNK_BYTES = 1 << 18

# OpenCV's fixed-point resize works with 11-bit coefficients (INTER_RESIZE_COEF_BITS).
_COEF_SCALE = 2048
_CUBIC_A = -0.75
# Below this many source pixels along either axis, the IPP build of OpenCV falls back from
# IPP's float cubic resize to OpenCV's own fixed-point one.
_IPP_MIN_SIDE = 4
# Output pixels per dense weight block of a banded matmul (see _band_plan) in each pass of the cubic
# resize: wider blocks multiply more zeros, narrower ones make more matmul calls. On an AVX-512
# machine, 8-row vertical blocks beat 4 and 16, and 16-column horizontal ones beat 4, 8, 12, 24 and
# 32 (figures in docs/benchmarks.md, "Overhead outside the models" and "Cubic resize: wider horizontal
# blocks"; another width can also change a few rounding results of the detector's input).
_BAND = 8
_COLUMN_BAND = 16
# Rows of an interleaved image normalised at a time: a block that stays in cache while each channel is read from it.
_NORMALIZE_ROWS = 64
# Both resizes make their output a stripe of rows at a time (both passes, rounding, normalisation), so
# that their temporaries stay in the core's cache: in the pipeline each model run evicts them, and a
# whole-image pass then costs a trip to memory (docs/benchmarks.md, "Striped resizes"). A stripe's
# temporaries take about this many bytes: the cubic one's vertical-pass rows (4 bytes per source
# value; on top, one run of them before they are split into planes, and the source rows of one
# run), the linear one's source rows, taps and int32 sums (2 bytes per source value and 36 per
# output value: each output row reads two source rows).
_STRIPE_BYTES = 1 << 20
_STRIPE_MAX_ROWS = 128
# Largest temporary a Workspace keeps (bytes): far above the stripes' needs; larger ones (a
# linear resize of a huge crop) are rare enough to allocate for.
_WORKSPACE_MAX_BYTES = 16 << 20


def load_image(
    source: ImageSource,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: Optional[str] = None,
) -> np.ndarray:
    """Load an image as an RGB uint8 array, as ``cv2.imread(path)[:, :, ::-1]`` would.

    Files are recognised by their content (a WebP file named ``.jpg`` loads fine). The EXIF
    orientation is applied, to PIL images too (read from ``info["exif"]``, which
    ``ImageOps.exif_transpose`` rewrites without it, so an already transposed image is left
    alone); like OpenCV, orientation given only in XMP or in a PNG text chunk is ignored, and
    so is a malformed EXIF block, silently. Alpha is dropped without compositing; grey,
    palette, CMYK and 16-bit images become 8-bit RGB as OpenCV converts them (16-bit samples
    keep their high byte). Multi-frame files give their first frame. The result equals
    OpenCV's on every file tested.

    A path must name a regular file (or a symbolic link to one): directories, FIFOs, sockets
    and devices are refused before they are opened, and never block.

    Args:
      source: a path (``str`` or ``os.PathLike``), the encoded bytes of a file, a
        ``PIL.Image.Image``, or a uint8 array of shape ``(H, W, 3)`` (RGB) or ``(H, W)`` (grey).
        Arrays are validated and returned without copying when already C-contiguous RGB.
      max_pixels: refuse images with more than this many pixels, checked from the header
        before any pixel is decoded (decompression-bomb guard). It bounds the memory a file
        takes to decode: about ``7 * max_pixels`` bytes for JPEG, PNG and BMP, up to
        ``16 * max_pixels`` for WebP (see the module docstring). Pillow's own hard limit
        (``2 * PIL.Image.MAX_IMAGE_PIXELS``) still applies on top of it.
      name: what to call the image in error messages; defaults to the path, ``<bytes>``,
        ``<PIL image>`` or ``<array>``.

    Returns:
      uint8 array of shape ``(H, W, 3)``, RGB, C-contiguous.

    Raises:
      MissingFileError: the path does not exist, or is a symbolic link to nothing.
      InvalidInputError: the path names a directory, FIFO, socket or device instead of a
        regular file, or is not a valid path; the source is of an unsupported type; an array
        has the wrong shape or is empty; or ``max_pixels`` is not a positive integer.
      InvalidDtypeError: an array source is not uint8.
      ImageDecodeError: the file cannot be read (permission denied, a loop of symbolic links,
        an I/O error), or is empty, truncated, corrupt, not an image, in a format other than
        JPEG/PNG/WebP/BMP, or larger than ``max_pixels``.
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
        return _rgb_from_pil(source, label, _exif_orientation(source.info.get("exif")))
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = name or "<bytes>"
        data = bytes(source)
        if not data:
            raise ImageDecodeError(f"{label}: cannot decode image: no data (0 bytes); {_EXPECTED}")
        return _decode(io.BytesIO(data), label, max_pixels)
    if isinstance(source, (str, os.PathLike)):
        path = os.fsdecode(os.fspath(source))
        label = name or path
        fp, size = _open_regular_file(path, label)
        with fp:
            if size == 0:
                raise ImageDecodeError(f"{label}: cannot decode image: file is empty (0 bytes); {_EXPECTED}")
            return _decode(fp, label, max_pixels)
    raise InvalidInputError(
        "expected a path, bytes, a PIL.Image.Image or a uint8 (H, W, 3) array, "
        f"got {type(source).__name__}"
    )


def _open_regular_file(path: str, label: str) -> Tuple[BinaryIO, int]:
    """Open a regular file for reading: ``(file, size in bytes)``; never blocks."""
    try:
        # Checked before opening: opening a device can have side effects, a FIFO can block.
        _require_regular(os.stat(path).st_mode, label)
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise _path_error(path, label, exc) from exc
    except ValueError as exc:
        if isinstance(exc, EdgeShituError):
            raise
        # An embedded NUL character.
        raise InvalidInputError(f"{label!r}: not a valid path ({exc}); expected an image file") from exc
    try:
        # Checked again on what was opened: the path may have been replaced since the stat().
        info = os.fstat(fd)
        _require_regular(info.st_mode, label)
        if _OPEN_NONBLOCK:
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb"), info.st_size
    except BaseException as exc:
        os.close(fd)
        if isinstance(exc, OSError):
            raise _path_error(path, label, exc) from exc
        raise


def _require_regular(mode: int, label: str) -> None:
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise InvalidInputError(f"{label}: is a directory; expected an image file")
    kind = next((what for test, what in _SPECIAL_FILES if test(mode)), "a special file")
    raise InvalidInputError(f"{label}: not a regular file ({kind}); expected an image file")


def _path_error(path: str, label: str, exc: OSError) -> EdgeShituError:
    if exc.errno == errno.ENOENT:
        if os.path.islink(path):
            return MissingFileError(f"{label}: no such image file (a symbolic link to nothing)")
        return MissingFileError(f"{label}: no such image file")
    if exc.errno == errno.ENOTDIR:
        return MissingFileError(f"{label}: no such image file (a parent is not a directory)")
    return _read_error(label, exc)


def _read_error(label: str, exc: OSError) -> ImageDecodeError:
    reason = exc.strerror or str(exc) or type(exc).__name__
    return ImageDecodeError(f"{label}: cannot read image file: {reason}; expected a readable image file")


def _decode(fp: BinaryIO, label: str, max_pixels: int) -> np.ndarray:
    try:
        exif, stream = _hide_jpeg_metadata(fp)
        im = _open(stream, label)
    except (EdgeShituError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow raises many unrelated types here.
        raise _decode_error(label, exc) from exc
    with im:
        _check_pixels(im.size, max_pixels, label)
        _check_pillow_limit(im.size, label)
        try:
            im.load()
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - Pillow raises many unrelated types here.
            raise _decode_error(label, exc) from exc
        if exif is None:
            exif = im.info.get("exif")
        return _rgb_from_pil(im, label, _exif_orientation(exif))


def _open(fp: BinaryIO, label: str) -> Image.Image:
    """``Image.open(fp, formats=_FORMATS)`` without its ``DecompressionBombWarning``.

    :func:`load_image` applies its own pixel limit and then Pillow's hard one instead; the
    warning would only duplicate them, and silencing it takes process-global state.
    """
    Image.preinit()
    prefix = fp.read(16)
    failure: Optional[Tuple[str, Exception]] = None
    note: Optional[str] = None
    for fmt in _FORMATS:
        if fmt not in Image.OPEN:
            Image.init()
        entry = Image.OPEN.get(fmt)
        if entry is None:
            continue
        factory, accept = entry
        verdict = accept(prefix) if accept is not None else True
        if isinstance(verdict, str):
            # The plugin recognises the file but cannot decode it (e.g. built without WebP).
            note = note or verdict
            continue
        if not verdict:
            continue
        fp.seek(0)
        try:
            return factory(fp, "")
        except (SyntaxError, IndexError, TypeError, struct.error) as exc:
            # What Image.open takes for "not this format after all": the header is broken.
            failure = failure or (fmt, exc)
    if failure is not None:
        fmt, exc = failure
        reason = str(exc) or type(exc).__name__
        raise ImageDecodeError(f"{label}: cannot decode image: broken {fmt} header: {reason}; {_EXPECTED}") from exc
    raise ImageDecodeError(f"{label}: cannot decode image: {note or _identify(prefix)}; {_EXPECTED}")


def _identify(prefix: bytes) -> str:
    """Say what an undecodable file is, for the error message (from its first bytes only)."""
    Image.init()
    for fmt, (_, accept) in list(Image.OPEN.items()):
        try:
            verdict = accept is not None and accept(prefix)
        except Exception:  # noqa: BLE001 - only used to improve an error message.
            continue
        if verdict and not isinstance(verdict, str):
            return f"unsupported format {fmt}"
    return "not a recognised image file"


def _decode_error(label: str, exc: BaseException) -> ImageDecodeError:
    if isinstance(exc, OSError) and exc.errno is not None:
        # The operating system's, not Pillow's: the file could not be read.
        return _read_error(label, exc)
    reason = str(exc) or type(exc).__name__
    return ImageDecodeError(f"{label}: cannot decode image: {reason}; {_EXPECTED}")


def _check_pixels(size: Tuple[int, int], max_pixels: int, label: str) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"{label}: image is {width}x{height} = {width * height} pixels, more than "
            f"max_pixels={max_pixels}; refusing to decode it (decompression-bomb guard)"
        )


def _check_pillow_limit(size: Tuple[int, int], label: str) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    width, height = size
    if limit is not None and width * height > 2 * limit:
        raise ImageDecodeError(
            f"{label}: image too large to decode safely: {width}x{height} = {width * height} "
            f"pixels, more than Pillow's limit of {2 * limit} (2 * PIL.Image.MAX_IMAGE_PIXELS)"
        )


def _hide_jpeg_metadata(fp: BinaryIO) -> Tuple[Optional[bytes], BinaryIO]:
    """Take a JPEG's EXIF block for ourselves and hide it, and its MPF index, from Pillow.

    Pillow parses both while opening a JPEG (the EXIF block for a resolution missing from the
    JFIF header, the MPF index to tell MPO files apart) and warns when they are malformed;
    neither changes the pixels, and the first frame of an MPO file is a plain JPEG.

    Returns:
      ``(exif, stream)``: the first EXIF block's TIFF data (``None`` if there is none, or
      ``fp`` is not a JPEG) and the stream to give Pillow, ``fp`` itself when nothing is hidden.
    """
    fp.seek(0)
    if fp.read(3) != b"\xff\xd8\xff":
        fp.seek(0)
        return None, fp
    exif: Optional[bytes] = None
    hidden: List[Tuple[int, int]] = []
    pos = 2
    for _ in range(_JPEG_MAX_STEPS):
        fp.seek(pos)
        head = fp.read(4)
        if len(head) < 2:
            break
        if head[0] != 0xFF or head[1] == 0xFF:
            pos += 1  # junk or a fill byte, skipped as Pillow skips it
            continue
        marker = head[1]
        if marker in (_JPEG_SOS, _JPEG_EOI):
            break
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        if len(head) < 4:
            break
        length = head[2] << 8 | head[3]
        if length < 2:
            break
        if marker == _JPEG_APP1 and length >= 8 and fp.read(6) == b"Exif\x00\x00":
            hidden.append((pos + 4, 6))
            if exif is None:
                exif = fp.read(length - 8)
        elif marker == _JPEG_APP2 and length >= 6 and fp.read(4) == b"MPF\x00":
            hidden.append((pos + 4, 4))
        pos += 2 + length
    fp.seek(0)
    if not hidden:
        return exif, fp
    return exif, io.BufferedReader(_ZeroedRanges(fp, hidden))


class _ZeroedRanges(io.RawIOBase):
    """A seekable binary stream read with some byte ranges replaced by zeros."""

    def __init__(self, raw: BinaryIO, ranges: Sequence[Tuple[int, int]]) -> None:
        super().__init__()
        self._raw = raw
        self._ranges = tuple(ranges)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        start = self._raw.tell()
        view = memoryview(buffer).cast("B")
        count = self._raw.readinto(view) or 0
        for at, length in self._ranges:
            lo, hi = max(at, start), min(at + length, start + count)
            if lo < hi:
                view[lo - start : hi - start] = bytes(hi - lo)
        return count


def _exif_orientation(exif: object) -> int:
    """The orientation (1-8) recorded in raw EXIF data; 1 when absent or unreadable.

    Reads the first IFD only, and only as far as it is intact; anything malformed means no
    rotation, as for OpenCV, never an error or a warning.

    Args:
      exif: the TIFF structure of an EXIF block, with or without its ``Exif\\0\\0`` header
        (``info["exif"]`` of a PIL image); anything else gives 1.
    """
    if not isinstance(exif, (bytes, bytearray, memoryview)):
        return 1
    data = bytes(exif)
    if data.startswith(b"Exif\x00\x00"):
        data = data[6:]
    if data[:4] == b"II*\x00":
        order = "<"
    elif data[:4] == b"MM\x00*":
        order = ">"
    else:
        return 1
    (first,) = struct.unpack_from(order + "I", data, 4) if len(data) >= 8 else (0,)
    if first < 8 or first + 2 > len(data):
        return 1
    (entries,) = struct.unpack_from(order + "H", data, first)
    orientation = 1
    end = min(first + 2 + 12 * entries, len(data) - 11)
    for entry in range(first + 2, end, 12):
        tag, kind, count = struct.unpack_from(order + "HHI", data, entry)
        if tag == _EXIF_ORIENTATION:
            # The last entry wins, as in Pillow's tag dictionary.
            code = _TIFF_INTEGERS.get(kind) if count == 1 else None
            value = struct.unpack_from(order + code, data, entry + 8)[0] if code else 1
            orientation = value if 1 <= value <= 8 else 1
    return orientation


def _rgb_from_pil(im: Image.Image, label: str, orientation: int) -> np.ndarray:
    """Copy a loaded PIL image into a new uint8 RGB array, upright for ``orientation``.

    A strip of rows at a time is turned upright and converted, then copied to its place in the
    result: the peak is Pillow's image plus the result, with no other full-size copy. Upright
    colour images, most photos, are packed straight into the result instead (:func:`_pack_rgb`).
    """
    width, height = im.size
    # _pack_rgb drives Pillow's raw encoder, a private interface (stable since PIL): a Pillow without it, or
    # whose interface changed, takes the strips below.
    if orientation == 1 and im.mode in _PACKED_MODES and width and height:
        packed = _pack_rgb(im, label)
        if packed is not None:
            return packed
    convert = _strip_converter(im, label)
    method, from_end, as_columns = _ORIENTATIONS[orientation]
    out = np.empty((width, height, 3) if as_columns else (height, width, 3), dtype=np.uint8)
    rows = max(1, _STRIP_PIXELS // max(width, 1))
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        strip = im if bottom - top == height else im.crop((0, top, width, bottom))
        if method is not None:
            strip = strip.transpose(method)
        band = slice(height - bottom, height - top) if from_end else slice(top, bottom)
        target = out[:, band] if as_columns else out[band]
        target[...] = convert(strip)
    return out


def _pack_rgb(im: Image.Image, label: str) -> Optional[np.ndarray]:
    """A loaded RGB, RGBA or RGBX image's RGB samples as a new uint8 ``(H, W, 3)`` array, or None when this
    Pillow's raw encoder cannot be driven (no :data:`_RAW_ENCODER`, or another signature).

    Drives the raw encoder that ``Image.tobytes()`` (and so ``np.asarray(im)``) uses, writing its
    chunks straight into the result: one packing pass plus a copy of each small chunk, where the
    strips of :func:`_rgb_from_pil` take a crop, ``tobytes()`` and a copy of every strip
    (docs/benchmarks.md, "Overhead outside the models").
    """
    if _RAW_ENCODER is None:
        return None
    width, height = im.size
    out = np.empty((height, width, 3), dtype=np.uint8)
    target = memoryview(out).cast("B")
    try:
        encoder = _RAW_ENCODER(im.mode, "raw", ("RGB", 0, 1))
    except (AttributeError, TypeError, ValueError):
        return None
    try:
        encoder.setimage(im.im, (0, 0, width, height))
        chunk = max(_PACK_CHUNK_BYTES, width * 4)
        written = 0
        while True:
            _, status, data = encoder.encode(chunk)
            target[written : written + len(data)] = data
            written += len(data)
            if status:
                break
    except (AttributeError, TypeError, ValueError):
        return None  # an encoder of another shape: the caller takes the strip path
    finally:
        encoder.cleanup()
    if status < 0 or written != out.nbytes:
        raise ImageDecodeError(f"{label}: cannot convert image mode {im.mode} to RGB (encoder status {status})")
    return out


def _strip_converter(im: Image.Image, label: str) -> Callable[[Image.Image], np.ndarray]:
    """How to turn a strip of ``im`` into uint8 ``(rows, W, 3)``, or ``(rows, W, 1)`` grey."""
    mode = im.mode
    if mode == "RGB":
        return np.asarray
    if mode in ("RGBA", "RGBX"):
        return lambda strip: np.asarray(strip)[:, :, :3]
    if mode == "L":
        return lambda strip: np.asarray(strip)[:, :, None]
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        # OpenCV reduces 16-bit samples to 8 bits by dropping the low byte; Pillow's own
        # conversion would clip them at 255 instead.
        return lambda strip: (np.clip(np.asarray(strip), 0, 65535) >> 8).astype(np.uint8)[:, :, None]
    if mode == "F":
        return lambda strip: np.clip(np.rint(np.asarray(strip, dtype=np.float32)), 0, 255).astype(np.uint8)[:, :, None]
    if mode in ("P", "PA"):
        # A plain palette lookup: Image.convert("RGB") warns on palettes with per-entry alpha.
        palette = np.zeros((256, 3), dtype=np.uint8)
        entries = np.asarray(im.getpalette("RGB") or [], dtype=np.uint8).reshape(-1, 3)[:256]
        palette[: len(entries)] = entries
        return lambda strip: palette[np.asarray(strip)[:, :, 0] if mode == "PA" else np.asarray(strip)]
    if mode == "CMYK":
        return _rgb_from_cmyk
    # La and RGBa are un-premultiplied first: Pillow cannot go straight to RGB from them.
    steps = (mode.upper(), "RGB") if mode in ("La", "RGBa") else ("RGB",)

    def convert(strip: Image.Image) -> np.ndarray:
        try:
            for target in steps:
                strip = strip.convert(target)
        except (ValueError, OSError) as exc:
            raise ImageDecodeError(f"{label}: cannot convert image mode {mode} to RGB: {exc}") from exc
        return np.asarray(strip)

    return convert


def _rgb_from_cmyk(strip: Image.Image) -> np.ndarray:
    # OpenCV's CMYK conversion on the inverted (Adobe) samples libjpeg returns, which Pillow
    # has already inverted back; Pillow's own formula differs by 1 on most pixels.
    ink = np.asarray(strip).astype(np.int32)
    white = 255 - ink[:, :, 3:4]
    return (white - ((ink[:, :, :3] * white) >> 8)).astype(np.uint8)


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
    c = src.shape[2]
    out = np.empty((height, width, c), dtype=np.uint8)
    for top, values in _linear_stripes(src, width, height):
        out[top : top + values.shape[0]] = values.reshape(-1, c, width).transpose(0, 2, 1)
    return out.reshape(height, width) if img.ndim == 2 else out


def _resize_cubic(
    img: np.ndarray, src: np.ndarray, width: int, height: int, inv_x: float, inv_y: float
) -> np.ndarray:
    h, w = src.shape[:2]
    if (width, height) == (w, h):
        return np.array(img, order="C")
    c = src.shape[2]
    out = np.empty((height, width, c), dtype=np.uint8)
    for top, values in _cubic_stripes(src, width, height, inv_x, inv_y):
        # Whole numbers in 0..255 after rounding: the cast is exact.
        out[top : top + values.shape[1]] = _round(values).transpose(1, 2, 0)
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
def _band_plan(src: int, dst: int, inv_scale: float, exact: bool, band: int = _BAND) -> _Band:
    """Cubic taps as dense weight blocks, one per run of ``band`` output pixels.

    Each entry is ``(d0, d1, s0, s1, weights)``: output pixels ``d0:d1`` read source pixels
    ``s0:s1`` only, through float32 ``weights`` of shape ``(s1 - s0, d1 - d0)``. A banded matmul
    wastes multiplications on zeros but runs in BLAS, which beats gathering the taps with numpy.
    """
    idx, weights = _cubic_taps(src, dst, inv_scale, exact)
    plan = []
    for d0 in range(0, dst, band):
        d1 = min(dst, d0 + band)
        s0, s1 = int(idx[d0:d1].min()), int(idx[d0:d1].max()) + 1
        block = np.zeros((s1 - s0, d1 - d0), dtype=np.float64)
        # np.add.at: clamped border taps repeat a source pixel and must add up.
        np.add.at(block, (idx[d0:d1] - s0, np.arange(d1 - d0)[:, None]), weights[d0:d1].astype(np.float64))
        plan.append((d0, d1, s0, s1, _frozen(block.astype(np.float32))))
    return tuple(plan)


class Workspace:
    """Scratch memory that :func:`resize_normalize_chw` reuses from one call to the next.

    Resizing a photo for a model takes temporary arrays (about 2 MB for the cubic resize of a
    1200x1200 photo to 640x640, several MB for the linear resize of a large crop to 224x224).
    Allocated afresh for every call, their pages can be faulted in
    and zeroed by the kernel each time, which costs about as much as one of the resize's passes
    (docs/benchmarks.md, "Overhead outside the models"). A workspace keeps the largest
    temporaries it has served, each up to ``max_bytes``, for as long as it lives; larger ones are
    allocated for the call and dropped.

    Thread-safe: a call that finds the workspace in use by another thread allocates its own
    temporaries instead of waiting.

    Args:
      max_bytes: size of the largest temporary kept, in bytes.
    """

    def __init__(self, *, max_bytes: int = _WORKSPACE_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._buffers: Dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return sum(buf.nbytes for buf in list(self._buffers.values()))

    def _claim(self) -> Optional["Workspace"]:
        """This workspace if no other thread is using it (release it with ``_lock.release()``), else None."""
        return self if self._lock.acquire(blocking=False) else None

    def _array(self, slot: str, shape: Tuple[int, ...], dtype: type) -> np.ndarray:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        if nbytes > self.max_bytes:
            return np.empty(shape, dtype=dtype)
        buf = self._buffers.get(slot)
        if buf is None or buf.nbytes < nbytes:
            buf = self._buffers[slot] = np.empty(nbytes, dtype=np.uint8)
        return buf[:nbytes].view(dtype).reshape(shape)


def _scratch(workspace: Optional[Workspace], slot: str, shape: Tuple[int, ...], dtype: type) -> np.ndarray:
    """An uninitialised temporary: from the workspace when there is one, else a new array."""
    if workspace is None:
        return np.empty(shape, dtype=dtype)
    return workspace._array(slot, shape, dtype)


def _cubic_stripes(
    src: np.ndarray, width: int, height: int, inv_x: float, inv_y: float, workspace: Optional[Workspace] = None
) -> Iterator[Tuple[int, np.ndarray]]:
    """Cubic resize of uint8 ``(H, W, C)`` (any strides), a stripe of output rows at a time.

    Yields ``(top, values)``: float32 ``(C, rows, width)``, one plane per channel, for output rows
    ``top:top + rows``, before rounding and saturation (:func:`_round` does both), in order. ``values`` is
    scratch memory that the next stripe overwrites: use it before asking for the next one.

    Each stripe runs the vertical pass (a banded matmul per run of output rows, over only the source rows
    that run reads, converted to float32 into a small buffer, on interleaved channels), splits its rows
    into one plane per channel, and runs the horizontal pass on the planes stacked as one matrix (a banded
    matmul per run of output columns, all channels and rows in one call). On interleaved rows the
    horizontal weights would hold the pixel weights times the identity over the C channels: C times the
    multiplications, all but one in C of them by zero. The terms are those of whole-image passes, though
    BLAS may add them in another order for another stripe height (a tie then rounds the other way, rarely).
    """
    h, w, c = src.shape
    exact = min(w, h) >= _IPP_MIN_SIDE
    rows_plan = _band_plan(h, height, inv_y, exact, band=_BAND)
    columns_plan = _band_plan(w, width, inv_x, exact, band=_COLUMN_BAND)
    # A whole number of _BAND-row runs per stripe, so each run of the vertical plan falls in one stripe.
    stripe = max(1, min(_STRIPE_MAX_ROWS, _STRIPE_BYTES // (w * c * 4)) // _BAND) * _BAND
    most = min(stripe, height)
    work = _scratch(workspace, "work", (max(s1 - s0 for _, _, s0, s1, _ in rows_plan), w, c), np.float32)
    run = _scratch(workspace, "run", (min(_BAND, height), w * c), np.float32)
    # Flat, so that a stripe of n rows is a (C, n, W) block whose planes follow each other: one (C * n, W)
    # matrix for the horizontal pass, however short the last stripe.
    rows_buf = _scratch(workspace, "rows", (c * most * w,), np.float32)
    values_buf = _scratch(workspace, "values", (c * most * width,), np.float32)
    for first in range(0, len(rows_plan), stripe // _BAND):
        runs = rows_plan[first : first + stripe // _BAND]
        top = runs[0][0]
        n = runs[-1][1] - top
        rows = rows_buf[: c * n * w].reshape(c, n, w)
        values = values_buf[: c * n * width].reshape(c * n, width)
        # OpenBLAS's sgemm on arm64 can leave spurious divide, overflow or invalid flags (numpy issues 28687 and
        # 29820), which numpy reports after the call; these sums are of finite, bounded terms, so no flag can be
        # real. (Not held across the yield: the caller's code runs there.)
        with np.errstate(all="ignore"):
            for d0, d1, s0, s1, weights in runs:
                block = work[: s1 - s0]
                np.copyto(block, src[s0:s1])
                interleaved = np.matmul(weights.T, block.reshape(s1 - s0, w * c), out=run[: d1 - d0])
                np.copyto(rows[:, d0 - top : d1 - top], interleaved.reshape(d1 - d0, w, c).transpose(2, 0, 1))
            stacked = rows.reshape(c * n, w)
            for d0, d1, s0, s1, weights in columns_plan:
                np.matmul(stacked[:, s0:s1], weights, out=values[:, d0:d1])
        yield top, values.reshape(c, n, width)


def _round(values: np.ndarray) -> np.ndarray:
    """Rounds float32 resize values in place to whole numbers in [0, 255], as OpenCV saturates them."""
    np.rint(values, out=values)
    np.clip(values, 0, 255, out=values)
    return values


def _linear_stripes(
    src: np.ndarray, width: int, height: int, workspace: Optional[Workspace] = None
) -> Iterator[Tuple[int, np.ndarray]]:
    """OpenCV's uint8 INTER_LINEAR in integers, a stripe of output rows at a time: uint8 ``(H, W, C)``
    (any strides) to int32 ``(rows, C * width)`` holding 0..255 for output rows ``top:top + rows``, each row
    one plane per channel side by side (the channel planes of a CHW model input, read without strides).

    Yields ``(top, values)`` in order; ``values`` is scratch memory that the next stripe overwrites.
    Stripes keep the temporaries in the core's cache (see ``_STRIPE_BYTES``); the integer sums are the
    same whatever the stripe.

    Horizontal pass: exact sums of 11-bit weights. Vertical pass as in OpenCV's SIMD kernel
    (``VResizeLinearVec_32s8u``): each row sum is shifted right by 4, multiplied by its 11-bit
    weight keeping the high 16 bits, and the sum rounded with ``(v + 2) >> 2``. The weights of
    each pass are non-negative and add up to at most 2049, so the result never exceeds 255 and,
    unlike OpenCV's generic kernel, needs no saturation.
    """
    h, w, c = src.shape
    wc = width * c
    columns, column_weights = _linear_columns(w, width, width / w, c)
    # Per output row: two source rows (uint8), their taps (uint8, 2 per output value), products (int32, 2),
    # sums and vertical taps (int32, 2 each per output value).
    stripe = max(_BAND, min(_STRIPE_MAX_ROWS, _STRIPE_BYTES // (2 * w * c + 36 * wc)))
    # A stripe of n output rows reads at most 2n source rows.
    most = 2 * min(stripe, height)
    lines_buf = _scratch(workspace, "lines", (most, w, c), np.uint8)
    taps_buf = _scratch(workspace, "taps", (most, 2, wc), np.uint8)
    products_buf = _scratch(workspace, "products", (most, 2, wc), np.int32)
    sums_buf = _scratch(workspace, "sums", (most, wc), np.int32)
    vertical_buf = _scratch(workspace, "vertical", (most, wc), np.int32)
    for top, used, inverse, row_weights in _linear_row_stripes(h, height, height / h, stripe):
        n = len(inverse) // 2
        k = len(used)
        # Only the rows the vertical pass reads, and of those only the tap columns.
        # (np.take copies through a temporary unless told what to do with out-of-range indices, which
        # these are not; and it first copies a strided source, such as a crop, whole: so it is given
        # only the span of rows this stripe reads, and consecutive rows, as a crop that shrinks by at
        # most 2x reads them, are copied as a slice.)
        span = src[used[0] : used[-1] + 1]
        if len(span) == k:
            lines = lines_buf[:k]
            np.copyto(lines, span)
        else:
            lines = np.take(span, used - used[0], axis=0, mode="clip", out=lines_buf[:k])
        taps = np.take(lines.reshape(k, w * c), columns, axis=1, mode="clip", out=taps_buf[:k])
        products = np.multiply(taps, column_weights, out=products_buf[:k])
        acc = np.add(products[:, 0], products[:, 1], out=sums_buf[:k])
        acc >>= 4
        # Both taps of every output row at once: rows 0..n-1 the upper, n.. the lower.
        vertical = np.take(acc, inverse, axis=0, mode="clip", out=vertical_buf[: 2 * n])
        vertical *= row_weights
        vertical >>= 16
        values = np.add(vertical[:n], vertical[n:], out=vertical[:n])
        values += 2
        values >>= 2
        yield top, values


@functools.lru_cache(maxsize=128)
def _linear_row_stripes(src: int, dst: int, inv_scale: float, stripe: int
                        ) -> Tuple[Tuple[int, np.ndarray, np.ndarray, np.ndarray], ...]:
    """Row taps per stripe of ``stripe`` output rows: ``(top, used, inverse, weights)`` with the source
    rows the stripe reads (int64, ascending), the upper then the lower tap of each of its output rows as
    positions in ``used`` (int64 ``(2 * rows,)``) and their int32 weights ``(2 * rows, 1)``."""
    idx, weights = _linear_taps(src, dst, inv_scale, False)
    plan = []
    for top in range(0, dst, stripe):
        part = idx[top : top + stripe]
        used, inverse = np.unique(part, return_inverse=True)
        inverse = inverse.reshape(part.shape).T.reshape(-1)
        row_weights = weights[top : top + stripe].T.reshape(-1, 1).astype(np.int32)
        plan.append((top, _frozen(used), _frozen(inverse), _frozen(row_weights)))
    return tuple(plan)


@functools.lru_cache(maxsize=128)
def _linear_columns(src: int, dst: int, inv_scale: float, channels: int) -> Tuple[np.ndarray, np.ndarray]:
    """Column taps over a flattened ``(W * C)`` row, output channel by channel: int64 indices and int32
    weights ``(2, C * dst)``."""
    idx, weights = _linear_taps(src, dst, inv_scale, True)
    flat = idx.T[:, None, :] * channels + np.arange(channels)[None, :, None]
    wide = np.tile(weights.T, (1, channels)).astype(np.int32)
    return _frozen(flat.reshape(2, -1)), _frozen(wide)


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
    gain, bias = _normalization(mean, std, scale, c)
    out = _chw_out(out, (c, h, w))
    _normalize_into(img, gain, bias, out)
    return out


def resize_normalize_chw(
    img: np.ndarray,
    width: int,
    height: int,
    mean: Sequence[float],
    std: Sequence[float],
    scale: float = 1.0 / 255.0,
    *,
    interpolation: str = "cubic",
    reverse_channels: bool = False,
    out: Optional[np.ndarray] = None,
    workspace: Optional[Workspace] = None,
) -> np.ndarray:
    """Resize an image and normalise it to CHW in one go, as a model input.

    Equals ``normalize_chw(resize_cubic(img, width, height), mean, std, scale)`` (or
    :func:`resize_linear`) bit for bit, without the intermediate uint8 image: the resize's
    rounded values are normalised where they are, which saves a full pass and a conversion.

    Args:
      img: uint8 ``(H, W, C)`` with ``C == len(mean)``; any strides (a :func:`crop` view, or
        ``img[:, :, ::-1]`` for BGR, is read without a copy).
      width: output width in pixels, >= 1.
      height: output height in pixels, >= 1.
      mean: per-channel mean, in the scaled unit (e.g. ImageNet ``0.485, 0.456, 0.406``).
      std: per-channel standard deviation, non-zero.
      scale: multiplier applied to the raw uint8 values first.
      interpolation: ``"cubic"`` (:func:`resize_cubic`) or ``"linear"`` (:func:`resize_linear`).
      reverse_channels: read the image's channels in reverse order (RGB in, BGR tensor out), without a copy;
        ``mean`` and ``std`` are in the reversed order.
      out: optional float32 ``(C, height, width)`` C-contiguous array to write into (e.g. a slot
        of a batch), returned.
      workspace: scratch memory to reuse for the temporaries (see :class:`Workspace`); None
        allocates them for this call.

    Returns:
      float32 ``(C, height, width)``.

    Raises:
      InvalidDtypeError: ``img`` is not uint8, or ``out`` is not float32.
      InvalidInputError: ``img`` is not ``(H, W, C)`` or is empty, a size is not a positive
        int, ``interpolation`` is unknown, ``mean``/``std`` have the wrong length, or a
        ``std``/``mean``/``scale`` is zero (``std``) or not finite.
    """
    if interpolation not in ("cubic", "linear"):
        raise InvalidInputError(f"interpolation must be 'cubic' or 'linear', got {interpolation!r}")
    src = _check_resize_source(img)
    if img.ndim != 3:
        raise InvalidInputError(f"expected an image of shape (H, W, C), got {img.shape}")
    if reverse_channels:
        src = src[:, :, ::-1]
    width, height = _check_size(width, "width"), _check_size(height, "height")
    h, w, c = src.shape
    gain, bias = _normalization(mean, std, scale, c)
    out = _chw_out(out, (c, height, width))
    if (width, height) == (w, h):
        _normalize_into(src, gain, bias, out)
        return out
    claimed = None if workspace is None else workspace._claim()
    try:
        if interpolation == "cubic":
            for top, values in _cubic_stripes(src, width, height, width / w, height / h, claimed):
                _affine(_round(values), gain, bias, out[:, top : top + values.shape[1]])
        else:
            for top, values in _linear_stripes(src, width, height, claimed):
                rows = values.shape[0]
                _affine(values.reshape(rows, c, width).transpose(1, 0, 2), gain, bias, out[:, top : top + rows])
    finally:
        if claimed is not None:
            claimed._lock.release()
    return out


def _normalization(
    mean: Sequence[float], std: Sequence[float], scale: float, channels: int
) -> Tuple[np.ndarray, np.ndarray]:
    """``(x * scale - mean) / std`` folded into float32 ``x * gain + bias``, per channel."""
    if isinstance(mean, tuple) and isinstance(std, tuple):
        # A model's input spec (tuples) comes back for every crop: validate and fold it once.
        try:
            return _folded_normalization(mean, std, scale, channels)
        except TypeError:  # unhashable entries: validated below
            pass
    return _fold_normalization(mean, std, scale, channels)


@functools.lru_cache(maxsize=32)
def _folded_normalization(
    mean: Tuple[float, ...], std: Tuple[float, ...], scale: float, channels: int
) -> Tuple[np.ndarray, np.ndarray]:
    gain, bias = _fold_normalization(mean, std, scale, channels)
    return _frozen(gain), _frozen(bias)


def _fold_normalization(
    mean: Sequence[float], std: Sequence[float], scale: float, channels: int
) -> Tuple[np.ndarray, np.ndarray]:
    mean64 = _per_channel(mean, channels, "mean")
    std64 = _per_channel(std, channels, "std")
    if np.any(std64 == 0):
        raise InvalidInputError(f"std must be non-zero, got {list(std64)}")
    scale32 = np.float32(scale)
    if not np.isfinite(scale32):
        raise InvalidInputError(f"scale must be finite, got {scale!r}")
    gain = (np.float64(scale32) / std64).astype(np.float32)
    bias = (-mean64 / std64).astype(np.float32)
    return gain, bias


def _chw_out(out: Optional[np.ndarray], shape: Tuple[int, int, int]) -> np.ndarray:
    if out is None:
        return np.empty(shape, dtype=np.float32)
    if not isinstance(out, np.ndarray) or out.dtype != np.float32:
        raise InvalidDtypeError(f"out must be a float32 array, got {getattr(out, 'dtype', type(out))}")
    if out.shape != shape or not out.flags.c_contiguous:
        raise InvalidInputError(f"out must be a C-contiguous float32 array of shape {shape}, got {out.shape}")
    return out


def _normalize_into(img: np.ndarray, gain: np.ndarray, bias: np.ndarray, out: np.ndarray) -> None:
    """``out[ch] = img[:, :, ch] * gain[ch] + bias[ch]`` in float32, for a uint8 ``(H, W, C)`` image (any
    strides). A few rows at a time, so that each block stays in cache while each of its channels is read."""
    for top in range(0, img.shape[0], _NORMALIZE_ROWS):
        _affine(img[top : top + _NORMALIZE_ROWS].transpose(2, 0, 1), gain, bias, out[:, top : top + _NORMALIZE_ROWS])


def _affine(planes: np.ndarray, gain: np.ndarray, bias: np.ndarray, target: np.ndarray) -> None:
    """``target[ch] = planes[ch] * gain[ch] + bias[ch]`` in float32, for ``(C, rows, width)`` planes of any integer or
    float dtype and float32 ``(C,)`` gain and bias: two calls for all channels, whatever their number."""
    np.multiply(planes, gain[:, None, None], out=target, dtype=np.float32)
    target += bias[:, None, None]


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
