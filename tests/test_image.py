"""Tests of edge_shitu.image: loading, OpenCV-compatible resizing, normalisation, cropping.

OpenCV is only a test oracle here (the runtime never imports it); tests that need it skip
without it. The pure-numpy oracles below (slow per-pixel re-implementations of OpenCV's
arithmetic) run everywhere.
"""

from __future__ import annotations

import errno
import io
import math
import os
import platform
import re
import socket
import stat
import struct
import subprocess
import sys
import threading
import warnings
import zlib
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps, PngImagePlugin

from edge_shitu import image as image_module
from edge_shitu.errors import ImageDecodeError, InvalidDtypeError, InvalidInputError, MissingFileError
from edge_shitu.image import (
    DEFAULT_MAX_PIXELS,
    Workspace,
    crop,
    load_image,
    normalize_chw,
    resize_cubic,
    resize_cubic_scale,
    resize_linear,
    resize_normalize_chw,
    to_batch,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EXPECTED = "expected JPEG, PNG, WebP or BMP"
N_TEST_IMAGES = 13
N_GALLERY_SAMPLE = 30
# Gallery files that are really PNG with alpha although named .jpg.
GALLERY_PNGS = ("49/0.jpg", "67/1.jpg", "75/0.jpg")


@pytest.fixture(scope="module")
def cv2():
    return pytest.importorskip("cv2", reason="OpenCV (the 'dev' extra) is the oracle of these tests")


@pytest.fixture(scope="module")
def gallery_sample(drink_dir: Path) -> list:
    gallery = drink_dir / "gallery"
    jpgs = sorted(p for p in gallery.glob("*/*.jpg") if p.is_file())
    pngs = [gallery / name for name in GALLERY_PNGS if (gallery / name).is_file()]
    sample = [p for p in jpgs[::40] if p not in pngs][: N_GALLERY_SAMPLE - len(pngs)] + pngs
    assert len(sample) == N_GALLERY_SAMPLE
    return sample


def _cv2_rgb(cv2, path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert bgr is not None, path
    return np.ascontiguousarray(bgr[:, :, ::-1])


def _noise(rng: np.random.Generator, h: int, w: int, c: int = 3) -> np.ndarray:
    return rng.integers(0, 256, size=(h, w, c), dtype=np.uint8)


def _diff_stats(ours: np.ndarray, ref: np.ndarray) -> tuple:
    assert ours.shape == ref.shape and ours.dtype == np.uint8
    diff = np.abs(ours.astype(np.int16) - ref.astype(np.int16))
    return int(diff.max()), float((diff <= 1).mean())


def _assert_close_to_cv2(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    worst, within_one = _diff_stats(ours, ref)
    assert worst <= 2, f"{what}: max difference {worst} grey levels"
    assert within_one >= 0.99, f"{what}: only {within_one:.4%} of values within 1 grey level"


@pytest.mark.parametrize("index", range(N_TEST_IMAGES))
def test_load_matches_cv2_imread_on_test_images(cv2, test_images, index):
    assert len(test_images) == N_TEST_IMAGES
    path = test_images[index]
    img = load_image(path)
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert img.flags.c_contiguous and img.flags.writeable
    np.testing.assert_array_equal(img, _cv2_rgb(cv2, path))


@pytest.mark.parametrize("name", GALLERY_PNGS)
def test_load_drops_alpha_like_cv2(cv2, drink_dir, name):
    path = drink_dir / "gallery" / name
    with Image.open(path) as im:
        assert (im.format, im.mode) == ("PNG", "RGBA")
    np.testing.assert_array_equal(load_image(path), _cv2_rgb(cv2, path))


def test_webp_named_jpg_is_decoded_by_content(test_images):
    path = next(p for p in test_images if p.name == "99.jpg")
    with Image.open(path) as im:
        assert im.format == "WEBP"
        expected = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(load_image(path), expected)


def test_png_named_jpg_in_tmp(tmp_path, rng):
    pixels = _noise(rng, 7, 9)
    path = tmp_path / "photo.jpg"
    Image.fromarray(pixels).save(path, format="PNG")
    np.testing.assert_array_equal(load_image(path), pixels)
    np.testing.assert_array_equal(load_image(str(path)), pixels)


def test_bytes_and_pil_sources_match_path(test_images):
    path = test_images[0]
    from_path = load_image(path)
    np.testing.assert_array_equal(load_image(path.read_bytes()), from_path)
    np.testing.assert_array_equal(load_image(bytearray(path.read_bytes())), from_path)
    with Image.open(path) as im:
        np.testing.assert_array_equal(load_image(im), from_path)


@pytest.mark.parametrize("interface", ["missing", "changed"])
def test_a_pillow_whose_raw_encoder_cannot_be_driven_decodes_the_same(test_images, rng, monkeypatch, interface):
    """Colour images are packed through Pillow's private raw encoder; without it (or with another signature) the
    strip path gives the same pixels."""
    rgba = Image.fromarray(rng.integers(0, 256, (37, 53, 4), dtype=np.uint8), "RGBA")
    sources = [test_images[0], test_images[2], rgba]
    want = [load_image(s) for s in sources]

    def changed(*args, **kwargs):
        raise TypeError("_getencoder() takes other arguments")

    monkeypatch.setattr(image_module, "_RAW_ENCODER", None if interface == "missing" else changed)
    assert image_module._pack_rgb(rgba, "rgba") is None
    for source, expected in zip(sources, want):
        got = load_image(source)
        assert got.dtype == np.uint8 and got.flags.c_contiguous
        np.testing.assert_array_equal(got, expected)


def test_array_source_is_validated_not_copied(rng):
    rgb = _noise(rng, 5, 6)
    out = load_image(rgb)
    assert out is rgb or np.shares_memory(out, rgb)
    strided = _noise(rng, 5, 12)[:, ::2]
    out = load_image(strided)
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, strided)
    grey = rng.integers(0, 256, size=(4, 3), dtype=np.uint8)
    expanded = load_image(grey)
    assert expanded.shape == (4, 3, 3)
    for c in range(3):
        np.testing.assert_array_equal(expanded[:, :, c], grey)


@pytest.mark.parametrize(
    ("array", "error", "pattern"),
    [
        (np.zeros((4, 4, 3), np.float32), InvalidDtypeError, r"my-array: expected a uint8.*float32"),
        (np.zeros((4, 4, 3), np.int64), InvalidDtypeError, r"my-array: expected a uint8.*int64"),
        (np.zeros((4, 4, 4), np.uint8), InvalidInputError, r"my-array: expected .*\(H, W, 3\).*\(4, 4, 4\)"),
        (np.zeros((4,), np.uint8), InvalidInputError, r"my-array: expected .*got \(4,\)"),
        (np.zeros((0, 4, 3), np.uint8), InvalidInputError, r"my-array: expected an image of at least 1x1"),
    ],
)
def test_bad_arrays_are_rejected(array, error, pattern):
    with pytest.raises(error, match=pattern):
        load_image(array, name="my-array")


def _orientation_jpeg(path: Path, pixels: np.ndarray, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, format="JPEG", quality=95, exif=exif.tobytes())


# What each EXIF orientation asks the viewer to do to the stored pixels.
_ORIENTED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, k=-1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, k=1),
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(tmp_path, orientation):
    # Flat 16x16 blocks survive JPEG almost unchanged: a red marker block top-left, a green one
    # top-right, on grey, in a 32x48 (h x w) image.
    stored = np.full((32, 48, 3), 128, dtype=np.uint8)
    stored[:16, :16] = (255, 0, 0)
    stored[:16, 32:] = (0, 255, 0)
    path = tmp_path / f"oriented-{orientation}.jpg"
    _orientation_jpeg(path, stored, orientation)
    img = load_image(path)
    expected = _ORIENTED[orientation](stored)
    assert img.shape == expected.shape
    assert np.abs(img.astype(int) - expected).mean() < 3
    # The marker blocks themselves, away from JPEG ringing at their edges.
    assert (np.abs(img[2:14, 2:14].astype(int) - expected[2:14, 2:14]) < 40).all()


@pytest.mark.parametrize("orientation", [3, 6, 7])
def test_exif_orientation_matches_cv2(tmp_path, cv2, orientation):
    stored = np.full((32, 48, 3), 128, dtype=np.uint8)
    stored[:16, :16] = (255, 0, 0)
    path = tmp_path / f"oriented-{orientation}.jpg"
    _orientation_jpeg(path, stored, orientation)
    np.testing.assert_array_equal(load_image(path), _cv2_rgb(cv2, path))


def _save(im: Image.Image, path: Path, fmt: str, **kwargs) -> Path:
    im.save(path, format=fmt, **kwargs)
    return path


@pytest.mark.parametrize(
    ("mode", "fmt", "kwargs"),
    [
        ("1", "PNG", {}),
        ("L", "PNG", {}),
        ("LA", "PNG", {}),
        ("P", "PNG", {}),
        ("P", "PNG", {"transparency": 5}),
        ("P-alpha", "PNG", {}),
        ("RGBA", "PNG", {}),
        ("I;16", "PNG", {}),
        ("L", "JPEG", {}),
        ("CMYK", "JPEG", {}),
        ("1", "BMP", {}),
        ("L", "BMP", {}),
        ("P", "BMP", {}),
        ("RGBA", "WEBP", {"lossless": True}),
    ],
)
def test_file_modes_match_cv2(tmp_path, cv2, rng, mode, fmt, kwargs):
    rgba = Image.fromarray(_noise(rng, 23, 31, 4), "RGBA")
    if mode == "I;16":
        im = Image.fromarray((rng.integers(0, 65536, size=(23, 31))).astype(np.uint16))
        assert im.mode == "I;16"
    elif mode == "P-alpha":
        # A palette with per-entry alpha (tRNS of several bytes): Image.convert("RGB") warns
        # on these, which must not escape.
        im = rgba.convert("P")
        kwargs = {"transparency": bytes(range(0, 256, 3))}
    else:
        im = rgba.convert(mode)
    path = _save(im, tmp_path / f"mode-{mode.replace(';', '')}.{fmt.lower()}", fmt, **kwargs)
    img = load_image(path)
    assert img.dtype == np.uint8 and img.shape == (23, 31, 3) and img.flags.c_contiguous
    np.testing.assert_array_equal(img, _cv2_rgb(cv2, path))


@pytest.mark.parametrize("channels", [3, 4])
def test_sixteen_bit_colour_png_matches_cv2(tmp_path, cv2, rng, channels):
    path = tmp_path / f"deep{channels}.png"
    assert cv2.imwrite(str(path), rng.integers(0, 65536, size=(20, 30, channels)).astype(np.uint16))
    np.testing.assert_array_equal(load_image(path), _cv2_rgb(cv2, path))


def test_sixteen_bit_png_drops_low_byte(tmp_path):
    values = np.array([[0, 255, 256, 511], [512, 40000, 65280, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    img = load_image(path)
    np.testing.assert_array_equal(img[:, :, 0], values >> 8)
    np.testing.assert_array_equal(img[:, :, 1], img[:, :, 2])


@pytest.mark.parametrize("mode", ["I", "F", "YCbCr", "HSV", "RGBX", "La", "RGBa"])
def test_pil_only_modes_become_rgb(rng, mode):
    base = Image.fromarray(_noise(rng, 6, 5))
    if mode == "I":
        im = Image.fromarray(np.array([[0, 300, 65535, 70000, -5]], dtype=np.int32))
        expected = np.array([[0, 1, 255, 255, 0]], dtype=np.uint8)
    elif mode == "F":
        im = Image.fromarray(np.array([[0.4, 12.6, 300.0, -2.0]], dtype=np.float32))
        expected = np.array([[0, 13, 255, 0]], dtype=np.uint8)
    else:
        im = base.convert(mode)
        expected = None
    img = load_image(im)
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert img.shape[:2] == (im.size[1], im.size[0])
    if expected is not None:
        for c in range(3):
            np.testing.assert_array_equal(img[:, :, c], expected)
    if mode == "YCbCr":
        np.testing.assert_allclose(img, np.asarray(base), atol=3)


def test_decompression_bomb_guard_checks_size_before_decoding(tmp_path, monkeypatch):
    path = _save(Image.new("RGB", (100, 80)), tmp_path / "bomb.png", "PNG")
    calls = []

    def spy(self, *args, **kwargs):
        calls.append(self)
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    with pytest.raises(ImageDecodeError, match=r"bomb\.png: image is 100x80 = 8000 pixels.*max_pixels=7999"):
        load_image(path, max_pixels=7999)
    with pytest.raises(ImageDecodeError, match=r"<bytes>: image is 100x80"):
        load_image(path.read_bytes(), max_pixels=7999)
    assert calls == []


def test_decompression_bomb_guard_allows_the_limit(tmp_path):
    path = _save(Image.new("RGB", (100, 80)), tmp_path / "ok.png", "PNG")
    assert load_image(path, max_pixels=8000).shape == (80, 100, 3)


def test_pil_bomb_warning_does_not_escape(tmp_path, monkeypatch):
    path = _save(Image.new("RGB", (100, 80)), tmp_path / "big.png", "PNG")
    # 8000 pixels: above Pillow's warning threshold, below its hard limit (2 x 5000).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
    assert load_image(path).shape == (80, 100, 3)  # filterwarnings=error would turn a warning into a failure
    with pytest.raises(ImageDecodeError, match=r"big\.png: image is 100x80"):
        load_image(path, max_pixels=5000)


def test_pil_bomb_error_becomes_image_decode_error(tmp_path, monkeypatch):
    path = _save(Image.new("RGB", (100, 80)), tmp_path / "huge.png", "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)
    with pytest.raises(ImageDecodeError, match=r"huge\.png: image too large to decode safely"):
        load_image(path)


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.jpg"
    with pytest.raises(MissingFileError, match=r"nowhere\.jpg: no such image file"):
        load_image(path)
    with pytest.raises(FileNotFoundError):
        load_image(str(path))


def test_directory_is_rejected(tmp_path):
    folder = tmp_path / "photos.jpg"
    folder.mkdir()
    with pytest.raises(InvalidInputError, match=r"photos\.jpg: is a directory; expected an image file$"):
        load_image(folder)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageDecodeError, match=rf"empty\.jpg: cannot decode image: file is empty.*{EXPECTED}"):
        load_image(path)
    with pytest.raises(ImageDecodeError, match=r"upload-7: cannot decode image: no data"):
        load_image(b"", name="upload-7")


@pytest.mark.parametrize(
    ("fmt", "suffix"), [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"), ("BMP", "bmp")]
)
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_file_raises(tmp_path, rng, fmt, suffix, keep):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    full = io.BytesIO()
    Image.fromarray(_noise(rng, 64, 80)).save(full, format=fmt)
    data = full.getvalue()
    path = tmp_path / f"cut.{suffix}"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ImageDecodeError, match=rf"cut\.{suffix}: cannot decode image: .*; {EXPECTED}"):
        load_image(path)
    with pytest.raises(ImageDecodeError, match=r"cut-bytes: cannot decode image"):
        load_image(path.read_bytes(), name="cut-bytes")


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        (b"this is not an image at all\n" * 10, r"not a recognised image file"),
        (bytes(range(256)) * 4, r"not a recognised image file"),
    ],
)
def test_garbage_file(tmp_path, content, pattern):
    path = tmp_path / "garbage.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageDecodeError, match=rf"garbage\.jpg: cannot decode image: {pattern}; expected JPEG"):
        load_image(path)


@pytest.mark.parametrize(("fmt", "suffix"), [("GIF", "gif"), ("TIFF", "tif"), ("PPM", "ppm")])
def test_unsupported_format_is_named(tmp_path, rng, fmt, suffix):
    path = tmp_path / f"other.{suffix}"
    Image.fromarray(_noise(rng, 8, 8)).save(path, format=fmt)
    pattern = rf"other\.{suffix}: cannot decode image: unsupported format {fmt}; {EXPECTED}"
    with pytest.raises(ImageDecodeError, match=pattern):
        load_image(path)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "10"])
def test_bad_max_pixels(bad, rng):
    with pytest.raises(InvalidInputError, match="max_pixels must be a positive integer"):
        load_image(_noise(rng, 2, 2), max_pixels=bad)


def test_unsupported_source_type():
    with pytest.raises(InvalidInputError, match=r"expected a path, bytes, a PIL\.Image\.Image .*got int"):
        load_image(42)


def test_default_pixel_limit_refuses_larger_images_from_the_header():
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    # A PNG header announcing one column more than an 8192x6144 frame, and no pixels.
    header = struct.pack(">IIBBBBB", 8193, 6144, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"")
    assert DEFAULT_MAX_PIXELS == 8192 * 6144
    with pytest.raises(ImageDecodeError, match=r"8193x6144 = 50337792 pixels, more than max_pixels=50331648"):
        load_image(png)


def test_loading_leaves_the_warnings_filters_alone(tmp_path, monkeypatch):
    # The filters are process-global: changing them, even inside catch_warnings, races with
    # every other thread.
    calls = []

    def spy(function):
        def record(*args, **kwargs):
            calls.append(function.__name__)
            return function(*args, **kwargs)

        return record

    big = _save(Image.new("RGB", (100, 80)), tmp_path / "big.png", "PNG")
    gif = _save(Image.new("RGB", (8, 8)), tmp_path / "small.gif", "GIF")
    with monkeypatch.context() as patch:
        for name in ("catch_warnings", "simplefilter", "filterwarnings", "resetwarnings"):
            patch.setattr(warnings, name, spy(getattr(warnings, name)))
        # Above Pillow's warning threshold, below its hard limit; then a format we do not decode.
        patch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
        shape = load_image(big).shape
        with pytest.raises(ImageDecodeError) as refused:
            load_image(gif)
    assert calls == []
    assert shape == (80, 100, 3)
    assert "unsupported format GIF" in str(refused.value)


# Paths that are not readable regular files: every failure must be one of the errors enrolment
# skips with a reason, never a bare OSError, and must come quickly: a FIFO that blocked open()
# would hang a whole gallery build.

SKIPPED_BY_ENROLMENT = (MissingFileError, ImageDecodeError, InvalidInputError)


def _load_soon(path: Path, timeout: float = 1.0) -> BaseException:
    """The error load_image(path) raises, failing the test if it takes over ``timeout`` s."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = load_image(path)
        except BaseException as exc:  # noqa: BLE001 - handed to the test to check.
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        # Release a reader blocked on a FIFO, so that the thread ends with the test.
        if stat.S_ISFIFO(os.lstat(path).st_mode):
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(5)
        pytest.fail(f"load_image({path}) had not returned after {timeout} s")
    assert "error" in outcome, f"load_image({path}) returned an image"
    return outcome["error"]


def _check(error: BaseException, kind: type, pattern: str) -> None:
    assert isinstance(error, kind), f"{type(error).__name__}: {error}"
    assert isinstance(error, SKIPPED_BY_ENROLMENT)
    assert "\n" not in str(error)
    assert re.search(pattern, str(error)), f"{pattern!r} not in {str(error)!r}"


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "camera.jpg"
    os.mkfifo(fifo)
    _check(_load_soon(fifo), InvalidInputError, r"camera\.jpg: not a regular file \(a FIFO\); expected an image file$")


def test_fifo_swapped_in_after_the_check_does_not_block(tmp_path, monkeypatch):
    # A regular file when stat() looks, a FIFO when open() comes: the race a check alone leaves.
    fifo = tmp_path / "swapped.jpg"
    os.mkfifo(fifo)
    decoy = _save(Image.new("RGB", (4, 4)), tmp_path / "decoy.jpg", "JPEG")
    real_stat = os.stat

    def stat_before_swap(path, *args, **kwargs):
        return real_stat(decoy) if os.fspath(path) == str(fifo) else real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat_before_swap)
    _check(_load_soon(fifo), InvalidInputError, r"swapped\.jpg: not a regular file \(a FIFO\)")


@pytest.mark.parametrize("device", ["/dev/null", "/dev/zero"])
def test_device_is_refused(device):
    _check(_load_soon(Path(device)), InvalidInputError, rf"^{device}: not a regular file \(a character device\)")


def test_socket_is_refused(tmp_path):
    path = tmp_path / "s.jpg"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        _check(_load_soon(path), InvalidInputError, r"s\.jpg: not a regular file \(a socket\)")


def test_symlink_loop(tmp_path):
    one, other = tmp_path / "one.jpg", tmp_path / "other.jpg"
    one.symlink_to(other)
    other.symlink_to(one)
    _check(_load_soon(one), ImageDecodeError, r"one\.jpg: cannot read image file: .*symbolic links; expected a readable")


def test_dangling_symlink(tmp_path):
    link = tmp_path / "link.jpg"
    link.symlink_to(tmp_path / "gone.jpg")
    error = _load_soon(link)
    _check(error, MissingFileError, r"link\.jpg: no such image file \(a symbolic link to nothing\)$")
    assert isinstance(error, FileNotFoundError)


def test_path_through_a_file(tmp_path):
    parent = _save(Image.new("RGB", (4, 4)), tmp_path / "photo.jpg", "JPEG")
    _check(_load_soon(parent / "inside.jpg"), MissingFileError, r"inside\.jpg: no such image file")


def test_path_with_nul_character(tmp_path):
    with pytest.raises(InvalidInputError, match=r"not a valid path .*; expected an image file"):
        load_image(str(tmp_path / "a\0b.jpg"))


@pytest.mark.parametrize("call", ["stat", "open"])
def test_permission_denied(tmp_path, monkeypatch, call):
    # The tests run as root, whom permissions do not stop: the refusal is raised where the kernel
    # would raise it (stat() under a directory without search permission, open() on a file
    # without read permission).
    path = _save(Image.new("RGB", (4, 4)), tmp_path / "locked.jpg", "JPEG")
    real = getattr(os, call)

    def refuse(target, *args, **kwargs):
        if os.fspath(target) == str(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(target))
        return real(target, *args, **kwargs)

    monkeypatch.setattr(os, call, refuse)
    error = _load_soon(path)
    _check(error, ImageDecodeError, r"locked\.jpg: cannot read image file: Permission denied; expected a readable image file$")
    assert isinstance(error.__cause__, PermissionError)


def test_io_error_while_decoding(tmp_path, rng, monkeypatch):
    path = _save(Image.fromarray(_noise(rng, 64, 64)), tmp_path / "flaky.png", "PNG")
    real_fdopen = os.fdopen

    class FailsAfterHeader(io.RawIOBase):
        # A disk that gives the first bytes, then an I/O error.
        def __init__(self, raw):
            super().__init__()
            self.raw = raw

        def readable(self):
            return True

        def seekable(self):
            return True

        def seek(self, offset, whence=io.SEEK_SET):
            return self.raw.seek(offset, whence)

        def tell(self):
            return self.raw.tell()

        def close(self):
            self.raw.close()
            super().close()

        def readinto(self, buffer):
            if self.raw.tell() >= 100:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            return self.raw.readinto(memoryview(buffer)[: 100 - self.raw.tell()])

    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: io.BufferedReader(FailsAfterHeader(real_fdopen(fd, "rb", 0))))
    _check(_load_soon(path), ImageDecodeError, r"flaky\.png: cannot read image file: Input/output error")


# EXIF orientation from malformed metadata: no warning, no error, no rotation unless an intact
# orientation entry was read.


def _tiff(order: str, entries: list, *, first: int = 8, count: Optional[int] = None) -> bytes:
    """A TIFF structure (what an EXIF block holds) with one IFD of (tag, type, count, value)."""
    e = "<" if order == "II" else ">"
    fields = b"".join(struct.pack(e + "HHI", tag, kind, n) + value for tag, kind, n, value in entries)
    ifd = struct.pack(e + "H", len(entries) if count is None else count) + fields + struct.pack(e + "I", 0)
    return order.encode() + struct.pack(e + "HI", 42, first) + bytes(max(0, first - 8)) + ifd


def _short(order: str, value: int) -> bytes:
    return struct.pack("<HH" if order == "II" else ">HH", value, 0)


def _long(order: str, value: int) -> bytes:
    return struct.pack("<I" if order == "II" else ">I", value)


_ORIENTATION_6 = (0x0112, 3, 1, _short("MM", 6))
# X resolution (RATIONAL, 8 bytes) stored at an offset past the end of the block.
_RESOLUTION_PAST_END = (0x011A, 5, 1, _long("MM", 0xFFF0))

# (EXIF TIFF data, the orientation that must be applied)
_MALFORMED_EXIF = {
    "empty": (b"", 1),
    "garbage": (bytes(range(7, 200)), 1),
    "not tiff": (b"XX\x00*\x00\x00\x00\x08" + bytes(40), 1),
    "ifd offset past end": (_tiff("MM", [_ORIENTATION_6], first=60_000)[:40], 1),
    "ifd cut inside second entry": (_tiff("MM", [_ORIENTATION_6, _RESOLUTION_PAST_END])[: 8 + 2 + 12 + 5], 6),
    "entry count past end": (_tiff("MM", [_ORIENTATION_6], count=500), 6),
    "tag data past end": (_tiff("MM", [_ORIENTATION_6, _RESOLUTION_PAST_END]), 6),
    "orientation 0": (_tiff("MM", [(0x0112, 3, 1, _short("MM", 0))]), 1),
    "orientation 9": (_tiff("MM", [(0x0112, 3, 1, _short("MM", 9))]), 1),
    "orientation of two values": (_tiff("MM", [(0x0112, 3, 2, _short("MM", 6))]), 1),
    "orientation as text": (_tiff("MM", [(0x0112, 2, 2, b"6\0\0\0")]), 1),
}


def _upright_markers() -> np.ndarray:
    """32x48 grey with a red block top-left and a green one top-right (survive JPEG)."""
    stored = np.full((32, 48, 3), 128, dtype=np.uint8)
    stored[:16, :16] = (255, 0, 0)
    stored[:16, 32:] = (0, 255, 0)
    return stored


def _with_app_segments(jpeg: bytes, *segments: tuple) -> bytes:
    """``jpeg`` with (marker, payload) segments inserted after its SOI marker."""
    extra = b"".join(bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload for marker, payload in segments)
    return jpeg[:2] + extra + jpeg[2:]


def _encoded(pixels: np.ndarray, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _assert_oriented(img: np.ndarray, stored: np.ndarray, orientation: int, exact: bool) -> None:
    expected = _ORIENTED[orientation](stored)
    assert img.shape == expected.shape
    if exact:
        np.testing.assert_array_equal(img, expected)
    else:
        assert np.abs(img.astype(int) - expected).mean() < 3


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("case", list(_MALFORMED_EXIF))
def test_malformed_exif_neither_warns_nor_fails(tmp_path, fmt, case):
    tiff, orientation = _MALFORMED_EXIF[case]
    stored = _upright_markers()
    if fmt == "JPEG":
        # Pillow's JFIF header has no resolution, so Pillow reads the EXIF block when opening.
        data = _with_app_segments(_encoded(stored, "JPEG", quality=95), (0xE1, b"Exif\0\0" + tiff))
    else:
        data = _encoded(stored, fmt, exif=b"Exif\0\0" + tiff, **({"lossless": True} if fmt == "WEBP" else {}))
    path = tmp_path / f"exif.{fmt.lower()}"
    path.write_bytes(data)
    # Recorded rather than raised, since Pillow's EXIF readers swallow their own exceptions.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        img = load_image(path)
    assert [str(w.message) for w in caught] == []
    _assert_oriented(img, stored, orientation, exact=fmt != "JPEG")


@pytest.mark.parametrize(
    ("order", "kind", "orientation"),
    [("II", 3, 6), ("MM", 3, 8), ("II", 4, 3), ("MM", 4, 5), ("II", 3, 7), ("MM", 3, 2), ("II", 1, 4)],
)
def test_orientation_of_either_byte_order_and_any_integer_type(order, kind, orientation):
    value = {1: bytes([orientation, 0, 0, 0]), 3: _short(order, orientation), 4: _long(order, orientation)}[kind]
    # Other fields first, one of them pointing past its IFD, as cameras write them.
    entries = [(0x010F, 2, 6, _long(order, 38)), (0x0110, 2, 3, b"X1\0\0"), (0x0112, kind, 1, value)]
    tiff = _tiff(order, entries) + b"Maker\0"
    stored = _upright_markers()
    img = load_image(_encoded(stored, "PNG", exif=b"Exif\0\0" + tiff))
    _assert_oriented(img, stored, orientation, exact=True)


def test_malformed_mpo_index_neither_warns_nor_fails(tmp_path):
    stored = _upright_markers()
    path = tmp_path / "mpo.jpg"
    path.write_bytes(_with_app_segments(_encoded(stored, "JPEG", quality=95), (0xE2, b"MPF\0" + b"garbage" * 5)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        img = load_image(path)
    assert [str(w.message) for w in caught] == []
    _assert_oriented(img, stored, 1, exact=False)


def test_mpo_gives_its_first_frame_like_cv2(tmp_path, cv2, rng):
    first, second = _noise(rng, 24, 40), _noise(rng, 24, 40)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "stereo.mpo"
    Image.fromarray(first).save(path, format="MPO", save_all=True, append_images=[Image.fromarray(second)], exif=exif)
    with Image.open(path) as im:
        assert im.format == "MPO" and im.n_frames == 2
    img = load_image(path)
    assert img.shape == (40, 24, 3)
    np.testing.assert_array_equal(img, _cv2_rgb(cv2, path))


def test_orientation_outside_exif_is_ignored_like_cv2(tmp_path, cv2):
    stored = _upright_markers()
    xmp = (
        b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
    )
    jpeg = tmp_path / "xmp.jpg"
    Image.fromarray(stored).save(jpeg, format="JPEG", quality=95, xmp=xmp)
    raw = _tiff("MM", [_ORIENTATION_6])
    text = PngImagePlugin.PngInfo()
    text.add_text("Raw profile type exif", f"\nexif\n{len(raw):8d}\n{raw.hex()}\n")
    png = tmp_path / "text.png"
    Image.fromarray(stored).save(png, format="PNG", pnginfo=text)
    for path in (jpeg, png):
        img = load_image(path)
        assert img.shape == stored.shape
        np.testing.assert_array_equal(img, _cv2_rgb(cv2, path))


def test_exif_transposed_pil_image_is_left_alone(tmp_path):
    stored = _upright_markers()
    path = tmp_path / "oriented.jpg"
    _orientation_jpeg(path, stored, 6)
    with Image.open(path) as im:
        upright = ImageOps.exif_transpose(im)
    np.testing.assert_array_equal(load_image(upright), np.asarray(upright))
    with Image.open(path) as im:
        np.testing.assert_array_equal(load_image(im), np.asarray(upright))


# Run in a fresh process: peak resident memory is a high-water mark that earlier tests would
# already have raised.
_PEAK_SCRIPT = """
import resource, sys
from edge_shitu.image import load_image


def peak():
    # VmHWM belongs to this process's own address space; ru_maxrss would also count the peak
    # of the parent it was forked from (Linux carries it over the exec).
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


load_image(sys.argv[2])  # imports and first-use allocations, out of the measurement
before = peak()
img = load_image(sys.argv[1])
print((peak() - before) / (img.shape[0] * img.shape[1]))
"""


def _gradient(width: int, height: int, mode: str) -> Image.Image:
    ramp = Image.linear_gradient("L").resize((width, height))
    bands = [ramp, ramp.transpose(Image.Transpose.FLIP_LEFT_RIGHT), ramp.transpose(Image.Transpose.FLIP_TOP_BOTTOM)]
    return Image.merge(mode, bands + [ramp] * (len(mode) - 3))


@pytest.mark.parametrize(("fmt", "mode", "orientation"), [("JPEG", "RGB", 6), ("PNG", "RGBA", 1)])
def test_peak_memory_is_pillows_image_plus_the_result(tmp_path, fmt, mode, orientation):
    # Pillow holds a colour image at 4 bytes per pixel, the result takes 3: the documented 7
    # bytes per pixel leave no room for another full-size copy (conversion, transposition,
    # Pillow's tobytes) at any point.
    suffix = fmt.lower()
    exif = Image.Exif()
    exif[0x0112] = orientation
    big, small = tmp_path / f"big.{suffix}", tmp_path / f"small.{suffix}"
    options = {"exif": exif.tobytes(), **({"quality": 90} if fmt == "JPEG" else {"compress_level": 1})}
    _gradient(4096, 3072, mode).save(big, format=fmt, **options)
    _gradient(64, 48, mode).save(small, format=fmt, **options)
    run = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(big), str(small)],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120, check=True,
    )
    per_pixel = float(run.stdout)
    assert per_pixel < 8, f"decoding took {per_pixel:.2f} bytes per pixel at its peak"


def _real_photo_cases(img: np.ndarray) -> list:
    """(kind, source, width, height) tuples exercised on one real photo."""
    h, w = img.shape[:2]
    cases = [
        ("linear", img, 224, 224),
        ("cubic", img, w // 3 + 1, 2 * h - 1),
        ("linear", img, 2 * w + 1, h // 3 + 1),
        ("cubic", img, 37, 1),
        ("linear", img, 1, 29),
    ]
    y, x = h // 2, w // 2
    for region in (img[y : y + 1, 10:60], img[10:60, x : x + 1], img[y : y + 2, x : x + 2], img[5:36, 7:29]):
        cases.append(("linear", region, 224, 224))
        cases.append(("cubic", region, 640, 640))
    return cases


def _check_photo_against_cv2(cv2, img: np.ndarray, what: str) -> None:
    h, w = img.shape[:2]
    # The reference detector call, exactly as PaddleClas writes it.
    ref = cv2.resize(img, None, fx=640 / w, fy=640 / h, interpolation=2)
    _assert_close_to_cv2(resize_cubic(img, 640, 640), ref, f"{what} cubic 640x640")
    _assert_close_to_cv2(resize_cubic_scale(img, 640 / w, 640 / h), ref, f"{what} cubic fx/fy")
    for kind, src, width, height in _real_photo_cases(img):
        ours = (resize_cubic if kind == "cubic" else resize_linear)(src, width, height)
        flag = cv2.INTER_CUBIC if kind == "cubic" else cv2.INTER_LINEAR
        theirs = cv2.resize(np.ascontiguousarray(src), (width, height), interpolation=flag)
        _assert_close_to_cv2(ours, theirs, f"{what} {kind} {src.shape[1]}x{src.shape[0]}->{width}x{height}")


@pytest.mark.parametrize("index", range(N_TEST_IMAGES))
def test_resize_matches_cv2_on_test_images(cv2, test_images, index):
    _check_photo_against_cv2(cv2, load_image(test_images[index]), test_images[index].name)


@pytest.mark.parametrize("index", range(N_GALLERY_SAMPLE))
def test_resize_matches_cv2_on_gallery_images(cv2, gallery_sample, index):
    path = gallery_sample[index]
    _check_photo_against_cv2(cv2, load_image(path), str(path))


_EDGE_SOURCES = [(1, 1), (1, 9), (9, 1), (2, 2), (3, 5), (5, 3), (4, 4), (4, 50), (37, 53), (120, 90)]
_EDGE_TARGETS = [(1, 1), (1, 17), (17, 1), (2, 2), (3, 3), (7, 5), (224, 224), (640, 640), (101, 77)]


@pytest.mark.parametrize("kind", ["cubic", "linear"])
@pytest.mark.parametrize("source", _EDGE_SOURCES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_resize_matches_cv2_on_edge_sizes(cv2, kind, source):
    # Uniform noise is the hardest case for rounding agreement.
    img = _noise(np.random.default_rng(source[0] * 1000 + source[1]), *source)
    for width, height in _EDGE_TARGETS:
        ours = (resize_cubic if kind == "cubic" else resize_linear)(img, width, height)
        theirs = cv2.resize(img, (width, height), interpolation=2 if kind == "cubic" else 1)
        _assert_close_to_cv2(ours, theirs, f"{kind} {source[1]}x{source[0]}->{width}x{height}")


def test_resizes_report_no_floating_point_flags_of_blas_kernels():
    """OpenBLAS's sgemm on arm64 leaves a spurious divide-by-zero flag on some tiny shapes (a 5x3 source to 3x3),
    which numpy reports as an error under np.errstate(all="raise") (and pytest as a warning turned error): the
    resizes must neither report it nor change their result for it (only arm64 with OpenBLAS sets the flag)."""
    img = _noise(np.random.default_rng(5 * 1000 + 3), 5, 3)
    for width, height in _EDGE_TARGETS:
        with np.errstate(all="ignore"):
            expected = resize_cubic(img, width, height)
        with np.errstate(all="raise"):
            ours = resize_cubic(img, width, height)
            chw = resize_normalize_chw(img, width, height, [0.5] * 3, [0.25] * 3)
        np.testing.assert_array_equal(ours, expected)
        np.testing.assert_array_equal(chw, normalize_chw(ours, [0.5] * 3, [0.25] * 3))


def test_bit_fidelity_with_ipp_opencv(cv2, test_images):
    # What the docstrings claim beyond the 1-grey-level spec, for the x86 wheels with IPP inside
    # (versions checked: docs/benchmarks.md, "edge_shitu/image.py: resizing"): linear bit-exact,
    # cubic exact on >= 99.99 % of values, including sources under 4 pixels where OpenCV switches
    # to its fixed-point path.
    if platform.machine().lower() not in ("x86_64", "amd64") or not cv2.ipp.useIPP():
        pytest.skip("bit fidelity is only claimed against the IPP-enabled x86 OpenCV wheels")
    rng = np.random.default_rng(7)
    sources = [load_image(test_images[i]) for i in (0, 5, 9)]
    sources += [_noise(rng, *shape) for shape in [(2, 2), (3, 50), (50, 3), (1, 9), (4, 4), (37, 53)]]
    exact = total = 0
    for img in sources:
        for width, height in [(640, 640), (101, 77), (224, 224), (5, 3)]:
            np.testing.assert_array_equal(resize_linear(img, width, height), cv2.resize(img, (width, height)))
            ours = resize_cubic(img, width, height)
            exact += int((ours == cv2.resize(img, (width, height), interpolation=cv2.INTER_CUBIC)).sum())
            total += ours.size
    assert exact / total >= 0.9999


def test_linear_is_bit_exact_with_cv2_on_crops(cv2, test_images):
    # Not required by the spec (1 grey level is), but this is what the implementation claims.
    img = load_image(test_images[5])
    for box in [(10, 20, 300, 500), (0, 0, 7, 3), (100, 100, 101, 400), (50, 60, 1100, 61), (0, 0, 448, 448)]:
        region = crop(img, box)
        theirs = cv2.resize(np.ascontiguousarray(region), (224, 224))
        np.testing.assert_array_equal(resize_linear(region, 224, 224), theirs)


@pytest.mark.parametrize(("fx", "fy"), [(0.333, 0.417), (1.33, 2.71), (0.05, 0.07), (3.0, 0.5)])
def test_resize_cubic_scale_matches_cv2_fx_fy(cv2, rng, fx, fy):
    img = _noise(rng, 61, 87)
    theirs = cv2.resize(img, None, fx=fx, fy=fy, interpolation=cv2.INTER_CUBIC)
    _assert_close_to_cv2(resize_cubic_scale(img, fx, fy), theirs, f"fx={fx} fy={fy}")


def test_reference_detector_call_equals_size_call(test_images):
    img = load_image(test_images[6])
    h, w = img.shape[:2]
    np.testing.assert_array_equal(resize_cubic_scale(img, 640 / w, 640 / h), resize_cubic(img, 640, 640))


def _oracle_linear(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """OpenCV's uint8 INTER_LINEAR written out pixel by pixel (11-bit weights, SIMD rounding)."""
    h, w, c = img.shape

    def taps(src: int, dst: int, clamp: bool) -> list:
        out = []
        for d in range(dst):
            pos = np.float32((d + 0.5) * (1.0 / (dst / src)) - 0.5)
            left = math.floor(pos)
            frac = float(np.float32(pos - np.float32(left)))
            if clamp and (left < 0 or left >= src - 1):
                frac, left = 0.0, min(max(left, 0), src - 1)
            w0 = int(np.rint(np.float32(np.float32(1 - np.float32(frac)) * np.float32(2048))))
            w1 = int(np.rint(np.float32(np.float32(frac) * np.float32(2048))))
            out.append(((min(max(left, 0), src - 1), w0), (min(max(left + 1, 0), src - 1), w1)))
        return out

    xs, ys = taps(w, width, True), taps(h, height, False)
    out = np.zeros((height, width, c), dtype=np.uint8)
    for y in range(height):
        for x in range(width):
            for ch in range(c):
                rows = [sum(int(img[ry, sx, ch]) * wx for sx, wx in xs[x]) for ry, _ in ys[y]]
                v = ((rows[0] >> 4) * ys[y][0][1] >> 16) + ((rows[1] >> 4) * ys[y][1][1] >> 16)
                out[y, x, ch] = min(max((v + 2) >> 2, 0), 255)
    return out


def _keys(t: float) -> float:
    t = abs(t)
    a = -0.75
    if t <= 1:
        return ((a + 2) * t - (a + 3)) * t * t + 1
    if t < 2:
        return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return 0.0


def _oracle_cubic(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """Separable Keys cubic (a=-0.75), half-pixel centres, replicated border, in float64."""
    h, w, c = img.shape

    def taps(src: int, dst: int) -> list:
        out = []
        for d in range(dst):
            pos = (d + 0.5) * (src / dst) - 0.5
            left = math.floor(pos)
            out.append([(min(max(left + k, 0), src - 1), _keys(pos - (left + k))) for k in range(-1, 3)])
        return out

    xs, ys = taps(w, width), taps(h, height)
    out = np.zeros((height, width, c), dtype=np.uint8)
    for y in range(height):
        for x in range(width):
            for ch in range(c):
                v = sum(wy * sum(wx * float(img[ry, sx, ch]) for sx, wx in xs[x]) for ry, wy in ys[y])
                out[y, x, ch] = min(max(round(v), 0), 255)
    return out


@pytest.mark.parametrize(
    ("src", "dst"), [((9, 13), (20, 7)), ((17, 11), (5, 31)), ((6, 6), (6, 13)), ((1, 5), (4, 3)),
                     # taller than a stripe of rows (_STRIPE_MAX_ROWS): stripes join without a seam
                     ((61, 7), (5, 300)),
                     # shrunk more than 2x vertically: each stripe skips source rows
                     ((61, 7), (5, 20)), ((300, 9), (7, 13))]
)
def test_resize_linear_matches_pixel_oracle(rng, src, dst):
    img = _noise(rng, *src)
    np.testing.assert_array_equal(resize_linear(img, *dst), _oracle_linear(img, *dst))


@pytest.mark.parametrize("channels", [None, 1, 2, 4])
def test_resize_linear_matches_pixel_oracle_for_other_channel_counts(rng, channels):
    """The integer passes write each output row channel by channel: grey (2-D), one, two and four channels, widths
    down to one pixel, over several stripes, against the oracle; the fused model-input path agrees with it."""
    for src, dst in (((17, 11), (5, 31)), ((61, 7), (5, 300)), ((9, 1), (1, 40)), ((3, 2), (7, 224))):
        img = _noise(rng, *src, channels or 1)
        source = img[:, :, 0] if channels is None else img
        want = _oracle_linear(img, *dst)
        np.testing.assert_array_equal(resize_linear(source, *dst), want[:, :, 0] if channels is None else want)
        if channels is not None:
            mean, std = [0.5] * channels, [0.25] * channels
            np.testing.assert_array_equal(
                resize_normalize_chw(img, *dst, mean, std, interpolation="linear", workspace=Workspace()),
                normalize_chw(want, mean, std))


@pytest.mark.parametrize(
    ("src", "dst"), [((9, 13), (20, 7)), ((17, 11), (5, 31)), ((6, 6), (6, 13)), ((30, 25), (8, 9)),
                     ((61, 7), (5, 300))]
)
def test_resize_cubic_matches_pixel_oracle(rng, src, dst):
    img = _noise(rng, *src)
    ours = resize_cubic(img, *dst)
    worst, within_one = _diff_stats(ours, _oracle_cubic(img, *dst))
    # Float32 against float64 arithmetic: only values within ~1e-4 of .5 may round apart.
    assert worst <= 1 and within_one == 1.0
    assert (ours == _oracle_cubic(img, *dst)).mean() > 0.99


@pytest.mark.parametrize("channels", [None, 1, 4])
def test_resize_cubic_matches_pixel_oracle_for_other_channel_counts(rng, channels):
    """The horizontal pass runs on one plane per channel: grey (2-D), one and four channels, over several stripes,
    against the oracle; the fused model-input path agrees with it bit for bit."""
    for src, dst in (((17, 11), (5, 31)), ((61, 7), (5, 300))):
        img = _noise(rng, *src, channels or 1)
        source = img[:, :, 0] if channels is None else img
        ours = resize_cubic(source, *dst)
        want = _oracle_cubic(img, *dst)
        want = want[:, :, 0] if channels is None else want
        worst, within_one = _diff_stats(ours, want)
        assert worst <= 1 and within_one == 1.0 and (ours == want).mean() > 0.99
        if channels is not None:
            mean, std = [0.5] * channels, [0.25] * channels
            np.testing.assert_array_equal(resize_normalize_chw(img, *dst, mean, std, workspace=Workspace()),
                                          normalize_chw(ours, mean, std))


@pytest.mark.parametrize("channels", [None, 1, 3, 4])
@pytest.mark.parametrize("width", [1, 15, 16, 17, 33, 47])
def test_resize_cubic_matches_pixel_oracle_across_column_blocks(rng, width, channels):
    """The horizontal pass stacks all planes and rows of a stripe as one matrix and multiplies it by one weight
    block per run of output columns: widths below, at and above one block, with a short last block, and a
    stripe shorter than the others, for grey (2-D), one, three and four channels, against the oracle; the
    fused model-input path agrees with it bit for bit."""
    img = _noise(rng, 150, 23, channels or 1)
    source = img[:, :, 0] if channels is None else img
    ours = resize_cubic(source, width, 137)
    want = _oracle_cubic(img, width, 137)
    want = want[:, :, 0] if channels is None else want
    worst, within_one = _diff_stats(ours, want)
    assert worst <= 1 and within_one == 1.0 and (ours == want).mean() > 0.99
    if channels is not None:
        mean, std = [0.5] * channels, [0.25] * channels
        np.testing.assert_array_equal(resize_normalize_chw(img, width, 137, mean, std, workspace=Workspace()),
                                      normalize_chw(ours, mean, std))


@pytest.mark.parametrize("band", [1, 8, 16, 33])
@pytest.mark.parametrize(("src", "dst"), [(23, 47), (47, 23), (5, 5), (640, 640), (1200, 640)])
def test_band_plan_blocks_make_up_the_tap_matrix(src, dst, band):
    """Each block of a plan holds the weights of ``band`` output pixels over the source pixels they read: put back
    in place, the blocks are the dense resize matrix built from the taps one by one (clamped border taps add up)."""
    idx, weights = image_module._cubic_taps(src, dst, dst / src, True)
    dense = np.zeros((src, dst))
    for d in range(dst):
        for s, wgt in zip(idx[d], weights[d]):
            dense[s, d] += wgt
    plan = image_module._band_plan(src, dst, dst / src, True, band)
    assembled = np.zeros((src, dst))
    for d0, d1, s0, s1, block in plan:
        assert d1 - d0 == min(band, dst - d0) and block.shape == (s1 - s0, d1 - d0)
        assembled[s0:s1, d0:d1] = block
    assert [p[0] for p in plan] == list(range(0, dst, band))
    np.testing.assert_array_equal(assembled, dense.astype(np.float32))


def test_cubic_is_interpolating_and_constant_preserving(rng):
    flat = np.full((13, 17, 3), 77, dtype=np.uint8)
    assert (resize_cubic(flat, 40, 5) == 77).all()
    assert (resize_linear(flat, 40, 5) == 77).all()
    img = _noise(rng, 10, 10)
    np.testing.assert_array_equal(resize_cubic(img, 10, 10), img)
    np.testing.assert_array_equal(resize_linear(img, 10, 10), img)


def test_resize_returns_new_contiguous_arrays(rng):
    img = _noise(rng, 8, 8)
    for out in (resize_cubic(img, 8, 8), resize_linear(img, 8, 8), resize_cubic(img, 3, 5), resize_linear(img, 5, 3)):
        assert out.flags.c_contiguous and out.dtype == np.uint8
        assert not np.shares_memory(out, img)


def test_resize_grey_and_strided_inputs(rng):
    img = _noise(rng, 40, 60)
    for resize in (resize_cubic, resize_linear):
        grey = resize(img[:, :, 1], 23, 31)
        assert grey.shape == (31, 23)
        np.testing.assert_array_equal(grey, resize(img, 23, 31)[:, :, 1])
        view = img[3:35:2, 5:50]
        np.testing.assert_array_equal(resize(view, 19, 27), resize(np.ascontiguousarray(view), 19, 27))
        four = _noise(rng, 12, 14, 4)
        assert resize(four, 7, 9).shape == (9, 7, 4)


@pytest.mark.parametrize("resize", [resize_cubic, resize_linear])
def test_resize_bad_arguments(rng, resize):
    img = _noise(rng, 4, 4)
    with pytest.raises(InvalidDtypeError, match="expected a uint8 image array, got dtype float32"):
        resize(img.astype(np.float32), 2, 2)
    with pytest.raises(InvalidInputError, match=r"expected a non-empty image, got shape \(0, 4, 3\)"):
        resize(img[:0], 2, 2)
    with pytest.raises(InvalidInputError, match=r"expected an image of shape \(H, W, C\) or \(H, W\)"):
        resize(img.reshape(-1), 2, 2)
    with pytest.raises(InvalidInputError, match="expected a uint8 image array, got list"):
        resize([[1]], 2, 2)
    for bad in (0, -3, 2.0, True, None):
        with pytest.raises(InvalidInputError, match=r"width must be a positive integer"):
            resize(img, bad, 2)
        with pytest.raises(InvalidInputError, match=r"height must be a positive integer"):
            resize(img, 2, bad)


def test_resize_cubic_scale_bad_factors(rng):
    img = _noise(rng, 4, 4)
    for bad in (0, -1.0, math.inf, math.nan, "x", True):
        with pytest.raises(InvalidInputError, match="fx must be a finite number > 0"):
            resize_cubic_scale(img, bad, 1.0)
    with pytest.raises(InvalidInputError, match=r"turn a 4x4 image into 0x4"):
        resize_cubic_scale(img, 0.1, 1.0)


def _reference_normalize(img: np.ndarray, scale: float = 1 / 255) -> np.ndarray:
    mean = np.array(IMAGENET_MEAN, dtype=np.float32).reshape(1, 1, 3)
    std = np.array(IMAGENET_STD, dtype=np.float32).reshape(1, 1, 3)
    return ((img.astype(np.float32) * np.float32(scale) - mean) / std).transpose(2, 0, 1)


@pytest.mark.parametrize("scale", [1 / 255, 0.00392157, 1.0])
def test_normalize_matches_reference_formula(rng, scale):
    img = _noise(rng, 31, 17)
    img[0, 0] = 0
    img[0, 1] = 255
    out = normalize_chw(img, IMAGENET_MEAN, IMAGENET_STD, scale)
    assert out.dtype == np.float32 and out.shape == (3, 31, 17) and out.flags.c_contiguous
    ref = _reference_normalize(img, scale)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6 * max(1.0, scale * 255))


def test_normalize_every_value_within_tolerance():
    # All 256 values in every channel: the folded constants must hold everywhere.
    img = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)
    out = normalize_chw(img, IMAGENET_MEAN, IMAGENET_STD)
    assert np.abs(out - _reference_normalize(img)).max() <= 1e-6


def test_normalize_into_batch_slot(rng):
    crops = [_noise(rng, 8, 9) for _ in range(3)]
    batch = np.empty((3, 3, 8, 9), dtype=np.float32)
    for i, c in enumerate(crops):
        slot = batch[i]
        assert normalize_chw(c, IMAGENET_MEAN, IMAGENET_STD, out=slot) is slot
    stacked = to_batch([normalize_chw(c, IMAGENET_MEAN, IMAGENET_STD) for c in crops])
    np.testing.assert_array_equal(batch, stacked)
    assert stacked.shape == (3, 3, 8, 9) and stacked.dtype == np.float32


def test_normalize_bad_arguments(rng):
    img = _noise(rng, 4, 4)
    with pytest.raises(InvalidDtypeError, match="got dtype float32"):
        normalize_chw(img.astype(np.float32), IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(InvalidInputError, match=r"shape \(H, W, C\), got \(4, 4\)"):
        normalize_chw(img[:, :, 0], IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(InvalidInputError, match=r"mean must have one value per channel \(3\), got 2"):
        normalize_chw(img, (0.5, 0.5), IMAGENET_STD)
    with pytest.raises(InvalidInputError, match="std must be non-zero"):
        normalize_chw(img, IMAGENET_MEAN, (0.2, 0.0, 0.2))
    with pytest.raises(InvalidInputError, match="mean must be finite"):
        normalize_chw(img, (0.1, math.nan, 0.1), IMAGENET_STD)
    with pytest.raises(InvalidInputError, match="mean must be 3 numbers"):
        normalize_chw(img, ("a", "b", "c"), IMAGENET_STD)
    with pytest.raises(InvalidDtypeError, match="out must be a float32 array"):
        normalize_chw(img, IMAGENET_MEAN, IMAGENET_STD, out=np.empty((3, 4, 4), np.float64))
    with pytest.raises(InvalidInputError, match=r"out must be a C-contiguous float32 array of shape \(3, 4, 4\)"):
        normalize_chw(img, IMAGENET_MEAN, IMAGENET_STD, out=np.empty((3, 4, 5), np.float32))


def _resize_then_normalize(img: np.ndarray, width: int, height: int, interpolation: str) -> np.ndarray:
    resized = (resize_cubic if interpolation == "cubic" else resize_linear)(img, width, height)
    return normalize_chw(resized, IMAGENET_MEAN, IMAGENET_STD)


@pytest.mark.parametrize("index", [0, 2, 5, 9])
def test_resize_normalize_equals_resize_then_normalize_on_photos(test_images, index):
    # The model inputs of the pipeline: the detector's 640x640 cubic, the extractor's 224x224
    # linear of whole photos and of crop views.
    img = load_image(test_images[index])
    h, w = img.shape[:2]
    workspace = Workspace()
    cases = [("cubic", img, 640, 640), ("linear", img, 224, 224),
             ("linear", crop(img, (w * 0.2, h * 0.1, w * 0.7, h * 0.9)), 224, 224),
             ("cubic", crop(img, (3.5, 7, w * 0.4, h * 0.3)), 640, 640)]
    for interpolation, src, width, height in cases:
        want = _resize_then_normalize(src, width, height, interpolation)
        for ws in (None, workspace):
            got = resize_normalize_chw(src, width, height, IMAGENET_MEAN, IMAGENET_STD,
                                       interpolation=interpolation, workspace=ws)
            assert got.dtype == np.float32 and got.flags.c_contiguous
            np.testing.assert_array_equal(got, want, err_msg=f"{interpolation} {src.shape} -> {width}x{height}")


@pytest.mark.parametrize("interpolation", ["cubic", "linear"])
@pytest.mark.parametrize(("src", "dst"), [((1, 1), (3, 2)), ((2, 3), (5, 4)), ((3, 7), (1, 1)), ((4, 4), (4, 4)),
                                          ((37, 53), (101, 77)), ((120, 90), (13, 200)), ((333, 250), (224, 224))])
def test_resize_normalize_equals_resize_then_normalize_on_noise(rng, interpolation, src, dst):
    # Uniform noise, the hardest case for rounding; sizes under 4 take the fixed-point cubic path,
    # equal sizes no resize at all.
    img = _noise(rng, *src)
    want = _resize_then_normalize(img, *dst, interpolation)
    got = resize_normalize_chw(img, *dst, IMAGENET_MEAN, IMAGENET_STD, interpolation=interpolation)
    np.testing.assert_array_equal(got, want)


def test_resize_normalize_reads_strided_views_and_fills_out(rng):
    img = _noise(rng, 60, 80)
    batch = np.empty((3, 3, 24, 32), dtype=np.float32)
    views = [img[5:50:2, 3:70], img[:, :, ::-1], img[::-1, ::3]]
    for i, view in enumerate(views):
        for interpolation in ("cubic", "linear"):
            slot = batch[i]
            got = resize_normalize_chw(view, 32, 24, IMAGENET_MEAN, IMAGENET_STD, interpolation=interpolation,
                                       out=slot)
            assert got is slot
            np.testing.assert_array_equal(slot, _resize_then_normalize(np.ascontiguousarray(view), 32, 24,
                                                                       interpolation))


def test_workspace_is_reused_and_bounded(rng):
    workspace = Workspace()
    sizes = [(300, 200), (40, 50), (500, 640), (300, 200)]
    for h, w in sizes:
        img = _noise(rng, h, w)
        for interpolation in ("cubic", "linear"):
            got = resize_normalize_chw(img, 64, 48, IMAGENET_MEAN, IMAGENET_STD, interpolation=interpolation,
                                       workspace=workspace)
            np.testing.assert_array_equal(got, _resize_then_normalize(img, 64, 48, interpolation))
    held = workspace.nbytes
    assert held > 0
    resize_normalize_chw(_noise(rng, 100, 80), 64, 48, IMAGENET_MEAN, IMAGENET_STD, workspace=workspace)
    assert workspace.nbytes == held  # smaller images reuse what is there
    tiny = Workspace(max_bytes=1024)
    img = _noise(rng, 90, 120)
    got = resize_normalize_chw(img, 64, 48, IMAGENET_MEAN, IMAGENET_STD, workspace=tiny)
    np.testing.assert_array_equal(got, _resize_then_normalize(img, 64, 48, "cubic"))
    assert tiny.nbytes == 0  # every temporary of this call is over max_bytes: none is kept


def test_workspace_shared_by_threads(rng):
    # A workspace in use is not waited for: the other thread allocates its own temporaries.
    workspace = Workspace()
    images = [_noise(rng, 150 + 7 * i, 200 - 5 * i) for i in range(8)]
    want = [_resize_then_normalize(img, 96, 80, "cubic") for img in images]
    failures = []

    def work(k: int) -> None:
        for _ in range(3):
            for i in range(k % 2, len(images), 2):
                got = resize_normalize_chw(images[i], 96, 80, IMAGENET_MEAN, IMAGENET_STD, workspace=workspace)
                if not np.array_equal(got, want[i]):
                    failures.append(i)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def test_resize_normalize_bad_arguments(rng):
    img = _noise(rng, 6, 5)
    with pytest.raises(InvalidInputError, match="interpolation must be 'cubic' or 'linear', got 'area'"):
        resize_normalize_chw(img, 4, 4, IMAGENET_MEAN, IMAGENET_STD, interpolation="area")
    with pytest.raises(InvalidInputError, match=r"expected an image of shape \(H, W, C\), got \(6, 5\)"):
        resize_normalize_chw(img[:, :, 0], 4, 4, IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(InvalidDtypeError, match="got dtype float32"):
        resize_normalize_chw(img.astype(np.float32), 4, 4, IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(InvalidInputError, match="width must be a positive integer, got 0"):
        resize_normalize_chw(img, 0, 4, IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(InvalidInputError, match=r"std must have one value per channel \(3\), got 2"):
        resize_normalize_chw(img, 4, 4, IMAGENET_MEAN, (0.2, 0.2))
    with pytest.raises(InvalidInputError, match="std must be non-zero"):
        resize_normalize_chw(img, 4, 4, IMAGENET_MEAN, (0.2, 0.0, 0.2))
    with pytest.raises(InvalidInputError, match=r"out must be a C-contiguous float32 array of shape \(3, 4, 3\)"):
        resize_normalize_chw(img, 3, 4, IMAGENET_MEAN, IMAGENET_STD, out=np.empty((3, 3, 4), np.float32))
    with pytest.raises(InvalidDtypeError, match="out must be a float32 array"):
        resize_normalize_chw(img, 3, 4, IMAGENET_MEAN, IMAGENET_STD, out=np.empty((3, 4, 3), np.float64))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "RGBX"])
@pytest.mark.parametrize("size", [(1, 1), (7, 3), (17000, 2), (301, 517)])
def test_colour_images_are_packed_like_numpy_asarray(rng, mode, size):
    # Upright colour images are packed straight into the result (wider than Pillow's 64 KiB
    # chunk too); the result must be what numpy's own conversion gives.
    width, height = size
    pixels = rng.integers(0, 256, size=(height, width, len(mode)), dtype=np.uint8)
    im = Image.frombytes(mode, size, pixels.tobytes())
    out = load_image(im)
    assert out.shape == (height, width, 3) and out.flags.c_contiguous and out.flags.writeable
    np.testing.assert_array_equal(out, np.asarray(im)[:, :, :3])


def test_to_batch_bad_arguments():
    chw = np.zeros((3, 4, 4), np.float32)
    with pytest.raises(InvalidInputError, match="expected at least one"):
        to_batch([])
    with pytest.raises(InvalidInputError, match=r"image 1: expected shape \(3, 4, 4\)"):
        to_batch([chw, np.zeros((3, 4, 5), np.float32)])
    with pytest.raises(InvalidDtypeError, match="image 0: expected float32, got dtype float64"):
        to_batch([chw.astype(np.float64)])
    with pytest.raises(InvalidInputError, match=r"image 0: expected a float32 \(C, H, W\) array, got list"):
        to_batch([[1.0]])


def _oracle_crop_mask(shape: tuple, box: tuple) -> np.ndarray:
    """Which pixels a box covers, decided pixel by pixel."""
    h, w = shape
    x1, y1, x2, y2 = box
    xa, ya = math.floor(x1), math.floor(y1)
    xb, yb = max(math.ceil(x2), xa + 1), max(math.ceil(y2), ya + 1)
    mask = np.zeros((h, w), dtype=bool)
    for y in range(h):
        for x in range(w):
            mask[y, x] = xa <= x < xb and ya <= y < yb
    return mask


def test_crop_matches_pixel_oracle(rng):
    img = _noise(rng, 20, 30)
    tags = np.arange(20 * 30).reshape(20, 30)
    for _ in range(300):
        x1, y1 = rng.uniform(-10, 35), rng.uniform(-10, 25)
        x2 = x1 + rng.choice([0.0, rng.uniform(0, 2), rng.uniform(0, 40)])
        y2 = y1 + rng.choice([0.0, rng.uniform(0, 2), rng.uniform(0, 30)])
        box = (x1, y1, x2, y2)
        mask = _oracle_crop_mask(img.shape[:2], box)
        if not mask.any():
            with pytest.raises(InvalidInputError, match="lies entirely outside the 30x20 image"):
                crop(img, box)
            continue
        region = crop(img, box)
        assert np.shares_memory(region, img)
        ys, xs = np.nonzero(mask)
        expected = tags[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        assert mask.sum() == expected.size
        np.testing.assert_array_equal(region, img[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1])


def test_crop_cases():
    img = np.arange(10 * 8 * 3, dtype=np.uint8).reshape(10, 8, 3)
    np.testing.assert_array_equal(crop(img, (1.2, 2.7, 3.1, 5.0)), img[2:5, 1:4])
    # Negative coordinates clip instead of wrapping around (the reference's bug).
    np.testing.assert_array_equal(crop(img, (-3.5, -1, 2, 2)), img[0:2, 0:2])
    np.testing.assert_array_equal(crop(img, (6.5, 8.2, 50, 99)), img[8:10, 6:8])
    # Zero-size boxes give one pixel instead of crashing the resize.
    np.testing.assert_array_equal(crop(img, (4, 4, 4, 4)), img[4:5, 4:5])
    np.testing.assert_array_equal(crop(img, (0, 0, 0, 0)), img[0:1, 0:1])
    np.testing.assert_array_equal(crop(img, (7.9, 9.9, 7.9, 9.9)), img[9:10, 7:8])
    np.testing.assert_array_equal(crop(img, np.array([0, 0, 8, 10], np.float32)), img)
    assert crop(img, (2, 3, 2.0001, 3.5)).shape == (1, 1, 3)


@pytest.mark.parametrize(
    ("box", "pattern"),
    [
        ((8, 0, 9, 5), "lies entirely outside the 8x10 image"),
        ((0, 10, 5, 12), "lies entirely outside"),
        ((-5, -5, 0, 0.0), "lies entirely outside"),
        ((-5, 2, -0.5, 4), "lies entirely outside"),
        ((3, 3, 2, 4), "x1 <= x2 and y1 <= y2"),
        ((3, 3, 4, 2), "x1 <= x2 and y1 <= y2"),
        ((0, math.nan, 3, 3), "must be finite"),
        ((0, 0, math.inf, 3), "must be finite"),
        ((0, 0, 3), "four numbers"),
        (("a", 0, 3, 3), "four numbers"),
    ],
)
def test_crop_rejects_bad_boxes(box, pattern):
    img = np.zeros((10, 8, 3), np.uint8)
    with pytest.raises(InvalidInputError, match=pattern):
        crop(img, box)


def test_crop_bad_images():
    with pytest.raises(InvalidDtypeError, match="got dtype float64"):
        crop(np.zeros((4, 4, 3)), (0, 0, 2, 2))
    with pytest.raises(InvalidInputError, match=r"shape \(H, W, C\), got \(4, 4\)"):
        crop(np.zeros((4, 4), np.uint8), (0, 0, 2, 2))


@pytest.mark.parametrize("order", ["RGB", "BGR"])
def test_image_to_tensor_refuses_a_non_image_in_either_channel_order(order, rng):
    from dataclasses import replace

    from edge_shitu.bundle import InputSpec
    from edge_shitu.preprocess import image_to_tensor

    spec = InputSpec(name="x", shape=(1, 3, 8, 8), resize="stretch", interpolation="linear", channel_order=order,
                     scale=1 / 255, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), layout="NCHW")
    for bad in ([[1, 2]], None, np.zeros((4, 4, 3), np.float32)):
        with pytest.raises((InvalidInputError, InvalidDtypeError), match="expected a uint8 image array"):
            image_to_tensor(bad, spec)
    with pytest.raises(InvalidInputError, match=r"expected an image of shape \(H, W, C\), got \(4, 4\)"):
        image_to_tensor(np.zeros((4, 4), np.uint8), spec)
    # BGR: the RGB tensor of the image with its channels reversed.
    img = _noise(rng, 5, 7)
    other = replace(spec, channel_order="RGB" if order == "BGR" else "BGR")
    np.testing.assert_array_equal(image_to_tensor(img, spec), image_to_tensor(img[:, :, ::-1].copy(), other))
