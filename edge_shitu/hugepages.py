"""Backing large, long-lived arrays with transparent huge pages (Linux and Android only).

An exhaustive Hamming scan reads the whole code array once per query. On 4 KiB pages the codes of a
1M-item gallery (64 MB) span 16,000 pages, and the scan misses the TLB on most of them; on 2 MiB pages
faiss's ``IndexBinaryFlat`` search over 1M codes went from 2.5-3.0 ms to 2.1-2.2 ms on one x86-64 core.
numpy already asks for huge pages when it allocates a large array; faiss's own code storage does not,
so :class:`~edge_shitu.search.HammingIndex` asks for both.

Advice is only a hint: where it is not supported (another OS, transparent huge pages set to
``never``, a kernel before 6.1 that cannot collapse pages on request, an emulator), the memory stays
as it was and nothing is raised.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from typing import Callable, Optional

import numpy as np

__all__ = ["HUGE_PAGE_BYTES", "MIN_BYTES", "advise_huge_pages", "advise_array"]

HUGE_PAGE_BYTES = 2 << 20
"""Size of a transparent huge page on x86-64 and on arm64 with 4 KiB base pages."""

MIN_BYTES = 2 * HUGE_PAGE_BYTES
"""Smaller ranges are left alone: they hold at most one whole huge page, and a scan of them fits in cache."""

_MADV_HUGEPAGE = 14
_MADV_COLLAPSE = 25


@functools.lru_cache(maxsize=None)
def _madvise() -> Optional[Callable[[int, int, int], int]]:
    if not sys.platform.startswith(("linux", "android")):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def advise_huge_pages(address: int, nbytes: int) -> bool:
    """Asks the kernel to back the whole huge pages inside ``[address, address + nbytes)`` with huge pages.

    Only pages entirely inside the range are advised, so memory next to it (which may belong to
    something else) is never touched. The pages are collapsed at once where the kernel can
    (``MADV_COLLAPSE``, Linux 6.1+), else left to the kernel's background collapsing.

    Args:
      address: start of memory this process owns and keeps mapped.
      nbytes: its length in bytes.

    Returns:
      True when the kernel accepted the advice, False when it was not given (too small, unsupported
      platform) or refused.

    Raises:
      Nothing: advice that cannot be given is skipped.
    """
    madvise = _madvise()
    if madvise is None or nbytes < MIN_BYTES or address <= 0:
        return False
    lo = -(-address // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    hi = (address + nbytes) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    if hi <= lo or madvise(lo, hi - lo, _MADV_HUGEPAGE) != 0:
        return False
    # A refusal here (older kernel, memory pressure) only means the collapse happens later or not at all.
    madvise(lo, hi - lo, _MADV_COLLAPSE)
    return True


def advise_array(array: np.ndarray) -> bool:
    """:func:`advise_huge_pages` over the memory of a C-contiguous array (a view's own span only).

    Raises:
      Nothing; a non-contiguous array is skipped (returns False).
    """
    if not array.flags.c_contiguous:
        return False
    return advise_huge_pages(int(array.__array_interface__["data"][0]), int(array.nbytes))
