"""Tests of edge_shitu.codes: binarisation layout, Hamming distances and top-k, against slow oracles."""

from __future__ import annotations

import numpy as np
import pytest

from edge_shitu import codes as codes_mod
from edge_shitu.codes import (
    binarize,
    check_codes,
    codes_to_hex,
    hamming_distances,
    hex_to_codes,
    l2_normalize,
    top_k,
)
from edge_shitu.errors import InvalidDtypeError, InvalidInputError


def _reference_binarize(features: np.ndarray) -> np.ndarray:
    """PaddleClas Binarize(method="sign"), written out byte by byte."""
    bits = ((np.sign(features) + 1) / 2).astype(np.uint8)
    n, d = bits.shape
    weights = np.array([128, 64, 32, 16, 8, 4, 2, 1])
    out = np.zeros((n, d // 8), dtype=np.uint8)
    for row in range(n):
        for i in range(d // 8):
            out[row, i] = int(np.dot(bits[row, 8 * i : 8 * i + 8], weights))
    return out


def _oracle_hamming(queries: np.ndarray, codes: np.ndarray) -> np.ndarray:
    out = np.zeros((queries.shape[0], codes.shape[0]), dtype=np.int64)
    for i, q in enumerate(queries):
        for j, c in enumerate(codes):
            out[i, j] = sum(bin(int(a) ^ int(b)).count("1") for a, b in zip(q, c))
    return out


def _oracle_top_k(distances, ids, k, max_distance=None):
    k = min(k, len(ids))  # k is capped at the number of codes
    rows_ids, rows_dist, counts = [], [], []
    for row in distances:
        pairs = sorted((int(d), int(i)) for d, i in zip(row, ids))
        if max_distance is not None:
            pairs = [p for p in pairs if p[0] <= max_distance]
        pairs = pairs[:k]
        counts.append(len(pairs))
        rows_ids.append([i for _, i in pairs] + [-1] * (k - len(pairs)))
        rows_dist.append([d for d, _ in pairs] + [-1] * (k - len(pairs)))
    return rows_ids, rows_dist, counts


@pytest.fixture(params=[True, False], ids=["bitwise_count", "table"])
def popcount_path(request, monkeypatch):
    """Runs a test with numpy's bitwise_count and with the 256-entry table fallback."""
    if request.param and not hasattr(np, "bitwise_count"):
        pytest.skip("numpy < 2 has no bitwise_count")
    monkeypatch.setattr(codes_mod, "_HAVE_BITWISE_COUNT", request.param)
    return request.param


class TestBinarize:
    def test_matches_reference_formula(self, rng):
        features = rng.standard_normal((7, 512)).astype(np.float32)
        features[0, :40] = 0.0
        features[1, 3] = -0.0
        out = binarize(features)
        assert out.dtype == np.uint8 and out.shape == (7, 64) and out.flags.c_contiguous
        np.testing.assert_array_equal(out, _reference_binarize(features))

    def test_first_feature_is_most_significant_bit(self):
        features = np.zeros((1, 16), dtype=np.float32)
        features[0, 0] = 1.0
        features[0, 15] = 2.0
        np.testing.assert_array_equal(binarize(features), [[0b1000_0000, 0b0000_0001]])

    def test_exact_zeros_give_zero_bits(self):
        features = np.zeros((2, 512), dtype=np.float32)
        features[1] = -0.0
        assert not binarize(features).any()

    def test_real_features_match_reference(self, embeddings_npz):
        features = np.load(embeddings_npz)["embeddings"][:20]
        np.testing.assert_array_equal(binarize(features), _reference_binarize(features))

    def test_other_float_dtypes_and_infinities(self):
        features = np.array([[1, -1, np.inf, -np.inf, 0, 2, -2, 0.5]], dtype=np.float64)
        np.testing.assert_array_equal(binarize(features), [[0b1010_0101]])
        np.testing.assert_array_equal(binarize(features.astype(np.float16)), [[0b1010_0101]])

    def test_empty_batch(self):
        out = binarize(np.zeros((0, 512), dtype=np.float32))
        assert out.shape == (0, 64) and out.dtype == np.uint8

    def test_integer_features_rejected(self):
        with pytest.raises(InvalidDtypeError, match="floating-point.*int64"):
            binarize(np.ones((2, 512), dtype=np.int64))

    @pytest.mark.parametrize("shape", [(2, 12), (2, 0), (512,), (1, 2, 512)])
    def test_bad_shapes_rejected(self, shape):
        with pytest.raises(InvalidInputError, match="multiple of 8|2-D"):
            binarize(np.ones(shape, dtype=np.float32))

    def test_nan_rejected(self):
        features = np.ones((3, 512), dtype=np.float32)
        features[2, 7] = np.nan
        with pytest.raises(InvalidInputError, match=r"NaN in rows \[2\]"):
            binarize(features)


class TestL2Normalize:
    def test_unit_norms_and_zero_rows(self, rng):
        x = rng.standard_normal((5, 512)) * 7
        x[3] = 0
        out = l2_normalize(x)
        assert out.dtype == np.float32 and out.shape == (5, 512)
        norms = np.linalg.norm(out, axis=1)
        np.testing.assert_allclose(norms[[0, 1, 2, 4]], 1.0, rtol=1e-6)
        assert norms[3] == 0
        np.testing.assert_allclose(out[0], x[0] / np.linalg.norm(x[0]), rtol=1e-6)
        np.testing.assert_array_equal(binarize(out), binarize(x))

    @pytest.mark.parametrize("bad", [np.nan, np.inf])
    def test_non_finite_rejected(self, bad):
        x = np.ones((2, 8), dtype=np.float32)
        x[1, 1] = bad
        with pytest.raises(InvalidInputError, match="NaN or infinity"):
            l2_normalize(x)

    def test_bad_eps_and_dtype(self):
        with pytest.raises(InvalidInputError, match="eps"):
            l2_normalize(np.ones((1, 8), np.float32), eps=0.0)
        with pytest.raises(InvalidDtypeError, match="floating"):
            l2_normalize(np.ones((1, 8), np.int32))


class TestCheckCodes:
    def test_single_code_becomes_a_batch(self):
        code = np.arange(64, dtype=np.uint8)
        out = check_codes(code, 64)
        assert out.shape == (1, 64)
        np.testing.assert_array_equal(out[0], code)

    def test_non_contiguous_input_is_copied(self, rng):
        wide = rng.integers(0, 256, (4, 128), dtype=np.uint8)
        view = wide[:, ::2]
        out = check_codes(view, 64)
        assert out.flags.c_contiguous
        np.testing.assert_array_equal(out, view)

    def test_contiguous_input_is_not_copied(self, rng):
        codes = rng.integers(0, 256, (4, 64), dtype=np.uint8)
        assert check_codes(codes, 64) is codes

    @pytest.mark.parametrize("dtype", [np.int8, np.int64, np.float32, np.bool_])
    def test_wrong_dtype_is_never_cast(self, dtype):
        with pytest.raises(InvalidDtypeError, match=f"uint8.*got {np.dtype(dtype)}"):
            check_codes(np.zeros((2, 64), dtype=dtype), 64)

    def test_non_array_rejected(self):
        with pytest.raises(InvalidDtypeError, match="numpy uint8 array.*list"):
            check_codes([[0] * 64], 64)

    @pytest.mark.parametrize("shape", [(2, 63), (63,), (2, 64, 1), ()])
    def test_wrong_shape(self, shape):
        with pytest.raises(InvalidInputError, match=r"my_codes must have shape \(n, 64\).*got"):
            check_codes(np.zeros(shape, dtype=np.uint8), 64, name="my_codes")


class TestHamming:
    @pytest.mark.parametrize("nbytes", [64, 3, 8])
    def test_matches_python_oracle(self, rng, popcount_path, nbytes):
        queries = rng.integers(0, 256, (5, nbytes), dtype=np.uint8)
        codes = rng.integers(0, 256, (37, nbytes), dtype=np.uint8)
        codes[4] = queries[1]
        codes[5] = ~queries[2]
        out = hamming_distances(queries, codes)
        assert out.dtype == np.int32 and out.shape == (5, 37)
        np.testing.assert_array_equal(out, _oracle_hamming(queries, codes))
        assert out[1, 4] == 0 and out[2, 5] == nbytes * 8

    def test_blocks_cover_large_inputs(self, rng, popcount_path):
        # More columns than one block and several row blocks: every block boundary is crossed.
        queries = rng.integers(0, 256, (70, 64), dtype=np.uint8)
        codes = rng.integers(0, 256, (9001, 64), dtype=np.uint8)
        expected = np.unpackbits(queries[:, None, :] ^ codes[None, :, :], axis=-1).sum(-1)
        np.testing.assert_array_equal(hamming_distances(queries, codes), expected)

    def test_fast_path_and_table_agree(self, rng, monkeypatch):
        queries = rng.integers(0, 256, (9, 64), dtype=np.uint8)
        codes = rng.integers(0, 256, (300, 64), dtype=np.uint8)
        monkeypatch.setattr(codes_mod, "_HAVE_BITWISE_COUNT", False)
        table = hamming_distances(queries, codes)
        monkeypatch.setattr(codes_mod, "_HAVE_BITWISE_COUNT", hasattr(np, "bitwise_count"))
        np.testing.assert_array_equal(hamming_distances(queries, codes), table)

    def test_single_query_code(self, rng):
        codes = rng.integers(0, 256, (6, 64), dtype=np.uint8)
        np.testing.assert_array_equal(hamming_distances(codes[2], codes), _oracle_hamming(codes[2:3], codes))

    @pytest.mark.parametrize("n,m", [(0, 5), (3, 0), (0, 0)])
    def test_empty(self, rng, n, m, popcount_path):
        out = hamming_distances(np.zeros((n, 64), np.uint8), np.zeros((m, 64), np.uint8))
        assert out.shape == (n, m) and out.dtype == np.int32

    def test_width_mismatch(self):
        with pytest.raises(InvalidInputError, match=r"queries must have shape \(n, 64\).*\(2, 32\)"):
            hamming_distances(np.zeros((2, 32), np.uint8), np.zeros((3, 64), np.uint8))

    def test_bad_dtypes(self):
        with pytest.raises(InvalidDtypeError, match="codes must be a numpy uint8"):
            hamming_distances(np.zeros((2, 64), np.uint8), np.zeros((3, 64), np.int64))
        with pytest.raises(InvalidDtypeError, match="queries must have dtype uint8"):
            hamming_distances(np.zeros((2, 64), np.float32), np.zeros((3, 64), np.uint8))


class TestTopK:
    @pytest.mark.parametrize("k", [1, 3, 19, 20, 24])
    @pytest.mark.parametrize("max_distance", [None, 0, 2])
    def test_matches_oracle_with_many_ties(self, rng, k, max_distance):
        m = 20
        distances = rng.integers(0, 4, (11, m)).astype(np.int32)
        ids = rng.permutation(1000)[:m].astype(np.int64)
        result = top_k(distances, ids, k, max_distance)
        exp_ids, exp_dist, exp_counts = _oracle_top_k(distances, ids, k, max_distance)
        assert result.ids.dtype == np.int64 and result.distances.dtype == np.int32
        assert result.counts.dtype == np.int64 and result.ids.shape == (11, min(k, m))
        np.testing.assert_array_equal(result.ids, exp_ids)
        np.testing.assert_array_equal(result.distances, exp_dist)
        np.testing.assert_array_equal(result.counts, exp_counts)

    def test_ties_at_the_boundary_keep_the_smallest_ids(self):
        # All distances equal: argpartition alone could return any 3 columns.
        ids = np.arange(100, 0, -1, dtype=np.int64)
        result = top_k(np.full((2, 100), 7, np.int32), ids, 3)
        np.testing.assert_array_equal(result.ids, [[1, 2, 3], [1, 2, 3]])
        distances = np.array([[5, 1, 5, 5, 0, 5]], np.int32)
        result = top_k(distances, np.array([9, 8, 7, 3, 6, 4]), 4)
        np.testing.assert_array_equal(result.ids, [[6, 8, 3, 4]])
        np.testing.assert_array_equal(result.distances, [[0, 1, 5, 5]])

    def test_huge_distances_use_the_lexsort_path(self, rng):
        distances = (rng.integers(0, 3, (4, 9)) + 2**62).astype(np.int64)
        ids = rng.permutation(9).astype(np.int64) * 3
        with pytest.raises(InvalidInputError, match=">= 0"):
            top_k(-distances, ids, 2)
        result = top_k(distances - 2**62, ids, 4)
        exp_ids, _, _ = _oracle_top_k(distances - 2**62, ids, 4)
        np.testing.assert_array_equal(result.ids, exp_ids)
        big = top_k(distances, ids, 4)
        np.testing.assert_array_equal(big.ids, exp_ids)

    @pytest.mark.parametrize("k", [5, 10**12])
    def test_k_larger_than_gallery_is_capped(self, k):
        result = top_k(np.array([[3, 1]], np.int32), np.array([10, 20]), k)
        np.testing.assert_array_equal(result.ids, [[20, 10]])
        np.testing.assert_array_equal(result.distances, [[1, 3]])
        np.testing.assert_array_equal(result.counts, [2])

    def test_empty_gallery(self):
        result = top_k(np.zeros((3, 0), np.int32), np.zeros(0, np.int64), 4)
        assert result.ids.shape == (3, 0) and result.distances.shape == (3, 0)
        np.testing.assert_array_equal(result.counts, [0, 0, 0])
        assert len(result) == 3

    def test_no_queries(self):
        result = top_k(np.zeros((0, 5), np.int32), np.arange(5), 2)
        assert result.ids.shape == (0, 2) and result.counts.shape == (0,)

    def test_max_distance_drops_everything(self):
        result = top_k(np.array([[3, 4]], np.int32), np.array([0, 1]), 2, max_distance=2)
        np.testing.assert_array_equal(result.ids, [[-1, -1]])
        np.testing.assert_array_equal(result.counts, [0])

    @pytest.mark.parametrize("k", [0, -1, 2.0, True])
    def test_bad_k(self, k):
        with pytest.raises(InvalidInputError, match="k must be an integer >= 1"):
            top_k(np.zeros((1, 2), np.int32), np.arange(2), k)

    def test_bad_arguments(self):
        d = np.zeros((1, 2), np.int32)
        with pytest.raises(InvalidInputError, match="max_distance must be >= 0"):
            top_k(d, np.arange(2), 1, max_distance=-1)
        with pytest.raises(InvalidInputError, match="max_distance must be an integer"):
            top_k(d, np.arange(2), 1, max_distance=1.5)
        with pytest.raises(InvalidDtypeError, match="distances must be an integer array"):
            top_k(d.astype(np.float32), np.arange(2), 1)
        with pytest.raises(InvalidInputError, match=r"one entry per column of distances \(2\), got 3"):
            top_k(d, np.arange(3), 1)


class TestHex:
    def test_round_trip(self, rng):
        codes = rng.integers(0, 256, (5, 64), dtype=np.uint8)
        strings = codes_to_hex(codes)
        assert all(len(s) == 128 and s == s.lower() for s in strings)
        np.testing.assert_array_equal(hex_to_codes(strings, 64), codes)
        np.testing.assert_array_equal(hex_to_codes([s.upper() for s in strings], 64), codes)

    def test_msb_first_text(self):
        code = binarize(np.array([[1, 0, 0, 0, 0, 0, 0, 0] + [-1] * 7 + [1]], np.float32))
        assert codes_to_hex(code) == ["8001"]
        assert codes_to_hex(code[0]) == ["8001"]

    def test_empty(self):
        assert codes_to_hex(np.zeros((0, 64), np.uint8)) == []
        assert hex_to_codes([], 64).shape == (0, 64)

    def test_errors(self):
        good = "ab" * 64
        with pytest.raises(InvalidInputError, match=r"code 1: expected 128 hex digits.*127 characters"):
            hex_to_codes([good, good[:-1]], 64)
        with pytest.raises(InvalidInputError, match="code 0: expected 128 hex digits"):
            hex_to_codes(["zz" * 64], 64)
        with pytest.raises(InvalidInputError, match="code 0: expected 128 hex digits"):
            hex_to_codes([" a" * 64], 64)
        with pytest.raises(InvalidInputError, match="not a single string"):
            hex_to_codes(good, 64)
        with pytest.raises(InvalidInputError, match="code 0: expected a hex string, got bytes"):
            hex_to_codes([b"ab" * 64], 64)
        with pytest.raises(InvalidInputError, match="nbytes"):
            hex_to_codes([good], 0)
        with pytest.raises(InvalidDtypeError, match="uint8"):
            codes_to_hex(np.zeros((1, 64), np.int16))
