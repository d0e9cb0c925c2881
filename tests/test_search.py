"""The Hamming search engine: HammingIndex and hamming_distances against slow obvious code on every
backend and both popcount paths (numpy's bitwise_count and the byte table of numpy < 2), ties, edges,
and the one validator of codes, k and max_distance."""

from __future__ import annotations

import importlib.util
import platform
import types

import numpy as np
import pytest

from edge_shitu import search as search_mod
from edge_shitu.errors import BackendUnavailableError, InvalidDtypeError, InvalidInputError
from edge_shitu.search import (
    HammingIndex,
    available_backends,
    check_codes,
    hamming_distances,
    resolve_hamming_backend,
)

# faiss only where it is installed and passes its self-check: on aarch64, faiss-cpu 1.15.1 fails it,
# which test_faiss_is_installed_for_ci checks is detected.
BACKENDS = [b for b in ("numpy", "faiss") if b in available_backends()]


# Only what exists here is parametrized (a skip is a failure in CI): the bitwise_count path needs numpy >= 2,
# faiss must be installed and pass its self-check.
_POPCOUNT_PATHS = [p for p in (True, False) if p is False or hasattr(np, "bitwise_count")]
_BACKEND_PARAMS = [f"numpy-{'bitwise_count' if p else 'table'}" for p in _POPCOUNT_PATHS] + BACKENDS[1:]


@pytest.fixture(params=_POPCOUNT_PATHS, ids=lambda p: "bitwise_count" if p else "table")
def popcount_path(request, monkeypatch):
    """Runs a test with numpy's bitwise_count and with the 256-entry table of numpy < 2."""
    monkeypatch.setattr(search_mod, "_HAVE_BITWISE_COUNT", request.param)
    return request.param


@pytest.fixture(params=_BACKEND_PARAMS)
def backend(request, monkeypatch):
    """A backend name, the numpy one on each popcount path there is; faiss where available."""
    name, _, path = request.param.partition("-")
    if path:
        monkeypatch.setattr(search_mod, "_HAVE_BITWISE_COUNT", path == "bitwise_count")
    return name


def _popcount(q: np.ndarray, c: np.ndarray) -> int:
    return sum(bin(int(a) ^ int(b)).count("1") for a, b in zip(q, c))


def _oracle_distances(queries: np.ndarray, codes: np.ndarray) -> np.ndarray:
    return np.array([[_popcount(q, c) for c in codes] for q in queries], dtype=np.int64).reshape(len(queries), len(codes))


def _oracle(queries: np.ndarray, codes: np.ndarray, k: int, max_distance=None):
    """Python loops: distance of every pair, then sort by (distance, position)."""
    out = []
    for q in queries:
        pairs = []
        for pos, c in enumerate(codes):
            d = _popcount(q, c)
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


@pytest.mark.parametrize("bits", [512, 64, 24])
def test_matches_oracle_random(backend, bits, rng):
    codes = rng.integers(0, 256, (300, bits // 8), dtype=np.uint8)
    queries = np.concatenate([codes[:3], rng.integers(0, 256, (4, bits // 8), dtype=np.uint8)])
    index = HammingIndex.build(codes, bits=bits, backend=backend)
    for k in (1, 5, 40):
        got = _as_pairs(*index.search(queries, k))
        assert got == _oracle(queries, codes, k)


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


def test_max_distance(backend, rng):
    codes = rng.integers(0, 256, (500, 8), dtype=np.uint8)
    queries = codes[:4] ^ np.uint8(1)
    index = HammingIndex.build(codes, bits=64, backend=backend)
    for limit in (0, 1, 20, 64):
        got = _as_pairs(*index.search(queries, 5, max_distance=limit))
        assert got == _oracle(queries, codes, 5, max_distance=limit)
    pos, dist, counts = index.search(queries, 5, max_distance=0)
    assert (counts == 0).all() and (pos == -1).all() and (dist == -1).all()


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


def test_numpy_layout_follows_the_popcount_path(popcount_path, rng):
    codes = rng.integers(0, 256, (10, 64), dtype=np.uint8)
    index = HammingIndex.build(codes, bits=512, backend="numpy")
    # Word blocks need bitwise_count; numpy < 2 keeps the bytes for the table.
    assert isinstance(index._data, np.ndarray) != popcount_path
    assert isinstance(HammingIndex.build(codes[:, :3], bits=24, backend="numpy")._data, np.ndarray)


@pytest.mark.parametrize("k", [1, 3, 19, 20, 24, 10**12])
@pytest.mark.parametrize("max_distance", [None, 0, 2])
def test_k_at_and_beyond_the_size_with_many_ties(backend, rng, k, max_distance):
    # 20 one-byte codes from 4 values: every distance is shared by many rows, at every k; results
    # have min(k, 20) columns, padded with -1 past max_distance.
    codes = np.array([0b0000_0000, 0b0000_0011, 0b1000_0001, 0b1111_1111], np.uint8)[rng.integers(0, 4, 20)][:, None]
    queries = rng.integers(0, 256, (11, 1), dtype=np.uint8)
    pos, dist, counts = HammingIndex.build(codes, bits=8, backend=backend).search(queries, k, max_distance)
    c = min(k, 20)
    assert pos.shape == dist.shape == (11, c) and counts.shape == (11,)
    assert pos.dtype == np.int64 and dist.dtype == np.int32 and counts.dtype == np.int64
    want = _oracle(queries, codes, c, max_distance)
    assert _as_pairs(pos, dist, counts) == want
    for row, pairs in enumerate(want):
        assert (pos[row, len(pairs):] == -1).all() and (dist[row, len(pairs):] == -1).all()


@pytest.mark.parametrize("k", [0, -1, 2.0, True, None])
def test_bad_k(k):
    index = HammingIndex.build(np.zeros((2, 8), np.uint8), bits=64, backend="numpy")
    with pytest.raises(InvalidInputError, match="k must be an integer >= 1"):
        index.search(np.zeros((1, 8), np.uint8), k)


@pytest.mark.parametrize("limit", [-1, 1.5, True, "3"])
def test_bad_max_distance(limit):
    index = HammingIndex.build(np.zeros((2, 8), np.uint8), bits=64, backend="numpy")
    with pytest.raises(InvalidInputError, match="max_distance must be an integer >= 0 or None"):
        index.search(np.zeros((1, 8), np.uint8), 1, max_distance=limit)


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
    # One copy of the codes: word blocks with numpy's bitwise_count, row-major bytes without it (numpy < 2).
    held = index._data.nbytes if isinstance(index._data, np.ndarray) else index._data.flat.nbytes
    assert index.memory_bytes == 300 * 64 and held == 300 * 64


class TestHammingDistances:
    @pytest.mark.parametrize("nbytes", [64, 3, 8, 16])
    def test_matches_python_oracle(self, rng, popcount_path, nbytes):
        queries = rng.integers(0, 256, (5, nbytes), dtype=np.uint8)
        codes = rng.integers(0, 256, (37, nbytes), dtype=np.uint8)
        codes[4] = queries[1]
        codes[5] = ~queries[2]
        out = hamming_distances(queries, codes)
        assert out.dtype == np.int32 and out.shape == (5, 37)
        np.testing.assert_array_equal(out, _oracle_distances(queries, codes))
        assert out[1, 4] == 0 and out[2, 5] == nbytes * 8

    @pytest.mark.parametrize("block_rows", [1, 7, 64])
    def test_every_block_boundary(self, rng, monkeypatch, popcount_path, block_rows):
        monkeypatch.setattr(search_mod, "_BLOCK_ROWS", block_rows)
        queries = rng.integers(0, 256, (4, 64), dtype=np.uint8)
        codes = rng.integers(0, 256, (150, 64), dtype=np.uint8)
        np.testing.assert_array_equal(hamming_distances(queries, codes), _oracle_distances(queries, codes))

    def test_agrees_with_the_index(self, backend, rng):
        codes = _tied_codes(rng, 300, 64)
        queries = np.concatenate([codes[:2], rng.integers(0, 256, (3, 64), dtype=np.uint8)])
        pos, dist, _ = HammingIndex.build(codes, bits=512, backend=backend).search(queries, 300)
        np.testing.assert_array_equal(np.take_along_axis(hamming_distances(queries, codes), pos, axis=1), dist)

    def test_single_query_code(self, rng):
        codes = rng.integers(0, 256, (6, 64), dtype=np.uint8)
        np.testing.assert_array_equal(hamming_distances(codes[2], codes), _oracle_distances(codes[2:3], codes))

    @pytest.mark.parametrize("n,m", [(0, 5), (3, 0), (0, 0)])
    def test_empty(self, n, m, popcount_path):
        out = hamming_distances(np.zeros((n, 64), np.uint8), np.zeros((m, 64), np.uint8))
        assert out.shape == (n, m) and out.dtype == np.int32

    def test_bad_arguments(self):
        with pytest.raises(InvalidInputError, match=r"queries must have shape \(n, 64\).*\(2, 32\)"):
            hamming_distances(np.zeros((2, 32), np.uint8), np.zeros((3, 64), np.uint8))
        with pytest.raises(InvalidDtypeError, match="codes must have dtype uint8"):
            hamming_distances(np.zeros((2, 64), np.uint8), np.zeros((3, 64), np.int64))
        with pytest.raises(InvalidDtypeError, match="queries must have dtype uint8"):
            hamming_distances(np.zeros((2, 64), np.float32), np.zeros((3, 64), np.uint8))
        with pytest.raises(InvalidInputError, match=r"codes must have shape \(n, bytes\) with bytes >= 1"):
            hamming_distances(np.zeros((2, 0), np.uint8), np.zeros((3, 0), np.uint8))
        with pytest.raises(InvalidInputError, match=r"codes must have shape \(n, bytes\)"):
            hamming_distances(np.zeros(64, np.uint8), np.zeros(64, np.uint8))


class TestCheckCodes:
    def test_single_code_becomes_a_batch(self):
        code = np.arange(64, dtype=np.uint8)
        out = check_codes(code, 64)
        assert out.shape == (1, 64)
        np.testing.assert_array_equal(out[0], code)

    def test_non_contiguous_input_is_copied(self, rng):
        wide = rng.integers(0, 256, (4, 128), dtype=np.uint8)
        view = wide[:, ::2]
        for nbytes in (64, None):
            out = check_codes(view, nbytes)
            assert out.flags.c_contiguous
            np.testing.assert_array_equal(out, view)

    def test_contiguous_input_is_not_copied(self, rng):
        codes = rng.integers(0, 256, (4, 64), dtype=np.uint8)
        assert check_codes(codes, 64) is codes and check_codes(codes, None) is codes

    @pytest.mark.parametrize("dtype", [np.int8, np.int64, np.float32, np.bool_])
    def test_wrong_dtype_is_never_cast(self, dtype):
        for nbytes in (64, None):
            with pytest.raises(InvalidDtypeError, match=f"uint8.*got {np.dtype(dtype)}"):
                check_codes(np.zeros((2, 64), dtype=dtype), nbytes)

    def test_non_array_rejected(self):
        with pytest.raises(InvalidDtypeError, match="numpy uint8 array.*list"):
            check_codes([[0] * 64], 64)

    @pytest.mark.parametrize("shape", [(2, 63), (63,), (2, 64, 1), ()])
    def test_wrong_shape(self, shape):
        with pytest.raises(InvalidInputError, match=r"my_codes must have shape \(n, 64\).*got"):
            check_codes(np.zeros(shape, dtype=np.uint8), 64, name="my_codes")

    @pytest.mark.parametrize("shape", [(64,), (2, 0), (2, 64, 1)])
    def test_any_width_needs_a_matrix_of_at_least_one_byte(self, shape):
        with pytest.raises(InvalidInputError, match=r"my_codes must have shape \(n, bytes\) with bytes >= 1"):
            check_codes(np.zeros(shape, dtype=np.uint8), None, name="my_codes")
