"""Tests of edge_shitu.codes: binarisation layout and hex text, against slow oracles.

Validation of codes, Hamming distances and top-k are the search engine's: tests/test_search.py."""

from __future__ import annotations

import numpy as np
import pytest

from edge_shitu.codes import binarize, codes_to_hex, hex_to_codes, l2_normalize
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
        with pytest.raises(InvalidDtypeError, match="uint8.*list"):
            codes_to_hex([[0] * 64])
        with pytest.raises(InvalidInputError, match=r"shape \(n, bytes\).*\(1, 2, 64\)"):
            codes_to_hex(np.zeros((1, 2, 64), np.uint8))
