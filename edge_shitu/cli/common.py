"""What the command modules share: exit codes, argument types, image lists, per-image loops, progress, output.

Command modules (the runtime's own and the plugins of ``edge_shitu.commands``) build on these so
that every command reports, exits and takes its options the same way.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import importlib.util
import json
import os
import time
import traceback
from pathlib import Path
from typing import Callable, List, Optional, Sequence, TextIO

from edge_shitu.errors import BackendUnavailableError, ImageDecodeError, InvalidInputError, MissingFileError

__all__ = [
    "EXIT_OK", "EXIT_FAILURE", "EXIT_BAD_INPUT", "IMAGE_SUFFIXES", "heavy", "missing_extra", "whole_number",
    "fraction", "add_threads",
    "add_image_limit", "embedder_options", "expand_images", "per_image", "Progress", "write_json", "JsonLines",
    "replica_note", "one_line", "box",
]

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
"""Files a folder given as an image argument contributes (matched case-insensitively)."""

# Errors that concern one input image: a batch command reports them and goes on with the next image.
_IMAGE_ERRORS = (MissingFileError, ImageDecodeError, InvalidInputError)
_GLOB_CHARS = set("*?[")
# Without a terminal, a status line at most this often.
_STATUS_SECONDS = 10.0


def heavy(module: str, extra: str):
    """Imports a module of an optional extra, or says which extra to install.

    Raises:
      BackendUnavailableError: the module (or what it imports) is not installed; the message gives
        the pip command.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise BackendUnavailableError(
            f"this command needs the '{extra}' extra ({exc}); run: pip install \"edge-shitu[{extra}]\""
        ) from None


def missing_extra(extra: str, modules: Sequence[str]) -> str:
    """A note for ``--help`` when a command's extra is not installed (found without importing it), else ""."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return f" [not installed: pip install \"edge-shitu[{extra}]\"]" if missing else ""


def _thread_count(text: str) -> int:
    from edge_shitu.options import check_threads

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of threads, got {text[:40]!r}") from None
    try:
        return check_threads(value, name="a thread count")
    except InvalidInputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _pixel_count(text: str) -> int:
    from edge_shitu.options import MAX_PIXELS

    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value.is_integer() and 1 <= value <= MAX_PIXELS):
        raise argparse.ArgumentTypeError(f"expected a whole number of pixels from 1 to {MAX_PIXELS}, got {text[:40]!r}")
    return int(value)


def whole_number(low: int, high: Optional[int] = None) -> Callable[[str], int]:
    """An argparse type: a whole number from ``low`` to ``high`` (no upper bound when None)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            span = f"from {low} to {high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"expected a whole number {span}, got {text[:40]!r}")
        return value

    return parse


def fraction(low_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a number in [0, 1], or (0, 1] when ``low_open``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not (0.0 < value <= 1.0 if low_open else 0.0 <= value <= 1.0):
            raise argparse.ArgumentTypeError(f"expected a number in {'(0' if low_open else '[0'}, 1], got {text[:40]!r}")
        return value

    return parse


def add_threads(parser: argparse.ArgumentParser) -> None:
    """Adds ``--threads`` (1 to this machine's core count)."""
    parser.add_argument("--threads", type=_thread_count, default=None,
                        help="inference threads per model, 1 to the number of CPU cores (default: the backend's)")


def add_image_limit(parser: argparse.ArgumentParser) -> None:
    """Adds ``--max-pixels`` (the decoding limit, see :mod:`edge_shitu.image`)."""
    from edge_shitu.image import DEFAULT_MAX_PIXELS

    parser.add_argument("--max-pixels", type=_pixel_count, default=DEFAULT_MAX_PIXELS, metavar="N",
                        help=f"refuse larger images before decoding them; decoding takes about 7 bytes per pixel "
                             f"(16 for WebP) (default {DEFAULT_MAX_PIXELS}, about 350 MB)")


def embedder_options(args: argparse.Namespace):
    """EmbedderOptions from ``--threads`` and ``--max-pixels``."""
    from edge_shitu.options import BackendOptions, EmbedderOptions

    return EmbedderOptions(backend=BackendOptions(threads=args.threads), max_pixels=args.max_pixels)


def expand_images(arguments: Sequence[str]) -> List[str]:
    """The image files named by command-line arguments, in order.

    A folder gives its image files (by suffix, recursively, sorted); an argument that is not an
    existing path but holds ``*``, ``?`` or ``[`` is a glob (``**`` crosses folders), sorted; anything
    else is kept as given, so a missing file is reported by the command like any bad image.

    Raises:
      InvalidInputError: a folder holds no image file, or a glob matches none.
    """
    images: List[str] = []
    for arg in arguments:
        path = Path(arg)
        if path.is_dir():
            found = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise InvalidInputError(f"{arg}: folder holds no image file ({', '.join(IMAGE_SUFFIXES)})")
            images += found
        elif not os.path.lexists(arg) and _GLOB_CHARS & set(arg):
            found = sorted(p for p in glob.glob(arg, recursive=True) if os.path.isfile(p))
            if not found:
                raise InvalidInputError(f"{arg}: no file matches this pattern")
            images += found
        else:
            images.append(arg)
    return images


class Progress:
    """Progress of a long command on stderr: a tqdm bar on a terminal, else a status line every few seconds.

    Use as a context manager; :meth:`update` takes the number of items done so far.
    """

    def __init__(self, what: str, total: int, stream: TextIO) -> None:
        self.what, self.total, self.stream = what, total, stream
        self._bar = None
        self._done = 0
        self._next = time.monotonic() + _STATUS_SECONDS
        if _is_terminal(stream):
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=what, unit="img", file=stream, leave=True, dynamic_ncols=True)

    def update(self, done: int) -> None:
        step, self._done = done - self._done, done
        if self._bar is not None:
            self._bar.update(step)
        elif time.monotonic() >= self._next or (done == self.total and self.total >= 1):
            self._next = time.monotonic() + _STATUS_SECONDS
            share = f" ({100 * done / self.total:.0f}%)" if self.total else ""
            self.stream.write(f"{self.what}: {done}/{self.total}{share}\n")
            self.stream.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class JsonLines:
    """Writes records as they come: one JSON object per line (``--jsonl``), or one array at the end (``--json``)."""

    def __init__(self, out: TextIO, *, lines: bool, array: bool) -> None:
        self.out, self.lines, self.array = out, lines, array
        self.records: List[dict] = []

    def add(self, record: dict) -> None:
        if self.lines:
            self.out.write(json.dumps(record, ensure_ascii=False) + "\n")
            self.out.flush()
        elif self.array:
            self.records.append(record)

    def close(self) -> None:
        if self.array and not self.lines:
            write_json(self.records, self.out)


def per_image(images: Sequence[str], work: Callable[[str], dict], err: TextIO, sink: JsonLines, *,
              debug: bool = False, progress: Optional[Progress] = None) -> int:
    """Runs ``work`` on each image and hands its record to ``sink``; a bad image is reported on
    stderr and recorded as ``{"image", "error"}``, and the loop goes on.

    Returns:
      The exit code: 2 when some image failed, else 0.
    """
    failed = 0
    for n, img in enumerate(images, start=1):
        try:
            record = work(img)
        except _IMAGE_ERRORS as exc:
            failed += 1
            if debug:
                traceback.print_exception(type(exc), exc, exc.__traceback__, file=err)
            err.write(f"edge-shitu: error: {one_line(exc)}\n")
            record = {"image": img, "error": one_line(exc)}
        sink.add(record)
        if progress is not None:
            progress.update(n)
    if failed and len(images) > 1:
        err.write(f"edge-shitu: {failed} of {len(images)} image(s) failed\n")
    return EXIT_BAD_INPUT if failed else EXIT_OK


def write_json(records, out: TextIO) -> None:
    """Writes one JSON document (UTF-8 text kept as is) and a newline."""
    json.dump(records, out, ensure_ascii=False, indent=2)
    out.write("\n")


def replica_note(bundle, err: TextIO) -> None:
    """Says on stderr when a bundle holds replica models (their outputs are meaningless)."""
    if bundle.is_replica:
        err.write(f"note: {bundle.path.name} holds REPLICA models (official graphs, random weights): "
                  "boxes, codes and labels are meaningless, only the mechanics are real\n")


def one_line(exc: object, limit: int = 600) -> str:
    """An error message on one line of bounded length, whatever the input put into it."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def box(values) -> List[float]:
    """A box as JSON-friendly floats rounded to 0.01 px."""
    return [round(float(v), 2) for v in values]
