"""Compact float embeddings: int8 (per-item scale) or fp16 copies of the features, for re-ranking.

A Hamming search over binary codes gives a shortlist; re-ranking that shortlist by the inner product
of the query's float feature with each item's *compact* stored feature recovers most of what the
codes lose, at ``d + 4`` bytes per item (int8) or ``2 d`` (fp16) instead of ``4 d``.

Formats (:data:`COMPACT_FORMATS`); features are L2-normalised before they are compressed:

- ``"int8"``: per item ``scale = max|x| / 127`` (float32) and ``q = round(x / scale)`` in
  [-127, 127], so ``|x - q * scale| <= scale / 2``. A zero feature has scale 0 and q 0.
- ``"fp16"``: ``x`` rounded to float16 (the scale is 1).

One item's blob (:func:`to_blob`, :func:`from_blob`) is little-endian: int8 is the float32 scale
followed by ``d`` int8 values (``d + 4`` bytes); fp16 is ``d`` float16 values (``2 d`` bytes).

Inner products are accumulated in float64 and rounded to float32 once, so
:func:`inner_products` and :func:`rerank_shortlist` agree to float32 rounding, and two items with
the same stored bytes get bit-identical similarities (a tie stays a tie).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

from edge_shitu.codes import l2_normalize
from edge_shitu.errors import GalleryCorruptError, InvalidDtypeError, InvalidInputError

__all__ = [
    "COMPACT_FORMATS",
    "CompactVectors",
    "bytes_per_item",
    "compress",
    "from_blob",
    "from_blobs",
    "inner_products",
    "rerank_shortlist",
    "to_blob",
    "unit_queries",
]

COMPACT_FORMATS = ("int8", "fp16")
"""Names of the compact formats."""

_VALUE_DTYPES = {"int8": np.dtype(np.int8), "fp16": np.dtype("<f2")}

# Elements of the float64 temporaries of one block of work (8 MB each).
_BLOCK_ELEMENTS = 1 << 20


def _check_format(fmt: object) -> str:
    if not isinstance(fmt, str) or fmt not in COMPACT_FORMATS:
        raise InvalidInputError(f"compact format must be one of {', '.join(COMPACT_FORMATS)}, got {fmt!r}")
    return fmt


def _check_dim(dim: object) -> int:
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise InvalidInputError(f"dim must be an integer >= 1, got {dim!r}")
    return int(dim)


def bytes_per_item(fmt: str, dim: int) -> int:
    """Stored bytes of one item: ``dim + 4`` (int8: values and a float32 scale) or ``2 * dim`` (fp16).

    Raises:
      InvalidInputError: unknown ``fmt`` or ``dim`` < 1.
    """
    fmt, dim = _check_format(fmt), _check_dim(dim)
    return dim + 4 if fmt == "int8" else 2 * dim


@dataclass(frozen=True, eq=False)
class CompactVectors:
    """Compact features of ``n`` items (read-only arrays).

    Attributes:
      fmt: one of :data:`COMPACT_FORMATS`.
      values: int8 ``(n, d)`` (fmt "int8", in [-127, 127]) or float16 ``(n, d)`` (fmt "fp16", finite).
      scales: float32 ``(n,)``, finite and >= 0: the feature is ``values * scales[:, None]`` (ones for fp16).

    Raises:
      InvalidInputError: unknown ``fmt``, shapes that do not fit, or values/scales out of range.
      InvalidDtypeError: ``values`` or ``scales`` have another dtype than the format's.
    """

    fmt: str
    values: np.ndarray
    scales: np.ndarray

    def __post_init__(self) -> None:
        fmt = _check_format(self.fmt)
        values, scales = self.values, self.scales
        want = _VALUE_DTYPES[fmt]
        if not isinstance(values, np.ndarray) or values.dtype != want:
            got = values.dtype if isinstance(values, np.ndarray) else type(values).__name__
            raise InvalidDtypeError(f"{fmt} values must be {want.name} (n, d), got {got}")
        if values.ndim != 2 or values.shape[1] < 1:
            raise InvalidInputError(f"{fmt} values must be (n, d) with d >= 1, got shape {values.shape}")
        if not isinstance(scales, np.ndarray) or scales.dtype != np.float32:
            got = scales.dtype if isinstance(scales, np.ndarray) else type(scales).__name__
            raise InvalidDtypeError(f"scales must be float32 (n,), got {got}")
        if scales.shape != values.shape[:1]:
            raise InvalidInputError(f"scales must be ({values.shape[0]},), got shape {scales.shape}")
        problem = _range_problem(fmt, values, scales)
        if problem:
            raise InvalidInputError(problem)
        for name, arr in (("values", values), ("scales", scales)):
            arr = np.ascontiguousarray(arr)
            if arr.flags.writeable:
                arr = arr.copy()  # the caller's array stays theirs; ours is read-only
                arr.flags.writeable = False
            object.__setattr__(self, name, arr)

    def __len__(self) -> int:
        return int(self.values.shape[0])

    @property
    def dim(self) -> int:
        """Feature dimension ``d``."""
        return int(self.values.shape[1])

    @property
    def bytes_per_item(self) -> int:
        """Stored bytes of one item (see :func:`bytes_per_item`)."""
        return bytes_per_item(self.fmt, self.dim)

    def dequantize(self) -> np.ndarray:
        """The approximate features: float32 ``(n, d)`` (``values * scales[:, None]``)."""
        return (self.values.astype(np.float32) * self.scales[:, None]).astype(np.float32, copy=False)

    def take(self, index: np.ndarray) -> "CompactVectors":
        """The items at ``index`` (int array of positions), in that order.

        Raises:
          IndexError: a position is out of range.
        """
        return CompactVectors(self.fmt, self.values[index], self.scales[index])


def _range_problem(fmt: str, values: np.ndarray, scales: np.ndarray) -> Optional[str]:
    """What is wrong with values/scales of the right dtypes and shapes, or None."""
    bad_scale = ~np.isfinite(scales) | (scales < 0)
    if bad_scale.any():
        rows = np.flatnonzero(bad_scale)[:10].tolist()
        return f"scales must be finite and >= 0, got {scales[bad_scale][:3].tolist()} at rows {rows}"
    if fmt == "int8":
        bad = (values == -128).any(axis=1)
        what = "int8 values must be in [-127, 127], got -128"
    else:
        bad = ~np.isfinite(values).all(axis=1)
        what = "fp16 values must be finite, got NaN or infinity"
    if fmt == "fp16" and (scales != 1).any():
        return f"fp16 scales must all be 1, got {scales[scales != 1][:3].tolist()}"
    if bad.any():
        return f"{what} in rows {np.flatnonzero(bad)[:10].tolist()}"
    return None


def compress(features: np.ndarray, fmt: str) -> CompactVectors:
    """L2-normalise features and store them in a compact format.

    Args:
      features: floating-point ``(n, d)``, finite; each row is scaled to unit L2 norm first (a zero
        row stays zero).
      fmt: ``"int8"`` (per-item scale ``max|x| / 127``, ``q = round(x / scale)``) or ``"fp16"``.

    Returns:
      The compact vectors; ``len == n`` (n may be 0).

    Raises:
      InvalidDtypeError: ``features`` is not a floating-point array.
      InvalidInputError: ``features`` is not 2-D with d >= 1, holds NaN or infinity, or ``fmt`` is unknown.
    """
    fmt = _check_format(fmt)
    x = l2_normalize(features)
    if x.shape[1] < 1:
        raise InvalidInputError(f"features must be (n, d) with d >= 1, got shape {x.shape}")
    if fmt == "fp16":
        return CompactVectors(fmt, x.astype("<f2"), np.ones(x.shape[0], np.float32))
    scales = (np.abs(x).max(axis=1) / np.float32(127)).astype(np.float32) if x.size else np.zeros(x.shape[0],
                                                                                                   np.float32)
    safe = np.where(scales > 0, scales, np.float32(1))
    values = np.clip(np.rint(x / safe[:, None]), -127, 127).astype(np.int8)
    return CompactVectors(fmt, values, scales)


def _as_query(query: object, dim: int, name: str) -> np.ndarray:
    arr = np.asarray(query)
    if not np.issubdtype(arr.dtype, np.floating):
        raise InvalidDtypeError(f"{name} must be a floating-point array, got dtype {arr.dtype}")
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise InvalidInputError(f"{name} must be (q, {dim}), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise InvalidInputError(f"{name} holds NaN or infinity")
    return arr


def inner_products(query: np.ndarray, vectors: CompactVectors) -> np.ndarray:
    """Inner products of float queries with every compact item.

    The query is used as given (not normalised: the order of the items for one query does not depend
    on its norm). Accumulated in float64, rounded to float32 once.

    Args:
      query: floating-point ``(d,)`` or ``(q, d)``, finite.
      vectors: ``n`` compact items of dimension ``d``.

    Returns:
      float32 ``(n,)`` for one query, ``(q, n)`` for a batch.

    Raises:
      InvalidDtypeError: ``query`` is not a floating-point array.
      InvalidInputError: ``query`` has another dimension than ``vectors`` or is not finite.
    """
    if not isinstance(vectors, CompactVectors):
        raise InvalidInputError(f"vectors must be CompactVectors, got {type(vectors).__name__}")
    single = np.ndim(query) == 1
    q = _as_query(np.asarray(query)[None] if single else query, vectors.dim, "query").astype(np.float64)
    n = len(vectors)
    out = np.empty((q.shape[0], n), np.float32)
    step = max(1, _BLOCK_ELEMENTS // max(vectors.dim, 1))
    for s in range(0, n, step):
        block = vectors.values[s:s + step].astype(np.float64)
        out[:, s:s + step] = ((q @ block.T) * vectors.scales[s:s + step].astype(np.float64)).astype(np.float32)
    return out[0] if single else out


def to_blob(vectors: CompactVectors, row: int = 0) -> bytes:
    """One item's bytes (little-endian; int8: float32 scale then ``d`` int8; fp16: ``d`` float16).

    Raises:
      InvalidInputError: ``row`` is not a position of ``vectors``.
    """
    if isinstance(row, bool) or not isinstance(row, (int, np.integer)) or not 0 <= row < len(vectors):
        raise InvalidInputError(f"row must be an integer in [0, {len(vectors)}), got {row!r}")
    values = vectors.values[row].tobytes()
    if vectors.fmt == "fp16":
        return values
    return vectors.scales[row:row + 1].astype("<f4").tobytes() + values


def from_blobs(blobs: Sequence[bytes], *, fmt: str, dim: int, where: str = "compact embedding") -> CompactVectors:
    """Items from their blobs (as written by :func:`to_blob`), checked strictly.

    Args:
      blobs: one ``bytes`` per item (memoryview and bytearray are accepted).
      fmt: the format the blobs were written in.
      dim: the feature dimension the blobs must have.
      where: what to call the data in error messages (e.g. the gallery file).

    Returns:
      ``len(blobs)`` compact items.

    Raises:
      InvalidInputError: unknown ``fmt`` or ``dim`` < 1.
      GalleryCorruptError: a blob is not bytes, has another length than :func:`bytes_per_item`, a
        non-finite or negative scale, an int8 value of -128, or non-finite fp16 values.
    """
    fmt, dim = _check_format(fmt), _check_dim(dim)
    size = bytes_per_item(fmt, dim)
    raw = bytearray()
    for i, blob in enumerate(blobs):
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            raise GalleryCorruptError(f"{where}: item {i}: expected a {fmt} blob of {size} bytes, "
                                      f"got {type(blob).__name__}")
        if len(blob) != size:
            raise GalleryCorruptError(f"{where}: item {i}: a {fmt} blob of d = {dim} must be {size} bytes, "
                                      f"got {len(blob)}")
        raw += blob
    n = len(raw) // size
    table = np.frombuffer(bytes(raw), np.uint8).reshape(n, size)
    if fmt == "fp16":
        values = table.view("<f2").reshape(n, dim)
        scales = np.ones(n, np.float32)
    else:
        scales = np.ascontiguousarray(table[:, :4]).view("<f4").reshape(n).astype(np.float32)
        values = np.ascontiguousarray(table[:, 4:]).view(np.int8)
    problem = _range_problem(fmt, values, scales)
    if problem:
        raise GalleryCorruptError(f"{where}: {problem}")
    return CompactVectors(fmt, values, scales)


def from_blob(blob: bytes, *, fmt: str, dim: int, where: str = "compact embedding") -> CompactVectors:
    """One item from its blob (see :func:`from_blobs`); ``len == 1``.

    Raises:
      InvalidInputError: unknown ``fmt`` or ``dim`` < 1.
      GalleryCorruptError: the blob's length or contents are not a valid item.
    """
    return from_blobs([blob], fmt=fmt, dim=dim, where=where)


def unit_queries(features: np.ndarray) -> np.ndarray:
    """Query features as the re-ranking uses them: each row divided by its L2 norm (a zero row stays zero).

    Args:
      features: floating-point ``(q, d)``.

    Returns:
      float32 ``(q, d)``.
    """
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return (features / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def rerank_shortlist(shortlist: np.ndarray, query_features: np.ndarray, vectors: CompactVectors,
                     k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Re-rank each query's shortlist by inner product with the compact items.

    Each row's candidates are ordered by descending inner product of the query's float feature with
    the candidate's compact vector; equal similarities keep the shortlist's order (its Hamming rank):
    the sort is stable. The first ``k`` are returned.

    Args:
      shortlist: int64 ``(q, N)`` positions into ``vectors``, best first; ``-1`` = no candidate
        (anywhere in a row; skipped). A position appears at most once per row. ``N`` may be 0.
      query_features: floating-point ``(q, d)``, finite; used as given (see :func:`inner_products`).
      vectors: the compact items.
      k: results per query, >= 1; ``k > N`` pads.

    Returns:
      ``(positions, similarities)``: int64 ``(q, k)`` positions (``-1`` padded) and float32 ``(q, k)``
      inner products (NaN padded).

    Raises:
      InvalidDtypeError: ``shortlist`` is not int64, or ``query_features`` not floating-point.
      InvalidInputError: shapes that do not fit, positions outside ``[-1, len(vectors))``, a position
        repeated in a row, non-finite queries, or ``k`` < 1.
    """
    if not isinstance(vectors, CompactVectors):
        raise InvalidInputError(f"vectors must be CompactVectors, got {type(vectors).__name__}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InvalidInputError(f"k must be an integer >= 1, got {k!r}")
    k = int(k)
    if not isinstance(shortlist, np.ndarray) or shortlist.dtype != np.int64:
        got = shortlist.dtype if isinstance(shortlist, np.ndarray) else type(shortlist).__name__
        raise InvalidDtypeError(f"shortlist must be int64 (q, N), got {got}")
    if shortlist.ndim != 2:
        raise InvalidInputError(f"shortlist must be 2-D (q, N), got shape {shortlist.shape}")
    q_rows, width = shortlist.shape
    queries = _as_query(query_features, vectors.dim, "query_features")
    if queries.shape[0] != q_rows:
        raise InvalidInputError(f"query_features has {queries.shape[0]} rows, shortlist has {q_rows}")
    n = len(vectors)
    if shortlist.size and (shortlist.min() < -1 or shortlist.max() >= n):
        raise InvalidInputError(f"shortlist positions must be in [-1, {n}), got values in "
                                f"[{shortlist.min()}, {shortlist.max()}]")
    if width > 1:
        ordered = np.sort(shortlist, axis=1)
        repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
        if repeated.any():
            row = int(np.flatnonzero(repeated.any(axis=1))[0])
            raise InvalidInputError(f"shortlist row {row} repeats a position")
    positions = np.full((q_rows, k), -1, np.int64)
    sims = np.full((q_rows, k), np.nan, np.float32)
    take = min(k, width)
    if q_rows == 0 or take == 0 or n == 0:  # (with no items, every position was -1)
        return positions, sims
    step = max(1, _BLOCK_ELEMENTS // max(width * vectors.dim, 1))
    for s in range(0, q_rows, step):
        cand = shortlist[s:s + step]
        valid = cand >= 0
        safe = np.where(valid, cand, 0)
        # Elementwise products summed along the last axis: the same bytes give the same sum wherever they are.
        prod = vectors.values[safe].astype(np.float64) * queries[s:s + step, None, :].astype(np.float64)
        block = (prod.sum(axis=2) * vectors.scales[safe].astype(np.float64)).astype(np.float32)
        cost = np.where(valid, -block.astype(np.float64), np.inf)
        order = np.argsort(cost, axis=1, kind="stable")[:, :take]
        picked = np.take_along_axis(valid, order, axis=1)
        positions[s:s + step, :take] = np.where(picked, np.take_along_axis(cand, order, axis=1), -1)
        sims[s:s + step, :take] = np.where(picked, np.take_along_axis(block, order, axis=1), np.nan)
    return positions, sims
