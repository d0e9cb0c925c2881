"""An HNSW index (hnswlib) over the float embeddings a gallery stores beside its codes.

The gallery's own search is exhaustive Hamming distance over 512-bit codes. Galleries built with
``--keep-embeddings`` also hold the float32 features, and this module serves those the way the
PaddleClas reference serves its float galleries (faiss ``HNSW32``, inner product), with two
differences: efSearch is set (faiss leaves it at 16, which loses recall) and the index file
describes itself in a JSON sidecar, so it is never used for a gallery it was not built from.

Files, beside the gallery by default::

    drinks.gallery            the gallery (SQLite)
    drinks.gallery.hnsw       hnswlib's graph + vectors (its own format; it records neither space nor ef)
    drinks.gallery.hnsw.json  what the graph was built from: the gallery's code and embedding
                              fingerprints, its generation, item count, digest of its ids, dim, space,
                              M, ef_construction, and the size and sha256 of the .hnsw file

:meth:`FloatIndex.for_gallery` loads the pair when the sidecar matches the gallery and the options
exactly, and otherwise rebuilds from the stored embeddings and replaces both files. hnswlib does
not check the contents of what it loads (a flipped byte in a link list is an out-of-bounds read,
a crash Python cannot catch), so the .hnsw file is loaded only when its sha256 is the one recorded.

hnswlib is imported only when an index is built or loaded: ``pip install "edge-shitu[hnsw]"``.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple, Union

import numpy as np

from edge_shitu.errors import (
    BackendUnavailableError,
    ClosedError,
    GalleryCorruptError,
    GalleryError,
    InvalidDtypeError,
    InvalidInputError,
    MissingEmbeddingsError,
    UnknownItemError,
)
from edge_shitu.gallery_format import fsync_dir

if TYPE_CHECKING:
    from edge_shitu.gallery import Gallery

__all__ = ["FloatIndex", "FloatIndexOptions", "MissingEmbeddingsError", "FORMAT_VERSION", "HNSW_EXTRA_HINT",
           "index_status"]

FORMAT_VERSION = 1
"""Version of the sidecar's layout; a sidecar of another version is rebuilt."""

HNSW_EXTRA_HINT = 'pip install "edge-shitu[hnsw]"'

_FORMAT = "edge-shitu-float-index"
_SPACE = "ip"
_INDEX_SUFFIX = ".hnsw"
_SIDECAR_SUFFIX = ".json"
# Embeddings read from SQLite and added to the graph at a time: bounds memory at ~16 MB for d=512.
_CHUNK = 8192
# A removal committed by another process between reading the ids and reading their embeddings
# makes the build start over; a gallery changing faster than that is not one to index.
_BUILD_ATTEMPTS = 3
# The fields of the sidecar that must equal the gallery's state and the options for the file to be used.
_STATE_KEYS = ("gallery_fingerprint", "embedding_fingerprint", "generation", "count", "dim", "ids_sha256")
_BUILD_KEYS = ("space", "normalized", "m", "ef_construction")
_CONSTRUCT_KEY = object()


@dataclass(frozen=True)
class FloatIndexOptions:
    """How the HNSW graph is built and searched.

    Attributes:
      m: links per node (hnswlib's ``M``), in ``[2, 256]``; 32 as the reference's ``HNSW32``.
        Changing it rebuilds the index.
      ef_construction: candidate list size while building, in ``[m, 10000]``. Changing it
        rebuilds the index.
      ef_search: candidate list size while searching, in ``[1, 100000]``; raised to ``k`` for a
        search of k > ef_search neighbours. Not part of the file: changing it needs no rebuild.
      threads: threads hnswlib uses to build and to search a batch, in ``[1, 1024]``.
    """

    m: int = 32
    ef_construction: int = 200
    ef_search: int = 128
    threads: int = 1

    def __post_init__(self) -> None:
        for name, low, high in (("m", 2, 256), ("ef_construction", 1, 10_000), ("ef_search", 1, 100_000),
                                ("threads", 1, 1024)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise InvalidInputError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
        if self.ef_construction < self.m:
            raise InvalidInputError(
                f"ef_construction ({self.ef_construction}) must be >= m ({self.m}): hnswlib would raise it to m")


def _generation(gallery: "Gallery") -> int:
    """The gallery's counter of committed item changes (the one place that reads it)."""
    return gallery.generation


def _hnswlib() -> Any:
    try:
        import hnswlib
    except ImportError as exc:
        raise BackendUnavailableError(f"the float index needs hnswlib: {HNSW_EXTRA_HINT}") from exc
    return hnswlib


def _ids_digest(ids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(ids, dtype="<i8").tobytes()).hexdigest()


def _file_digest(path: Path) -> Tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while True:
            block = fh.read(1 << 20)
            if not block:
                return size, digest.hexdigest()
            size += len(block)
            digest.update(block)


def _gallery_state(gallery: "Gallery") -> Dict[str, Any]:
    """What an index of ``gallery`` must have been built from (reads no embeddings)."""
    # The generation is read first: a change committed while the rest is read then leaves the
    # recorded generation older than the contents, so the next comparison rebuilds (never the reverse).
    generation = _generation(gallery)
    info = gallery.info()
    ids = gallery.ids()
    return {
        "gallery_fingerprint": gallery.fingerprint,
        "embedding_fingerprint": info.embedding_fingerprint,
        "generation": int(generation),
        "count": int(ids.shape[0]),
        "dim": info.embedding_dim,
        "ids_sha256": _ids_digest(ids),
        "_ids": ids,
    }


def _difference(recorded: Dict[str, Any], wanted: Dict[str, Any], keys: Tuple[str, ...]) -> Optional[str]:
    for key in keys:
        if recorded.get(key) != wanted.get(key):
            if key == "ids_sha256":
                return "the gallery holds other item ids than the index"
            return f"{key} is {wanted.get(key)!r} in the gallery but {recorded.get(key)!r} in the index"
    return None


def _normalized(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    # A stored all-zero embedding stays zero (similarity 0 to everything) rather than becoming NaN.
    return (x / np.maximum(norms, np.float32(1e-12))).astype(np.float32, copy=False)


def _check_k(k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InvalidInputError(f"k must be an integer >= 1, got {k!r}")
    return int(k)


class FloatIndex:
    """Approximate inner-product search over a gallery's float embeddings (hnswlib HNSW).

    Get one with :meth:`for_gallery`; it loads the index file beside the gallery when that file was
    built from the gallery as it is now, and rebuilds it otherwise. Vectors are L2-normalised, so
    similarities are cosine similarities in ``[-1, 1]``. hnswlib labels are the gallery's item ids.

    Example::

        with Gallery.open("drinks.gallery", readonly=True) as g, FloatIndex.for_gallery(g) as index:
            ids, similarities = index.search(features, k=5)

    Attributes:
      path: the index file, or None for an index held only in memory.
      persisted: whether the index file and its sidecar on disk hold this index (False for an
        in-memory gallery, an empty one, or when they could not be written, e.g. read-only storage).
      built: True when the index was built from the gallery's embeddings by this call, False when
        it was loaded from the file.
      build_reason: why it was built rather than loaded (None when loaded).
    """

    def __init__(self, key: object, index: Any, state: Dict[str, Any], options: FloatIndexOptions,
                 path: Optional[Path], persisted: bool, built: bool, build_reason: Optional[str]) -> None:
        """Internal: use :meth:`for_gallery`.

        Raises:
          TypeError: when called directly.
        """
        if key is not _CONSTRUCT_KEY:
            raise TypeError("use FloatIndex.for_gallery(gallery) to get a FloatIndex")
        self._index = index
        self._state = {k: v for k, v in state.items() if not k.startswith("_")}
        self._options = options
        self._size = int(state["count"])
        self._dim: Optional[int] = state["dim"]
        self._closed = False
        self._lock = threading.Lock()  # hnswlib's ef is per index, set before each search
        self.path = path
        self.persisted = persisted
        self.built = built
        self.build_reason = build_reason

    @classmethod
    def for_gallery(cls, gallery: "Gallery", *, options: Optional[FloatIndexOptions] = None,
                    path: Optional[Union[str, "os.PathLike[str]"]] = None) -> "FloatIndex":
        """Loads the float index of a gallery, or builds (and saves) it when there is none that matches.

        The file is used only when its sidecar records this gallery exactly (code and embedding
        fingerprints, generation, item count and ids, dim), these options' ``m`` and
        ``ef_construction``, and the file's own size and sha256. Anything else (no file, a
        changed gallery, an unreadable or corrupt file, an hnswlib error) rebuilds it from
        ``gallery.ids()`` and ``gallery.embeddings(ids)``; the new index and sidecar are written
        atomically (temporary file, fsync, rename; index first, sidecar last), so a crash leaves
        at worst a sidecar that does not match, and the next call rebuilds.

        Args:
          gallery: an open gallery whose items all store a float embedding.
          options: build and search settings (defaults: ``FloatIndexOptions()``).
          path: the index file; default ``<gallery file>.hnsw`` beside the gallery. The sidecar
            is ``<path>.json``. Ignored for an in-memory gallery, whose index is never written.
            The files are a cache derived from the gallery, so they are written beside a gallery
            opened read-only too; where they cannot be written (read-only storage) the index
            stays in memory and :attr:`persisted` is False.

        Returns:
          The index; see :attr:`persisted`, :attr:`built` and :attr:`build_reason`.

        Raises:
          BackendUnavailableError: hnswlib is not installed.
          InvalidInputError: ``options`` is not a FloatIndexOptions.
          MissingEmbeddingsError: some items have no stored embedding (the gallery was built
            without ``--keep-embeddings``).
          GalleryError: the gallery is closed or cannot be read.
          GalleryCorruptError: a stored embedding has the wrong size.
        """
        options = FloatIndexOptions() if options is None else options
        if not isinstance(options, FloatIndexOptions):
            raise InvalidInputError(f"options must be a FloatIndexOptions, got {type(options).__name__}")
        hnswlib = _hnswlib()
        if gallery.path is None:
            index_path: Optional[Path] = None
        elif path is not None:
            index_path = Path(path)
        else:
            index_path = Path(str(gallery.path) + _INDEX_SUFFIX)

        attempts = 0
        while True:
            state = _gallery_state(gallery)
            if state["count"] and state["dim"] is None:
                raise MissingEmbeddingsError(
                    f"{gallery.path or 'the in-memory gallery'}: none of its {state['count']} items has a stored "
                    "float embedding; rebuild the gallery with --keep-embeddings "
                    "(edge-shitu gallery build ... --keep-embeddings)")
            if index_path is None:
                reason = "the gallery lives in memory"
            elif state["count"] == 0:
                reason = "the gallery is empty"
            else:
                loaded, reason = _load(hnswlib, index_path, state, options)
                if loaded is not None:
                    return cls(_CONSTRUCT_KEY, loaded, state, options, index_path, True, False, None)
            try:
                index = _build(hnswlib, gallery, state, options)
            except UnknownItemError:
                # Items were removed by another process while being read: read the gallery again.
                attempts += 1
                if attempts == _BUILD_ATTEMPTS:
                    raise
                continue
            # An empty gallery has no graph (hnswlib cannot search one): nothing to write.
            persisted = index is not None and index_path is not None and _save(index, index_path, state, options)
            return cls(_CONSTRUCT_KEY, index, state, options, index_path if persisted else None, persisted,
                       True, reason)

    @property
    def size(self) -> int:
        """Number of indexed items."""
        return self._size

    @property
    def dim(self) -> Optional[int]:
        """Dimension of the embeddings, or None for an empty gallery that never stored any."""
        return self._dim

    @property
    def options(self) -> FloatIndexOptions:
        """The options the index was built or loaded with."""
        return self._options

    @property
    def generation(self) -> int:
        """The gallery generation (:attr:`Gallery.generation`) the index was built from."""
        return self._state["generation"]

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def __len__(self) -> int:
        return self._size

    def __enter__(self) -> "FloatIndex":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = str(self.path) if self.path is not None else "memory"
        state = "closed" if self._closed else f"items={self._size}, dim={self._dim}"
        return f"FloatIndex({where!r}, {state}, m={self._options.m}, ef_search={self._options.ef_search})"

    def close(self) -> None:
        """Releases the graph; later searches raise. Calling it twice is harmless."""
        with self._lock:
            self._index = None
            self._closed = True

    def stale(self, gallery: "Gallery") -> Optional[str]:
        """Says why this index no longer answers for ``gallery`` (then call :meth:`for_gallery` again).

        Compares what the index was built from with the gallery's fingerprints, generation,
        item count, ids and embedding dimension. It reads the gallery's summary and ids, not its
        embeddings (a few milliseconds for 100,000 items).

        Args:
          gallery: the gallery the index was made for.

        Returns:
          None when the index matches the gallery, otherwise a sentence saying what differs.

        Raises:
          GalleryError: the gallery is closed or cannot be read.
        """
        return _difference(self._state, _gallery_state(gallery), _STATE_KEYS)

    def search(self, features: np.ndarray, k: int = 5) -> Tuple[np.ndarray, np.ndarray]:
        """Finds the k most similar items of each query by inner product of L2-normalised vectors.

        Queries are normalised here. Each row is ordered by decreasing similarity, ties by
        ascending id; k is capped at :attr:`size` for the search and the missing columns are
        padded, so the arrays are always ``(q, k)`` (an empty index answers with padding only).
        The candidate list is ``max(options.ef_search, k)``.

        Args:
          features: float32 ``(q, d)`` query features, finite, no all-zero row; ``d`` is the
            gallery's embedding dimension (any ``d`` for an empty gallery without one).
          k: neighbours per query, >= 1.

        Returns:
          ``(ids, similarities)``: int64 ``(q, k)`` item ids padded with -1, and float32
          ``(q, k)`` cosine similarities padded with NaN.

        Raises:
          InvalidDtypeError: ``features`` is not a float32 ndarray.
          InvalidInputError: ``features`` is not 2-D, has the wrong width, a non-finite value or
            an all-zero row, or ``k < 1``.
          ClosedError: the index was closed.
          GalleryCorruptError: the graph cannot return k neighbours even searching exhaustively.
        """
        if not isinstance(features, np.ndarray):
            raise InvalidDtypeError(f"features must be a float32 numpy array, got {type(features).__name__}")
        if features.dtype != np.float32:
            raise InvalidDtypeError(f"features must be float32, got {features.dtype}")
        if features.ndim != 2:
            raise InvalidInputError(f"features must be 2-D (q, d), got shape {features.shape}")
        if self._dim is not None and features.shape[1] != self._dim:
            raise InvalidInputError(
                f"features must have {self._dim} columns (the gallery's embedding dim), got shape {features.shape}")
        k = _check_k(k)
        if self._closed:
            raise ClosedError("the float index is closed")
        q = features.shape[0]
        ids = np.full((q, k), -1, dtype=np.int64)
        similarities = np.full((q, k), np.nan, dtype=np.float32)
        found = min(k, self._size)
        if q == 0 or found == 0:
            return ids, similarities
        if not np.isfinite(features).all():
            raise InvalidInputError("features must be finite (no NaN or inf)")
        norms = np.linalg.norm(features, axis=1)
        if (norms == 0).any():
            raise InvalidInputError(f"query rows {np.flatnonzero(norms == 0)[:20].tolist()} are all zero: "
                                    "they have no direction to compare")
        queries = (features / norms[:, None]).astype(np.float32, copy=False)
        labels, distances = self._knn(queries, found)
        # hnswlib's "ip" distance is 1 - dot product.
        sims = (1.0 - distances).astype(np.float32)
        labels = labels.astype(np.int64)
        order = np.lexsort((labels, -sims), axis=-1)
        ids[:, :found] = np.take_along_axis(labels, order, axis=1)
        similarities[:, :found] = np.take_along_axis(sims, order, axis=1)
        return ids, similarities

    def _knn(self, queries: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        with self._lock:
            if self._index is None:
                raise ClosedError("the float index is closed")
            index = self._index
            index.set_ef(max(self._options.ef_search, k))
            try:
                return index.knn_query(queries, k=k, num_threads=self._options.threads)
            except RuntimeError:
                # hnswlib raises when a query reaches fewer than k items; the graph of a complete
                # build reaches all of them with an exhaustive candidate list.
                index.set_ef(max(self._options.ef_search, self._size))
                try:
                    return index.knn_query(queries, k=k, num_threads=self._options.threads)
                except RuntimeError as exc:
                    raise GalleryCorruptError(
                        f"the float index cannot return {k} of its {self._size} items ({exc}); rebuild it") from exc
                finally:
                    index.set_ef(self._options.ef_search)



def _sidecar_path(index_path: Path) -> Path:
    return Path(str(index_path) + _SIDECAR_SUFFIX)


def _record(state: Dict[str, Any], options: FloatIndexOptions) -> Dict[str, Any]:
    return {
        "format": _FORMAT,
        "format_version": FORMAT_VERSION,
        **{k: state[k] for k in _STATE_KEYS},
        "space": _SPACE,
        "normalized": True,
        "m": options.m,
        "ef_construction": options.ef_construction,
    }


def _check_files(index_path: Path, state: Dict[str, Any], options: Optional[FloatIndexOptions]) -> Optional[str]:
    """Why the index file and its sidecar do not answer for ``state`` (and ``options``, when given), or None.

    Reads the sidecar and hashes the index file; needs no hnswlib.
    """
    sidecar = _sidecar_path(index_path)
    if not sidecar.exists():
        return f"no sidecar {sidecar.name}"
    try:
        recorded = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"sidecar {sidecar.name} is unreadable ({exc})"
    if not isinstance(recorded, dict):
        return f"sidecar {sidecar.name} is not a JSON object"
    if recorded.get("format") != _FORMAT or recorded.get("format_version") != FORMAT_VERSION:
        return (f"sidecar {sidecar.name} is format {recorded.get('format')!r} version "
                f"{recorded.get('format_version')!r}, expected {_FORMAT!r} version {FORMAT_VERSION}")
    if options is None:
        why = _difference(recorded, state, _STATE_KEYS)
    else:
        why = _difference(recorded, _record(state, options), _STATE_KEYS + _BUILD_KEYS)
    if why is not None:
        return why
    try:
        size, digest = _file_digest(index_path)
    except OSError as exc:
        return f"index file {index_path.name} is unreadable ({exc})"
    if size != recorded.get("index_bytes") or digest != recorded.get("index_sha256"):
        return f"index file {index_path.name} is not the one its sidecar describes (changed or damaged)"
    return None


def index_status(gallery: "Gallery", path: Optional[Union[str, "os.PathLike[str]"]] = None) -> Optional[Tuple[Path, Optional[str]]]:
    """Whether the float index file of a gallery answers for it as it is now (without hnswlib).

    The file is a cache: one that does not answer is rebuilt the next time it is used, so this
    reports, it does not repair.

    Args:
      gallery: an open gallery.
      path: the index file; default ``<gallery file>.hnsw``.

    Returns:
      None when there is no index file (or the gallery lives in memory), else ``(path, why)`` with
      ``why`` None when the index is up to date, else a sentence saying what differs.

    Raises:
      GalleryError: the gallery is closed or cannot be read.
    """
    if path is None:
        if gallery.path is None:
            return None
        path = str(gallery.path) + _INDEX_SUFFIX
    index_path = Path(path)
    if not index_path.exists() and not _sidecar_path(index_path).exists():
        return None
    return index_path, _check_files(index_path, _gallery_state(gallery), None)


def _load(hnswlib: Any, index_path: Path, state: Dict[str, Any],
          options: FloatIndexOptions) -> Tuple[Optional[Any], Optional[str]]:
    """The saved index when its sidecar matches ``state`` and ``options``, else (None, why not)."""
    why = _check_files(index_path, state, options)
    if why is not None:
        return None, why
    index = hnswlib.Index(space=_SPACE, dim=int(state["dim"]))
    try:
        index.load_index(str(index_path), max_elements=int(state["count"]))
    except (RuntimeError, OSError, ValueError, MemoryError) as exc:
        return None, f"hnswlib cannot load {index_path.name} ({exc})"
    if (index.element_count, index.M, index.ef_construction) != (state["count"], options.m, options.ef_construction):
        return None, f"{index_path.name} holds {index.element_count} items built with M={index.M}, " \
                     f"ef_construction={index.ef_construction}, unlike its sidecar"
    index.set_ef(options.ef_search)
    index.set_num_threads(options.threads)
    return index, None


def _build(hnswlib: Any, gallery: "Gallery", state: Dict[str, Any], options: FloatIndexOptions) -> Optional[Any]:
    """A new graph of the gallery's embeddings, or None for an empty gallery."""
    ids = state["_ids"]
    if ids.shape[0] == 0:
        return None
    index = hnswlib.Index(space=_SPACE, dim=int(state["dim"]))
    index.init_index(max_elements=ids.shape[0], M=options.m, ef_construction=options.ef_construction)
    index.set_num_threads(options.threads)
    for start in range(0, ids.shape[0], _CHUNK):
        chunk = ids[start:start + _CHUNK]
        try:
            emb = gallery.embeddings(chunk)
        except (UnknownItemError, GalleryCorruptError):
            raise
        except GalleryError as exc:
            if gallery.closed:
                raise
            # The gallery's only other refusal of an open gallery's known ids: items without an embedding.
            raise MissingEmbeddingsError(
                f"{exc}; a float index needs the embedding of every item: rebuild the gallery with "
                "--keep-embeddings (edge-shitu gallery build ... --keep-embeddings)") from exc
        index.add_items(_normalized(emb), chunk.astype(np.uint64), num_threads=options.threads)
    index.set_ef(options.ef_search)
    return index


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save(index: Any, index_path: Path, state: Dict[str, Any], options: FloatIndexOptions) -> bool:
    """Writes the index then its sidecar, each atomically; False when the location is not writable."""
    folder = index_path.parent
    token = uuid.uuid4().hex
    tmp_index = folder / f".{index_path.name}.{token}.tmp"
    sidecar = _sidecar_path(index_path)
    tmp_sidecar = folder / f".{sidecar.name}.{token}.tmp"
    try:
        # Created here first because hnswlib's save_index does not report a file it could not open.
        with open(tmp_index, "xb"):
            pass
        index.save_index(str(tmp_index))
        _fsync_file(tmp_index)
        size, digest = _file_digest(tmp_index)
        if size != index.index_file_size():
            raise OSError(f"hnswlib wrote {size} bytes of {index.index_file_size()} to {tmp_index}")
        record = {**_record(state, options), "index_bytes": size, "index_sha256": digest}
        with open(tmp_sidecar, "x", encoding="utf-8") as fh:
            json.dump(record, fh, indent=2, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        # Index first: between the two renames the old sidecar records the old file's sha256, so the
        # pair does not match and the next for_gallery rebuilds; it is never used half-updated.
        os.replace(tmp_index, index_path)
        fsync_dir(folder)
        os.replace(tmp_sidecar, sidecar)
        fsync_dir(folder)
        return True
    except (OSError, RuntimeError):
        return False
    finally:
        for tmp in (tmp_index, tmp_sidecar):
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
