"""The gallery file format (version 2): schema, metadata and the low-level reads and writes every
gallery module shares. :mod:`edge_shitu.gallery` is the store built on it, :mod:`edge_shitu.gallery_check`
the integrity check.

File layout::

    meta(key TEXT PRIMARY KEY, value TEXT NOT NULL)
        format_version "2", bits, bit_order "big", metric "hamming", fingerprint (hex, the model and
        code settings that made the codes), created_by, next_id, and optionally max_distance
        (calibrated acceptance threshold), det_threshold (the detector's minimum box score, a float
        in [0, 1]), embedding_dim and embedding_fingerprint (float embeddings stored beside codes,
        and the extractor that made them), generation (a counter of committed changes to the items,
        0 when absent: what files derived from the items, such as a float index, are checked against).
    labels(id INTEGER PRIMARY KEY, label TEXT NOT NULL, count INTEGER NOT NULL)
    items(id INTEGER PRIMARY KEY, label_id INTEGER NOT NULL, code BLOB NOT NULL,
          embedding BLOB NULL (float32 little-endian), source TEXT NULL, added_at INTEGER NULL)
    compact(item_id INTEGER PRIMARY KEY, vec BLOB NOT NULL)          (with meta compact)
        Each item's float feature, L2-normalised and stored compactly for re-ranking (see
        :mod:`edge_shitu.compact`): meta compact "int8" or "fp16" (chosen when the gallery is created;
        then every item has a row), compact_dim, and optionally min_similarity (the calibrated
        acceptance threshold of re-ranked search).
    thumbnails(item_id INTEGER PRIMARY KEY, jpeg BLOB NOT NULL)      (optional)
        A small JPEG per item that has one (see :mod:`edge_shitu.thumbnail`). The table is created,
        in the same transaction, by the first write of a thumbnail, so galleries without it (all
        those made before it existed) stay valid format-2 files; rows are deleted with their items.
"""

from __future__ import annotations

import os
import re
import sqlite3
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, Optional, Sequence, Tuple, TypeVar, Union

import numpy as np

from edge_shitu import __version__
from edge_shitu.errors import GalleryCorruptError, GalleryError, InvalidInputError

FORMAT_VERSION = "2"
"""The gallery file format this SDK reads and writes."""

_MAX_ID = np.iinfo(np.int64).max - 1  # next_id = max id + 1 must still fit in SQLite's int64
# Old SQLite builds allow at most 999 bound parameters per statement.
_CHUNK = 500
_REQUIRED_META = ("format_version", "bits", "bit_order", "metric", "fingerprint", "created_by", "next_id")
_ITEM_COLUMNS = {"id", "label_id", "code", "embedding", "source", "added_at"}
_LABEL_COLUMNS = {"id", "label", "count"}
_THUMBNAIL_COLUMNS = {"item_id", "jpeg"}
_THUMBNAIL_TABLE = "CREATE TABLE IF NOT EXISTS thumbnails(item_id INTEGER PRIMARY KEY, jpeg BLOB NOT NULL)"
_COMPACT_COLUMNS = {"item_id", "vec"}
_COMPACT_TABLE = "CREATE TABLE IF NOT EXISTS compact(item_id INTEGER PRIMARY KEY, vec BLOB NOT NULL)"
# Rows per fetch when loading codes: bounds the Python objects alive at once while opening.
_FETCH_ROWS = 1 << 15
_HEX = re.compile(r"[0-9a-fA-F]+")
_SIDE_FILES = ("-journal", "-wal", "-shm")

_SCHEMA = (
    "CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE labels(id INTEGER PRIMARY KEY, label TEXT NOT NULL, count INTEGER NOT NULL)",
    "CREATE TABLE items("
    "id INTEGER PRIMARY KEY, label_id INTEGER NOT NULL, code BLOB NOT NULL, "
    "embedding BLOB NULL, source TEXT NULL, added_at INTEGER NULL)",
)

PathLike = Union[str, "os.PathLike[str]"]
T = TypeVar("T")


@dataclass(frozen=True)
class _Meta:
    bits: int
    fingerprint: str
    created_by: str
    next_id: int
    max_distance: Optional[int]
    embedding_dim: Optional[int]
    embedding_fingerprint: Optional[str] = None
    det_threshold: Optional[float] = None
    generation: int = 0
    compact: Optional[str] = None
    compact_dim: Optional[int] = None
    min_similarity: Optional[float] = None


def _chunks(values: Sequence[T], size: int = _CHUNK) -> Iterable[Sequence[T]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _short_list(values: Sequence[int], limit: int = 20) -> str:
    shown = ", ".join(str(int(v)) for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}] ({len(values)} in all)"


def _check_fingerprint(fingerprint: object) -> str:
    if not isinstance(fingerprint, str) or not _HEX.fullmatch(fingerprint):
        raise InvalidInputError(f"fingerprint must be a non-empty hex string, got {fingerprint!r}")
    return fingerprint.lower()


def _check_bits(bits: object) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or bits <= 0 or bits % 8:
        raise InvalidInputError(f"bits must be a positive multiple of 8, got {bits!r}")
    return int(bits)


def _parse_int(value: str, key: str, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise GalleryCorruptError(f"{name}: meta {key!r} must be an integer, got {value!r}") from None


def _optional_number(rows: Dict[str, str], key: str, low: float, high: float, name: str) -> Optional[float]:
    """An optional meta value that must be a number in [low, high]; None when absent."""
    if key not in rows:
        return None
    try:
        value = float(rows[key])
    except ValueError:
        value = float("nan")
    if not low <= value <= high:
        raise GalleryCorruptError(f"{name}: meta {key!r} must be a number in [{low:g}, {high:g}], got {rows[key]!r}")
    return value


def _optional_dim(rows: Dict[str, str], key: str, name: str) -> Optional[int]:
    """An optional meta value that must be a positive integer; None when absent."""
    if key not in rows:
        return None
    value = _parse_int(rows[key], key, name)
    if value <= 0:
        raise GalleryCorruptError(f"{name}: meta {key!r} must be > 0, got {value}")
    return value


def _parse_meta(rows: Dict[str, str], name: str) -> _Meta:
    missing = [key for key in _REQUIRED_META if key not in rows]
    if missing:
        raise GalleryCorruptError(f"{name}: the meta table lacks {missing}; this is not an edge-shitu gallery")
    version = rows["format_version"]
    if version == "1":
        raise GalleryError(
            f"{name} is an edge-shitu gallery of format 1; this edge-shitu uses format {FORMAT_VERSION}. "
            f"Upgrade it once with `edge-shitu gallery upgrade {name}` (the old file is kept as a backup; "
            "the command comes with the convert extra: pip install \"edge-shitu[convert]\")"
        )
    if version != FORMAT_VERSION:
        raise GalleryCorruptError(
            f"{name}: gallery format_version {version!r} is not supported (this edge-shitu reads "
            f"version {FORMAT_VERSION!r})"
        )
    bits = _parse_int(rows["bits"], "bits", name)
    if bits <= 0 or bits % 8:
        raise GalleryCorruptError(f"{name}: meta 'bits' must be a positive multiple of 8, got {bits}")
    if rows["bit_order"] != "big":
        raise GalleryCorruptError(f"{name}: meta 'bit_order' must be 'big', got {rows['bit_order']!r}")
    if rows["metric"] != "hamming":
        raise GalleryCorruptError(f"{name}: meta 'metric' must be 'hamming', got {rows['metric']!r}")
    if not _HEX.fullmatch(rows["fingerprint"]):
        raise GalleryCorruptError(f"{name}: meta 'fingerprint' is not a hex string: {rows['fingerprint']!r}")
    next_id = _parse_int(rows["next_id"], "next_id", name)
    if not 0 <= next_id <= _MAX_ID + 1:
        raise GalleryCorruptError(f"{name}: meta 'next_id' out of range: {next_id}")
    max_distance = None
    if "max_distance" in rows:
        max_distance = _parse_int(rows["max_distance"], "max_distance", name)
        if not 0 <= max_distance <= bits:
            raise GalleryCorruptError(f"{name}: meta 'max_distance' must be in [0, {bits}], got {max_distance}")
    det_threshold = _optional_number(rows, "det_threshold", 0.0, 1.0, name)
    embedding_dim = _optional_dim(rows, "embedding_dim", name)
    compact = rows.get("compact")
    if compact is not None and compact not in ("int8", "fp16"):
        raise GalleryCorruptError(f"{name}: meta 'compact' must be 'int8' or 'fp16', got {compact!r}")
    compact_dim = _optional_dim(rows, "compact_dim", name)
    min_similarity = _optional_number(rows, "min_similarity", -1.0, 1.0, name)
    generation = _parse_int(rows.get("generation", "0"), "generation", name)
    if generation < 0:
        raise GalleryCorruptError(f"{name}: meta 'generation' must be >= 0, got {generation}")
    embedding_fingerprint = rows.get("embedding_fingerprint")
    if embedding_fingerprint is not None and not _HEX.fullmatch(embedding_fingerprint):
        raise GalleryCorruptError(f"{name}: meta 'embedding_fingerprint' is not a hex string: {embedding_fingerprint!r}")
    return _Meta(
        bits=bits,
        fingerprint=rows["fingerprint"].lower(),
        created_by=rows["created_by"],
        next_id=next_id,
        max_distance=max_distance,
        embedding_dim=embedding_dim,
        embedding_fingerprint=None if embedding_fingerprint is None else embedding_fingerprint.lower(),
        det_threshold=det_threshold,
        generation=generation,
        compact=compact,
        compact_dim=compact_dim,
        min_similarity=min_similarity,
    )


def _is_corruption(exc: sqlite3.Error) -> bool:
    """Tells damaged or foreign files apart from transient conditions (locks, permissions, disk full)."""
    name = getattr(exc, "sqlite_errorname", None)
    if name is not None:
        transient = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM",
                     "SQLITE_FULL", "SQLITE_NOMEM", "SQLITE_INTERRUPT", "SQLITE_CONSTRAINT", "SQLITE_IOERR")
        return not name.startswith(transient)
    # Python < 3.11 has no error names: recognise corruption by SQLite's own messages for it, so that
    # constraint failures, locks and the like are never reported as a damaged file.
    if isinstance(exc, (sqlite3.IntegrityError, sqlite3.OperationalError)):
        text = str(exc).lower()
        return "malformed" in text or "corrupt" in text
    text = str(exc).lower()
    return any(word in text for word in ("malformed", "not a database", "corrupt", "encrypted"))


def _read_meta_rows(conn: sqlite3.Connection) -> Dict[str, str]:
    return {str(k): str(v) for k, v in conn.execute("SELECT key, value FROM meta")}


def _code_chunks(conn: sqlite3.Connection, nbytes: int, name: str, ids: np.ndarray,
                 label_ids: np.ndarray) -> Iterator[np.ndarray]:
    """Yields the codes in id order, a bounded batch of rows at a time, filling ``ids`` and
    ``label_ids`` on the way.

    ``ids`` and ``label_ids`` must have one slot per item (``SELECT count(*)`` in the same transaction).
    """
    count = ids.shape[0]
    cursor = conn.execute("SELECT id, label_id, code FROM items ORDER BY id")
    done = 0
    while True:
        rows = cursor.fetchmany(_FETCH_ROWS)
        if not rows:
            break
        n = len(rows)
        if done + n > count:
            raise GalleryCorruptError(f"{name}: the items table changed while it was being read")
        id_list, label_list, blobs = zip(*rows)
        try:
            joined = b"".join(blobs)
            lengths_ok = set(map(len, blobs)) == {nbytes}
        except TypeError:
            lengths_ok = False
        if not lengths_ok:
            bad = [int(r[0]) for r in rows if not isinstance(r[2], bytes) or len(r[2]) != nbytes]
            raise GalleryCorruptError(
                f"{name}: items {_short_list(bad)} have codes that are not {nbytes}-byte blobs "
                f"({nbytes * 8}-bit codes expected)"
            )
        ids[done:done + n] = id_list
        label_ids[done:done + n] = label_list
        done += n
        yield np.frombuffer(joined, dtype=np.uint8).reshape(n, nbytes)
    if done != count:
        raise GalleryCorruptError(f"{name}: the items table changed while it was being read")


def _read_codes(conn: sqlite3.Connection, nbytes: int, name: str) -> Tuple[np.ndarray, np.ndarray]:
    """Reads every (id, code) in id order: int64 ``(m,)`` and uint8 ``(m, nbytes)``."""
    count = conn.execute("SELECT count(*) FROM items").fetchone()[0]
    ids, label_ids = np.empty(count, dtype=np.int64), np.empty(count, dtype=np.int64)
    chunks = list(_code_chunks(conn, nbytes, name, ids, label_ids))
    codes = np.concatenate(chunks) if chunks else np.empty((0, nbytes), dtype=np.uint8)
    return ids, codes


def _check_schema(conn: sqlite3.Connection, name: str) -> None:
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    missing = {"meta", "items", "labels"} - tables
    if missing:
        raise GalleryCorruptError(
            f"{name}: not an edge-shitu gallery (SQLite database without the table(s) {sorted(missing)})"
        )
    checked = [("items", _ITEM_COLUMNS), ("labels", _LABEL_COLUMNS)]
    if "thumbnails" in tables:
        checked.append(("thumbnails", _THUMBNAIL_COLUMNS))
    if "compact" in tables:
        checked.append(("compact", _COMPACT_COLUMNS))
    for table, wanted in checked:
        columns = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
        if not wanted <= columns:
            raise GalleryCorruptError(
                f"{name}: the {table} table lacks the column(s) {sorted(wanted - columns)}"
            )


def _has_thumbnails(conn: sqlite3.Connection) -> bool:
    """Whether the optional thumbnails table exists (call inside the transaction that uses it)."""
    return conn.execute(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'thumbnails'").fetchone()[0] > 0


def fsync_dir(directory: Path) -> None:
    """Makes a rename in ``directory`` durable (where the platform allows it); never raises."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _label_ids(conn: sqlite3.Connection, labels: Iterable[str]) -> Dict[str, int]:
    """Ids of labels in the labels table, creating the missing ones (count 0)."""
    wanted = set(labels)
    # One scan of the (unindexed) labels table, in SQLite, against an indexed temporary list of
    # the batch's labels serves the whole batch.
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS wanted_labels(label TEXT PRIMARY KEY)")
    conn.execute("DELETE FROM temp.wanted_labels")
    conn.executemany("INSERT INTO temp.wanted_labels(label) VALUES (?)", ((lab,) for lab in wanted))
    found: Dict[str, int] = {label: int(i) for i, label in conn.execute(
        "SELECT l.id, l.label FROM labels AS l WHERE l.label IN (SELECT label FROM temp.wanted_labels)")}
    conn.execute("DELETE FROM temp.wanted_labels")
    missing = sorted(wanted - found.keys())
    if missing:
        start = (conn.execute("SELECT max(id) FROM labels").fetchone()[0] or 0) + 1
        conn.executemany("INSERT INTO labels(id, label, count) VALUES (?, ?, 0)",
                         ((start + j, lab) for j, lab in enumerate(missing)))
        found.update((lab, start + j) for j, lab in enumerate(missing))
    return found


def _bump_counts(conn: sqlite3.Connection, delta: Counter) -> None:
    """Adds ``delta[label_id]`` to each label's item count; labels left with no item are deleted."""
    changes = [(int(n), int(lab)) for lab, n in delta.items() if n]
    conn.executemany("UPDATE labels SET count = count + ? WHERE id = ?", changes)
    if any(n < 0 for n, _ in changes):
        conn.execute("DELETE FROM labels WHERE count <= 0")


def _set_meta(conn: sqlite3.Connection, key: str, value: object) -> None:
    conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, str(value)))


def _init_schema(conn: sqlite3.Connection, *, fingerprint: str, bits: int, compact: Optional[str] = None) -> None:
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement in _SCHEMA:
            conn.execute(statement)
        conn.executemany(
            "INSERT INTO meta(key, value) VALUES (?, ?)",
            [
                ("format_version", FORMAT_VERSION),
                ("bits", str(bits)),
                ("bit_order", "big"),
                ("metric", "hamming"),
                ("fingerprint", fingerprint),
                ("created_by", f"edge-shitu {__version__}"),
                ("next_id", "0"),
            ],
        )
        if compact is not None:
            conn.execute(_COMPACT_TABLE)
            conn.execute("INSERT INTO meta(key, value) VALUES ('compact', ?)", (compact,))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
