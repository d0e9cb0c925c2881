"""Label files as the reference uses them: one ``relative/path<TAB>label`` per line.

Labels (and paths) must survive that format unchanged, so the rule for a valid label lives here and
the gallery applies the same one.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Union

from edge_shitu.errors import InvalidInputError, LabelFileError, MissingFileError

__all__ = ["LabelEntry", "read_label_file", "check_label", "MAX_LINE_BYTES"]

MAX_LINE_BYTES = 64 * 1024
"""Longest line a label file may have; bounds memory on a file that is not a label file at all."""

# Control characters (Unicode category Cc: C0, DEL, C1 such as U+0085) and the line and paragraph
# separators U+2028/U+2029, which other tools' line splitting treats as line ends.
_BREAKING = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def has_breaking_characters(text: str) -> bool:
    """Whether ``text`` holds a character that would break a ``path<TAB>label`` line."""
    return _BREAKING.search(text) is not None


def check_label(label: object, where: str) -> str:
    """Validates one label.

    Args:
      label: the label.
      where: what to name in the message (e.g. ``"labels[3]"`` or ``"file.txt:12"``).

    Returns:
      The label, unchanged.

    Raises:
      InvalidInputError: not a str, empty, with leading or trailing spaces, or holding a tab, a
        newline, another control character or a line separator.
    """
    if not isinstance(label, str):
        raise InvalidInputError(f"{where}: a label must be a str, got {type(label).__name__}")
    if not label or label != label.strip() or has_breaking_characters(label):
        raise InvalidInputError(
            f"{where}: a label must be non-empty, without leading/trailing spaces and without "
            f"tabs, newlines, other control characters or line separators, got {_shown(label)}"
        )
    return label


@dataclass(frozen=True)
class LabelEntry:
    """One line of a label file.

    Attributes:
      path: the image path as written (relative to the image root).
      label: the label (second TAB-separated field; further fields are ignored, as in the reference).
      line: 1-based line number, for messages.
    """

    path: str
    label: str
    line: int


def read_label_file(path: Union[str, os.PathLike]) -> List[LabelEntry]:
    """Parses and validates a whole label file before anything is done with it.

    Lines end at LF (a CR before it is dropped); blank lines are skipped; a UTF-8 BOM is accepted.
    Every label is checked with :func:`check_label` and every path for control characters, so a bad
    line is reported as ``file:line`` before any image is read.

    Raises:
      MissingFileError: the file does not exist.
      LabelFileError: the file is not a regular UTF-8 text file, a line is longer than
        :data:`MAX_LINE_BYTES`, or a line has no TAB, an empty or absolute path, or a bad label.
    """
    p = Path(path)
    try:
        if not p.is_file() and p.exists():
            raise LabelFileError(f"{p}: is not a regular file, expected a label file")
        fh = open(p, "rb")
    except FileNotFoundError:
        raise MissingFileError(f"{p}: label file not found") from None
    except OSError as exc:
        raise LabelFileError(f"{p}: cannot read the label file ({exc.strerror or exc})") from None
    entries = []
    with fh:
        n = 0
        while True:
            raw = fh.readline(MAX_LINE_BYTES + 1)
            if not raw:
                break
            n += 1
            if len(raw) > MAX_LINE_BYTES:
                raise LabelFileError(f"{p}:{n}: line longer than {MAX_LINE_BYTES} bytes; expected "
                                     "'relative/path<TAB>label' lines")
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise LabelFileError(f"{p}:{n}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
            line = line[:-1] if line.endswith("\n") else line
            line = line[:-1] if line.endswith("\r") else line
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2:
                raise LabelFileError(f"{p}:{n}: expected 'relative/path<TAB>label', got {_shown(line)}")
            rel, label = fields[0].strip(), fields[1].strip()
            if not rel or not label:
                raise LabelFileError(f"{p}:{n}: empty path or label in {_shown(line)}")
            if has_breaking_characters(rel) or os.path.isabs(rel):
                raise LabelFileError(f"{p}:{n}: the path must be relative and free of control characters, "
                                     f"got {_shown(rel)}")
            try:
                check_label(label, f"{p}:{n}")
            except InvalidInputError as exc:
                raise LabelFileError(str(exc)) from None
            entries.append(LabelEntry(rel, label, n))
    return entries


def _shown(text: str, limit: int = 80) -> str:
    """``repr`` of at most ``limit`` characters, so one hostile line never floods a message."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"
