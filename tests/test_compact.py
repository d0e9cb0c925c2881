"""Compact embeddings (int8 / fp16): compression bounds, blobs, inner products and shortlist re-ranking."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from edge_shitu.codes import l2_normalize
from edge_shitu.compact import (
    COMPACT_FORMATS,
    CompactVectors,
    bytes_per_item,
    compress,
    from_blob,
    from_blobs,
    inner_products,
    rerank_shortlist,
    to_blob,
)
from edge_shitu.errors import GalleryCorruptError, InvalidDtypeError, InvalidInputError


def _slow_rerank(shortlist, queries, vectors, k):
    """Oracle: one query and one candidate at a time, explicit (-similarity, shortlist column) key."""
    feats = vectors.dequantize().astype(np.float64)
    positions = np.full((shortlist.shape[0], k), -1, np.int64)
    sims = np.full((shortlist.shape[0], k), np.nan)
    for i in range(shortlist.shape[0]):
        cands = []
        for col in range(shortlist.shape[1]):
            p = int(shortlist[i, col])
            if p >= 0:
                sim = sum(float(queries[i, j]) * float(feats[p, j]) for j in range(feats.shape[1]))
                cands.append((-sim, col, p))
        cands.sort()
        for r, (neg, _, p) in enumerate(cands[:k]):
            positions[i, r], sims[i, r] = p, -neg
    return positions, sims


def test_int8_round_trip_error_is_at_most_half_a_step(rng):
    x = rng.normal(size=(50, 64)).astype(np.float32) * rng.uniform(0.1, 10, size=(50, 1)).astype(np.float32)
    v = compress(x, "int8")
    unit = l2_normalize(x)
    assert v.values.dtype == np.int8 and v.scales.dtype == np.float32 and v.values.shape == (50, 64)
    np.testing.assert_allclose(v.scales, np.abs(unit).max(axis=1) / 127, rtol=1e-6)
    assert np.abs(v.values).max(axis=1).min() == 127  # each item uses the whole range
    err = np.abs(v.dequantize() - unit)
    assert (err <= v.scales[:, None] / 2 * (1 + 1e-5) + 1e-8).all()


def test_fp16_round_trip_and_zero_rows(rng):
    x = rng.normal(size=(20, 32)).astype(np.float64)
    x[3] = 0.0
    v = compress(x, "fp16")
    assert v.values.dtype == np.float16 and (v.scales == 1).all()
    np.testing.assert_allclose(v.dequantize(), l2_normalize(x), atol=2 ** -11)
    q = compress(x, "int8")
    assert q.scales[3] == 0 and not q.values[3].any() and not q.dequantize()[3].any()
    assert not v.values.flags.writeable and not q.scales.flags.writeable


def test_sizes_and_empty_input():
    assert bytes_per_item("int8", 512) == 516 and bytes_per_item("fp16", 512) == 1024
    for fmt in COMPACT_FORMATS:
        v = compress(np.zeros((0, 8), np.float32), fmt)
        assert len(v) == 0 and v.dim == 8 and v.bytes_per_item == bytes_per_item(fmt, 8)
        assert inner_products(np.ones((2, 8), np.float32), v).shape == (2, 0)
    with pytest.raises(InvalidInputError, match="compact format must be one of int8, fp16, got 'int4'"):
        compress(np.ones((2, 8), np.float32), "int4")
    with pytest.raises(InvalidDtypeError, match="floating-point"):
        compress(np.ones((2, 8), np.int32), "int8")
    with pytest.raises(InvalidInputError, match="NaN"):
        compress(np.full((2, 8), np.nan, np.float32), "int8")
    with pytest.raises(InvalidInputError, match="dim must be an integer >= 1"):
        bytes_per_item("int8", 0)


def test_inner_products_match_the_dequantised_features(rng):
    x = rng.normal(size=(30, 48)).astype(np.float32)
    q = l2_normalize(rng.normal(size=(4, 48)).astype(np.float32))
    for fmt in COMPACT_FORMATS:
        v = compress(x, fmt)
        got = inner_products(q, v)
        assert got.dtype == np.float32 and got.shape == (4, 30)
        np.testing.assert_allclose(got, q.astype(np.float64) @ v.dequantize().astype(np.float64).T, atol=1e-6)
        np.testing.assert_array_equal(inner_products(q[1], v), got[1])
    with pytest.raises(InvalidInputError, match=r"query must be \(q, 48\), got shape \(1, 47\)"):
        inner_products(q[0, :47], v)
    with pytest.raises(InvalidDtypeError, match="floating-point"):
        inner_products(np.ones(48, np.int64), v)


@pytest.mark.parametrize("fmt", COMPACT_FORMATS)
def test_blob_round_trip_is_exact_and_little_endian(rng, fmt):
    v = compress(rng.normal(size=(6, 16)).astype(np.float32), fmt)
    blobs = [to_blob(v, i) for i in range(len(v))]
    assert all(len(b) == bytes_per_item(fmt, 16) for b in blobs)
    back = from_blobs(blobs, fmt=fmt, dim=16)
    np.testing.assert_array_equal(back.values, v.values)
    np.testing.assert_array_equal(back.scales, v.scales)
    assert [to_blob(back, i) for i in range(6)] == blobs
    one = from_blob(blobs[2], fmt=fmt, dim=16)
    assert len(one) == 1 and one.values.tobytes() == v.values[2].tobytes()
    if fmt == "int8":
        assert blobs[0][:4] == struct.pack("<f", float(v.scales[0]))
        assert blobs[0][4:] == v.values[0].tobytes()
    else:
        assert blobs[0] == struct.pack("<16e", *map(float, v.values[0]))


def test_corrupt_blobs_are_refused(rng):
    v = compress(rng.normal(size=(2, 8)).astype(np.float32), "int8")
    good = to_blob(v, 0)
    cases = [
        (good[:-1], "int8", "must be 12 bytes, got 11"),
        (good + b"\0", "int8", "must be 12 bytes, got 13"),
        (struct.pack("<f", float("nan")) + good[4:], "int8", "scales must be finite and >= 0"),
        (struct.pack("<f", -1.0) + good[4:], "int8", "scales must be finite and >= 0"),
        (good[:4] + b"\x80" + good[5:], "int8", r"in \[-127, 127\], got -128 in rows \[0\]"),
        (struct.pack("<8e", 0, 0, float("inf"), 0, 0, 0, 0, 0), "fp16", "fp16 values must be finite"),
        (b"", "fp16", "must be 16 bytes, got 0"),
    ]
    for blob, fmt, message in cases:
        with pytest.raises(GalleryCorruptError, match=message) as info:
            from_blob(blob, fmt=fmt, dim=8, where="g.db item 7")
        assert str(info.value).startswith("g.db item 7: ")
    with pytest.raises(GalleryCorruptError, match="got str"):
        from_blobs([good, "text"], fmt="int8", dim=8)
    with pytest.raises(InvalidInputError, match="compact format"):
        from_blob(good, fmt="float32", dim=8)
    with pytest.raises(InvalidInputError, match=r"row must be an integer in \[0, 2\)"):
        to_blob(v, 2)


def test_compact_vectors_validate_their_arrays():
    with pytest.raises(InvalidDtypeError, match="int8 values must be int8"):
        CompactVectors("int8", np.zeros((2, 4), np.int16), np.ones(2, np.float32))
    with pytest.raises(InvalidDtypeError, match="scales must be float32"):
        CompactVectors("int8", np.zeros((2, 4), np.int8), np.ones(2, np.float64))
    with pytest.raises(InvalidInputError, match=r"scales must be \(2,\)"):
        CompactVectors("int8", np.zeros((2, 4), np.int8), np.ones(3, np.float32))
    with pytest.raises(InvalidInputError, match="fp16 scales must all be 1"):
        CompactVectors("fp16", np.zeros((2, 4), np.float16), np.full(2, 2, np.float32))


@pytest.mark.parametrize("fmt", COMPACT_FORMATS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rerank_matches_the_oracle_with_ties_and_padding(fmt, seed):
    rng = np.random.default_rng(seed)
    n, d, q, width = 40, 24, 25, 7
    x = rng.normal(size=(n, d)).astype(np.float32)
    x[10:15] = x[5]  # identical items: equal similarities, the shortlist's order must decide
    v = compress(x, fmt)
    queries = l2_normalize(rng.normal(size=(q, d)).astype(np.float32))
    shortlist = np.stack([rng.permutation(n)[:width] for _ in range(q)]).astype(np.int64)
    shortlist[0] = [12, 5, 14, 3, 10, 11, 13]  # five tied candidates in a chosen order
    shortlist[1] = -1                            # no candidate at all
    shortlist[2, 3:] = -1                        # fewer candidates than N
    shortlist[3, [0, 2, 5]] = -1                 # holes anywhere in the row
    for k in (1, 3, width, width + 4):
        pos, sims = rerank_shortlist(shortlist, queries, v, k)
        want_pos, want_sims = _slow_rerank(shortlist, queries, v, k)
        assert pos.dtype == np.int64 and sims.dtype == np.float32 and pos.shape == sims.shape == (q, k)
        np.testing.assert_array_equal(pos, want_pos)
        np.testing.assert_allclose(sims, want_sims, atol=1e-6)
        assert np.array_equal(np.isnan(sims), pos < 0)
    pos, sims = rerank_shortlist(shortlist, queries, v, width)
    tied = [p for p in pos[0] if p in (5, 10, 11, 12, 13, 14)]
    assert tied == [12, 5, 14, 10, 11, 13]  # ties in shortlist order
    assert len(set(sims[0][np.isin(pos[0], tied)].tolist())) == 1
    np.testing.assert_allclose(sims[0], inner_products(queries[0], v)[pos[0]], atol=1e-6)


def test_rerank_edges(rng):
    v = compress(rng.normal(size=(5, 8)).astype(np.float32), "int8")
    qf = rng.normal(size=(3, 8)).astype(np.float32)
    pos, sims = rerank_shortlist(np.zeros((0, 4), np.int64), np.zeros((0, 8), np.float32), v, 2)
    assert pos.shape == sims.shape == (0, 2) and pos.dtype == np.int64 and sims.dtype == np.float32
    pos, sims = rerank_shortlist(np.zeros((3, 0), np.int64), qf, v, 2)  # empty shortlist rows
    assert (pos == -1).all() and np.isnan(sims).all() and pos.shape == (3, 2)
    pos, _ = rerank_shortlist(np.full((3, 4), -1, np.int64), qf, v, 5)
    assert (pos == -1).all()
    empty = compress(np.zeros((0, 8), np.float32), "fp16")
    pos, _ = rerank_shortlist(np.full((3, 2), -1, np.int64), qf, empty, 1)
    assert (pos == -1).all()


def test_rerank_errors(rng):
    v = compress(rng.normal(size=(5, 8)).astype(np.float32), "int8")
    qf = rng.normal(size=(2, 8)).astype(np.float32)
    sl = np.array([[0, 1], [2, -1]], np.int64)
    with pytest.raises(InvalidDtypeError, match="shortlist must be int64"):
        rerank_shortlist(sl.astype(np.int32), qf, v, 1)
    with pytest.raises(InvalidInputError, match=r"positions must be in \[-1, 5\)"):
        rerank_shortlist(np.array([[0, 5], [1, 2]], np.int64), qf, v, 1)
    with pytest.raises(InvalidInputError, match=r"positions must be in \[-1, 5\)"):
        rerank_shortlist(np.array([[0, -2], [1, 2]], np.int64), qf, v, 1)
    with pytest.raises(InvalidInputError, match="shortlist row 1 repeats a position"):
        rerank_shortlist(np.array([[0, 1, -1, -1], [3, 4, 3, -1]], np.int64), qf, v, 1)
    with pytest.raises(InvalidInputError, match="query_features has 1 rows, shortlist has 2"):
        rerank_shortlist(sl, qf[:1], v, 1)
    with pytest.raises(InvalidInputError, match=r"query_features must be \(q, 8\)"):
        rerank_shortlist(sl, qf[:, :4], v, 1)
    with pytest.raises(InvalidInputError, match="k must be an integer >= 1, got 0"):
        rerank_shortlist(sl, qf, v, 0)
    with pytest.raises(InvalidInputError, match="2-D"):
        rerank_shortlist(sl[0], qf, v, 1)
