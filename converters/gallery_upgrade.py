"""Migration of galleries of format 1 (one label string per item) to the current format.

Only old files need it, so it lives beside the runtime; it writes the current schema through the
gallery module's own schema code, so the two cannot drift apart.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import uuid
from pathlib import Path

from edge_shitu.errors import GalleryCorruptError, GalleryError, MissingFileError
from edge_shitu.gallery_format import (
    PathLike,
    _SIDE_FILES,
    _check_bits,
    _check_fingerprint,
    _init_schema,
    _read_meta_rows,
    _set_meta,
    fsync_dir,
)

__all__ = ["upgrade_gallery"]


def upgrade_gallery(path: PathLike) -> Path:
    """Rewrites a format-1 gallery file in the current format, keeping the old file as a backup.

    Ids, labels, codes, embeddings, sources, the fingerprint, ``next_id`` and a calibrated
    ``max_distance`` are carried over unchanged (``added_at`` is rounded to whole seconds). The
    new file is written beside the old one and renamed over it only when complete, so a crash
    leaves either the old gallery or the new one.

    Args:
      path: the format-1 gallery file.

    Returns:
      The backup of the old file (``path`` + ``.v1.bak``).

    Raises:
      MissingFileError: ``path`` does not exist.
      GalleryError: ``path`` is not a format-1 gallery (already current, or not a gallery), the
        backup file exists already, or the new file cannot be written.
    """
    source = Path(path)
    if not source.is_file():
        raise MissingFileError(f"gallery file not found: {source}")
    backup = source.with_name(source.name + ".v1.bak")
    name = str(source)
    tmp = source.with_name(f".{source.name}.{uuid.uuid4().hex}.tmp")
    try:
        old = sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
        try:
            rows = _read_meta_rows(old)
        except sqlite3.Error as exc:
            raise GalleryCorruptError(f"{name} is not an edge-shitu gallery: {exc}") from exc
        finally:
            old.close()
        if rows.get("format_version") != "1":
            raise GalleryError(f"{name} is not a format-1 gallery (format_version {rows.get('format_version')!r}); "
                               "nothing to upgrade")
        if backup.exists():
            raise GalleryError(f"{backup} exists already; move it away before upgrading {source}")
        conn = sqlite3.connect(str(tmp), isolation_level=None)
        try:
            _init_schema(conn, fingerprint=_check_fingerprint(rows["fingerprint"]), bits=_check_bits(int(rows["bits"])))
            conn.execute("ATTACH DATABASE ? AS old", (f"{source.resolve().as_uri()}?mode=ro",))
            conn.execute("BEGIN IMMEDIATE")
            for key in ("created_by", "next_id", "max_distance", "embedding_dim"):
                if key in rows:
                    _set_meta(conn, key, rows[key])
            conn.execute("INSERT INTO labels(label, count) SELECT label, count(*) FROM old.items GROUP BY label "
                         "ORDER BY label")
            conn.execute(
                "INSERT INTO items(id, label_id, code, embedding, source, added_at) "
                "SELECT o.id, l.id, o.code, o.embedding, o.source, CAST(o.added_at AS INTEGER) "
                "FROM old.items AS o JOIN labels AS l ON l.label = o.label ORDER BY o.id")
            conn.execute("COMMIT")
            conn.execute("DETACH DATABASE old")
        finally:
            conn.close()
        # The backup is a second name of the old file, made before the new file takes the gallery's
        # path: at every instant the path holds a whole gallery, old or new.
        try:
            os.link(source, backup)
        except OSError:
            shutil.copy2(source, backup)
        os.replace(tmp, source)
    except (OSError, sqlite3.Error, ValueError) as exc:
        if isinstance(exc, GalleryError):
            raise
        raise GalleryError(f"cannot upgrade gallery {name}: {exc}") from exc
    finally:
        for suffix in ("", *_SIDE_FILES):
            Path(str(tmp) + suffix).unlink(missing_ok=True)
    fsync_dir(source.parent)
    return backup
