"""Binary codes: sign binarisation, MSB-first packing, Hamming distances and top-k selection.

A ``d``-dimensional float feature becomes ``d // 8`` bytes: bit ``j`` is ``feature[j] > 0`` and the
bits are packed most-significant-bit first (``np.packbits(..., bitorder="big")``), the layout of
the PaddleClas reference (``deploy/python/postprocess.py::Binarize``), so galleries built by either
side interoperate. A 512-d PP-ShiTu feature becomes ``uint8[64]``.
"""

from __future__ import annotations

import re
from typing import List, Optional, Sequence

import numpy as np

from edge_shitu.errors import InvalidDtypeError, InvalidInputError
from edge_shitu.types import SearchResult

__all__ = [
    "binarize",
    "l2_normalize",
    "check_codes",
    "hamming_distances",
    "top_k",
    "codes_to_hex",
    "hex_to_codes",
]

# numpy >= 2 has a vectorised popcount; older numpy uses the 256-entry table below.
# Module-level so that tests can force the fallback path.
_HAVE_BITWISE_COUNT = hasattr(np, "bitwise_count")

_POPCOUNT_TABLE = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)

# Elements of one (query rows x gallery columns) work block: a 64k-element uint64 block is
# 512 KiB, which keeps the temporaries in cache (measured 2x faster than whole-matrix temporaries).
_BLOCK_ELEMENTS = 1 << 16
_MIN_BLOCK_COLUMNS = 4096

_HEX_RE = re.compile(r"[0-9a-fA-F]*")


def _as_float_matrix(x: object, name: str, *, allow_inf: bool) -> np.ndarray:
    arr = np.asarray(x)
    if not np.issubdtype(arr.dtype, np.floating):
        raise InvalidDtypeError(f"{name} must be a floating-point array, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise InvalidInputError(f"{name} must be 2-D (n, d), got shape {arr.shape}")
    bad_mask = np.isnan(arr) if allow_inf else ~np.isfinite(arr)
    if bad_mask.any():
        rows = np.unique(np.nonzero(bad_mask)[0])
        what = "NaN" if allow_inf else "NaN or infinity"
        raise InvalidInputError(f"{name} contains {what} in rows {rows[:10].tolist()}")
    return arr


def binarize(features: np.ndarray) -> np.ndarray:
    """Turns float features into packed binary codes (sign, then MSB-first packing).

    Bit ``j`` of a code is 1 when ``features[:, j] > 0`` and 0 otherwise, so an exact zero gives 0,
    as the reference's ``((sign(x) + 1) / 2).astype(uint8)`` does. L2 normalisation does not
    change signs, so it is not needed before binarising.

    Args:
      features: floating-point array ``(n, d)``; ``d`` a positive multiple of 8. ``+-inf`` are
        allowed (they have a sign), NaN is not.

    Returns:
      uint8 array ``(n, d // 8)``, C-contiguous.

    Raises:
      InvalidDtypeError: ``features`` is not a floating-point array.
      InvalidInputError: ``features`` is not 2-D, ``d`` is not a positive multiple of 8, or it
        contains NaN.
    """
    arr = _as_float_matrix(features, "features", allow_inf=True)
    d = arr.shape[1]
    if d == 0 or d % 8:
        raise InvalidInputError(f"features must have a positive multiple of 8 columns, got {d}")
    return np.ascontiguousarray(np.packbits(arr > 0, axis=1, bitorder="big"))


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Scales each row to unit L2 norm.

    Unlike the reference (no epsilon), a zero row stays zero instead of becoming NaN.

    Args:
      x: floating-point array ``(n, d)`` of finite values.
      eps: lower bound of the norm a row is divided by; must be > 0.

    Returns:
      float32 array ``(n, d)``.

    Raises:
      InvalidDtypeError: ``x`` is not a floating-point array.
      InvalidInputError: ``x`` is not 2-D or has NaN or infinite values, or ``eps`` is not > 0.
    """
    if not eps > 0:
        raise InvalidInputError(f"eps must be > 0, got {eps!r}")
    arr = _as_float_matrix(x, "x", allow_inf=False).astype(np.float32, copy=False)
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    return (arr / np.maximum(norms, np.float32(eps))).astype(np.float32, copy=False)


def check_codes(codes: object, nbytes: int, *, name: str = "codes") -> np.ndarray:
    """Validates a batch of packed codes without ever casting them.

    Args:
      codes: uint8 ndarray ``(n, nbytes)``, or one code ``(nbytes,)``.
      nbytes: expected bytes per code (bits / 8).
      name: what to call the argument in error messages.

    Returns:
      C-contiguous uint8 array ``(n, nbytes)`` (the input itself when it already is one).

    Raises:
      InvalidDtypeError: ``codes`` is not a numpy array of dtype uint8.
      InvalidInputError: ``codes`` does not have shape ``(n, nbytes)`` or ``(nbytes,)``.
    """
    if not isinstance(codes, np.ndarray):
        raise InvalidDtypeError(
            f"{name} must be a numpy uint8 array of shape (n, {nbytes}), got {type(codes).__name__}"
        )
    if codes.dtype != np.uint8:
        raise InvalidDtypeError(
            f"{name} must have dtype uint8 (packed bits, {nbytes} bytes per code), got {codes.dtype}; "
            "binary codes are never cast: use edge_shitu.codes.binarize on float features"
        )
    if codes.ndim == 1 and codes.shape[0] == nbytes:
        codes = codes.reshape(1, nbytes)
    if codes.ndim != 2 or codes.shape[1] != nbytes:
        raise InvalidInputError(
            f"{name} must have shape (n, {nbytes}) ({nbytes * 8}-bit codes), got {codes.shape}"
        )
    return np.ascontiguousarray(codes)


def hamming_distances(queries: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Exhaustive Hamming distances between two sets of packed codes.

    Args:
      queries: uint8 ``(n, B)`` (or one code ``(B,)``).
      codes: uint8 ``(m, B)``.

    Returns:
      int32 ``(n, m)``: number of differing bits of every (query, code) pair.

    Raises:
      InvalidDtypeError: an argument is not a uint8 ndarray.
      InvalidInputError: ``codes`` is not 2-D, or the byte widths differ.
    """
    if not isinstance(codes, np.ndarray) or codes.dtype != np.uint8:
        got = codes.dtype if isinstance(codes, np.ndarray) else type(codes).__name__
        raise InvalidDtypeError(f"codes must be a numpy uint8 array, got {got}")
    if codes.ndim != 2:
        raise InvalidInputError(f"codes must be 2-D (m, bytes), got shape {codes.shape}")
    nbytes = codes.shape[1]
    q = check_codes(queries, nbytes, name="queries")
    c = np.ascontiguousarray(codes)
    n, m = q.shape[0], c.shape[0]
    out = np.zeros((n, m), dtype=np.int32)
    if n == 0 or m == 0 or nbytes == 0:
        return out
    if _HAVE_BITWISE_COUNT:
        if nbytes % 8 == 0:
            # popcount is independent of byte order, so native-endian uint64 views are fine.
            q, c = q.view(np.uint64), c.view(np.uint64)
        _accumulate(q, c, out, lambda x, y: np.bitwise_count(x, out=y))
    else:
        _accumulate(q, c, out, lambda x, y: np.take(_POPCOUNT_TABLE, x, out=y))
    return out


def _accumulate(q: np.ndarray, c: np.ndarray, out: np.ndarray, popcount) -> None:
    """Adds popcount(q[i, w] ^ c[j, w]) over words w into out[i, j], block by block."""
    n, words = q.shape
    m = c.shape[0]
    cols = min(m, max(_MIN_BLOCK_COLUMNS, _BLOCK_ELEMENTS // n))
    rows = max(1, _BLOCK_ELEMENTS // cols)
    xor_buf = np.empty((min(rows, n), cols), dtype=q.dtype)
    count_buf = np.empty((min(rows, n), cols), dtype=np.uint8)
    for c0 in range(0, m, cols):
        c1 = min(m, c0 + cols)
        # Word-major block of the gallery: each word becomes one contiguous row.
        block_t = np.ascontiguousarray(c[c0:c1].T)
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            x = xor_buf[: r1 - r0, : c1 - c0]
            y = count_buf[: r1 - r0, : c1 - c0]
            acc = out[r0:r1, c0:c1]
            for w in range(words):
                np.bitwise_xor(q[r0:r1, w, None], block_t[w][None, :], out=x)
                popcount(x, y)
                acc += y


def _check_int_array(x: object, name: str, ndim: int) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise InvalidDtypeError(f"{name} must be an integer array, got dtype {arr.dtype}")
    if arr.ndim != ndim:
        raise InvalidInputError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    return arr


def top_k(
    distances: np.ndarray,
    ids: np.ndarray,
    k: int,
    max_distance: Optional[int] = None,
) -> SearchResult:
    """Selects the k nearest codes of every query, deterministically.

    Rows are sorted by ascending distance, ties by ascending id, so the result does not depend
    on the order the gallery is stored in.

    Args:
      distances: integer ``(n, m)``, non-negative Hamming distances.
      ids: integer ``(m,)``, the id of each column (stable gallery keys, not positions).
      k: matches to return per query, >= 1; capped at the number of codes ``m``, so the result
        has ``c = min(k, m)`` columns.
      max_distance: when given, matches with a larger distance are dropped (padded with -1).

    Returns:
      SearchResult with ids int64 ``(n, c)``, distances int32 ``(n, c)`` and counts int64 ``(n,)``.

    Raises:
      InvalidDtypeError: ``distances`` or ``ids`` is not an integer array.
      InvalidInputError: bad shapes, negative distances, ``k < 1`` or ``max_distance < 0``.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InvalidInputError(f"k must be an integer >= 1, got {k!r}")
    k = int(k)
    if max_distance is not None:
        if isinstance(max_distance, bool) or not isinstance(max_distance, (int, np.integer)):
            raise InvalidInputError(f"max_distance must be an integer or None, got {max_distance!r}")
        if max_distance < 0:
            raise InvalidInputError(f"max_distance must be >= 0, got {max_distance}")
    dist = _check_int_array(distances, "distances", 2)
    id_arr = _check_int_array(ids, "ids", 1)
    n, m = dist.shape
    if id_arr.shape[0] != m:
        raise InvalidInputError(f"ids must have one entry per column of distances ({m}), got {id_arr.shape[0]}")
    k = min(k, m)
    out_ids = np.full((n, k), -1, dtype=np.int64)
    out_dist = np.full((n, k), -1, dtype=np.int32)
    counts = np.zeros(n, dtype=np.int64)
    if n == 0 or m == 0:
        return SearchResult(ids=out_ids, distances=out_dist, counts=counts)
    dist = dist.astype(np.int64, copy=False)
    if dist.min() < 0:
        raise InvalidInputError("distances must be >= 0")
    id_arr = id_arr.astype(np.int64, copy=False)
    kk = min(k, m)

    if m > 1 and np.all(id_arr[1:] > id_arr[:-1]):
        rank = np.arange(m, dtype=np.int64)
    else:
        rank = np.empty(m, dtype=np.int64)
        rank[np.argsort(id_arr, kind="stable")] = np.arange(m, dtype=np.int64)

    # One unique int64 key per column, ordered by (distance, id): a partition on it is exact
    # even when many columns tie at the k-th distance.
    if int(dist.max()) < (np.iinfo(np.int64).max - m) // m:
        keys = dist * m + rank
        if kk < m:
            cand = np.argpartition(keys, kk - 1, axis=1)[:, :kk]
        else:
            cand = np.broadcast_to(np.arange(m), (n, m))
        cand_keys = np.take_along_axis(keys, cand, axis=1)
        order = np.take_along_axis(cand, np.argsort(cand_keys, axis=1, kind="stable"), axis=1)
    else:
        # Distances too large for the combined key (never the case for real codes).
        order = np.lexsort((np.broadcast_to(rank, (n, m)), dist), axis=1)[:, :kk]

    sel_dist = np.take_along_axis(dist, order, axis=1)
    sel_ids = id_arr[order]
    keep = np.ones_like(sel_dist, dtype=bool) if max_distance is None else sel_dist <= max_distance
    out_ids[:, :kk] = np.where(keep, sel_ids, -1)
    out_dist[:, :kk] = np.where(keep, sel_dist, -1)
    counts[:] = keep.sum(axis=1)
    return SearchResult(ids=out_ids, distances=out_dist, counts=counts)


def codes_to_hex(codes: np.ndarray) -> List[str]:
    """Writes codes as lowercase hexadecimal strings (two characters per byte, MSB-first).

    Args:
      codes: uint8 ``(n, B)`` or one code ``(B,)``.

    Returns:
      ``n`` strings of ``2 * B`` lowercase hex characters (128 for a 512-bit code).

    Raises:
      InvalidDtypeError: ``codes`` is not a uint8 ndarray.
      InvalidInputError: ``codes`` is not 1-D or 2-D.
    """
    if not isinstance(codes, np.ndarray) or codes.dtype != np.uint8:
        got = codes.dtype if isinstance(codes, np.ndarray) else type(codes).__name__
        raise InvalidDtypeError(f"codes must be a numpy uint8 array, got {got}")
    if codes.ndim not in (1, 2):
        raise InvalidInputError(f"codes must be (n, bytes) or (bytes,), got shape {codes.shape}")
    arr = check_codes(codes, codes.shape[-1])
    return [row.tobytes().hex() for row in arr]


def hex_to_codes(strings: Sequence[str], nbytes: int) -> np.ndarray:
    """Parses hexadecimal code strings (as written by :func:`codes_to_hex`).

    Args:
      strings: sequence of strings of exactly ``2 * nbytes`` hex digits (either case).
      nbytes: bytes per code (64 for 512 bits), >= 1.

    Returns:
      uint8 ``(len(strings), nbytes)``.

    Raises:
      InvalidInputError: ``strings`` is a single string rather than a sequence, or an entry is not
        a string of ``2 * nbytes`` hex digits (the message gives its index), or ``nbytes < 1``.
    """
    if isinstance(nbytes, bool) or not isinstance(nbytes, (int, np.integer)) or nbytes < 1:
        raise InvalidInputError(f"nbytes must be an integer >= 1, got {nbytes!r}")
    if isinstance(strings, (str, bytes)):
        raise InvalidInputError("strings must be a sequence of hex strings, not a single string")
    out = np.zeros((len(strings), nbytes), dtype=np.uint8)
    for i, s in enumerate(strings):
        if not isinstance(s, str):
            raise InvalidInputError(f"code {i}: expected a hex string, got {type(s).__name__}")
        if len(s) != 2 * nbytes or not _HEX_RE.fullmatch(s):
            raise InvalidInputError(
                f"code {i}: expected {2 * nbytes} hex digits ({nbytes * 8} bits), got {s[:20]!r}"
                f"{'...' if len(s) > 20 else ''} ({len(s)} characters)"
            )
        out[i] = np.frombuffer(bytes.fromhex(s), dtype=np.uint8)
    return out
