"""Integrity check of gallery files, usable on files too damaged to open as a gallery."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import List, Optional, Tuple

from edge_shitu.compact import bytes_per_item
from edge_shitu.errors import GalleryCorruptError, GalleryError, MissingFileError
from edge_shitu.gallery_format import (
    PathLike,
    _Meta,
    _check_schema,
    _has_thumbnails,
    _parse_meta,
    _read_codes,
    _read_meta_rows,
    _short_list,
)
from edge_shitu.thumbnail import MAX_THUMBNAIL_BYTES

__all__ = ["check_gallery"]


def _check_contents(conn: sqlite3.Connection, name: str) -> Tuple[List[str], Optional[_Meta]]:
    """File-level checks (call inside a transaction); the meta is None when it could not be read."""
    problems = [f"integrity: {r[0]}" for r in conn.execute("PRAGMA integrity_check") if r[0] != "ok"]
    try:
        _check_schema(conn, name)
        meta = _parse_meta(_read_meta_rows(conn), name)
    except GalleryCorruptError as exc:
        return problems + [str(exc)], None
    nbytes = meta.bits // 8
    bad_codes = conn.execute(
        "SELECT count(*) FROM items WHERE typeof(code) != 'blob' OR length(code) != ?", (nbytes,)).fetchone()[0]
    if bad_codes:
        problems.append(f"{bad_codes} items have codes that are not {nbytes}-byte blobs")
    duplicated = conn.execute(
        "SELECT count(*) FROM (SELECT label FROM labels GROUP BY label HAVING count(*) > 1)").fetchone()[0]
    if duplicated:
        problems.append(f"{duplicated} labels are stored more than once")
    bad_labels = conn.execute(
        "SELECT count(*) FROM labels WHERE typeof(label) != 'text' OR label = ''").fetchone()[0]
    if bad_labels:
        problems.append(f"{bad_labels} labels are empty or not text")
    orphans = conn.execute(
        "SELECT count(*) FROM items WHERE label_id NOT IN (SELECT id FROM labels)").fetchone()[0]
    if orphans:
        problems.append(f"{orphans} items refer to a label that does not exist")
    stored = dict(conn.execute("SELECT id, count FROM labels"))
    actual = dict(conn.execute("SELECT label_id, count(*) FROM items GROUP BY label_id"))
    wrong = sorted(i for i in set(stored) | set(actual) if stored.get(i, 0) != actual.get(i, 0))
    if wrong:
        problems.append(f"the item counts of {len(wrong)} labels disagree with the items "
                        f"(label ids {_short_list(wrong)})")
    if meta.embedding_dim is None:
        stray = conn.execute("SELECT count(*) FROM items WHERE embedding IS NOT NULL").fetchone()[0]
        if stray:
            problems.append(f"{stray} items have embeddings but meta 'embedding_dim' is missing")
    else:
        bad_emb = conn.execute(
            "SELECT count(*) FROM items WHERE embedding IS NOT NULL AND "
            "(typeof(embedding) != 'blob' OR length(embedding) != ?)", (4 * meta.embedding_dim,)).fetchone()[0]
        if bad_emb:
            problems.append(f"{bad_emb} items have embeddings that are not {meta.embedding_dim} float32 values")
    if _has_thumbnails(conn):
        stray = conn.execute(
            "SELECT item_id FROM thumbnails WHERE item_id NOT IN (SELECT id FROM items) ORDER BY item_id").fetchall()
        if stray:
            problems.append(f"{len(stray)} thumbnails belong to no item "
                            f"(item ids {_short_list([r[0] for r in stray])})")
        bad = conn.execute(
            "SELECT item_id FROM thumbnails WHERE typeof(jpeg) != 'blob' OR substr(jpeg, 1, 3) != x'FFD8FF' "
            "ORDER BY item_id").fetchall()
        if bad:
            problems.append(f"{len(bad)} thumbnails are not JPEG blobs (item ids {_short_list([r[0] for r in bad])})")
        large = conn.execute("SELECT count(*) FROM thumbnails WHERE length(jpeg) > ?",
                             (MAX_THUMBNAIL_BYTES,)).fetchone()[0]
        if large:
            problems.append(f"{large} thumbnails are larger than {MAX_THUMBNAIL_BYTES} bytes")
    if meta.compact is not None:
        problems.extend(_check_compact(conn, meta))
    low, high = conn.execute("SELECT min(id), max(id) FROM items").fetchone()
    if low is not None and low < 0:
        problems.append(f"negative item id {low}")
    if high is not None and meta.next_id <= high:
        problems.append(f"meta 'next_id' {meta.next_id} is not above the largest id {high}")
    return problems, meta


def _check_compact(conn: sqlite3.Connection, meta: _Meta) -> List[str]:
    """A compact gallery keeps exactly one well-formed compact feature per item."""
    if not conn.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'compact'").fetchone()[0]:
        return [f"meta 'compact' is {meta.compact!r} but the compact table is missing"]
    problems = []
    missing = conn.execute("SELECT id FROM items WHERE id NOT IN (SELECT item_id FROM compact) ORDER BY id").fetchall()
    if missing:
        problems.append(f"{len(missing)} items have no compact feature (item ids {_short_list([r[0] for r in missing])})")
    stray = conn.execute("SELECT item_id FROM compact WHERE item_id NOT IN (SELECT id FROM items) ORDER BY item_id").fetchall()
    if stray:
        problems.append(f"{len(stray)} compact features belong to no item (item ids {_short_list([r[0] for r in stray])})")
    if meta.compact_dim is None:
        if conn.execute("SELECT count(*) FROM compact").fetchone()[0]:
            problems.append("compact features are stored but meta 'compact_dim' is missing")
        return problems
    size = bytes_per_item(meta.compact, meta.compact_dim)
    bad = conn.execute("SELECT item_id FROM compact WHERE typeof(vec) != 'blob' OR length(vec) != ? ORDER BY item_id",
                       (size,)).fetchall()
    if bad:
        problems.append(f"{len(bad)} compact features are not {size}-byte {meta.compact} blobs "
                        f"(item ids {_short_list([r[0] for r in bad])})")
    return problems


def check_gallery(path: PathLike) -> List[str]:
    """Checks a gallery file without loading it: useful when it is too damaged to open.

    Runs SQLite's integrity check and the gallery's own checks (schema, meta values, code and
    embedding sizes, labels and their counts, ids, thumbnails), then reads every code. Opening the file
    writable first lets SQLite roll back a transaction that a crashed writer left unfinished;
    a file that cannot be written is checked read-only.

    Args:
      path: the gallery file.

    Returns:
      One message per problem; an empty list for a healthy gallery.

    Raises:
      MissingFileError: ``path`` does not exist.
      GalleryError: ``path`` is a directory or cannot be opened at all.
    """
    target = Path(path)
    if not target.exists():
        raise MissingFileError(f"gallery file not found: {target}")
    if target.is_dir():
        raise GalleryError(f"{target} is a directory, not a gallery file")
    name = str(target)
    mode = "rw" if os.access(target, os.W_OK) else "ro"
    try:
        conn = sqlite3.connect(f"{target.resolve().as_uri()}?mode={mode}", uri=True, isolation_level=None, timeout=10.0)
    except sqlite3.Error as exc:
        raise GalleryError(f"cannot open gallery {name}: {exc}") from exc
    try:
        conn.execute("BEGIN")
        try:
            problems, meta = _check_contents(conn, name)
            if meta is not None and not any("codes that are not" in p for p in problems):
                try:
                    _read_codes(conn, meta.bits // 8, name)
                except GalleryCorruptError as exc:
                    problems.append(str(exc))
        finally:
            conn.execute("COMMIT")
    except sqlite3.Error as exc:
        return [f"{name}: not a readable SQLite gallery: {exc}"]
    finally:
        conn.close()
    return problems
