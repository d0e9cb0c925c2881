"""Learned hash heads: a linear layer between the L2-normalised feature and its binary code.

A head is ``weight`` float32 ``(bits, d)`` and ``bias`` float32 ``(bits,)``; the code of a feature
row ``x`` is ``np.packbits((x @ weight.T + bias) > 0, axis=1)`` (MSB-first, the layout of
:mod:`edge_shitu.codes`). Plain sign binarisation is the identity head (``weight = I``,
``bias = 0``), which gives bit-for-bit the codes of :func:`edge_shitu.codes.binarize`.

On disk a head is an ``.npz`` archive holding exactly ``weight.npy`` and ``bias.npy`` (numpy's
format, never pickled), read here with every size checked before anything is inflated. In a bundle
the head is the file ``hash.npz``, named in ``manifest.json`` under ``"hash"`` with its sha256, which
is part of the bundle's code fingerprint. Writing heads and putting them into bundles is the
converter's job (``edge-shitu hash install``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from edge_shitu.bundle import MAX_FEATURE_DIM
from edge_shitu.errors import HashHeadError, InvalidDtypeError, InvalidInputError, MissingFileError
from edge_shitu.npz import ArraySpec, read_npz

__all__ = ["HashHead", "HEAD_FILE", "MAX_BITS", "MAX_DIM", "MAX_FILE_BYTES", "encoder_for"]

HEAD_FILE = "hash.npz"
"""Name of the head file inside a bundle directory."""

MAX_BITS = 4096
"""Longest code a head may give: 512 bytes per code, already more than a 128-d float feature."""
MAX_DIM = MAX_FEATURE_DIM
"""Widest feature a head may take: the widest extractor output a bundle allows."""
MAX_FILE_BYTES = 4 * (MAX_BITS * MAX_DIM + MAX_BITS) + (64 << 10)
"""Largest head file read into memory: the largest head's float32 data plus room for headers."""

_SPECS = {
    "weight": ArraySpec(shape=(MAX_BITS, MAX_DIM), kinds="f", itemsize=(4, 4), max_bytes=4 * MAX_BITS * MAX_DIM,
                        dtype="float32"),
    "bias": ArraySpec(shape=(MAX_BITS,), kinds="f", itemsize=(4, 4), max_bytes=4 * MAX_BITS, dtype="float32"),
}
_EXPECTED = "an .npz with exactly 'weight' float32 [bits, d] and 'bias' float32 [bits], bits a positive multiple of 8"

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True, eq=False)
class HashHead:
    """A validated linear hash head. Build it with :meth:`from_arrays`, :meth:`identity` or :meth:`load`.

    Attributes:
      weight: float32 ``(bits, d)``, C-contiguous, read-only.
      bias: float32 ``(bits,)``, read-only.
    """

    weight: np.ndarray
    bias: np.ndarray

    @classmethod
    def from_arrays(cls, weight: np.ndarray, bias: np.ndarray, *, where: str = "hash head") -> "HashHead":
        """Validate and freeze a head given as arrays.

        Args:
          weight: float32 ``(bits, d)``, finite.
          bias: float32 ``(bits,)``, finite.
          where: what to call the head in error messages (a file name, usually).

        Returns:
          The head, holding read-only copies of the arrays.

        Raises:
          HashHeadError: a wrong dtype (only float32 is accepted, never cast), shape, ``bits`` not a
            positive multiple of 8 up to :data:`MAX_BITS`, ``d`` above :data:`MAX_DIM`, or non-finite values.
        """
        for name, arr, ndim in (("weight", weight, 2), ("bias", bias, 1)):
            if not isinstance(arr, np.ndarray):
                raise HashHeadError(f"{where}: {name} must be a numpy array, got {type(arr).__name__}; "
                                    f"expected {_EXPECTED}")
            if arr.dtype != np.float32:
                raise HashHeadError(f"{where}: {name} has dtype {arr.dtype}, expected float32 ({_EXPECTED})")
            if arr.ndim != ndim:
                raise HashHeadError(f"{where}: {name} has shape {arr.shape}, expected {ndim}-D ({_EXPECTED})")
        bits, dim = weight.shape
        if bits == 0 or bits % 8 or bits > MAX_BITS or not 1 <= dim <= MAX_DIM:
            raise HashHeadError(f"{where}: weight has shape {weight.shape}; expected [bits, d] with bits a positive "
                                f"multiple of 8 up to {MAX_BITS} and d from 1 to {MAX_DIM}")
        if bias.shape != (bits,):
            raise HashHeadError(f"{where}: bias has shape {bias.shape}, expected [{bits}] (one per row of weight)")
        for name, arr in (("weight", weight), ("bias", bias)):
            if not np.isfinite(arr).all():
                raise HashHeadError(f"{where}: {name} holds NaN or infinite values; expected finite float32 values")
        w = np.array(weight, dtype=np.float32, order="C", copy=True)
        b = np.array(bias, dtype=np.float32, copy=True)
        w.flags.writeable = False
        b.flags.writeable = False
        return cls(w, b)

    @classmethod
    def identity(cls, dim: int) -> "HashHead":
        """The head of plain sign binarisation: ``weight = I (dim, dim)``, ``bias = 0``.

        Raises:
          HashHeadError: ``dim`` is not a positive multiple of 8 up to :data:`MAX_BITS`.
        """
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or not 0 < dim <= MAX_BITS or dim % 8:
            raise HashHeadError(f"identity head: dim must be a positive multiple of 8 up to {MAX_BITS}, got {dim!r}")
        return cls.from_arrays(np.eye(int(dim), dtype=np.float32), np.zeros(int(dim), dtype=np.float32),
                               where="identity head")

    @classmethod
    def load(cls, path: PathLike) -> "HashHead":
        """Read and validate a head file.

        The archive must hold exactly ``weight.npy`` and ``bias.npy``; their headers (dtype, shape at
        most [:data:`MAX_BITS`, :data:`MAX_DIM`]) and declared sizes are checked before any data is read
        (see :func:`edge_shitu.npz.read_npz`), and nothing is ever unpickled.

        Args:
          path: an ``.npz`` file as written by :meth:`save` (or ``np.savez``).

        Returns:
          The head.

        Raises:
          MissingFileError: ``path`` does not exist.
          HashHeadError: the file is not such an archive; the message names the file and what was
            expected.
        """
        path = Path(path)
        if not path.exists():
            raise MissingFileError(f"{path}: no such hash head file")
        if path.is_dir():
            raise HashHeadError(f"{path}: is a directory; expected {_EXPECTED}")
        return cls._from_source(path, str(path))

    @classmethod
    def from_bytes(cls, data: bytes, *, where: str = "hash head") -> "HashHead":
        """Parse and validate the bytes of a head file (see :meth:`load`).

        Args:
          data: the file's bytes.
          where: what to call the file in error messages.

        Raises:
          HashHeadError: the bytes are not such an archive.
        """
        return cls._from_source(data, where)

    @classmethod
    def _from_source(cls, source: Union[bytes, Path], where: str) -> "HashHead":
        arrays = read_npz(source, _SPECS, where=where, expected=_EXPECTED, what="hash head archive",
                          error=HashHeadError)
        return cls.from_arrays(arrays["weight"], arrays["bias"], where=where)

    @property
    def bits(self) -> int:
        """Code length in bits (rows of ``weight``)."""
        return int(self.weight.shape[0])

    @property
    def dim(self) -> int:
        """Feature dimension the head expects (columns of ``weight``)."""
        return int(self.weight.shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes per packed code."""
        return self.bits // 8

    def project(self, features: np.ndarray) -> np.ndarray:
        """The head's real-valued outputs ``features @ weight.T + bias``, in float32.

        Args:
          features: floating-point ``(n, d)`` without NaN (L2-normalised features, normally).

        Returns:
          float32 ``(n, bits)``.

        Raises:
          InvalidDtypeError: ``features`` is not a floating-point array.
          InvalidInputError: ``features`` is not 2-D or holds NaN.
          HashHeadError: ``features`` has another dimension than the head's ``d``.
        """
        arr = np.asarray(features)
        if not np.issubdtype(arr.dtype, np.floating):
            raise InvalidDtypeError(f"features must be a floating-point array, got dtype {arr.dtype}")
        if arr.ndim != 2:
            raise InvalidInputError(f"features must be 2-D (n, d), got shape {arr.shape}")
        if arr.shape[1] != self.dim:
            raise HashHeadError(
                f"hash head expects {self.dim}-d features (weight [{self.bits}, {self.dim}]), got {arr.shape[1]}-d"
            )
        if np.isnan(arr).any():
            raise InvalidInputError("features contain NaN")
        out = arr.astype(np.float32, copy=False) @ self.weight.T
        out += self.bias
        return out

    def encode(self, features: np.ndarray) -> np.ndarray:
        """Binary codes: bit ``j`` = ``project(features)[:, j] > 0``, packed MSB-first.

        Args:
          features: as for :meth:`project`.

        Returns:
          uint8 ``(n, bits // 8)``, C-contiguous.

        Raises:
          As :meth:`project`.
        """
        return np.ascontiguousarray(np.packbits(self.project(features) > 0, axis=1, bitorder="big"))


def encoder_for(head: Optional[HashHead]) -> Callable[[np.ndarray], np.ndarray]:
    """The function from L2-normalised features to packed codes: the head's, or plain sign.

    Args:
      head: a head, or None for plain sign binarisation (:func:`edge_shitu.codes.binarize`).

    Returns:
      ``encode(features float (n, d)) -> uint8 (n, bits // 8)``.
    """
    if head is None:
        from edge_shitu.codes import binarize

        return binarize
    return head.encode
