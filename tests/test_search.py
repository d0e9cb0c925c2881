"""HammingIndex: oracle tests against slow obvious code, backend equivalence, ties, edges."""

from __future__ import annotations

import importlib.util
import platform
import types

import numpy as np
import pytest

from edge_shitu import search as search_mod
from edge_shitu.errors import BackendUnavailableError, InvalidDtypeError, InvalidInputError
from edge_shitu.search import HammingIndex, available_backends, resolve_hamming_backend

# faiss only where it is installed and passes its self-check: on aarch64, faiss-cpu 1.15.1 fails it,
# which test_faiss_is_installed_for_ci checks is detected.
BACKENDS = [b for b in ("numpy", "faiss") if b in available_backends()]


def _oracle(queries: np.ndarray, codes: np.ndarray, k: int, max_distance=None):
    """Python loops: distance of every pair, then sort by (distance, position)."""
    out = []
    for q in queries:
        pairs = []
        for pos, c in enumerate(codes):
            d = sum(bin(int(a) ^ int(b)).count("1") for a, b in zip(q, c))
            if max_distance is None or d <= max_distance:
                pairs.append((d, pos))
        pairs.sort()
        out.append(pairs[:k])
    return out


def _as_pairs(positions, distances, counts):
    return [[(int(distances[r, i]), int(positions[r, i])) for i in range(int(counts[r]))]
            for r in range(positions.shape[0])]


def _tied_codes(rng, m: int, nbytes: int) -> np.ndarray:
    # Few distinct codes, many copies: ties everywhere, including at the k-th distance.
    base = rng.integers(0, 256, (7, nbytes), dtype=np.uint8)
    return base[rng.integers(0, 7, m)]


def test_faiss_is_installed_for_ci():
    # The fast extra is part of CI's install: equivalence tests below must really run faiss.
    assert importlib.util.find_spec("faiss") is not None
    if platform.machine() in ("x86_64", "AMD64"):
        assert "faiss" in available_backends()
    elif "faiss" not in available_backends():
        # The aarch64 wheels miscount whole differing 256-bit blocks: the self-check must say so.
        with pytest.raises(BackendUnavailableError, match="instead of"):
            resolve_hamming_backend("faiss")
        assert resolve_hamming_backend("auto") == "numpy"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", [512, 256, 128, 64, 24])
def test_complementary_codes_are_at_full_distance(backend, bits, rng):
    codes = rng.integers(0, 256, (50, bits // 8), dtype=np.uint8)
    index = HammingIndex.build(np.concatenate([codes, ~codes]), bits=bits, backend=backend)
    positions, distances, counts = index.search(~codes[:5], 100)
    assert (counts == 100).all()
    # Query i (~codes[i]) is row 50 + i at distance 0 and differs from row i in every bit.
    assert (distances[:, -1] == bits).all() and (positions[:, -1] == np.arange(5)).all()
    assert (distances[:, 0] == 0).all() and (positions[:, 0] == np.arange(50, 55)).all()


class _MiscountingFaiss:
    """A faiss stand-in with the aarch64 1.15.1 bug: a whole differing 256-bit block counts 0."""

    __version__ = "fake"

    class IndexBinaryFlat:
        def __init__(self, bits):
            self.bits, self.rows = bits, []

        def add(self, codes):
            self.rows.extend(codes)

        def search(self, q, k):
            d = []
            for row in self.rows:
                diff = np.unpackbits(row ^ q[0]).reshape(-1, 256) if self.bits >= 256 else np.unpackbits(row ^ q[0])[None]
                d.append(sum(int(b.sum()) % 256 for b in diff))
            order = np.argsort(d, kind="stable")[:k]
            return np.array([d])[:, order], order[None]


def test_a_miscounting_faiss_is_not_used(monkeypatch):
    monkeypatch.setattr(search_mod, "importlib", types.SimpleNamespace(
        import_module=lambda name: _MiscountingFaiss if name == "faiss" else importlib.import_module(name)))
    assert available_backends() == ("numpy",)
    assert resolve_hamming_backend("auto") == "numpy"
    with pytest.raises(BackendUnavailableError, match=r"\[0, 0\] instead of \[0, 256\] for 256-bit"):
        HammingIndex.build(np.zeros((1, 32), np.uint8), bits=256, backend="faiss")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", [512, 64, 24])
def test_matches_oracle_random(backend, bits, rng):
    codes = rng.integers(0, 256, (300, bits // 8), dtype=np.uint8)
    queries = np.concatenate([codes[:3], rng.integers(0, 256, (4, bits // 8), dtype=np.uint8)])
    index = HammingIndex.build(codes, bits=bits, backend=backend)
    for k in (1, 5, 40):
        got = _as_pairs(*index.search(queries, k))
        assert got == _oracle(queries, codes, k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_are_broken_by_position(backend, rng):
    codes = _tied_codes(rng, 2000, 64)
    queries = np.concatenate([codes[:2], rng.integers(0, 256, (2, 64), dtype=np.uint8)])
    index = HammingIndex.build(codes, bits=512, backend=backend)
    for k in (1, 5, 30, 300):
        assert _as_pairs(*index.search(queries, k)) == _oracle(queries, codes, k)


def test_backends_agree_on_a_large_index(rng):
    # More rows than one numpy block, queries near and far; every backend gives the arrays of a brute force
    # over unpacked bits (the Python-loop oracle is too slow for 50,000 rows under emulation).
    codes = rng.integers(0, 256, (50_000, 64), dtype=np.uint8)
    codes[30_000:30_050] = codes[5]  # a tie spanning blocks
    queries = np.concatenate([codes[[5, 17, 49_999]], rng.integers(0, 256, (3, 64), dtype=np.uint8)])
    bits = np.unpackbits(codes, axis=1)
    want_pos, want_dist = [], []
    for q in np.unpackbits(queries, axis=1):
        d = (bits != q).sum(1)
        order = np.lexsort((np.arange(len(d)), d))[:10]
        want_pos.append(order)
        want_dist.append(d[order])
    for backend in BACKENDS:
        pos, dist, counts = HammingIndex.build(codes, bits=512, backend=backend).search(queries, 10)
        np.testing.assert_array_equal(pos, np.array(want_pos), err_msg=backend)
        np.testing.assert_array_equal(dist, np.array(want_dist), err_msg=backend)
        assert (counts == 10).all()
    assert want_pos[0][0] == 5 and (want_dist[0] == 0).all() and want_pos[0][1] == 30_000


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_distance(backend, rng):
    codes = rng.integers(0, 256, (500, 8), dtype=np.uint8)
    queries = codes[:4] ^ np.uint8(1)
    index = HammingIndex.build(codes, bits=64, backend=backend)
    for limit in (0, 1, 20, 64):
        got = _as_pairs(*index.search(queries, 5, max_distance=limit))
        assert got == _oracle(queries, codes, 5, max_distance=limit)
    pos, dist, counts = index.search(queries, 5, max_distance=0)
    assert (counts == 0).all() and (pos == -1).all() and (dist == -1).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_edges(backend, rng):
    empty = HammingIndex.build(np.empty((0, 64), np.uint8), bits=512, backend=backend)
    pos, dist, counts = empty.search(rng.integers(0, 256, (2, 64), dtype=np.uint8), 3)
    assert pos.shape == (2, 0) and dist.shape == (2, 0) and (counts == 0).all()
    assert pos.dtype == np.int64 and dist.dtype == np.int32 and counts.dtype == np.int64
    codes = rng.integers(0, 256, (3, 64), dtype=np.uint8)
    index = HammingIndex.build(codes, bits=512, backend=backend)
    for k in (10, 10**12):  # one code, k > size: capped at the size
        pos, dist, counts = index.search(codes[1], k)
        assert counts.tolist() == [3] and pos.shape == (1, 3) and pos[0, 0] == 1 and (pos >= 0).all()
    pos, _, _ = index.search(np.empty((0, 64), np.uint8), 2)
    assert pos.shape == (0, 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_appended_without_reordered_and_codes(backend, rng):
    codes = rng.integers(0, 256, (100, 64), dtype=np.uint8)
    index = HammingIndex.build(codes[:60], bits=512, backend=backend)
    grown = index.appended(codes[60:])
    assert len(index) == 60 and len(grown) == 100
    np.testing.assert_array_equal(grown.codes(), codes)
    keep = np.arange(100) % 3 != 0
    shrunk = grown.without(keep)
    np.testing.assert_array_equal(shrunk.codes(), codes[keep])
    perm = rng.permutation(100)
    np.testing.assert_array_equal(grown.reordered(perm).codes(), codes[perm])
    assert grown.memory_bytes == 100 * 64 and shrunk.backend == backend
    q = codes[:5]
    assert _as_pairs(*shrunk.search(q, 4)) == _oracle(q, codes[keep], 4)


def test_byte_table_path_when_numpy_lacks_bitwise_count(monkeypatch, rng):
    monkeypatch.setattr(search_mod, "_HAVE_BITWISE_COUNT", False)
    codes = _tied_codes(rng, 400, 64)
    index = HammingIndex.build(codes, bits=512, backend="numpy")
    assert index._data.dtype == np.uint8
    q = codes[:3] ^ np.uint8(3)
    assert _as_pairs(*index.search(q, 7)) == _oracle(q, codes, 7)


def test_bad_input():
    codes = np.zeros((4, 64), np.uint8)
    index = HammingIndex.build(codes, bits=512, backend="numpy")
    with pytest.raises(InvalidDtypeError, match="uint8"):
        index.search(np.zeros((1, 64), np.int64), 1)
    with pytest.raises(InvalidInputError, match=r"shape \(n, 64\)"):
        index.search(np.zeros((1, 32), np.uint8), 1)
    with pytest.raises(InvalidInputError, match="k must be"):
        index.search(codes, 0)
    with pytest.raises(InvalidInputError, match="max_distance"):
        index.search(codes, 1, max_distance=-1)
    with pytest.raises(InvalidInputError, match="bits"):
        HammingIndex.build(codes, bits=500)
    with pytest.raises(InvalidInputError, match="unknown Hamming backend"):
        resolve_hamming_backend("annoy")
    with pytest.raises(InvalidInputError, match="keep"):
        index.without(np.ones(3, bool))
    with pytest.raises(TypeError, match="build"):
        HammingIndex(object(), "numpy", 512, 0, None)


def test_missing_faiss_is_named(monkeypatch):
    def no_faiss():
        raise BackendUnavailableError("the faiss Hamming backend needs faiss-cpu; run: pip install \"edge-shitu[fast]\"")

    monkeypatch.setattr(search_mod, "_faiss", no_faiss)
    assert resolve_hamming_backend("auto") == "numpy"
    with pytest.raises(BackendUnavailableError, match=r"edge-shitu\[fast\]"):
        HammingIndex.build(np.zeros((1, 8), np.uint8), bits=64, backend="faiss")


@pytest.mark.parametrize("backend", BACKENDS)
def test_from_chunks_equals_build(backend, rng):
    codes = rng.integers(0, 256, (1000, 64), dtype=np.uint8)
    chunks = [codes[:0], codes[:333], codes[333:334], codes[334:]]
    index = HammingIndex.from_chunks(iter(chunks), size=1000, bits=512, backend=backend)
    np.testing.assert_array_equal(index.codes(), codes)
    q = codes[[3, 500]] ^ np.uint8(7)
    for a, b in zip(index.search(q, 9), HammingIndex.build(codes, bits=512, backend=backend).search(q, 9)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(InvalidInputError, match="not size=1001"):
        HammingIndex.from_chunks(iter(chunks), size=1001, bits=512, backend=backend)
    with pytest.raises(InvalidInputError, match="more than size=999"):
        HammingIndex.from_chunks(iter(chunks), size=999, bits=512, backend=backend)


@pytest.mark.parametrize("block_rows", [1, 7, 64])
def test_numpy_blocks_of_any_size_give_the_oracle(monkeypatch, rng, block_rows):
    # Small blocks put block edges everywhere: appends that fill a partial last block, removals and
    # permutations that gather across blocks, ties and the first block's bound that span them.
    monkeypatch.setattr(search_mod, "_BLOCK_ROWS", block_rows)
    monkeypatch.setattr(search_mod, "_SEED_ROWS", 3)
    codes = np.concatenate([_tied_codes(rng, 150, 64), rng.integers(0, 256, (150, 64), dtype=np.uint8)])
    codes = codes[rng.permutation(300)]
    queries = np.concatenate([codes[[0, 150, 299]], rng.integers(0, 256, (2, 64), dtype=np.uint8)])
    index = HammingIndex.build(codes[:101], bits=512, backend="numpy").appended(codes[101:250]).appended(codes[250:])
    chunked = HammingIndex.from_chunks(iter([codes[:5], codes[5:6], codes[6:]]), size=300, bits=512, backend="numpy")
    # The Python-loop oracle, once per case: the arm64 CI step runs this file under emulation.
    cases = {(k, limit): _oracle(queries, codes, k, limit) for k, limit in ((1, None), (5, None), (40, 200), (300, 250))}
    for idx in (index, chunked):
        np.testing.assert_array_equal(idx.codes(), codes)
        for (k, limit), want in cases.items():
            assert _as_pairs(*idx.search(queries, k, max_distance=limit)) == want
    keep = rng.random(300) < 0.6
    perm = rng.permutation(300)
    for derived, rows in ((index.without(keep), codes[keep]), (index.reordered(perm), codes[perm])):
        np.testing.assert_array_equal(derived.codes(), rows)
        assert _as_pairs(*derived.search(queries, 9)) == _oracle(queries, rows, 9)
    assert index.memory_bytes == 300 * 64 and index._data.flat.nbytes == 300 * 64
