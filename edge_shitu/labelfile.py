"""Label files as the reference uses them: one ``relative/path<TAB>label`` per line."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Union

from edge_shitu.errors import LabelFileError, MissingFileError

__all__ = ["LabelEntry", "read_label_file"]


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
    """Parse a label file. Blank lines are skipped; a UTF-8 BOM is accepted.

    Raises:
      MissingFileError: the file does not exist.
      LabelFileError: the file is not UTF-8, or a line has no TAB, an empty path or an empty label.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise MissingFileError(f"{p}: label file not found") from None
    except IsADirectoryError:
        raise LabelFileError(f"{p}: is a directory, expected a label file") from None
    except UnicodeDecodeError as exc:
        raise LabelFileError(f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    entries = []
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip("\r\n")
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise LabelFileError(f"{p}:{n}: expected 'relative/path<TAB>label', got {line[:80]!r}")
        rel, label = fields[0].strip(), fields[1].strip()
        if not rel or not label:
            raise LabelFileError(f"{p}:{n}: empty path or label in {line[:80]!r}")
        entries.append(LabelEntry(rel, label, n))
    return entries
