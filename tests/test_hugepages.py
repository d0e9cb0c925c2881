"""Huge-page advice: a hint that never raises, and that does back an index's codes where Linux allows."""

from __future__ import annotations

import ctypes
import mmap
import platform
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_shitu import hugepages
from edge_shitu import search as search_mod
from edge_shitu.search import HammingIndex, available_backends

MIB = 1 << 20
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_kib(address: int, nbytes: int) -> int:
    """AnonHugePages (KiB) of the mappings overlapping ``[address, address + nbytes)``; -1 when no
    mapping of /proc/self/smaps covers it (an emulator's /proc may not list it)."""
    total, inside, seen = 0, False, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        m = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if m:
            lo, hi = int(m.group(1), 16), int(m.group(2), 16)
            inside = lo < address + nbytes and hi > address
            seen |= inside
        elif inside and line.startswith("AnonHugePages:"):
            total += int(line.split()[1])
    return total if seen else -1


def kernel_collapses() -> bool:
    """Whether this kernel has MADV_COLLAPSE (Linux 6.1+), i.e. advice takes effect at once."""
    m = re.match(r"(\d+)\.(\d+)", platform.release())
    return bool(m) and (int(m.group(1)), int(m.group(2))) >= (6, 1)


def require_thp_on_request():
    if not sys.platform.startswith("linux") or not THP.exists():
        pytest.skip("needs Linux with transparent huge pages (no /sys/kernel/mm/transparent_hugepage)")
    if "[never]" in THP.read_text():
        pytest.skip("transparent huge pages are set to 'never' on this machine")


def test_small_or_invalid_ranges_are_left_alone():
    assert hugepages.advise_huge_pages(1 << 30, hugepages.MIN_BYTES - 1) is False
    assert hugepages.advise_huge_pages(0, 64 * MIB) is False
    assert hugepages.advise_array(np.zeros(1000, np.uint8)) is False
    assert hugepages.advise_array(np.zeros((8 * MIB, 2), np.uint8)[:, 0]) is False  # not contiguous


def test_other_platforms_get_no_advice(monkeypatch):
    hugepages._madvise.cache_clear()
    monkeypatch.setattr(sys, "platform", "win32")
    try:
        assert hugepages._madvise() is None
        assert hugepages.advise_array(np.ones(8 * MIB, np.uint8)) is False
    finally:
        monkeypatch.undo()
        hugepages._madvise.cache_clear()


def test_refused_advice_is_reported_not_raised():
    # A range this process does not map: Linux refuses (ENOMEM), nothing is raised. QEMU's user-mode
    # emulation (the arm64 CI step, which has no /sys) accepts and ignores any advice.
    refused = hugepages.advise_huge_pages(1 << 46, 8 * MIB)
    assert isinstance(refused, bool)
    if sys.platform.startswith("linux") and THP.exists():
        assert refused is False


def test_advice_on_a_large_array_keeps_its_contents():
    arr = np.arange(8 * MIB // 8, dtype=np.uint64)
    accepted = hugepages.advise_array(arr)
    assert isinstance(accepted, bool)
    if sys.platform.startswith("linux") and THP.exists() and "[never]" not in THP.read_text():
        assert accepted
    assert np.array_equal(arr, np.arange(8 * MIB // 8, dtype=np.uint64))


def test_advice_backs_anonymous_memory_with_huge_pages():
    require_thp_on_request()
    # Private anonymous memory that nobody else has advised (shared memory has its own huge-page setting).
    region = mmap.mmap(-1, 16 * MIB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    arr = np.frombuffer(region, dtype=np.uint8)
    arr[:] = 1  # fault every page in first, so that only a collapse can make them huge
    address = arr.__array_interface__["data"][0]
    before = huge_kib(address, arr.nbytes)
    if before == -1:
        pytest.skip("/proc/self/smaps does not list this mapping (emulated /proc)")
    if before > 0:
        pytest.skip("transparent huge pages are 'always' here: memory is huge without advice")
    assert hugepages.advise_array(arr) is True
    after = huge_kib(address, arr.nbytes)
    if after == 0 and not kernel_collapses():
        pytest.skip(f"kernel {platform.release()} has no MADV_COLLAPSE (Linux 6.1+): pages collapse later")
    assert after >= 12 * 1024  # the whole 2 MiB pages inside 16 MiB: at least 6 of them
    assert (arr == 1).all()  # advice never changes contents


@pytest.mark.skipif("faiss" not in available_backends(), reason="needs faiss-cpu (passing its self-check)")
def test_faiss_index_advice_goes_to_its_own_copy_of_the_codes(monkeypatch):
    # That advice makes pages huge is checked above on a mapping of its own; faiss's vector may sit in
    # the heap, whose mapping smaps reports as a whole, so here only what is advised is checked.
    require_thp_on_request()
    advised = []
    real = hugepages.advise_huge_pages
    monkeypatch.setattr(hugepages, "advise_huge_pages",
                        lambda address, nbytes: advised.append((address, nbytes)) or real(address, nbytes))
    codes = np.random.default_rng(0).integers(0, 256, (150_000, 64), dtype=np.uint8)
    index = HammingIndex.build(codes, bits=512, backend="faiss")
    pos, dist, _ = index.search(codes[:3], k=1)  # the first search gives the advice
    assert pos[:, 0].tolist() == [0, 1, 2] and dist[:, 0].tolist() == [0, 0, 0]
    [(address, nbytes)] = advised
    assert nbytes == codes.nbytes
    advised_bytes = np.ctypeslib.as_array(ctypes.cast(address, ctypes.POINTER(ctypes.c_uint8)), shape=(nbytes,))
    assert np.array_equal(advised_bytes, codes.ravel())  # faiss's copy of the codes, not some other memory
    assert index.codes().tobytes() == codes.tobytes()


@pytest.mark.parametrize("rows, due", [(65_535, False), (65_536, True)])
def test_indexes_of_4_mib_and_more_are_advised_once_at_their_first_search(monkeypatch, rows, due):
    calls = []
    monkeypatch.setattr(search_mod, "_advise_huge_pages", lambda data, nbytes: calls.append(nbytes) or True)
    codes = np.zeros((rows, 64), dtype=np.uint8)
    index = HammingIndex.build(codes, bits=512, backend="numpy")
    assert calls == []
    index.search(codes[:1], k=1)
    index.search(codes[:2], k=1)
    assert calls == ([rows * 64] if due else [])
