"""Exhaustive Hamming search over packed binary codes, with a pure-numpy backend and faiss.

This module is the one place where codes, ``k`` and ``max_distance`` are validated
(:func:`check_codes`) and Hamming distances are counted: :class:`HammingIndex` for top-k searches,
:func:`hamming_distances` for the dense distance matrix that leave-one-out measurements need, both
on the same popcount code.

A :class:`HammingIndex` holds the codes of a gallery, row ``i`` being the ``i``-th item, and finds
the ``k`` nearest rows of each query. Results are the same on every backend, ties included: rows
are ranked by ascending distance, then ascending position. The gallery keeps its rows in ascending
id order, so ties are broken by id there.

Backends (``backend=`` of :meth:`HammingIndex.build`):

``numpy``
    Always available, and what :func:`hamming_distances` uses. The codes are cut into blocks of
    32768 rows, and each block is one contiguous word-major array: ``block[w, i]`` is the ``w``-th 64-bit word of the block's row ``i``. For each
    block and query, the XOR of all words is one ufunc call over the block, the popcount another,
    and the sum over words three more (pairwise uint8 sums, then uint16), all into reused buffers.
    Top-k selection is done per block against the running k-th distance (a block with no closer
    row costs one ``min``), so only rows that can still enter the result are ever sorted. Codes
    whose width is not a multiple of 64 bits are scanned byte by byte, and under numpy < 2 (which
    has no ``bitwise_count``) all codes are, counted with a 256-entry table.
``faiss``
    ``faiss.IndexBinaryFlat`` (faiss-cpu, which has wheels for x86-64 and aarch64). faiss does not
    define the order of equal distances, so the index asks for a few more neighbours than needed
    and, in the rare case that the tie at the k-th distance extends past them, collects the whole
    tie with a range search; both are then ordered by (distance, position). faiss searches on its
    OpenMP threads, whose number is a process-wide setting that this module leaves alone: an
    application that runs model sessions beside the search sets it once (``faiss.omp_set_num_threads``
    or ``OMP_NUM_THREADS``), since idle OpenMP threads spin and take the cores from the sessions.
``auto``
    faiss when it can be imported and passes a self-check of its Hamming kernels (done once per
    process: faiss-cpu's aarch64 wheels 1.15.1 miscount codes that differ in a whole 256-bit block),
    else numpy.

Each backend holds exactly one copy of the codes (64 bytes per 512-bit item), and an index never
changes after it is built: :meth:`HammingIndex.appended` and :meth:`HammingIndex.without` return
new indexes, so a search running on one index is never disturbed by a writer.
"""

from __future__ import annotations

import functools
import importlib
from typing import Iterable, Iterator, Optional, Tuple

import numpy as np

from edge_shitu.errors import BackendUnavailableError, InvalidDtypeError, InvalidInputError

__all__ = [
    "HammingIndex",
    "BACKENDS",
    "available_backends",
    "check_codes",
    "hamming_distances",
    "resolve_hamming_backend",
]

BACKENDS = ("numpy", "faiss")
"""Names of the Hamming search backends, besides ``"auto"``."""

# Rows per block of the numpy scan. Measured over 1M codes on one x86-64 core: 32768 rows (2 MiB of
# XOR buffer) beat 8192 by ~15%: fewer ufunc calls outweigh the L2 misses of the larger buffer.
_BLOCK_ROWS = 32768
# Rows whose k-th distance bounds the first block's candidates: a partition of them is cheap, where
# one of the whole first block cost as much as scanning it.
_SEED_ROWS = 1024
# Extra neighbours asked of faiss so that ties at the k-th distance are almost always complete.
_FAISS_EXTRA = 16

# numpy >= 2 has a vectorised popcount; numpy < 2 (Chaquopy's 1.26 on Android) counts bytes with
# this table. Module-level so that tests can take the fallback path on numpy >= 2.
_HAVE_BITWISE_COUNT = hasattr(np, "bitwise_count")
_POPCOUNT_TABLE = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _faiss():
    try:
        faiss = importlib.import_module("faiss")
    except ImportError as exc:
        raise BackendUnavailableError(
            f"the faiss Hamming backend needs faiss-cpu ({exc}); run: pip install \"edge-shitu[fast]\""
        ) from None
    problem = _faiss_problem(faiss)
    if problem:
        raise BackendUnavailableError(f"the installed faiss-cpu is not used: {problem}; the numpy backend is")
    return faiss


@functools.lru_cache(maxsize=None)
def _faiss_problem(faiss) -> str:
    """Checks once per process that faiss computes Hamming distances right; returns what is wrong, or ``""``.

    faiss-cpu 1.15.1's aarch64 wheels sum the byte popcounts of a 256-bit block into a uint8, so a block
    whose 256 bits all differ counts 0 (see bench/arm/README.md). The check covers every code width
    faiss has a specialised kernel for, with codes that differ in every bit and in no bit.
    """
    for bits in (64, 128, 256, 512):
        nbytes = bits // 8
        codes = np.zeros((2, nbytes), np.uint8)
        codes[1] = 0xFF
        index = faiss.IndexBinaryFlat(bits)
        index.add(codes)
        found = sorted(index.search(np.full((1, nbytes), 0xFF, np.uint8), 2)[0][0].tolist())
        if found != [0, bits]:
            return (f"faiss {getattr(faiss, '__version__', '?')} gives Hamming distances {found} "
                    f"instead of [0, {bits}] for {bits}-bit codes")
    return ""


def available_backends() -> Tuple[str, ...]:
    """The backends that can be used here.

    Returns:
      A subset of :data:`BACKENDS`, ``"numpy"`` always included.
    """
    found = ["numpy"]
    try:
        _faiss()
        found.append("faiss")
    except BackendUnavailableError:
        pass
    return tuple(found)


def resolve_hamming_backend(name: str) -> str:
    """Turns a backend name into the backend that will be used.

    Args:
      name: ``"auto"``, ``"numpy"`` or ``"faiss"``.

    Returns:
      ``"numpy"`` or ``"faiss"``.

    Raises:
      InvalidInputError: ``name`` is not a backend name.
      BackendUnavailableError: ``name`` is ``"faiss"`` and faiss-cpu is not installed or fails its
        self-check.
    """
    if name == "auto":
        return "faiss" if "faiss" in available_backends() else "numpy"
    if name not in BACKENDS:
        raise InvalidInputError(f"unknown Hamming backend {name!r}; expected auto, {', '.join(BACKENDS)}")
    if name == "faiss":
        _faiss()
    return name


def check_codes(codes: object, nbytes: Optional[int], *, name: str = "codes") -> np.ndarray:
    """Validates a batch of packed codes without ever casting them.

    Args:
      codes: uint8 ndarray ``(n, nbytes)``, or one code ``(nbytes,)`` when ``nbytes`` is given.
      nbytes: expected bytes per code (bits / 8), or None for any width of at least one byte
        (then ``codes`` must be 2-D).
      name: what to call the argument in error messages.

    Returns:
      C-contiguous uint8 array ``(n, nbytes)`` (the input itself when it already is one).

    Raises:
      InvalidDtypeError: ``codes`` is not a numpy array of dtype uint8.
      InvalidInputError: ``codes`` does not have shape ``(n, nbytes)`` or ``(nbytes,)``.
    """
    width = "bytes" if nbytes is None else nbytes
    if not isinstance(codes, np.ndarray):
        raise InvalidDtypeError(
            f"{name} must be a numpy uint8 array of shape (n, {width}), got {type(codes).__name__}"
        )
    if codes.dtype != np.uint8:
        per_code = "" if nbytes is None else f", {nbytes} bytes per code"
        raise InvalidDtypeError(
            f"{name} must have dtype uint8 (packed bits{per_code}), got {codes.dtype}; "
            "binary codes are never cast: use edge_shitu.codes.binarize on float features"
        )
    if nbytes is not None and codes.ndim == 1 and codes.shape[0] == nbytes:
        codes = codes.reshape(1, nbytes)
    if nbytes is None:
        if codes.ndim != 2 or codes.shape[1] == 0:
            raise InvalidInputError(f"{name} must have shape (n, bytes) with bytes >= 1, got {codes.shape}")
    elif codes.ndim != 2 or codes.shape[1] != nbytes:
        raise InvalidInputError(
            f"{name} must have shape (n, {nbytes}) ({nbytes * 8}-bit codes), got {codes.shape}"
        )
    return np.ascontiguousarray(codes)


def _check_k(k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InvalidInputError(f"k must be an integer >= 1, got {k!r}")
    return int(k)


def _check_max_distance(value: object) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise InvalidInputError(f"max_distance must be an integer >= 0 or None, got {value!r}")
    return int(value)


def hamming_distances(queries: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """The Hamming distance of every (query, code) pair, with the numpy backend's scan.

    For top-k and thresholded searches use :class:`HammingIndex`, which never holds the whole
    ``(n, m)`` matrix; this is for measurements that need every distance (leave-one-out).

    Args:
      queries: uint8 ``(n, B)``, or one code ``(B,)``.
      codes: uint8 ``(m, B)``, ``B >= 1``.

    Returns:
      int32 ``(n, m)``: the number of differing bits of every pair.

    Raises:
      InvalidDtypeError: an argument is not a uint8 ndarray.
      InvalidInputError: ``codes`` is not 2-D with at least one byte per code, or the widths differ.
    """
    c = check_codes(codes, None, name="codes")
    q = check_codes(queries, c.shape[1], name="queries")
    out = np.zeros((q.shape[0], c.shape[0]), dtype=np.int32)
    if out.size:
        for start, row, dist in _scan(_numpy_layout(c, copy=False), q):
            out[row, start:start + dist.shape[0]] = dist
    return out


def _uses_words(nbytes: int) -> bool:
    """Whether the numpy backend keeps codes of this width as 64-bit word blocks (else as rows of bytes)."""
    return nbytes % 8 == 0 and _HAVE_BITWISE_COUNT


def _numpy_layout(codes: np.ndarray, *, copy: bool) -> object:
    """The numpy backend's storage of C-contiguous uint8 codes: word blocks, or the rows of bytes."""
    if _uses_words(codes.shape[1]):
        return _WordBlocks.from_codes(codes)
    return codes.copy() if copy else codes


def _scan(data: object, q: np.ndarray) -> Iterator[Tuple[int, int, np.ndarray]]:
    """Hamming distances of C-contiguous uint8 queries ``(n, B)`` to the codes of a numpy layout.

    Yields ``(first row, query row, distances)`` block by block, every query for each block; the
    distances (unsigned integers, one per row of the block) live in a buffer reused by the next
    item, so they must be consumed before asking for it.
    """
    if isinstance(data, _WordBlocks):
        rows = min(data.rows, data.size)
        qw = q.view(np.uint64)  # (n, W); popcount ignores byte order
        xor_buf = np.empty((data.words, rows), dtype=np.uint64)
        count_buf = np.empty((data.words, rows), dtype=np.uint8)
        dist_buf = np.empty(rows, dtype=np.uint16 if data.words * 64 < 65536 else np.uint32)
        # Words are summed pairwise in uint8 first (2 x 64 bits <= 128 fits), halving the
        # widening additions; only 8-word codes (512 bits) take that route.
        pairwise = data.words == 8
        for start, block in data.blocks():
            width = block.shape[1]
            x, c, d = xor_buf[:, :width], count_buf[:, :width], dist_buf[:width]
            for j in range(q.shape[0]):
                np.bitwise_xor(block, qw[j][:, None], out=x)
                np.bitwise_count(x, out=c)
                if pairwise:
                    np.add(c[:4], c[4:], out=c[:4])
                    np.add(c[0], c[1], out=d, dtype=d.dtype)
                    np.add(d, c[2], out=d, casting="unsafe")
                    np.add(d, c[3], out=d, casting="unsafe")
                else:
                    np.add.reduce(c, axis=0, dtype=d.dtype, out=d)
                yield start, j, d
    else:
        codes = data  # (m, B) uint8
        m = codes.shape[0]
        rows = min(_BLOCK_ROWS, m)
        for start in range(0, m, rows):
            block = codes[start:min(m, start + rows)]
            for j in range(q.shape[0]):
                x = np.bitwise_xor(block, q[j])
                counts = np.bitwise_count(x) if _HAVE_BITWISE_COUNT else _POPCOUNT_TABLE[x]
                yield start, j, counts.sum(axis=1, dtype=np.int64)


class _Selector:
    """Running top-k of one query over blocks seen in ascending position order.

    The result is kept as one sorted int64 array of keys ``distance << 40 | position``: sorting keys
    orders by distance, then position, and merging a block's few candidates is one concatenate and
    one sort. Positions are below 2**40 and distances below 2**20 for any code that fits in memory.
    """

    __slots__ = ("k", "limit", "keys", "worst")

    def __init__(self, k: int, max_distance: Optional[int]) -> None:
        self.k = k
        self.limit = max_distance
        self.keys = np.empty(0, dtype=np.int64)
        self.worst = -1  # distance of the k-th key once there are k, else -1

    def offer(self, block_dist: np.ndarray, start: int) -> None:
        if self.worst >= 0:
            # A later row equal to the current k-th distance loses the tie (larger position).
            # Most blocks hold no better row: one min() rules them out without building an index list.
            if block_dist.min() >= self.worst:
                return
            keep = np.flatnonzero(block_dist < self.worst)
        elif block_dist.shape[0] > self.k:
            # No row beyond the block's k-th smallest distance can enter; the k-th smallest of a prefix
            # bounds it from above and is far cheaper to find.
            seed = block_dist[: max(self.k, _SEED_ROWS)]
            bound = int(np.partition(seed, self.k - 1)[self.k - 1])
            if self.limit is not None:
                bound = min(bound, self.limit)
            keep = np.flatnonzero(block_dist <= bound)
        elif self.limit is not None:
            keep = np.flatnonzero(block_dist <= self.limit)
        else:
            keep = np.arange(block_dist.shape[0])
        if keep.size == 0:
            return
        # Every path above admits only rows within the limit: the running k-th distance never exceeds it.
        new = block_dist[keep].astype(np.int64)
        new <<= 40
        new |= keep + start
        keys = np.concatenate([self.keys, new])
        if keys.shape[0] > self.k:
            keys = np.partition(keys, self.k - 1)[: self.k]
        keys.sort()
        self.keys = keys
        if keys.shape[0] == self.k:
            self.worst = int(keys[-1] >> 40)

    def result(self) -> Tuple[np.ndarray, np.ndarray]:
        """int64 ``(distances, positions)``, ascending."""
        return self.keys >> 40, self.keys & ((1 << 40) - 1)


class _WordBlocks:
    """Codes as 64-bit words, block by block, for the numpy scan.

    Rows are cut into blocks of ``rows`` (the last one may be shorter). Block ``b`` is a contiguous
    ``(words, r_b)`` uint64 array inside ``flat``: ``block[w, i]`` is word ``w`` of row
    ``b * rows + i``. Blocks follow each other in ``flat``, which holds exactly ``words * size``
    words. A block's XOR then reads one contiguous stream; with one array per word over the whole
    index it read eight, and the XOR pass over 1M codes took 3.7 ms instead of 3.0 ms (one x86-64 core).
    Words are the code's bytes viewed as native uint64: popcounts do not depend on byte order.
    """

    __slots__ = ("flat", "words", "size", "rows")

    def __init__(self, words: int, size: int, rows: int) -> None:
        self.words, self.size, self.rows = words, size, rows
        self.flat = np.empty(words * size, dtype=np.uint64)

    @classmethod
    def from_codes(cls, codes: np.ndarray) -> "_WordBlocks":
        """From C-contiguous uint8 ``(m, 8 * words)`` codes."""
        out = cls(codes.shape[1] // 8, codes.shape[0], _BLOCK_ROWS)
        out.put(codes.view(np.uint64), 0)
        return out

    def block(self, b: int) -> np.ndarray:
        start = b * self.rows
        r = min(self.rows, self.size - start)
        return self.flat[start * self.words:(start + r) * self.words].reshape(self.words, r)

    def blocks(self) -> Iterable[Tuple[int, np.ndarray]]:
        """``(first row, block)`` for every block, in order."""
        for start in range(0, self.size, self.rows):
            yield start, self.block(start // self.rows)

    def put(self, rows: np.ndarray, at: int) -> None:
        """Writes uint64 ``(n, words)`` rows (any strides) as rows ``at ... at + n - 1``."""
        done = 0
        while done < rows.shape[0]:
            b, offset = divmod(at + done, self.rows)
            block = self.block(b)
            count = min(block.shape[1] - offset, rows.shape[0] - done)
            block[:, offset:offset + count] = rows[done:done + count].T
            done += count

    def codes(self) -> np.ndarray:
        """A copy as uint8 ``(size, 8 * words)``."""
        out = np.empty((self.size, self.words), dtype=np.uint64)
        for start, block in self.blocks():
            out[start:start + block.shape[1]] = block.T
        return out.view(np.uint8)

    def take(self, index: np.ndarray) -> "_WordBlocks":
        """A new set whose row ``i`` is row ``index[i]`` of this one (int64 ``(n,)``, in range)."""
        out = _WordBlocks(self.words, index.shape[0], self.rows)
        for start, block in out.blocks():
            b, offset = np.divmod(index[start:start + block.shape[1]], self.rows)
            stride = np.minimum(self.rows, self.size - b * self.rows)  # row count of each source block
            first = b * (self.rows * self.words) + offset
            for w in range(self.words):
                block[w] = self.flat[first + w * stride]
        return out

    def extended(self, rows: np.ndarray) -> "_WordBlocks":
        """A new set with uint64 ``(n, words)`` rows added at the end."""
        out = _WordBlocks(self.words, self.size + rows.shape[0], self.rows)
        whole = self.size - self.size % self.rows  # rows of complete blocks: their words do not move
        out.flat[:whole * self.words] = self.flat[:whole * self.words]
        if whole < self.size:
            out.put(self.block(whole // self.rows).T, whole)
        out.put(rows, self.size)
        return out


class HammingIndex:
    """An immutable set of packed codes searchable by Hamming distance.

    Build one with :meth:`build`; see the module docstring for the backends.
    """

    def __init__(self, _key: object, backend: str, bits: int, size: int, data: object) -> None:
        """Internal: use :meth:`build`."""
        if _key is not _BUILD_KEY:
            raise TypeError("use HammingIndex.build(codes, bits=..., backend=...)")
        self._backend = backend
        self._bits = bits
        self._size = size
        self._data = data

    @classmethod
    def build(cls, codes: np.ndarray, *, bits: int, backend: str = "auto") -> "HammingIndex":
        """Builds an index holding a copy of ``codes``.

        Args:
          codes: uint8 ``(m, bits // 8)``, packed MSB-first; ``m`` may be 0.
          bits: code length in bits, a positive multiple of 8.
          backend: ``"auto"``, ``"numpy"`` or ``"faiss"``.

        Returns:
          The index; row ``i`` is ``codes[i]``.

        Raises:
          InvalidDtypeError: ``codes`` is not a uint8 ndarray.
          InvalidInputError: bad ``bits``, shape or backend name.
          BackendUnavailableError: ``backend="faiss"`` without faiss-cpu.
        """
        if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or bits <= 0 or bits % 8:
            raise InvalidInputError(f"bits must be a positive multiple of 8, got {bits!r}")
        bits = int(bits)
        arr = check_codes(codes, bits // 8, name="codes")
        name = resolve_hamming_backend(backend)
        if name == "faiss":
            faiss = _faiss()
            index = faiss.IndexBinaryFlat(bits)
            if arr.shape[0]:
                index.add(arr)
            data: object = index
        else:
            data = _numpy_layout(arr, copy=True)
        return cls(_BUILD_KEY, name, bits, int(arr.shape[0]), data)

    @classmethod
    def from_chunks(cls, chunks: Iterable[np.ndarray], *, size: int, bits: int,
                    backend: str = "auto") -> "HammingIndex":
        """Builds an index from consecutive blocks of rows without first joining them.

        With the numpy backend, opening a large gallery this way never holds a second full copy of
        the codes; faiss gets them in one ``add`` (a second copy while it copies them in).

        Args:
          chunks: uint8 ``(n_i, bits // 8)`` arrays whose rows, in order, are the index's rows.
          size: total number of rows (the sum of ``n_i``).
          bits: code length in bits, a positive multiple of 8.
          backend: ``"auto"``, ``"numpy"`` or ``"faiss"``.

        Returns:
          The index.

        Raises:
          InvalidDtypeError: a chunk is not a uint8 ndarray.
          InvalidInputError: bad ``bits``, chunk shape, backend name, or the chunks do not add up to ``size``.
          BackendUnavailableError: ``backend="faiss"`` without faiss-cpu.
        """
        if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or bits <= 0 or bits % 8:
            raise InvalidInputError(f"bits must be a positive multiple of 8, got {bits!r}")
        bits, nbytes = int(bits), int(bits) // 8
        name = resolve_hamming_backend(backend)
        done = 0
        if name == "faiss":
            # One add of all rows: faiss's code vector then has exactly their size, where growing it
            # chunk by chunk left ~30% of freed capacity resident (93 instead of 72 bytes per item).
            data: object = np.empty((size, nbytes), dtype=np.uint8)
        elif _uses_words(nbytes):
            data = _WordBlocks(bits // 64, size, _BLOCK_ROWS)
        else:
            data = np.empty((size, nbytes), dtype=np.uint8)
        for chunk in chunks:
            arr = check_codes(chunk, nbytes, name="codes")
            n = arr.shape[0]
            if done + n > size:
                raise InvalidInputError(f"the chunks hold more than size={size} rows")
            if isinstance(data, _WordBlocks):
                data.put(arr.view(np.uint64), done)
            else:
                data[done:done + n] = arr
            done += n
        if done != size:
            raise InvalidInputError(f"the chunks hold {done} rows, not size={size}")
        if name == "faiss":
            return cls.build(data, bits=bits, backend="faiss")
        return cls(_BUILD_KEY, name, bits, size, data)

    @property
    def backend(self) -> str:
        """``"numpy"`` or ``"faiss"``."""
        return self._backend

    @property
    def bits(self) -> int:
        """Code length in bits."""
        return self._bits

    @property
    def memory_bytes(self) -> int:
        """Bytes held for the codes (``len(self) * bits // 8``)."""
        return self._size * (self._bits // 8)

    def __len__(self) -> int:
        return self._size

    def __repr__(self) -> str:
        return f"HammingIndex(backend={self._backend!r}, bits={self._bits}, size={self._size})"

    def codes(self) -> np.ndarray:
        """A copy of the codes.

        Returns:
          uint8 ``(len(self), bits // 8)``, C-contiguous.
        """
        nbytes = self._bits // 8
        if self._size == 0:
            return np.empty((0, nbytes), dtype=np.uint8)
        if self._backend == "faiss":
            faiss = _faiss()
            return faiss.vector_to_array(self._data.xb).reshape(self._size, nbytes).copy()
        if isinstance(self._data, _WordBlocks):
            return self._data.codes()
        return self._data.copy()

    def appended(self, codes: np.ndarray) -> "HammingIndex":
        """A new index with ``codes`` added after the existing rows.

        Args:
          codes: uint8 ``(n, bits // 8)``.

        Returns:
          A new index of ``len(self) + n`` rows on the same backend.

        Raises:
          InvalidDtypeError: ``codes`` is not a uint8 ndarray.
          InvalidInputError: wrong shape.
        """
        arr = check_codes(codes, self._bits // 8, name="codes")
        if isinstance(self._data, _WordBlocks):
            data = self._data.extended(arr.view(np.uint64))
            return HammingIndex(_BUILD_KEY, "numpy", self._bits, self._size + arr.shape[0], data)
        return HammingIndex.build(np.concatenate([self.codes(), arr]), bits=self._bits, backend=self._backend)

    def without(self, keep: np.ndarray) -> "HammingIndex":
        """A new index holding only the rows where ``keep`` is True, in the same order.

        Args:
          keep: bool ``(len(self),)``.

        Returns:
          A new index on the same backend.

        Raises:
          InvalidInputError: ``keep`` is not a bool array of the right length.
        """
        mask = np.asarray(keep)
        if mask.dtype != np.bool_ or mask.shape != (self._size,):
            raise InvalidInputError(f"keep must be a bool array of shape ({self._size},), got {mask.dtype} {mask.shape}")
        if isinstance(self._data, _WordBlocks):
            data = self._data.take(np.flatnonzero(mask))
            return HammingIndex(_BUILD_KEY, "numpy", self._bits, data.size, data)
        return HammingIndex.build(self.codes()[mask], bits=self._bits, backend=self._backend)

    def reordered(self, order: np.ndarray) -> "HammingIndex":
        """A new index whose row ``i`` is this index's row ``order[i]``.

        Args:
          order: int ``(len(self),)``, a permutation.

        Returns:
          A new index on the same backend.

        Raises:
          InvalidInputError: ``order`` is not a permutation of the rows.
        """
        perm = np.asarray(order)
        if perm.shape != (self._size,) or not np.array_equal(np.sort(perm), np.arange(self._size)):
            raise InvalidInputError(f"order must be a permutation of {self._size} rows")
        if isinstance(self._data, _WordBlocks):
            data = self._data.take(perm.astype(np.int64))
            return HammingIndex(_BUILD_KEY, "numpy", self._bits, self._size, data)
        return HammingIndex.build(self.codes()[perm], bits=self._bits, backend=self._backend)

    def search(
        self, queries: np.ndarray, k: int = 5, max_distance: Optional[int] = None
    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The k nearest rows of every query, by ascending distance, then ascending position.

        Args:
          queries: uint8 ``(n, bits // 8)`` or one code ``(bits // 8,)``.
          k: neighbours per query, >= 1; capped at the index's size, so the results have
            ``c = min(k, len(self))`` columns (any k is safe to ask for).
          max_distance: when given, only rows within this many bits are returned; rows with
            fewer matches are padded with -1.

        Returns:
          ``(positions, distances, counts)``: int64 ``(n, c)`` row positions, int32 ``(n, c)``
          distances (both -1 where padded) and int64 ``(n,)`` the number of real matches.

        Raises:
          InvalidDtypeError: ``queries`` is not a uint8 ndarray.
          InvalidInputError: wrong width, ``k < 1`` or ``max_distance < 0``.
        """
        k = min(_check_k(k), self._size)
        limit = _check_max_distance(max_distance)
        q = check_codes(queries, self._bits // 8, name="queries")
        n = q.shape[0]
        positions = np.full((n, k), -1, dtype=np.int64)
        distances = np.full((n, k), -1, dtype=np.int32)
        counts = np.zeros(n, dtype=np.int64)
        if n == 0 or self._size == 0:
            return positions, distances, counts
        if self._backend == "faiss":
            found = self._search_faiss(q, k, limit)
        else:
            found = self._search_numpy(q, k, limit)
        for row, (d, p) in enumerate(found):
            c = d.shape[0]
            positions[row, :c] = p
            distances[row, :c] = d
            counts[row] = c
        return positions, distances, counts

    def _search_numpy(self, q: np.ndarray, k: int, limit: Optional[int]):
        selectors = [_Selector(k, limit) for _ in range(q.shape[0])]
        for start, row, dist in _scan(self._data, q):
            selectors[row].offer(dist, start)
        return [s.result() for s in selectors]

    def _search_faiss(self, q: np.ndarray, k: int, limit: Optional[int]):
        index, m = self._data, self._size
        wanted = min(m, k + _FAISS_EXTRA)
        dist, lab = index.search(q, wanted)
        out = []
        for row in range(q.shape[0]):
            d = dist[row].astype(np.int64)
            p = lab[row].astype(np.int64)
            valid = p >= 0
            d, p = d[valid], p[valid]
            order = np.lexsort((p, d))
            d, p = d[order], p[order]
            if wanted < m and d.shape[0] >= k and d[-1] == d[k - 1]:
                # The tie at the k-th distance may continue past what faiss returned: take it whole.
                lims, rd, rl = index.range_search(q[row:row + 1], int(d[k - 1]) + 1)
                d, p = rd.astype(np.int64), rl.astype(np.int64)
                order = np.lexsort((p, d))
                d, p = d[order], p[order]
            d, p = d[:k], p[:k]
            if limit is not None:
                ok = d <= limit
                d, p = d[ok], p[ok]
            out.append((d, p))
        return out


_BUILD_KEY = object()
