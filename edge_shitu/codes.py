"""Binary codes: sign binarisation, MSB-first packing and their text form.

A ``d``-dimensional float feature becomes ``d // 8`` bytes: bit ``j`` is ``feature[j] > 0`` and the
bits are packed most-significant-bit first (``np.packbits(..., bitorder="big")``), the layout of
the PaddleClas reference (``deploy/python/postprocess.py::Binarize``), so galleries built by either
side interoperate. A 512-d PP-ShiTu feature becomes ``uint8[64]``. Validating codes and counting
their Hamming distances is :mod:`edge_shitu.search`'s.
"""

from __future__ import annotations

import re
from typing import List, Sequence

import numpy as np

from edge_shitu.errors import InvalidDtypeError, InvalidInputError
from edge_shitu.search import check_codes

__all__ = [
    "binarize",
    "l2_normalize",
    "codes_to_hex",
    "hex_to_codes",
]

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
    # np.linalg.norm(arr, axis=1, keepdims=True) computes exactly this, through more temporaries.
    norms = np.sqrt(np.add.reduce(arr * arr, axis=1, keepdims=True))
    return (arr / np.maximum(norms, np.float32(eps))).astype(np.float32, copy=False)


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
    width = codes.shape[-1] if isinstance(codes, np.ndarray) and codes.ndim in (1, 2) else None
    arr = check_codes(codes, width)
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
