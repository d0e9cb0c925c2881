"""The on-device gallery: labelled binary codes in one SQLite file, searched exhaustively in memory.

The file format is :mod:`edge_shitu.gallery_format`; the integrity check of files, damaged ones
included, is :mod:`edge_shitu.gallery_check` (:func:`check_gallery` is re-exported here).

Labels are stored once and items refer to them by a small integer. There is no index besides the
two integer primary keys (an index on ``labels.label`` alone would cost 7 bytes per item in a
gallery of five views per product), which keeps a million-item gallery near 93 bytes per item on
disk. Looking a label up by name scans the ``labels`` table once per write transaction (a few
tens of milliseconds for 200,000 labels); label uniqueness is kept by that code and verified by
:meth:`Gallery.check`. Counts per label live in ``labels.count``, kept exact in the same
transaction as every change to ``items``; only :meth:`Gallery.remove_label` scans the items.

Ids are stable keys, never row positions, and automatic ids are never reused after a removal
(``next_id`` only grows). Every change is one SQLite transaction (``BEGIN IMMEDIATE`` ...
``COMMIT``, rolled back on any error) with ``synchronous=FULL``, so a crash or power cut leaves the
gallery as it was before or after the change, never half-way.

The journal mode is SQLite's default rollback journal rather than WAL: a gallery is a file people
copy to devices and open from read-only storage, and a WAL database is only complete together with
its ``-wal``/``-shm`` side files (which a read-only opener leaves behind and cannot create on a
read-only partition). Changes are batched, so WAL's cheaper commits would not matter.

Items may carry a small JPEG thumbnail (:mod:`edge_shitu.thumbnail`) in an optional table, written,
read and removed with them; it is never loaded into memory.

In memory a gallery holds only an ascending ``int64 (m,)`` id array and one copy of the codes in a
:class:`~edge_shitu.search.HammingIndex` (numpy or faiss): 72 bytes per 512-bit item. Both are
replaced only after a transaction has committed, and reloaded when another connection (another
process) has changed the file.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import uuid
from collections import Counter, abc
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from edge_shitu.errors import (
    FingerprintMismatchError,
    GalleryCorruptError,
    GalleryError,
    InvalidDtypeError,
    InvalidInputError,
    MissingEmbeddingsError,
    MissingFileError,
    UnknownItemError,
)
from edge_shitu.compact import (
    COMPACT_FORMATS,
    CompactVectors,
    compress,
    from_blobs,
    rerank_shortlist,
    to_blob,
    unit_queries,
)
from edge_shitu.gallery_check import _check_contents, check_gallery
from edge_shitu.gallery_format import (
    _MAX_ID,
    _COMPACT_TABLE,
    _SIDE_FILES,
    _THUMBNAIL_TABLE,
    FORMAT_VERSION,
    PathLike,
    T,
    _Meta,
    _bump_counts,
    _check_bits,
    _check_fingerprint,
    _check_schema,
    _chunks,
    _code_chunks,
    _has_thumbnails,
    _init_schema,
    _is_corruption,
    _label_ids,
    _parse_meta,
    _read_codes,
    _read_meta_rows,
    _REQUIRED_META,
    _set_meta,
    _short_list,
    fsync_dir,
)
from edge_shitu.labelfile import check_label, has_breaking_characters
from edge_shitu.search import HammingIndex, check_codes, resolve_hamming_backend
from edge_shitu.thumbnail import JPEG_MAGIC, check_thumbnail
from edge_shitu.types import SearchResult

__all__ = ["Gallery", "GalleryItem", "GalleryInfo", "ItemBatch", "FORMAT_VERSION", "check_gallery", "fsync_dir"]

_MEMORY = ":memory:"
DEFAULT_SHORTLIST = 16
"""Hamming candidates re-ranked per query by :meth:`Gallery.search` with features: on the real PP-ShiTuV2
drink features 5 already reach float inner product's recall@1 (docs/benchmarks.md); 16 leaves a margin."""
_CONSTRUCT_KEY = object()
# Rows read (or written) at a time when compact features are loaded or made from stored embeddings.
_VECTOR_CHUNK = 8192


@dataclass(frozen=True)
class GalleryItem:
    """One stored gallery item.

    Attributes:
      id: stable item id (>= 0).
      label: the item's label.
      source: where the item came from (e.g. an image path), or None.
      added_at: when it was added, seconds since the Unix epoch, or None.
      has_embedding: whether a float embedding is stored beside the code.
      code: the packed binary code, ``bits // 8`` bytes, MSB-first.
      has_thumbnail: whether a JPEG thumbnail is stored with the item (see :meth:`Gallery.thumbnail`).
    """

    id: int
    label: str
    source: Optional[str]
    added_at: Optional[float]
    has_embedding: bool
    code: bytes
    has_thumbnail: bool = False


@dataclass(frozen=True)
class GalleryInfo:
    """A summary of a gallery.

    Attributes:
      path: the gallery file, or None for an in-memory gallery.
      count: number of items.
      label_count: number of distinct labels.
      bits: code length in bits.
      fingerprint: hex fingerprint of the model and code settings that made the codes.
      format_version: file format version.
      max_distance: calibrated acceptance threshold in bits, or None.
      embedding_dim: dimension of the stored float embeddings, or None when none are stored.
      embedding_fingerprint: identity of the extractor that made the stored embeddings, or None
        (no embeddings, or stored by an edge-shitu that did not record it).
      created_by: the edge-shitu version that created the file.
      file_size: size of the database (pages x page size) in bytes.
      readonly: whether the gallery was opened read-only.
      det_threshold: the stored detector threshold (minimum box score in [0, 1]), or None.
      thumbnail_count: number of items with a stored thumbnail.
      compact: the form of the compact features kept for re-ranking ("int8", "fp16"), or None.
      min_similarity: the calibrated acceptance threshold of re-ranked search, or None.
    """

    path: Optional[Path]
    count: int
    label_count: int
    bits: int
    fingerprint: str
    format_version: str
    max_distance: Optional[int]
    embedding_dim: Optional[int]
    created_by: str
    file_size: int
    readonly: bool
    embedding_fingerprint: Optional[str] = None
    det_threshold: Optional[float] = None
    thumbnail_count: int = 0
    compact: Optional[str] = None
    min_similarity: Optional[float] = None


@dataclass(frozen=True)
class ItemBatch:
    """New items for :meth:`Gallery.add_batches`.

    Attributes:
      codes: uint8 ``(n, bits // 8)`` packed codes.
      labels: ``n`` labels (same rules as :meth:`Gallery.add`).
      embeddings: optional float ``(n, d)`` features to store beside the codes.
      sources: optional ``n`` strings (e.g. image paths) or None entries.
      thumbnails: optional ``n`` JPEG thumbnails (bytes, see :func:`edge_shitu.thumbnail.make_thumbnail`)
        or None entries.
      features: float ``(n, d)`` features kept in compact form for re-ranking; required by, and only
        accepted by, a gallery created with ``compact`` (see :meth:`Gallery.add`).
    """

    codes: np.ndarray
    labels: Sequence[str]
    embeddings: Optional[np.ndarray] = None
    sources: Optional[Sequence[Optional[str]]] = None
    thumbnails: Optional[Sequence[Optional[bytes]]] = None
    features: Optional[np.ndarray] = None


@dataclass(frozen=True)
class _Prepared:
    codes: np.ndarray  # uint8 (n, nbytes), validated
    labels: List[str]
    blobs: List[Optional[bytes]]  # float32 little-endian embeddings, or None
    dim: Optional[int]
    sources: List[Optional[str]]
    thumbnails: List[Optional[bytes]]  # JPEG bytes, validated, or None
    vectors: Optional[CompactVectors] = None  # the compact features, for a compact gallery

    @property
    def n(self) -> int:
        return self.codes.shape[0]


@dataclass(frozen=True)
class _LabelNames:
    """Label id -> label for every label of a snapshot, packed: ascending int64 ids, one UTF-8 blob and
    the end offset of each name in it. A dict of a million Python strings would cost more memory than
    the codes themselves."""

    ids: np.ndarray  # int64 (L,), ascending, read-only
    ends: np.ndarray  # int64 (L,), end of each name in blob, read-only
    blob: bytes

    @classmethod
    def build(cls, names: Dict[int, str]) -> "_LabelNames":
        ids = np.fromiter(sorted(names), dtype=np.int64, count=len(names))
        encoded = [names[int(i)].encode("utf-8") for i in ids]
        ends = np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)), dtype=np.int64)
        return cls(_frozen(ids), _frozen(ends), b"".join(encoded))

    def with_names(self, names: Dict[int, str]) -> "_LabelNames":
        """This table plus ``names`` (ids not in it yet). New label ids are larger than every id in use,
        so they are appended without decoding the others; anything else rebuilds the table."""
        new = {i: lab for i, lab in names.items() if not self._holds(i)}
        if not new:
            return self
        ids = np.fromiter(sorted(new), dtype=np.int64, count=len(new))
        if self.ids.size and ids[0] <= self.ids[-1]:
            return _LabelNames.build({**self.as_dict(), **new})
        encoded = [new[int(i)].encode("utf-8") for i in ids]
        base = int(self.ends[-1]) if self.ends.size else 0
        ends = base + np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)), dtype=np.int64)
        return _LabelNames(_frozen(np.concatenate([self.ids, ids])), _frozen(np.concatenate([self.ends, ends])),
                           self.blob + b"".join(encoded))

    def _holds(self, label_id: int) -> bool:
        pos = int(np.searchsorted(self.ids, label_id))
        return pos < self.ids.size and int(self.ids[pos]) == label_id

    def get(self, label_id: int) -> str:
        pos = int(np.searchsorted(self.ids, label_id))
        start = int(self.ends[pos - 1]) if pos else 0
        return self.blob[start:int(self.ends[pos])].decode("utf-8")

    def as_dict(self) -> Dict[int, str]:
        return {int(i): self.get(int(i)) for i in self.ids}


@dataclass(frozen=True)
class _Snapshot:
    """One committed state of the items, kept in memory so that readers never need the file.

    A reader keeps answering from its last snapshot while the file cannot be read (e.g. a crashed
    writer left a rollback journal that a read-only connection may not roll back).
    """

    ids: np.ndarray  # (m,) strictly ascending, uint32 while ids fit, else int64; read-only
    index: HammingIndex  # the codes, row i belonging to ids[i]; immutable
    label_ids: np.ndarray  # (m,) label id of ids[i]: uint16 while label ids fit, else int32; read-only
    labels: _LabelNames  # every label with items
    vectors: Optional[CompactVectors] = None  # compact features, row i belonging to ids[i]; None: none stored

    def label_of(self, positions: np.ndarray) -> List[str]:
        return [self.labels.get(int(i)) for i in self.label_ids[positions]]

    def without(self, keep: np.ndarray) -> "_Snapshot":
        """The snapshot restricted to the rows where ``keep`` (bool (m,)) is true."""
        kept = self.label_ids[keep]
        present = np.unique(kept)
        labels = self.labels
        if present.size != labels.ids.size:
            labels = _LabelNames.build({int(i): labels.get(int(i)) for i in present})
        vectors = None if self.vectors is None else self.vectors.take(np.flatnonzero(keep))
        return _Snapshot(_frozen(_id_array(self.ids[keep])), self.index.without(keep), _frozen(kept), labels,
                         vectors)


def _label_array(values: Sequence[int]) -> np.ndarray:
    # Two bytes per item while label ids allow it: the in-memory cost per item stays near 80 bytes.
    arr = np.asarray(values, dtype=np.int64)
    dtype = np.uint16 if arr.size == 0 or int(arr.max()) <= np.iinfo(np.uint16).max else np.int32
    return _frozen(arr.astype(dtype))


def _id_array(values: np.ndarray) -> np.ndarray:
    # Four bytes per item while ids allow it, as for the label numbers.
    arr = np.asarray(values)
    small = arr.size == 0 or (int(arr.min()) >= 0 and int(arr.max()) <= np.iinfo(np.uint32).max)
    return _frozen(arr.astype(np.uint32 if small else np.int64, copy=False))


def _empty_snapshot(bits: int, backend: str) -> _Snapshot:
    return _Snapshot(_id_array(np.empty(0, np.int64)),
                     HammingIndex.build(np.empty((0, bits // 8), np.uint8), bits=bits, backend=backend),
                     _label_array([]), _LabelNames.build({}))


def _optional_number(value: object, name: str, low: float, high: float) -> Optional[float]:
    """A setting's value: None, or a number in [low, high] as a float."""
    if value is None:
        return None
    if (isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating))
            or not low <= value <= high):
        raise InvalidInputError(f"{name} must be a number in [{low:g}, {high:g}] or None, got {value!r}")
    return float(value)


def _frozen(arr: np.ndarray) -> np.ndarray:
    arr.flags.writeable = False
    return arr


def _check_embedding_fingerprint(fingerprint: object, with_embeddings: bool) -> Optional[str]:
    if not with_embeddings:
        return None
    if fingerprint is None:
        raise InvalidInputError("embeddings need embedding_fingerprint (Bundle.embedding_fingerprint of the extractor "
                                "that made them), so that they are never re-hashed with another model")
    return _check_fingerprint(fingerprint)


def _check_count(values: object, n: int, name: str) -> list:
    if isinstance(values, np.ndarray) and values.ndim == 1:
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, abc.Sequence):
        raise InvalidInputError(f"{name} must be a sequence with one entry per code, got {type(values).__name__}")
    if len(values) != n:
        raise InvalidInputError(f"{name} must have one entry per code ({n}), got {len(values)}")
    return list(values)


def _check_ids(ids: object, name: str = "ids") -> np.ndarray:
    if isinstance(ids, (str, bytes)):
        raise InvalidInputError(f"{name} must be a sequence of integers, got a string")
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise InvalidInputError(f"{name} must be a 1-D sequence of integers, got shape {arr.shape}")
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise InvalidDtypeError(f"{name} must be integers, got dtype {arr.dtype}")
    if arr.min() < 0 or arr.max() > _MAX_ID:
        raise InvalidInputError(f"{name} must be in [0, {_MAX_ID}], got values in [{arr.min()}, {arr.max()}]")
    return arr.astype(np.int64)


def _read_snapshot(conn: sqlite3.Connection, meta: _Meta, backend: str, name: str) -> _Snapshot:
    bits = meta.bits
    count = conn.execute("SELECT count(*) FROM items").fetchone()[0]
    ids, label_ids = np.empty(count, dtype=np.int64), np.empty(count, dtype=np.int64)
    # Chunk by chunk, so opening never holds a second full copy of the codes.
    index = HammingIndex.from_chunks(_code_chunks(conn, bits // 8, name, ids, label_ids), size=count, bits=bits,
                                     backend=backend)
    used = set(np.unique(label_ids).tolist())
    labels = {int(i): str(lab) for i, lab in conn.execute("SELECT id, label FROM labels") if int(i) in used}
    unknown = np.setdiff1d(label_ids, np.fromiter(labels, dtype=np.int64, count=len(labels)))
    if unknown.size:
        raise GalleryCorruptError(f"{name}: items refer to labels that do not exist (label ids {_short_list(unknown)}); "
                                  "run `edge-shitu gallery check` for details")
    return _Snapshot(ids=_id_array(ids), index=index, label_ids=_label_array(label_ids),
                     labels=_LabelNames.build(labels), vectors=_read_vectors(conn, meta, ids, name))


def _read_vectors(conn: sqlite3.Connection, meta: _Meta, ids: np.ndarray, name: str) -> Optional[CompactVectors]:
    """The compact features of the items ``ids`` (ascending), in that order; None for a gallery without them.

    Read in chunks into arrays of the final size, so a million-item gallery never holds its rows as
    Python objects nor a second full copy of the features.
    """
    if meta.compact is None or ids.size == 0:
        return None
    m, dim = ids.shape[0], meta.compact_dim
    count = conn.execute("SELECT count(*) FROM compact").fetchone()[0]
    if count != m or dim is None:
        raise GalleryCorruptError(f"{name}: the compact features do not match the items ({count} rows for "
                                  f"{m} items); run `edge-shitu gallery check` for details")
    values = np.empty((m, dim), dtype=np.int8 if meta.compact == "int8" else np.dtype("<f2"))
    scales = np.empty(m, dtype=np.float32)
    cursor = conn.execute("SELECT item_id, vec FROM compact ORDER BY item_id")
    done = 0
    while True:
        rows = cursor.fetchmany(_VECTOR_CHUNK)
        if not rows:
            break
        stored = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        expected = ids[done:done + len(rows)]
        if stored.shape != expected.shape or not np.array_equal(stored, expected):
            at = int(np.flatnonzero(stored[:expected.size] != expected)[0]) if expected.size else 0
            raise GalleryCorruptError(
                f"{name}: the compact features do not match the items (a row for item {int(stored[at])} where "
                f"item {int(expected[at]) if at < expected.size else 'none'} was expected); run "
                "`edge-shitu gallery check` for details")
        part = from_blobs([r[1] for r in rows], fmt=meta.compact, dim=dim, where=f"{name}: compact")
        values[done:done + len(rows)] = part.values
        scales[done:done + len(rows)] = part.scales
        done += len(rows)
    if done != m:
        raise GalleryCorruptError(f"{name}: the compact features changed while they were read")
    # Read-only arrays are taken as they are (no copy): see CompactVectors.
    return CompactVectors(meta.compact, _frozen(values), _frozen(scales))


def _embedding_chunks(conn: sqlite3.Connection, dim: int, rows: int, name: str) -> Iterator[Tuple[List[int], np.ndarray]]:
    """The stored float embeddings in id order, ``rows`` items at a time: ``(ids, float32 (n, dim))`` (read-only).

    Raises:
      GalleryCorruptError: an embedding is missing or is not ``dim`` float32 values.
    """
    cursor = conn.execute("SELECT id, embedding FROM items ORDER BY id")
    while True:
        chunk = cursor.fetchmany(rows)
        if not chunk:
            return
        if any(r[1] is None or len(r[1]) != 4 * dim for r in chunk):
            raise GalleryCorruptError(f"{name}: stored embeddings are not {dim} float32 values")
        yield [int(r[0]) for r in chunk], np.frombuffer(b"".join(r[1] for r in chunk), dtype="<f4").reshape(len(chunk), dim)


class Gallery:
    """Labelled binary codes stored in one SQLite file and searched by exhaustive Hamming distance.

    Create one with :meth:`create` or :meth:`open`; close it with :meth:`close` or a ``with``
    block. A gallery may be shared between threads (calls are serialised) and between processes
    (changes committed by another process are picked up before the next search).

    Example::

        with Gallery.create("drinks.gallery", fingerprint=bundle_fingerprint) as g:
            ids = g.add(codes, labels)
            result = g.search(query_codes, k=5)
    """

    def __init__(
        self,
        key: object,
        conn: sqlite3.Connection,
        path: Optional[Path],
        meta: _Meta,
        snapshot: _Snapshot,
        version: int,
        readonly: bool,
        backend: str = "numpy",
    ) -> None:
        """Internal: use :meth:`create` or :meth:`open`.

        Raises:
          TypeError: when called directly.
        """
        if key is not _CONSTRUCT_KEY:
            raise TypeError("use Gallery.create(...) or Gallery.open(...) to get a Gallery")
        self._conn: Optional[sqlite3.Connection] = conn
        self._path = path
        self._name = str(path) if path is not None else _MEMORY
        self._meta = meta
        self._snapshot = snapshot
        self._version: Optional[int] = version
        self._readonly = readonly
        self._backend = backend
        self._lock = threading.RLock()
        self._stale: Optional[str] = None

    @classmethod
    def create(
        cls,
        path: PathLike,
        *,
        fingerprint: str,
        bits: int = 512,
        overwrite: bool = False,
        backend: str = "auto",
        compact: Optional[str] = None,
    ) -> "Gallery":
        """Creates an empty gallery file (or an in-memory gallery) and opens it for writing.

        The file is built under a temporary name and renamed into place, so ``path`` never holds
        a half-made gallery.

        Args:
          path: the gallery file to create, or ``":memory:"`` for a gallery that lives only in
            this process.
          fingerprint: hex fingerprint of the model and code settings that make the codes; every
            later :meth:`open` can check it.
          bits: code length in bits, a positive multiple of 8.
          overwrite: replace an existing file at ``path``.
          backend: Hamming search backend: ``"auto"`` (faiss when installed, else numpy),
            ``"numpy"`` or ``"faiss"``; see :mod:`edge_shitu.search`.
          compact: ``"int8"`` or ``"fp16"``: keep every item's float feature in that compact form
            (about 0.5 or 1 KB per 512-d item), so that :meth:`search` can re-rank its Hamming
            shortlist by inner product (:mod:`edge_shitu.compact`); None keeps codes only.

        Returns:
          The new, empty, writable gallery.

        Raises:
          InvalidInputError: bad ``fingerprint``, ``bits`` or ``backend`` name.
          BackendUnavailableError: ``backend`` names a library that is not installed.
          MissingFileError: the folder of ``path`` does not exist.
          GalleryError: ``path`` exists and ``overwrite`` is False, or is a directory, or the file
            cannot be written.
        """
        fingerprint = _check_fingerprint(fingerprint)
        bits = _check_bits(bits)
        backend = resolve_hamming_backend(backend)
        if compact is not None and compact not in COMPACT_FORMATS:
            raise InvalidInputError(f"compact must be one of {', '.join(COMPACT_FORMATS)} or None, got {compact!r}")
        if str(path) == _MEMORY:
            conn = sqlite3.connect(_MEMORY, isolation_level=None, check_same_thread=False)
            try:
                _init_schema(conn, fingerprint=fingerprint, bits=bits, compact=compact)
                meta = _parse_meta(_read_meta_rows(conn), _MEMORY)
            except BaseException:
                conn.close()
                raise
            empty = _empty_snapshot(bits, backend)
            version = conn.execute("PRAGMA data_version").fetchone()[0]
            return cls(_CONSTRUCT_KEY, conn, None, meta, empty, version, False, backend)

        target = Path(path)
        if target.is_dir():
            raise GalleryError(f"{target} is a directory; give the path of a gallery file")
        if target.exists() and not overwrite:
            raise GalleryError(f"{target} already exists; pass overwrite=True to replace it")
        if not target.parent.is_dir():
            raise MissingFileError(f"cannot create {target}: folder {target.parent} does not exist")
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        try:
            conn = sqlite3.connect(str(tmp), isolation_level=None)
            try:
                _init_schema(conn, fingerprint=fingerprint, bits=bits, compact=compact)
            finally:
                conn.close()
            # A stale journal of the old file would be replayed onto the new one.
            for suffix in _SIDE_FILES:
                Path(str(target) + suffix).unlink(missing_ok=True)
            os.replace(tmp, target)
        except (OSError, sqlite3.Error) as exc:
            raise GalleryError(f"cannot create gallery {target}: {exc}") from exc
        finally:
            for suffix in ("", *_SIDE_FILES):
                Path(str(tmp) + suffix).unlink(missing_ok=True)
        fsync_dir(target.parent)
        return cls.open(target, fingerprint=fingerprint, backend=backend)

    @classmethod
    def open(
        cls,
        path: PathLike,
        *,
        fingerprint: Optional[str] = None,
        readonly: bool = False,
        backend: str = "auto",
    ) -> "Gallery":
        """Opens an existing gallery file and loads its codes into memory.

        Args:
          path: the gallery file.
          fingerprint: when given, the fingerprint of the model that will query the gallery; it
            must equal the one stored in the file.
          readonly: open without write access (SQLite ``mode=ro``); every change then raises.
          backend: Hamming search backend: ``"auto"`` (faiss when installed, else numpy),
            ``"numpy"`` or ``"faiss"``.

        Returns:
          The opened gallery.

        Raises:
          InvalidInputError: ``path`` is ``":memory:"``, ``fingerprint`` is not a hex string or
            ``backend`` is not a backend name.
          BackendUnavailableError: ``backend`` names a library that is not installed.
          MissingFileError: ``path`` does not exist.
          GalleryCorruptError: ``path`` is not a SQLite database, lacks the gallery tables, has
            an unsupported format version, bad meta values or codes of the wrong length.
          FingerprintMismatchError: ``fingerprint`` differs from the gallery's.
          GalleryError: the file cannot be opened (locked, unreadable, unfinished transaction on
            a read-only opening), or is of the older format 1 (the message says how to upgrade it).
        """
        backend = resolve_hamming_backend(backend)
        if str(path) == _MEMORY:
            raise InvalidInputError("an in-memory gallery cannot be reopened; use Gallery.create(':memory:', ...)")
        expected = None if fingerprint is None else _check_fingerprint(fingerprint)
        target = Path(path)
        if not target.exists():
            raise MissingFileError(f"gallery file not found: {target}")
        if target.is_dir():
            raise GalleryCorruptError(f"{target} is a directory, not a gallery file")
        name = str(target)
        uri = f"{target.resolve().as_uri()}?mode={'ro' if readonly else 'rw'}"
        try:
            conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=10.0)
        except sqlite3.Error as exc:
            raise GalleryError(f"cannot open gallery {name}: {exc}") from exc
        try:
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("BEGIN")
            meta, snapshot, version = _load(conn, name, backend)
            conn.execute("COMMIT")
        except GalleryError:
            conn.close()
            raise
        except sqlite3.Error as exc:
            conn.close()
            if _is_corruption(exc):
                raise GalleryCorruptError(f"{name} is not a readable edge-shitu gallery: {exc}") from exc
            hint = (" (a crash left an unfinished transaction: open it once writable to roll it back)"
                    if readonly and "readonly" in str(exc).lower() else "")
            raise GalleryError(f"cannot read gallery {name}: {exc}{hint}") from exc
        if expected is not None and expected != meta.fingerprint:
            conn.close()
            raise FingerprintMismatchError(
                f"{name} was built with fingerprint {meta.fingerprint} but is being opened for "
                f"fingerprint {expected}: its codes come from another model or code settings. Rebuild "
                "the gallery (or re-hash its stored embeddings) with the bundle that queries it."
            )
        return cls(_CONSTRUCT_KEY, conn, target, meta, snapshot, version, readonly, backend)

    @property
    def path(self) -> Optional[Path]:
        """The gallery file, or None for an in-memory gallery."""
        return self._path

    @property
    def bits(self) -> int:
        """Code length in bits."""
        return self._meta.bits

    @property
    def nbytes(self) -> int:
        """Code length in bytes (``bits // 8``)."""
        return self._meta.bits // 8

    @property
    def fingerprint(self) -> str:
        """Lowercase hex fingerprint of the model and code settings that made the codes."""
        return self._meta.fingerprint

    @property
    def max_distance(self) -> Optional[int]:
        """The calibrated acceptance threshold in bits, or None when none was set.

        Raises:
          GalleryError: the gallery is closed.
        """
        with self._lock:
            self._sync()
            return self._meta.max_distance

    @property
    def compact(self) -> Optional[str]:
        """The form of the stored compact features (``"int8"``, ``"fp16"``), or None: codes only."""
        return self._meta.compact

    @property
    def min_similarity(self) -> Optional[float]:
        """The calibrated acceptance threshold of re-ranked search (inner product), or None.

        Raises:
          GalleryError: the gallery is closed.
        """
        with self._lock:
            self._sync()
            return self._meta.min_similarity

    def set_min_similarity(self, value: Optional[float]) -> None:
        """Stores (or clears, with None) the acceptance threshold of re-ranked search.

        Raises:
          InvalidInputError: ``value`` is not a number in ``[-1, 1]``.
          GalleryError: the gallery is read-only or closed, or the write failed.
        """
        self._require_writable()
        self._set_setting("min_similarity", _optional_number(value, "min_similarity", -1.0, 1.0))

    @property
    def generation(self) -> int:
        """A counter of committed changes to the items (adds, removals, relabels, re-hashes; not settings),
        as stored in the file: files derived from the items (a float index) record it and are rebuilt when
        it differs.

        Raises:
          GalleryError: the gallery is closed.
        """
        with self._lock:
            self._sync()
            return self._meta.generation

    @property
    def det_threshold(self) -> Optional[float]:
        """The stored detector threshold (minimum box score, in ``[0, 1]``), or None when none was set.

        Raises:
          GalleryError: the gallery is closed.
        """
        with self._lock:
            self._sync()
            return self._meta.det_threshold

    @property
    def backend(self) -> str:
        """The Hamming search backend in use (``"numpy"`` or ``"faiss"``)."""
        return self._backend

    @property
    def stale(self) -> Optional[str]:
        """Why the file could not be re-read at the last call, or None when the view is current.

        While it is set, searches answer from the last state read (never a half-written one).
        """
        return self._stale

    @property
    def readonly(self) -> bool:
        """Whether the gallery was opened read-only."""
        return self._readonly

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._conn is None

    def close(self) -> None:
        """Closes the database; later calls on this gallery raise. Calling it twice is harmless."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> "Gallery":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._conn is None:
            return f"Gallery({self._name!r}, closed)"
        return (f"Gallery({self._name!r}, items={len(self._snapshot.ids)}, bits={self.bits}, "
                f"backend={self._backend!r}, readonly={self._readonly})")

    def __len__(self) -> int:
        with self._lock:
            self._sync()
            return int(self._snapshot.ids.shape[0])

    def __contains__(self, item_id: object) -> bool:
        if isinstance(item_id, bool) or not isinstance(item_id, (int, np.integer)):
            return False
        with self._lock:
            self._sync()
            ids = self._snapshot.ids
        pos = int(np.searchsorted(ids, item_id))
        return pos < ids.shape[0] and int(ids[pos]) == int(item_id)

    def ids(self) -> np.ndarray:
        """All item ids.

        Returns:
          int64 ``(m,)``, ascending (a copy).

        Raises:
          GalleryError: the gallery is closed.
        """
        with self._lock:
            self._sync()
            return self._snapshot.ids.astype(np.int64)

    def codes(self) -> Tuple[np.ndarray, np.ndarray]:
        """All ids and codes, as held in memory.

        Returns:
          ``(ids, codes)``: int64 ``(m,)`` ascending and uint8 ``(m, bits // 8)``, row i the code
          of ``ids[i]`` (copies).

        Raises:
          GalleryError: the gallery is closed.
        """
        with self._lock:
            self._sync()
            snapshot = self._snapshot
        return snapshot.ids.astype(np.int64), snapshot.index.codes()

    def compact_features(self) -> Tuple[np.ndarray, np.ndarray, Optional[CompactVectors]]:
        """All ids, codes and compact features of one state of the gallery, as held in memory.

        Returns:
          ``(ids, codes, vectors)``: int64 ``(m,)`` ascending, uint8 ``(m, bits // 8)`` (copies) and the
          compact features, row i belonging to ``ids[i]`` (read-only), or None for a gallery without
          them (or an empty one).

        Raises:
          GalleryError: the gallery is closed.
        """
        with self._lock:
            self._sync()
            snapshot = self._snapshot
        return snapshot.ids.astype(np.int64), snapshot.index.codes(), snapshot.vectors

    def search(self, codes: np.ndarray, k: int = 5, *, max_distance: Optional[int] = None,
               features: Optional[np.ndarray] = None, shortlist: int = DEFAULT_SHORTLIST) -> SearchResult:
        """Finds the k nearest items of each query code by exhaustive Hamming distance.

        Ties are broken by ascending id, so results are deterministic. With ``features`` (a gallery
        created with ``compact`` only), the Hamming top-``max(shortlist, k)`` is re-ranked by the inner
        product of each query's L2-normalised feature with the items' stored compact features; equal
        similarities keep the Hamming order.

        Args:
          codes: uint8 ``(n, bits // 8)`` query codes (or one code ``(bits // 8,)``).
          k: matches per query, >= 1; capped at the gallery's size, so the result has
            ``c = min(k, len(self))`` columns (any k is safe to ask for); rows with fewer matches
            within ``max_distance`` are padded with -1.
          max_distance: drop matches farther than this many bits. None means no limit; the
            gallery's calibrated :attr:`max_distance` is *not* applied here, so callers can see
            rejected candidates too.
          features: float ``(n, d)`` features of the queries (the codes' own), for re-ranking.
          shortlist: Hamming candidates re-ranked per query (with ``features``), >= 1.

        Returns:
          SearchResult with ids int64 ``(n, c)``, distances int32 ``(n, c)``, counts int64 ``(n,)``, and
          with ``features`` similarities float32 ``(n, c)`` (NaN where ids are -1), best first.

        Raises:
          InvalidDtypeError: ``codes`` is not a uint8 ndarray, ``features`` not float.
          InvalidInputError: ``codes`` has the wrong width, ``k < 1``, ``max_distance < 0``, ``shortlist < 1``,
            ``features`` of the wrong shape, or ``features`` for a gallery without compact features.
          GalleryError: the gallery is closed.
        """
        with self._lock:
            self._sync()
            snapshot = self._snapshot
        queries = check_codes(codes, self.nbytes)
        if features is None:
            positions, distances, counts = snapshot.index.search(queries, k, max_distance)
            return SearchResult(ids=self._ids_at(snapshot, positions), distances=distances, counts=counts)
        if self._meta.compact is None:
            raise InvalidInputError(f"{self._name} keeps no compact features: re-ranking needs a gallery created "
                                    "with compact='int8' or 'fp16'")
        if isinstance(shortlist, bool) or not isinstance(shortlist, (int, np.integer)) or shortlist < 1:
            raise InvalidInputError(f"shortlist must be an integer >= 1, got {shortlist!r}")
        feats = np.asarray(features)
        if not np.issubdtype(feats.dtype, np.floating):
            raise InvalidDtypeError(f"features must be a float array, got dtype {feats.dtype}")
        if feats.ndim == 1:
            feats = feats[None, :]
        if feats.ndim != 2 or feats.shape[0] != queries.shape[0]:
            raise InvalidInputError(f"features must have one row per query code ({queries.shape[0]}), "
                                    f"got shape {feats.shape}")
        if snapshot.vectors is not None and feats.shape[1] != snapshot.vectors.dim:
            raise InvalidInputError(f"features must have {snapshot.vectors.dim} columns, got {feats.shape[1]}")
        if not np.isfinite(feats).all():
            raise InvalidInputError("features contain NaN or infinite values")
        short, short_dist, _ = snapshot.index.search(queries, max(int(shortlist), int(k)), max_distance)
        if snapshot.vectors is None:  # an empty gallery
            empty = np.empty((queries.shape[0], 0))
            return SearchResult(ids=empty.astype(np.int64), distances=empty.astype(np.int32),
                                counts=np.zeros(queries.shape[0], np.int64), similarities=empty.astype(np.float32))
        cols = min(int(k), short.shape[1])
        positions, similarities = rerank_shortlist(short.astype(np.int64), unit_queries(feats), snapshot.vectors,
                                                   cols)
        # The Hamming distance of each re-ranked candidate, from its place in the shortlist.
        rows = np.arange(queries.shape[0])[:, None]
        where = np.argmax(short[:, None, :] == positions[:, :, None], axis=2)
        distances = np.where(positions >= 0, short_dist[rows, where], -1).astype(np.int32)
        counts = (positions >= 0).sum(axis=1).astype(np.int64)
        return SearchResult(ids=self._ids_at(snapshot, positions), distances=distances, counts=counts,
                            similarities=similarities)

    @staticmethod
    def _ids_at(snapshot: _Snapshot, positions: np.ndarray) -> np.ndarray:
        # Positions follow ascending ids, so the index's ties-by-position are ties-by-id.
        found = snapshot.ids[np.maximum(positions, 0)].astype(np.int64) if snapshot.ids.size else -1
        return np.where(positions >= 0, found, -1).astype(np.int64, copy=False)

    def add(
        self,
        codes: np.ndarray,
        labels: Sequence[str],
        *,
        ids: Optional[Sequence[int]] = None,
        embeddings: Optional[np.ndarray] = None,
        embedding_fingerprint: Optional[str] = None,
        sources: Optional[Sequence[Optional[str]]] = None,
        thumbnails: Optional[Sequence[Optional[bytes]]] = None,
        features: Optional[np.ndarray] = None,
    ) -> np.ndarray:
        """Adds a batch of items in one transaction: all of them or none.

        Args:
          codes: uint8 ``(n, bits // 8)`` codes (or one code ``(bits // 8,)``).
          labels: ``n`` labels: non-empty strings without leading/trailing spaces, tabs,
            newlines or other control characters.
          ids: ``n`` distinct ids >= 0 not in the gallery; by default new ids are given from
            ``max(every id ever used) + 1`` upwards (ids of removed items are never reused).
          embeddings: optional float ``(n, d)`` finite features stored beside the codes as
            float32 (e.g. to re-hash the gallery later); ``d`` must match earlier embeddings.
          embedding_fingerprint: hex identity of the extractor that made ``embeddings``
            (``Bundle.embedding_fingerprint``); required with ``embeddings`` and equal to the one
            of embeddings already stored, so a gallery never mixes two models' features.
          sources: optional ``n`` strings (e.g. image paths) or None entries.
          thumbnails: optional ``n`` JPEG thumbnails or None entries: ``bytes`` starting with
            ``FF D8 FF``, at most :data:`~edge_shitu.thumbnail.MAX_THUMBNAIL_BYTES` each (see
            :func:`~edge_shitu.thumbnail.make_thumbnail`); stored in the same transaction.
          features: float ``(n, d)`` finite features of the items (the extractor's, before binarisation),
            stored in the gallery's compact form: required by a gallery created with ``compact``,
            refused by any other.

        Returns:
          int64 ``(n,)``: the ids of the added items, in input order.

        Raises:
          InvalidDtypeError: ``codes`` is not uint8, ``ids`` not integers or ``embeddings`` not float.
          InvalidInputError: wrong shapes or lengths, bad labels, sources, embeddings or thumbnails,
            or ``embeddings`` without ``embedding_fingerprint`` (nothing is written then).
          FingerprintMismatchError: the gallery stores embeddings of another extractor.
          GalleryError: ``ids`` repeat or already exist, the gallery is read-only or closed, or
            the write failed (nothing is written then).
        """
        self._require_writable()
        batch = self._prepare(ItemBatch(codes, labels, embeddings=embeddings, sources=sources,
                                        thumbnails=thumbnails, features=features), 0)
        emb_fp = _check_embedding_fingerprint(embedding_fingerprint, batch.dim is not None)
        id_arr = None
        if ids is not None:
            id_arr = _check_ids(ids)
            if id_arr.shape[0] != batch.n:
                raise InvalidInputError(f"ids must have one entry per code ({batch.n}), got {id_arr.shape[0]}")
            uniq, counts = np.unique(id_arr, return_counts=True)
            if (counts > 1).any():
                raise GalleryError(f"{self._name}: ids repeat within the batch: {_short_list(uniq[counts > 1])}")
        if batch.n == 0:
            return np.empty(0, dtype=np.int64)

        def insert(conn: sqlite3.Connection, new_ids: np.ndarray, label_ids: Dict[str, int], now: int) -> None:
            conn.executemany(
                "INSERT INTO items(id, label_id, code, embedding, source, added_at) VALUES (?, ?, ?, ?, ?, ?)",
                ((int(i), label_ids[lab], batch.codes[j].tobytes(), batch.blobs[j], batch.sources[j], now)
                 for j, (i, lab) in enumerate(zip(new_ids, batch.labels))),
            )
            thumbs = [(int(i), jpeg) for i, jpeg in zip(new_ids, batch.thumbnails) if jpeg is not None]
            if thumbs:
                conn.execute(_THUMBNAIL_TABLE)
                conn.executemany("INSERT INTO thumbnails(item_id, jpeg) VALUES (?, ?)", thumbs)
            if batch.vectors is not None:
                conn.executemany("INSERT INTO compact(item_id, vec) VALUES (?, ?)",
                                 ((int(i), to_blob(batch.vectors, j)) for j, i in enumerate(new_ids)))

        return self._insert("add", batch.codes, batch.labels, batch.dim, emb_fp, id_arr, insert,
                            vectors=batch.vectors)

    def add_batches(self, batches: Iterable["ItemBatch"], *,
                    embedding_fingerprint: Optional[str] = None) -> np.ndarray:
        """Adds many batches of items as one transaction: all of them or none.

        The batches are consumed one at a time and staged in a temporary table of this connection
        (in SQLite's temporary storage, not in the gallery file), so memory stays bounded by one
        batch plus the codes; the gallery is locked only for the final copy. If the iterable raises,
        a batch is invalid, the disk fills up or the process dies, the gallery is left as it was.

        Args:
          batches: :class:`ItemBatch` objects (codes, labels, optional embeddings, sources and
            thumbnails).
          embedding_fingerprint: identity of the extractor that made the embeddings; required
            when any batch carries embeddings (see :meth:`add`).

        Returns:
          int64 ``(n,)``: ids of all added items, in input order (new ids, as in :meth:`add`).

        Raises:
          InvalidDtypeError, InvalidInputError: a batch is malformed (its index is named), or
            embeddings of different widths or without ``embedding_fingerprint``.
          FingerprintMismatchError: the gallery stores embeddings of another extractor.
          GalleryError: the gallery is read-only or closed, or the write failed.
          Whatever ``batches`` raises, after discarding what was staged.
        """
        self._require_writable()
        table = f"staged_{uuid.uuid4().hex}"
        codes: List[np.ndarray] = []
        labels: List[str] = []
        vectors: List[CompactVectors] = []
        dim: Optional[int] = None
        with_embeddings = with_thumbnails = False
        conn = self._require_open()
        with self._lock:
            conn.execute(f"CREATE TEMP TABLE {table}(seq INTEGER PRIMARY KEY, label TEXT NOT NULL, "
                         "code BLOB NOT NULL, embedding BLOB NULL, source TEXT NULL, thumbnail BLOB NULL, vec BLOB NULL)")
        try:
            for number, raw in enumerate(batches):
                if not isinstance(raw, ItemBatch):
                    raise InvalidInputError(f"batch {number}: expected an ItemBatch, got {type(raw).__name__}")
                batch = self._prepare(raw, number)
                if batch.dim is not None:
                    with_embeddings = True
                    if dim is not None and batch.dim != dim:
                        raise InvalidInputError(f"batch {number}: embeddings have {batch.dim} columns, "
                                                f"earlier batches {dim}")
                    dim = batch.dim
                with_thumbnails = with_thumbnails or any(t is not None for t in batch.thumbnails)
                start = len(labels)
                with self._lock:
                    self._require_open()
                    conn.execute("BEGIN")
                    try:
                        conn.executemany(
                            f"INSERT INTO temp.{table}(seq, label, code, embedding, source, thumbnail, vec) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?)",
                            ((start + j, batch.labels[j], batch.codes[j].tobytes(), batch.blobs[j], batch.sources[j],
                              batch.thumbnails[j], None if batch.vectors is None else to_blob(batch.vectors, j))
                             for j in range(batch.n)))
                        conn.execute("COMMIT")
                    except BaseException:
                        conn.execute("ROLLBACK")
                        raise
                codes.append(batch.codes)
                labels.extend(batch.labels)
                if batch.vectors is not None:
                    vectors.append(batch.vectors)
            emb_fp = _check_embedding_fingerprint(embedding_fingerprint, with_embeddings)
            if not labels:
                return np.empty(0, dtype=np.int64)
            all_codes = np.concatenate(codes)
            del codes
            all_vectors = None
            if vectors:
                all_vectors = CompactVectors(vectors[0].fmt, np.concatenate([v.values for v in vectors]),
                                             np.concatenate([v.scales for v in vectors]))
                del vectors

            def insert(conn: sqlite3.Connection, new_ids: np.ndarray, label_ids: Dict[str, int], now: int) -> None:
                conn.execute(f"CREATE TEMP TABLE {table}_labels(label TEXT PRIMARY KEY, id INTEGER NOT NULL)")
                conn.executemany(f"INSERT INTO temp.{table}_labels(label, id) VALUES (?, ?)", label_ids.items())
                conn.execute(
                    "INSERT INTO items(id, label_id, code, embedding, source, added_at) "
                    f"SELECT ? + s.seq, m.id, s.code, s.embedding, s.source, ? FROM temp.{table} AS s "
                    f"JOIN temp.{table}_labels AS m ON m.label = s.label ORDER BY s.seq",
                    (int(new_ids[0]), now))
                if with_thumbnails:
                    conn.execute(_THUMBNAIL_TABLE)
                    conn.execute(f"INSERT INTO thumbnails(item_id, jpeg) SELECT ? + seq, thumbnail "
                                 f"FROM temp.{table} WHERE thumbnail IS NOT NULL ORDER BY seq", (int(new_ids[0]),))
                if all_vectors is not None:
                    conn.execute(f"INSERT INTO compact(item_id, vec) SELECT ? + seq, vec FROM temp.{table} "
                                 "ORDER BY seq", (int(new_ids[0]),))

            return self._insert("add", all_codes, labels, dim, emb_fp, None, insert, vectors=all_vectors)
        except sqlite3.Error as exc:
            raise self._wrap(exc, "add") from exc
        finally:
            with self._lock:
                if self._conn is not None:
                    for name in (table, f"{table}_labels"):
                        try:
                            self._conn.execute(f"DROP TABLE IF EXISTS temp.{name}")
                        except sqlite3.Error:
                            pass  # the connection is gone or busy: the temporary table dies with it

    def _prepare(self, batch: "ItemBatch", number: int) -> "_Prepared":
        """Validates one batch of new items; ``number`` names it in messages."""
        where = f"batch {number}: " if number else ""
        arr = check_codes(batch.codes, self.nbytes)
        n = arr.shape[0]
        labels = list(_check_count(batch.labels, n, f"{where}labels"))
        checked = set()
        for i, label in enumerate(labels):
            if label not in checked:
                checked.add(check_label(label, f"{where}labels[{i}]"))
        blobs: List[Optional[bytes]] = [None] * n
        dim = None
        if batch.embeddings is not None:
            emb = np.asarray(batch.embeddings)
            if not np.issubdtype(emb.dtype, np.floating):
                raise InvalidDtypeError(f"{where}embeddings must be a float array, got dtype {emb.dtype}")
            if emb.ndim != 2 or emb.shape[0] != n or emb.shape[1] == 0:
                raise InvalidInputError(f"{where}embeddings must have shape ({n}, d), got {emb.shape}")
            if not np.isfinite(emb).all():
                raise InvalidInputError(f"{where}embeddings contain NaN or infinite values")
            with np.errstate(over="ignore"):
                emb = emb.astype("<f4")
            if not np.isfinite(emb).all():
                raise InvalidInputError(f"{where}embeddings contain values outside the float32 range")
            dim = emb.shape[1]
            blobs = [row.tobytes() for row in emb]
        sources: List[Optional[str]] = [None] * n
        if batch.sources is not None:
            sources = list(_check_count(batch.sources, n, f"{where}sources"))
            for i, src in enumerate(sources):
                if src is not None and (not isinstance(src, str) or has_breaking_characters(src)):
                    raise InvalidInputError(f"{where}sources[{i}] must be None or a str without tabs, newlines "
                                            f"or control characters, got {src!r}")
        thumbnails: List[Optional[bytes]] = [None] * n
        if batch.thumbnails is not None:
            if isinstance(batch.thumbnails, (bytes, bytearray, memoryview)):
                raise InvalidInputError(f"{where}thumbnails must be a sequence with one entry per code, got "
                                        f"{type(batch.thumbnails).__name__}")
            thumbnails = list(_check_count(batch.thumbnails, n, f"{where}thumbnails"))
            for i, jpeg in enumerate(thumbnails):
                if jpeg is not None:
                    check_thumbnail(jpeg, f"{where}thumbnails[{i}]")
        vectors = None
        if self._meta.compact is None:
            if batch.features is not None:
                raise InvalidInputError(f"{where}features are kept only by a gallery created with compact='int8' or "
                                        f"'fp16'; {self._name} keeps codes only")
        else:
            if batch.features is None:
                raise InvalidInputError(f"{where}{self._name} keeps every item's features for re-ranking "
                                        f"({self._meta.compact}): pass features with the codes")
            feats = np.asarray(batch.features)
            if not np.issubdtype(feats.dtype, np.floating):
                raise InvalidDtypeError(f"{where}features must be a float array, got dtype {feats.dtype}")
            if feats.ndim != 2 or feats.shape[0] != n or feats.shape[1] == 0:
                raise InvalidInputError(f"{where}features must have shape ({n}, d), got {feats.shape}")
            if not np.isfinite(feats).all():
                raise InvalidInputError(f"{where}features contain NaN or infinite values")
            vectors = compress(feats, self._meta.compact)
        return _Prepared(arr, labels, blobs, dim, sources, thumbnails, vectors)

    def _insert(self, what: str, codes: np.ndarray, labels: List[str], dim: Optional[int],
                embedding_fingerprint: Optional[str], explicit_ids: Optional[np.ndarray],
                insert: Callable[[sqlite3.Connection, np.ndarray, Dict[str, int], int], None], *,
                vectors: Optional[CompactVectors] = None) -> np.ndarray:
        """The transaction shared by :meth:`add` and :meth:`add_batches`: ids, labels, counts, meta, snapshot.

        ``insert(conn, new_ids, label_ids, now)`` writes the item rows; automatic ids are consecutive.
        """
        n = codes.shape[0]

        def body(conn: sqlite3.Connection, snap: _Snapshot, meta: _Meta):
            if dim is not None and meta.embedding_dim is not None and dim != meta.embedding_dim:
                raise InvalidInputError(
                    f"embeddings must have {meta.embedding_dim} columns like those already stored, got {dim}"
                )
            if (embedding_fingerprint is not None and meta.embedding_fingerprint is not None
                    and embedding_fingerprint != meta.embedding_fingerprint):
                raise FingerprintMismatchError(
                    f"{self._name} stores embeddings of extractor {meta.embedding_fingerprint}, but these come "
                    f"from extractor {embedding_fingerprint}: one gallery cannot hold two models' features")
            if explicit_ids is None:
                start = max(meta.next_id, int(snap.ids[-1]) + 1 if snap.ids.size else 0)
                if start + n - 1 > _MAX_ID:
                    raise GalleryError(f"{self._name}: no ids left (next id {start})")
                new_ids = np.arange(start, start + n, dtype=np.int64)
            else:
                new_ids = explicit_ids
                present = new_ids[np.isin(new_ids, snap.ids)]
                if present.size:
                    raise GalleryError(f"{self._name}: ids already in the gallery: {_short_list(np.sort(present))}")
            if _has_thumbnails(conn):
                # Thumbnails go with their items, so none can exist for a free id: a row left by a
                # damaged file (`gallery check` reports it) must not become the new item's.
                if explicit_ids is None:
                    conn.execute("DELETE FROM thumbnails WHERE item_id BETWEEN ? AND ?",
                                 (int(new_ids[0]), int(new_ids[-1])))
                else:
                    for part in _chunks([int(i) for i in new_ids]):
                        conn.execute(f"DELETE FROM thumbnails WHERE item_id IN ({','.join('?' * len(part))})", part)
            label_ids = _label_ids(conn, labels)
            insert(conn, new_ids, label_ids, int(time.time()))
            item_labels = np.fromiter((label_ids[lab] for lab in labels), dtype=np.int64, count=n)
            _bump_counts(conn, Counter(item_labels.tolist()))
            next_id = max(meta.next_id, int(new_ids.max()) + 1)
            _set_meta(conn, "next_id", next_id)
            new_meta = replace(meta, next_id=next_id)
            if dim is not None and meta.embedding_dim is None:
                _set_meta(conn, "embedding_dim", dim)
                new_meta = replace(new_meta, embedding_dim=dim)
            if embedding_fingerprint is not None and meta.embedding_fingerprint is None:
                _set_meta(conn, "embedding_fingerprint", embedding_fingerprint)
                new_meta = replace(new_meta, embedding_fingerprint=embedding_fingerprint)
            all_vectors = None
            if vectors is not None:
                if meta.compact_dim is not None and vectors.dim != meta.compact_dim:
                    raise InvalidInputError(f"features must have {meta.compact_dim} columns like those already "
                                            f"stored, got {vectors.dim}")
                if meta.compact_dim is None:
                    _set_meta(conn, "compact_dim", vectors.dim)
                    new_meta = replace(new_meta, compact_dim=vectors.dim)
                all_vectors = vectors if snap.vectors is None else CompactVectors(
                    vectors.fmt, np.concatenate([snap.vectors.values, vectors.values]),
                    np.concatenate([snap.vectors.scales, vectors.scales]))
            all_ids = np.concatenate([snap.ids.astype(np.int64), new_ids])
            all_labels = np.concatenate([snap.label_ids.astype(np.int64), item_labels])
            index = snap.index.appended(codes)
            if (snap.ids.size and new_ids.min() < snap.ids[-1]) or np.any(new_ids[1:] < new_ids[:-1]):
                order = np.argsort(all_ids, kind="stable")
                all_ids, all_labels, index = all_ids[order], all_labels[order], index.reordered(order)
                all_vectors = None if all_vectors is None else all_vectors.take(order)
            names = snap.labels.with_names({i: lab for lab, i in label_ids.items()})
            return new_ids.copy(), _Snapshot(_id_array(all_ids), index, _label_array(all_labels), names,
                                             all_vectors), new_meta

        return self._write(what, body)

    def remove(self, ids: Sequence[int]) -> int:
        """Removes items by id, with their thumbnails, in one transaction: all of them or none.

        Args:
          ids: ids to remove (repeats count once).

        Returns:
          Number of items removed.

        Raises:
          InvalidDtypeError: ``ids`` are not integers.
          InvalidInputError: ``ids`` is not a 1-D sequence of ids >= 0.
          UnknownItemError: some ids are not in the gallery (nothing is removed then).
          GalleryError: the gallery is read-only or closed, or the write failed.
        """
        self._require_writable()
        wanted = np.unique(_check_ids(ids))
        if wanted.size == 0:
            return 0

        def body(conn: sqlite3.Connection, snap: _Snapshot, meta: _Meta):
            gone = self._positions(snap, wanted)
            removed: Counter = Counter()
            thumbnails = _has_thumbnails(conn)
            for part in _chunks([int(i) for i in wanted]):
                marks = ",".join("?" * len(part))
                removed.update(dict(conn.execute(
                    f"SELECT label_id, count(*) FROM items WHERE id IN ({marks}) GROUP BY label_id", part)))
                conn.execute(f"DELETE FROM items WHERE id IN ({marks})", part)
                if thumbnails:
                    conn.execute(f"DELETE FROM thumbnails WHERE item_id IN ({marks})", part)
                if meta.compact is not None:
                    conn.execute(f"DELETE FROM compact WHERE item_id IN ({marks})", part)
            _bump_counts(conn, Counter({lab: -n for lab, n in removed.items()}))
            mask = np.ones(snap.ids.shape[0], dtype=bool)
            mask[gone] = False
            return int(wanted.size), snap.without(mask), None

        return self._write("remove", body)

    def remove_label(self, label: str) -> int:
        """Removes every item with this label, with their thumbnails, in one transaction.

        Args:
          label: the label to remove.

        Returns:
          Number of items removed (0 when no item has that label).

        Raises:
          InvalidInputError: ``label`` is not a str.
          GalleryError: the gallery is read-only or closed, or the write failed.
        """
        self._require_writable()
        if not isinstance(label, str):
            raise InvalidInputError(f"label must be a str, got {type(label).__name__}")

        def body(conn: sqlite3.Connection, snap: _Snapshot, meta: _Meta):
            row = conn.execute("SELECT id FROM labels WHERE label = ?", (label,)).fetchone()
            if row is None:
                return 0, None, None
            gone = np.fromiter((r[0] for r in conn.execute("SELECT id FROM items WHERE label_id = ?", row)),
                               dtype=np.int64)
            if _has_thumbnails(conn):
                conn.execute("DELETE FROM thumbnails WHERE item_id IN (SELECT id FROM items WHERE label_id = ?)", row)
            if meta.compact is not None:
                conn.execute("DELETE FROM compact WHERE item_id IN (SELECT id FROM items WHERE label_id = ?)", row)
            conn.execute("DELETE FROM items WHERE label_id = ?", row)
            conn.execute("DELETE FROM labels WHERE id = ?", row)
            if gone.size == 0:
                return 0, None, None
            return int(gone.size), snap.without(~np.isin(snap.ids, gone)), None

        return self._write("remove_label", body)

    def relabel(self, ids: Sequence[int], label: str) -> int:
        """Gives items a new label, in one transaction.

        Args:
          ids: ids of the items to relabel (repeats count once).
          label: the new label (same rules as in :meth:`add`).

        Returns:
          Number of items relabelled.

        Raises:
          InvalidDtypeError: ``ids`` are not integers.
          InvalidInputError: bad ``ids`` or ``label``.
          UnknownItemError: some ids are not in the gallery (nothing changes then).
          GalleryError: the gallery is read-only or closed, or the write failed.
        """
        self._require_writable()
        check_label(label, "relabel")
        wanted = np.unique(_check_ids(ids))
        if wanted.size == 0:
            return 0

        def body(conn: sqlite3.Connection, snap: _Snapshot, meta: _Meta):
            pos = self._positions(snap, wanted)
            target = _label_ids(conn, [label])[label]
            moved: Counter = Counter()
            for part in _chunks([int(i) for i in wanted]):
                marks = ",".join("?" * len(part))
                moved.update(dict(conn.execute(
                    f"SELECT label_id, count(*) FROM items WHERE id IN ({marks}) GROUP BY label_id", part)))
                conn.execute(f"UPDATE items SET label_id = ? WHERE id IN ({marks})", [target, *part])
            delta = Counter({lab: -n for lab, n in moved.items()})
            delta[target] += int(wanted.size)
            _bump_counts(conn, delta)
            label_ids = snap.label_ids.astype(np.int64)
            label_ids[pos] = target
            present = np.unique(label_ids).tolist()
            names = {i: (label if i == target else snap.labels.get(i)) for i in present}
            return int(wanted.size), replace(snap, label_ids=_label_array(label_ids),
                                             labels=_LabelNames.build(names)), None

        return self._write("relabel", body)

    def rehash(self, encode: Callable[[np.ndarray], np.ndarray], *, fingerprint: str, embedding_fingerprint: str,
               same_extractor: Sequence[str] = (), batch: int = 8192) -> int:
        """Recomputes every code from the stored float embeddings, in one transaction.

        Use it when the hash head (or the code settings) changes: the codes are rewritten and the
        gallery takes the new fingerprint, so the new bundle can open it. The calibrated
        ``max_distance`` is cleared, since it was measured on the old codes.

        Args:
          encode: maps float32 embeddings ``(n, d)`` to uint8 codes ``(n, bits // 8)``.
          fingerprint: the fingerprint of the model and code settings of ``encode``.
          embedding_fingerprint: identity of the extractor whose features ``encode`` expects; it
            must be the one that made the stored embeddings.
          same_extractor: code fingerprints known to come from that extractor (e.g. its plain sign
            codes). A gallery that stores embeddings without recording their extractor (made before
            edge-shitu recorded it) is re-hashed only when its current codes carry one of these.
          batch: embeddings passed to ``encode`` at a time.

        Returns:
          The number of items re-hashed.

        Raises:
          InvalidInputError: bad ``fingerprint`` or ``batch``, or ``encode`` returned codes of the
            wrong dtype or shape (nothing is changed then).
          FingerprintMismatchError: the stored embeddings come from another extractor, or their
            origin cannot be proven.
          MissingEmbeddingsError: some items have no stored embedding (the gallery was built without
            ``keep_embeddings``).
          GalleryError: the gallery is read-only or closed, or the write failed.
        """
        self._require_writable()
        fingerprint = _check_fingerprint(fingerprint)
        embedding_fingerprint = _check_fingerprint(embedding_fingerprint)
        proofs = {_check_fingerprint(f) for f in same_extractor}
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise InvalidInputError(f"batch must be a positive integer, got {batch!r}")

        def body(conn: sqlite3.Connection, snap: _Snapshot, meta: _Meta):
            self._require_embeddings(conn, snap, "their codes cannot be recomputed", "--keep-embeddings")
            stored = meta.embedding_fingerprint
            if stored is None and snap.ids.size and meta.fingerprint not in proofs:
                raise FingerprintMismatchError(
                    f"{self._name}: its stored embeddings do not record which extractor made them, and its codes "
                    f"(fingerprint {meta.fingerprint}) do not show that it was this one; rebuild the gallery "
                    "from the images with --keep-embeddings")
            if stored is not None and stored != embedding_fingerprint:
                raise FingerprintMismatchError(
                    f"{self._name}: its embeddings were made by extractor {stored}, but the new codes would be "
                    f"computed for extractor {embedding_fingerprint}: they would mean nothing. Re-hash with a "
                    "bundle of the same extractor, or rebuild the gallery from the images")
            codes = np.empty((snap.ids.shape[0], meta.bits // 8), dtype=np.uint8)
            done = 0
            for _, emb in _embedding_chunks(conn, meta.embedding_dim or 0, batch, self._name):
                n = emb.shape[0]
                new = encode(emb.astype(np.float32))
                if not isinstance(new, np.ndarray) or new.dtype != np.uint8 or new.shape != (n, meta.bits // 8):
                    got = f"{new.dtype} {new.shape}" if isinstance(new, np.ndarray) else type(new).__name__
                    raise InvalidInputError(
                        f"encode must return uint8 codes of shape ({n}, {meta.bits // 8}) "
                        f"({meta.bits} bits, the gallery's code length), got {got}")
                codes[done:done + n] = new
                done += n
            if done != snap.ids.shape[0]:
                raise GalleryCorruptError(f"{self._name}: the items changed while they were being re-hashed")
            conn.executemany("UPDATE items SET code = ? WHERE id = ?",
                             ((codes[j].tobytes(), int(i)) for j, i in enumerate(snap.ids)))
            _set_meta(conn, "fingerprint", fingerprint)
            new_meta = replace(meta, fingerprint=fingerprint, max_distance=None)
            if snap.ids.size:
                _set_meta(conn, "embedding_fingerprint", embedding_fingerprint)
                new_meta = replace(new_meta, embedding_fingerprint=embedding_fingerprint)
            conn.execute("DELETE FROM meta WHERE key = 'max_distance'")
            index = HammingIndex.build(codes, bits=meta.bits, backend=self._backend)
            return done, replace(snap, index=index), new_meta

        return self._write("rehash", body)

    def set_compact(self, fmt: Optional[str]) -> int:
        """Makes (or drops, with None) every item's compact feature from its stored float embedding, in one
        transaction.

        This upgrades a gallery built with ``keep_embeddings`` to re-ranked search (or changes its
        compact form) without the images. The calibrated ``min_similarity`` is cleared whenever the
        compact form changes, since it was measured on other features (or on none).

        Args:
          fmt: ``"int8"``, ``"fp16"`` (see :mod:`edge_shitu.compact`), or None to drop the compact
            features (the recogniser then accepts by Hamming distance again).

        Returns:
          The number of items whose compact feature was written (0 when dropping).

        Raises:
          InvalidInputError: unknown ``fmt``.
          MissingEmbeddingsError: some items store no float embedding (nothing is changed then).
          GalleryCorruptError: a stored embedding has the wrong size or is not finite.
          GalleryError: the gallery is read-only or closed, or the write failed (nothing is changed then).
        """
        self._require_writable()
        if fmt is not None and fmt not in COMPACT_FORMATS:
            raise InvalidInputError(f"compact must be one of {', '.join(COMPACT_FORMATS)} or None, got {fmt!r}")

        def body(conn: sqlite3.Connection, snap: _Snapshot, meta: _Meta):
            cleared = replace(meta, compact=None, compact_dim=None, min_similarity=None)
            if fmt is None:
                if meta.compact is None:
                    return 0, None, None
                conn.execute("DROP TABLE IF EXISTS compact")
                conn.execute("DELETE FROM meta WHERE key IN ('compact', 'compact_dim', 'min_similarity')")
                return 0, replace(snap, vectors=None), cleared
            self._require_embeddings(conn, snap, "no compact feature can be made for them", "--compact int8")
            dim = meta.embedding_dim
            values = np.empty((snap.ids.shape[0], dim or 1), dtype=np.int8 if fmt == "int8" else np.dtype("<f2"))
            scales = np.empty(snap.ids.shape[0], dtype=np.float32)
            conn.execute(_COMPACT_TABLE)
            conn.execute("DELETE FROM compact")
            done = 0
            for item_ids, emb in _embedding_chunks(conn, dim or 0, _VECTOR_CHUNK, self._name):
                if not np.isfinite(emb).all():
                    raise GalleryCorruptError(f"{self._name}: stored embeddings hold NaN or infinite values")
                part = compress(emb, fmt)
                conn.executemany("INSERT INTO compact(item_id, vec) VALUES (?, ?)",
                                 ((i, to_blob(part, j)) for j, i in enumerate(item_ids)))
                n = len(item_ids)
                values[done:done + n] = part.values
                scales[done:done + n] = part.scales
                done += n
            if done != snap.ids.shape[0]:
                raise GalleryCorruptError(f"{self._name}: the items changed while their compact features were made")
            _set_meta(conn, "compact", fmt)
            new_meta = replace(meta, compact=fmt, compact_dim=dim)
            if dim is None:
                conn.execute("DELETE FROM meta WHERE key = 'compact_dim'")
            else:
                _set_meta(conn, "compact_dim", dim)
            if meta.compact != fmt:
                conn.execute("DELETE FROM meta WHERE key = 'min_similarity'")
                new_meta = replace(new_meta, min_similarity=None)
            vectors = CompactVectors(fmt, _frozen(values), _frozen(scales)) if done else None
            return done, replace(snap, vectors=vectors), new_meta

        # The items keep their ids, codes and labels: derived files (a float index) stay valid.
        return self._write("set_compact", body, changes_items=False)

    def _require_embeddings(self, conn: sqlite3.Connection, snap: _Snapshot, consequence: str, option: str) -> None:
        """Raises MissingEmbeddingsError (saying ``consequence`` and to rebuild with ``option``) when an item has no
        stored float embedding."""
        missing = conn.execute("SELECT count(*) FROM items WHERE embedding IS NULL").fetchone()[0]
        if missing:
            raise MissingEmbeddingsError(
                f"{self._name}: {missing} of {snap.ids.shape[0]} items have no stored float embedding, so "
                f"{consequence}; rebuild the gallery from the images with {option} (edge-shitu gallery build ... "
                f"{option})")

    def set_max_distance(self, value: Optional[int]) -> None:
        """Stores (or clears, with None) the calibrated acceptance threshold.

        Args:
          value: threshold in bits, in ``[0, bits]``, or None.

        Raises:
          InvalidInputError: ``value`` is out of range or not an integer.
          GalleryError: the gallery is read-only or closed, or the write failed.
        """
        self._require_writable()
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= self.bits:
                raise InvalidInputError(f"max_distance must be an integer in [0, {self.bits}] or None, got {value!r}")
            value = int(value)
        self._set_setting("max_distance", value)

    def set_det_threshold(self, value: Optional[float]) -> None:
        """Stores (or clears, with None) the detector threshold: the minimum score of a detected box.

        Args:
          value: a finite number in ``[0, 1]``, or None.

        Raises:
          InvalidInputError: ``value`` is out of range or not a number.
          GalleryError: the gallery is read-only or closed, or the write failed.
        """
        self._require_writable()
        self._set_setting("det_threshold", _optional_number(value, "det_threshold", 0.0, 1.0))

    def _set_setting(self, key: str, value: object) -> None:
        """One optional meta setting (a field of :class:`_Meta` of the same name), stored or cleared in one
        transaction."""
        def body(conn: sqlite3.Connection, snap: _Snapshot, meta: _Meta):
            if value is None:
                conn.execute("DELETE FROM meta WHERE key = ?", (key,))
            else:
                _set_meta(conn, key, value)
            return None, None, replace(meta, **{key: value})

        self._write(f"set_{key}", body, changes_items=False)

    def thumbnail(self, item_id: int) -> Optional[bytes]:
        """Returns the JPEG thumbnail stored with an item.

        Args:
          item_id: the item's id.

        Returns:
          The JPEG file's bytes, or None when the item has no thumbnail.

        Raises:
          InvalidDtypeError: ``item_id`` is not an integer.
          InvalidInputError: ``item_id`` is negative.
          UnknownItemError: no item has this id.
          GalleryCorruptError: the stored thumbnail is not a JPEG.
          GalleryError: the gallery is closed or cannot be read.
        """
        if isinstance(item_id, (bool, np.bool_)) or not isinstance(item_id, (int, np.integer)):
            raise InvalidDtypeError(f"item_id must be an integer, got {type(item_id).__name__}")
        if not 0 <= item_id <= _MAX_ID:
            raise InvalidInputError(f"item_id must be in [0, {_MAX_ID}], got {item_id}")
        wanted = int(item_id)

        def query(conn: sqlite3.Connection) -> Tuple[bool, object]:
            if conn.execute("SELECT count(*) FROM items WHERE id = ?", (wanted,)).fetchone()[0] == 0:
                return False, None
            if not _has_thumbnails(conn):
                return True, None
            row = conn.execute("SELECT jpeg FROM thumbnails WHERE item_id = ?", (wanted,)).fetchone()
            return True, None if row is None else row[0]

        exists, blob = self._read(query)
        if not exists:
            raise UnknownItemError(f"{self._name}: unknown id {wanted}")
        if blob is not None and (not isinstance(blob, bytes) or not blob.startswith(JPEG_MAGIC)):
            raise GalleryCorruptError(f"{self._name}: the thumbnail of item {wanted} is not a JPEG; "
                                      "run `edge-shitu gallery check` for details")
        return blob

    def count(self, label: Optional[str] = None) -> int:
        """Counts items, e.g. the total of a paged :meth:`items` listing.

        Args:
          label: count only the items with this label (0 for a label no item has).

        Returns:
          The number of items.

        Raises:
          InvalidInputError: ``label`` is not a str or None.
          GalleryError: the gallery is closed or cannot be read.
        """
        if label is not None and not isinstance(label, str):
            raise InvalidInputError(f"label must be a str or None, got {type(label).__name__}")
        # The per-label counts are kept exact with every change, and are far fewer rows than the items.
        if label is None:
            sql, params = "SELECT coalesce(sum(count), 0) FROM labels", ()
        else:
            sql, params = "SELECT coalesce(sum(count), 0) FROM labels WHERE label = ?", (label,)
        return int(self._read(lambda conn: conn.execute(sql, params).fetchone()[0]))

    def items(self, *, label: Optional[str] = None, limit: Optional[int] = None, offset: int = 0) -> List[GalleryItem]:
        """Lists items in ascending id order.

        Args:
          label: only items with this label.
          limit: at most this many items (None: all).
          offset: skip this many items first.

        Returns:
          The items.

        Raises:
          InvalidInputError: negative ``limit`` or ``offset``, or a non-str ``label``.
          GalleryError: the gallery is closed or cannot be read.
        """
        for name, value in (("limit", limit), ("offset", offset)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0):
                raise InvalidInputError(f"{name} must be an integer >= 0, got {value!r}")
        if label is not None and not isinstance(label, str):
            raise InvalidInputError(f"label must be a str or None, got {type(label).__name__}")
        sql = ("SELECT items.id, labels.label, source, added_at, embedding IS NOT NULL, code, {thumbnail} "
               "FROM items JOIN labels ON labels.id = items.label_id")
        params: list = []
        if label is not None:
            sql += " WHERE labels.label = ?"
            params.append(label)
        sql += " ORDER BY items.id LIMIT ? OFFSET ?"
        params += [-1 if limit is None else int(limit), int(offset)]

        def query(conn: sqlite3.Connection) -> list:
            thumbnail = ("EXISTS(SELECT 1 FROM thumbnails WHERE thumbnails.item_id = items.id)"
                         if _has_thumbnails(conn) else "0")
            return conn.execute(sql.format(thumbnail=thumbnail), params).fetchall()

        rows = self._read(query)
        return [GalleryItem(id=r[0], label=r[1], source=r[2], added_at=None if r[3] is None else float(r[3]),
                            has_embedding=bool(r[4]), code=bytes(r[5]), has_thumbnail=bool(r[6]))
                for r in rows]

    def labels_of(self, ids: Sequence[int]) -> List[Optional[str]]:
        """Looks up the labels of ids, e.g. of a :class:`SearchResult` row.

        Args:
          ids: 1-D integer ids; -1 (the search padding) and unknown ids give None.

        Returns:
          One label or None per id, in input order.

        Raises:
          InvalidDtypeError: ``ids`` are not integers.
          InvalidInputError: ``ids`` is not 1-D.
          GalleryError: the gallery is closed or cannot be read.
        """
        arr = np.asarray(ids)
        if arr.ndim != 1:
            raise InvalidInputError(f"ids must be 1-D, got shape {arr.shape}")
        if arr.size and (arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer)):
            raise InvalidDtypeError(f"ids must be integers, got dtype {arr.dtype}")
        with self._lock:
            self._sync()
            snap = self._snapshot
        if arr.size == 0 or snap.ids.size == 0:
            return [None] * int(arr.size)
        flat = arr.astype(np.int64, copy=False)
        pos = np.minimum(np.searchsorted(snap.ids, flat), snap.ids.shape[0] - 1)
        found = snap.ids[pos] == flat
        labels = snap.label_of(pos[found])
        out: List[Optional[str]] = [None] * int(arr.size)
        for j, label in zip(np.flatnonzero(found).tolist(), labels):
            out[j] = label
        return out

    def embeddings(self, ids: Sequence[int]) -> np.ndarray:
        """Returns the float embeddings stored with items.

        Args:
          ids: 1-D ids (repeats allowed).

        Returns:
          float32 ``(len(ids), d)``; ``d`` is 0 when the gallery stores no embeddings.

        Raises:
          InvalidDtypeError: ``ids`` are not integers.
          InvalidInputError: ``ids`` is not a 1-D sequence of ids >= 0.
          UnknownItemError: some ids are not in the gallery.
          GalleryError: some items have no stored embedding, or the gallery is closed.
          GalleryCorruptError: a stored embedding has the wrong size.
        """
        arr = _check_ids(ids)
        wanted = [int(i) for i in np.unique(arr)]
        with self._lock:
            self._require_open()
            found = self._read(lambda conn: self._lookup(conn, "embedding", wanted))
            dim = self._meta.embedding_dim
        missing = [i for i in wanted if i not in found]
        if missing:
            raise UnknownItemError(f"{self._name}: unknown ids {_short_list(missing)}")
        absent = [i for i in wanted if found[i] is None]
        if absent:
            raise GalleryError(f"{self._name}: items {_short_list(absent)} have no stored embedding")
        out = np.empty((arr.shape[0], dim or 0), dtype=np.float32)
        for row, i in enumerate(arr):
            blob = found[int(i)]
            if dim is None or len(blob) != 4 * dim:
                raise GalleryCorruptError(f"{self._name}: item {int(i)} has an embedding of {len(blob)} bytes, expected 4 x {dim}")
            out[row] = np.frombuffer(blob, dtype="<f4")
        return out

    def label_counts(self) -> Dict[str, int]:
        """Counts items per label.

        Returns:
          ``{label: count}`` in label order.

        Raises:
          GalleryError: the gallery is closed or cannot be read.
        """
        rows = self._read(lambda conn: conn.execute(
            "SELECT label, count FROM labels WHERE count > 0 ORDER BY label").fetchall())
        return {label: int(count) for label, count in rows}

    def info(self) -> GalleryInfo:
        """Summarises the gallery.

        Returns:
          A GalleryInfo.

        Raises:
          GalleryError: the gallery is closed or cannot be read.
        """
        def query(conn: sqlite3.Connection):
            count = conn.execute("SELECT count(*) FROM items").fetchone()[0]
            label_count = conn.execute("SELECT count(*) FROM labels WHERE count > 0").fetchone()[0]
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            page_size = conn.execute("PRAGMA page_size").fetchone()[0]
            thumbnails = conn.execute("SELECT count(*) FROM thumbnails").fetchone()[0] if _has_thumbnails(conn) else 0
            return int(count), int(label_count), int(pages * page_size), int(thumbnails)

        with self._lock:
            self._sync()
            count, label_count, size, thumbnails = self._read(query)
            meta = self._meta
        return GalleryInfo(
            path=self._path, count=count, label_count=label_count, bits=meta.bits, fingerprint=meta.fingerprint,
            format_version=FORMAT_VERSION, max_distance=meta.max_distance, embedding_dim=meta.embedding_dim,
            created_by=meta.created_by, file_size=size, readonly=self._readonly,
            embedding_fingerprint=meta.embedding_fingerprint, det_threshold=meta.det_threshold,
            thumbnail_count=thumbnails, compact=meta.compact, min_similarity=meta.min_similarity,
        )

    def check(self) -> List[str]:
        """Looks for damage: SQLite integrity, meta values, code and embedding sizes, labels, ids,
        thumbnails, and agreement between the file and the in-memory codes.

        Returns:
          One message per problem found; an empty list when the gallery is healthy.

        Raises:
          GalleryError: the gallery is closed.
        """
        with self._lock:
            conn = self._require_open()
            problems: List[str] = []
            try:
                self._sync()
            except GalleryError as exc:
                problems.append(str(exc))
            try:
                conn.execute("BEGIN")
                try:
                    problems += self._check_in_transaction(conn)
                finally:
                    conn.execute("COMMIT")
            except sqlite3.Error as exc:
                problems.append(f"database error: {exc}")
            return problems

    def check_model(self, encode: Callable[[np.ndarray], np.ndarray], *, fingerprint: str,
                    embedding_fingerprint: str, sample: int = 1000) -> List[str]:
        """Checks that the gallery belongs to a model: its fingerprints, and that the stored codes
        are what ``encode`` makes of the stored embeddings (on a reproducible sample of items).

        Args:
          encode: maps float32 embeddings ``(n, d)`` to uint8 codes ``(n, bits // 8)``.
          fingerprint: the code fingerprint of that model.
          embedding_fingerprint: the identity of its extractor.
          sample: at most this many items with embeddings are re-encoded.

        Returns:
          One message per disagreement; empty when the gallery is this model's.

        Raises:
          InvalidInputError: a bad fingerprint or ``sample``.
          GalleryError: the gallery is closed or cannot be read.
        """
        fingerprint = _check_fingerprint(fingerprint)
        embedding_fingerprint = _check_fingerprint(embedding_fingerprint)
        if isinstance(sample, bool) or not isinstance(sample, int) or sample < 1:
            raise InvalidInputError(f"sample must be a positive integer, got {sample!r}")
        with self._lock:
            self._sync()
            meta, snap = self._meta, self._snapshot
        problems = []
        if meta.fingerprint != fingerprint:
            problems.append(f"codes were made by model {meta.fingerprint}, not by this bundle's {fingerprint}")
        if meta.embedding_fingerprint is not None and meta.embedding_fingerprint != embedding_fingerprint:
            problems.append(f"embeddings were made by extractor {meta.embedding_fingerprint}, not by this bundle's "
                            f"{embedding_fingerprint}")
        with_emb = self._read(lambda conn: np.fromiter(
            (r[0] for r in conn.execute("SELECT id FROM items WHERE embedding IS NOT NULL ORDER BY id")), np.int64))
        if with_emb.size:
            picked = np.sort(np.random.default_rng(0).choice(with_emb, min(sample, with_emb.size), replace=False))
            pos = np.searchsorted(snap.ids, picked)
            new = encode(self.embeddings(picked))
            if not isinstance(new, np.ndarray) or new.shape != (picked.size, self.nbytes):
                raise InvalidInputError(f"encode must return uint8 codes of shape ({picked.size}, {self.nbytes})")
            differ = np.flatnonzero((new != snap.index.codes()[pos]).any(axis=1))
            if differ.size:
                problems.append(f"{differ.size} of {picked.size} sampled items have codes that are not this model's "
                                f"code of their stored embedding (ids {_short_list(picked[differ])})")
        return problems

    def _check_in_transaction(self, conn: sqlite3.Connection) -> List[str]:
        problems, meta = _check_contents(conn, self._name)
        if meta is None:
            return problems
        if meta.bits != self._meta.bits or meta.fingerprint != self._meta.fingerprint:
            problems.append("bits or fingerprint changed since the gallery was opened")
            return problems
        if not problems:
            try:
                ids, codes = _read_codes(conn, meta.bits // 8, self._name)
            except GalleryCorruptError as exc:
                return problems + [str(exc)]
            snap = self._snapshot
            if self._version == conn.execute("PRAGMA data_version").fetchone()[0] and (
                    not np.array_equal(ids, snap.ids) or not np.array_equal(codes, snap.index.codes())):
                problems.append(
                    f"the in-memory codes ({snap.ids.shape[0]} items) disagree with the file ({ids.shape[0]} items)")
        return problems

    def _require_open(self) -> sqlite3.Connection:
        if self._conn is None:
            raise GalleryError("gallery is closed")
        return self._conn

    def _require_writable(self) -> None:
        self._require_open()
        if self._readonly:
            raise GalleryError(f"{self._name} was opened read-only; open it with readonly=False to change it")

    def _positions(self, snap: _Snapshot, wanted: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(snap.ids, wanted)
        clipped = np.minimum(pos, max(snap.ids.shape[0] - 1, 0))
        found = (pos < snap.ids.shape[0]) & (snap.ids[clipped] == wanted) if snap.ids.size else np.zeros(wanted.shape, bool)
        if not found.all():
            raise UnknownItemError(f"{self._name}: unknown ids {_short_list(wanted[~found])}; nothing was changed")
        return pos

    def _lookup(self, conn: sqlite3.Connection, column: str, ids: List[int]) -> Dict[int, object]:
        found: Dict[int, object] = {}
        source = "items JOIN labels ON labels.id = items.label_id" if column.startswith("labels.") else "items"
        for part in _chunks(ids):
            marks = ",".join("?" * len(part))
            found.update(conn.execute(f"SELECT items.id, {column} FROM {source} WHERE items.id IN ({marks})", part))
        return found

    def _read(self, query: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            conn = self._require_open()
            try:
                conn.execute("BEGIN")
                try:
                    return query(conn)
                finally:
                    conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise self._wrap(exc, "read") from exc

    def _sync(self) -> None:
        """Reloads meta and codes when another connection has committed changes to the file.

        When the file cannot be read just now (locked by a writer, or a crashed writer's journal
        that this read-only connection may not roll back), the last snapshot keeps serving and the
        reload is tried again at the next call; :attr:`stale` tells why.

        Raises:
          GalleryError: the gallery is closed.
          GalleryCorruptError: another process changed the bits or fingerprint (the snapshot is kept).
        """
        conn = self._require_open()
        try:
            version = conn.execute("PRAGMA data_version").fetchone()[0]
            if version == self._version:
                self._stale = None
                return
            conn.execute("BEGIN")
            try:
                meta, snapshot, version = _load(conn, self._name, self._backend)
            finally:
                conn.execute("COMMIT")
        except (sqlite3.Error, GalleryError) as exc:
            if isinstance(exc, sqlite3.Error):
                exc = self._wrap(exc, "reload")
            self._stale = str(exc)
            return
        if meta.bits != self._meta.bits or meta.fingerprint != self._meta.fingerprint:
            raise GalleryCorruptError(f"{self._name}: bits or fingerprint were changed by another process "
                                      "(re-hashed?); open the gallery again")
        self._meta, self._snapshot, self._version, self._stale = meta, snapshot, version, None

    def _write(self, what: str, body: Callable[[sqlite3.Connection, _Snapshot, _Meta],
                                                Tuple[T, Optional[_Snapshot], Optional[_Meta]]],
               *, changes_items: bool = True) -> T:
        """Runs ``body`` in one write transaction on the current state; a change of the items also bumps
        the meta ``generation`` in that transaction."""
        with self._lock:
            self._require_writable()
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise self._wrap(exc, what) from exc
            try:
                meta, snap, version = self._meta, self._snapshot, self._version
                current = conn.execute("PRAGMA data_version").fetchone()[0]
                if current != version:
                    meta, snap, version = _load(conn, self._name, self._backend)
                result, new_snap, new_meta = body(conn, snap, meta)
                if changes_items and new_snap is not None:  # no new snapshot: nothing was changed
                    after = new_meta if new_meta is not None else meta
                    _set_meta(conn, "generation", after.generation + 1)
                    new_meta = replace(after, generation=after.generation + 1)
                conn.execute("COMMIT")
            except BaseException as exc:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                if isinstance(exc, sqlite3.Error):
                    raise self._wrap(exc, what) from exc
                raise
            self._meta = new_meta if new_meta is not None else meta
            self._snapshot = new_snap if new_snap is not None else snap
            self._version = version
            return result

    def _wrap(self, exc: sqlite3.Error, what: str) -> GalleryError:
        if _is_corruption(exc):
            return GalleryCorruptError(f"{self._name}: {what} failed, the file looks damaged: {exc}")
        return GalleryError(f"{self._name}: {what} failed and nothing was changed: {exc}")


def _load(conn: sqlite3.Connection, name: str, backend: str) -> Tuple[_Meta, _Snapshot, int]:
    """Reads meta and codes; call inside a transaction so both come from the same state."""
    if conn.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone()[0]:
        # A gallery of an older format has other tables: say how to upgrade it rather than "corrupt".
        version = conn.execute("SELECT value FROM meta WHERE key = 'format_version'").fetchone()
        if version is not None and version[0] == "1":
            _parse_meta({"format_version": "1", **{k: "" for k in _REQUIRED_META if k != "format_version"}}, name)
    _check_schema(conn, name)
    meta = _parse_meta(_read_meta_rows(conn), name)
    snapshot = _read_snapshot(conn, meta, backend, name)
    version = conn.execute("PRAGMA data_version").fetchone()[0]
    return meta, snapshot, version
