"""``hash eval``: re-ranked search (--rerank-n, --compact, --rerank-sweep) and repeated class splits (--splits)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import average_precision, run_cli as run
from edge_shitu.codes import binarize
from edge_shitu.compact import bytes_per_item, compress
from edge_shitu.errors import InvalidInputError
from edge_shitu.hashing import HashHead
from edge_shitu_converters.hash_heads import save_head
from edge_shitu_converters.hash_training import (
    LabelledEmbeddings,
    leave_one_out,
    leave_one_out_reranked,
    paired_difference,
    t_interval,
)

# Two-sided 95% Student t quantiles t_{0.975, df} (tables), for the interval checks.
_T975 = {1: 12.706204736174698, 2: 4.302652729911275, 4: 2.7764451051977987}


def _toy(seed=0, classes=12, per_class=6, dim=64):
    """Classes apart in float space, but many sign bits are nuisance: codes are imperfect, re-ranking helps."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    x = np.repeat(centres, per_class, axis=0) + 1.2 * rng.normal(size=(classes * per_class, dim))
    x[7] = x[8]  # identical items: equal Hamming distance and equal similarity
    return x.astype(np.float32), np.array([f"c{i}" for i in range(classes)]).repeat(per_class)


@pytest.fixture
def toy_npz(tmp_path):
    x, labels = _toy()
    path = tmp_path / "toy.npz"
    np.savez(path, embeddings=x, labels=labels)
    return path


def _slow_reranked(data, codes, vectors, n):
    """Oracle: per query, the Hamming order of the others (ties by index), its first n sorted by
    (-similarity, Hamming rank) with dequantised features, then the rest; textbook recall@1 and AP."""
    feats = vectors.dequantize().astype(np.float64)
    bits = np.unpackbits(codes, axis=1).astype(int)
    y, total = data.classes, len(data)
    hits, aps = [], []
    for i in range(total):
        others = [j for j in range(total) if j != i]
        if not any(y[j] == y[i] for j in others):
            continue
        ham = sorted(others, key=lambda j: (int(np.sum(bits[i] != bits[j])), j))
        q = data.embeddings[i].astype(np.float64)
        sims = {j: float(np.float32(sum(q[t] * feats[j, t] for t in range(q.size)))) for j in ham[:n]}
        ranked = sorted(ham[:n], key=lambda j: (-sims[j], ham.index(j))) + ham[n:]
        rel = [y[j] == y[i] for j in ranked]
        hits.append(rel[0])
        aps.append(average_precision(rel))
    return float(np.mean(hits)), float(np.mean(aps)), len(hits)


@pytest.mark.parametrize("fmt", ["int8", "fp16"])
def test_reranked_scores_match_the_oracle(fmt):
    x, labels = _toy(classes=8, per_class=5, dim=16)
    data = LabelledEmbeddings.from_arrays(x, labels)
    codes = binarize(data.embeddings)
    vectors = compress(data.embeddings, fmt)
    for n in (1, 2, 3, 8, 100):
        got = leave_one_out_reranked(data, codes=codes, vectors=vectors, shortlist=n)
        r1, ap, queries = _slow_reranked(data, codes, vectors, n)
        assert got.queries == queries == 40 and got.items == 40
        assert got.recall_at_1 == pytest.approx(r1, abs=1e-12), n
        assert got.mean_ap == pytest.approx(ap, abs=1e-12), n
    # Re-ranking everything is the float ranking (to the compact format's rounding); one candidate is Hamming's.
    assert leave_one_out_reranked(data, codes=codes, vectors=vectors, shortlist=1) == leave_one_out(data, codes=codes)
    with pytest.raises(InvalidInputError, match="shortlist must be an integer >= 1"):
        leave_one_out_reranked(data, codes=codes, vectors=vectors, shortlist=0)
    with pytest.raises(InvalidInputError, match=r"vectors must be \(40, 16\)"):
        leave_one_out_reranked(data, codes=codes, vectors=compress(data.embeddings[:5], fmt), shortlist=2)


def test_json_gains_rerank_beside_the_existing_entries(toy_npz, tmp_path):
    code, out, err = run("hash", "eval", "--embeddings", toy_npz, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert list(doc) == ["embeddings", "split", "results", "training_seconds"]
    res = doc["results"]
    assert list(res) == ["float", "sign", "rerank"]
    for name in ("float", "sign"):
        assert list(res[name]) == ["recall_at_1", "map", "queries", "items"]
    rr = res["rerank"]
    assert list(rr) == ["n", "compact", "bytes_per_item", "recall_at_1", "map", "queries", "items", "codes"]
    assert (rr["n"], rr["compact"], rr["bytes_per_item"], rr["codes"]) == (16, "int8", 68, "sign")
    assert isinstance(rr["recall_at_1"], float) and isinstance(rr["map"], float)
    assert rr["queries"] == 72 and rr["items"] == 72
    # The figure is the brute-force one on the same items.
    x, labels = _toy()
    data = LabelledEmbeddings.from_arrays(x, labels)
    r1, ap, _ = _slow_reranked(data, binarize(data.embeddings), compress(data.embeddings, "int8"), 16)
    assert rr["recall_at_1"] == pytest.approx(r1, abs=1e-12) and rr["map"] == pytest.approx(ap, abs=1e-12)
    assert rr["recall_at_1"] > res["sign"]["recall_at_1"]  # the toy is built so that re-ranking helps

    save_head(HashHead.identity(64), tmp_path / "id.npz")
    code, out, err = run("hash", "eval", "--embeddings", toy_npz, "--head", tmp_path / "id.npz", "--compact", "fp16",
                         "--rerank-n", 5, "--json")
    assert code == 0, err
    res = json.loads(out)["results"]
    assert list(res) == ["float", "sign", "head", "rerank", "rerank_head"]
    assert res["rerank_head"]["codes"] == "head" and res["rerank_head"]["bytes_per_item"] == bytes_per_item("fp16", 64)
    # The identity head is plain sign: its re-ranked search is the sign codes' one.
    assert {k: v for k, v in res["rerank_head"].items() if k != "codes"} == \
        {k: v for k, v in res["rerank"].items() if k != "codes"}


def test_rerank_n_zero_omits_it_and_the_table_has_its_row(toy_npz):
    code, out, err = run("hash", "eval", "--embeddings", toy_npz, "--rerank-n", 0, "--json")
    assert code == 0, err
    assert list(json.loads(out)["results"]) == ["float", "sign"] and "rerank_sweep" not in json.loads(out)
    code, out, err = run("hash", "eval", "--embeddings", toy_npz, "--rerank-n", 0)
    assert code == 0 and "rerank" not in out
    code, out, err = run("hash", "eval", "--embeddings", toy_npz, "--rerank-n", 8)
    assert code == 0 and any(line.startswith("rerank-8 ") for line in out.splitlines())


def test_sweep_rows(toy_npz):
    code, out, err = run("hash", "eval", "--embeddings", toy_npz, "--rerank-sweep", "2, 3,16,200", "--json")
    assert code == 0, err
    doc = json.loads(out)
    rows = doc["rerank_sweep"]
    assert [r["n"] for r in rows] == [2, 3, 16, 200]
    assert all(list(r) == list(doc["results"]["rerank"]) for r in rows)
    assert rows[2] == doc["results"]["rerank"]  # N = 16 is the default --rerank-n
    # Re-ranking all 71 others orders by inner product: float's recall@1 up to int8 rounding.
    assert rows[3]["recall_at_1"] == pytest.approx(doc["results"]["float"]["recall_at_1"], abs=2 / 72)
    code, out, err = run("hash", "eval", "--embeddings", toy_npz, "--rerank-sweep", "2,5", "--rerank-n", 0)
    assert code == 0, err
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("codes "))
    assert [line.split()[:2] for line in lines[head + 1:head + 3]] == [["sign", "2"], ["sign", "5"]]


def test_t_interval_and_paired_difference():
    x = [0.01, 0.03, -0.005, 0.02, 0.015]
    lo, hi = t_interval(x)
    half = _T975[4] * np.std(x, ddof=1) / math.sqrt(5)
    assert lo == pytest.approx(np.mean(x) - half, abs=1e-12) and hi == pytest.approx(np.mean(x) + half, abs=1e-12)
    lo, hi = t_interval([1.0, 2.0])
    assert hi - lo == pytest.approx(2 * _T975[1] * np.std([1, 2], ddof=1) / math.sqrt(2), rel=1e-10)
    assert t_interval([0.5]) is None and t_interval([]) is None
    d = paired_difference([0.9, 0.8, 0.85], [0.8, 0.75, 0.8])
    assert d.diffs == pytest.approx((0.1, 0.05, 0.05)) and d.mean == pytest.approx(0.2 / 3)
    assert d.ci95[0] < 0 < d.ci95[1] and d.excludes_zero is False  # 3 splits: t = 4.30, too wide
    assert paired_difference([0.9, 0.8, 0.85], [0.8, 0.71, 0.74]).excludes_zero is True
    assert paired_difference([0.5], [0.4]).ci95 is None and paired_difference([0.5], [0.4]).excludes_zero is None
    with pytest.raises(InvalidInputError, match="two equal non-empty lists"):
        paired_difference([1.0], [1.0, 2.0])


def test_splits_summary_arithmetic(toy_npz):
    argv = ["hash", "eval", "--embeddings", toy_npz, "--split-classes", "--splits", 3, "--seed", 4, "--bits", 64,
            "--epochs", 2, "--rerank-n", 4]
    code, out, err = run(*argv, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert list(doc) == ["embeddings", "train_fraction", "splits", "summary", "vs_sign"]
    splits = doc["splits"]
    assert [s["seed"] for s in splits] == [4, 5, 6]
    methods = ["float", "sign", "itq", "dshsd", "rerank"]
    for s in splits:
        assert list(s["results"]) == methods
        assert s["train"]["classes"] + s["test"]["classes"] == 12 and s["results"]["rerank"]["n"] == 4
    assert len({tuple(sorted(s["test"].items())) for s in splits}) >= 1
    assert list(doc["summary"]) == methods and list(doc["vs_sign"]) == ["float", "itq", "dshsd", "rerank"]
    for m in methods:
        r1 = [s["results"][m]["recall_at_1"] for s in splits]
        ap = [s["results"][m]["map"] for s in splits]
        assert doc["summary"][m]["recall_at_1_mean"] == pytest.approx(sum(r1) / 3, abs=1e-12)
        assert doc["summary"][m]["map_mean"] == pytest.approx(sum(ap) / 3, abs=1e-12)
    sign = [s["results"]["sign"]["recall_at_1"] for s in splits]
    for m in ("itq", "dshsd", "rerank"):
        diffs = [s["results"][m]["recall_at_1"] - b for s, b in zip(splits, sign)]
        mean = sum(diffs) / 3
        sd = math.sqrt(sum((v - mean) ** 2 for v in diffs) / 2)
        vs = doc["vs_sign"][m]
        assert vs["splits"] == 3 and vs["recall_at_1_diffs"] == pytest.approx(diffs, abs=1e-12)
        assert vs["recall_at_1_diff_mean"] == pytest.approx(mean, abs=1e-12)
        assert vs["ci95"] == pytest.approx([mean - _T975[2] * sd / math.sqrt(3), mean + _T975[2] * sd / math.sqrt(3)],
                                           abs=1e-9)
    code, text, err = run(*argv)
    assert code == 0, err
    assert "3 class splits (seeds 4..6" in text
    for m in ("itq", "dshsd", "rerank-4"):
        verdict = next(line for line in text.splitlines() if line.startswith(m + ": recall@1 interval "))
        lo, hi = doc["vs_sign"][m.split("-")[0]]["ci95"]
        assert ("excludes zero" in verdict.split(";")[0]) == (lo > 0 or hi < 0)


def test_one_split_keeps_todays_shape_and_says_there_is_no_interval(toy_npz):
    argv = ["hash", "eval", "--embeddings", toy_npz, "--split-classes", "--bits", 64, "--epochs", 2]
    code, out, err = run(*argv, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert list(doc)[:4] == ["embeddings", "split", "results", "training_seconds"]
    assert list(doc["results"]) == ["float", "sign", "itq", "dshsd", "rerank"]
    assert len(doc["splits"]) == 1 and doc["splits"][0]["results"] == doc["results"]
    assert doc["vs_sign"]["dshsd"]["ci95"] is None and doc["vs_sign"]["dshsd"]["splits"] == 1
    code, text, err = run(*argv)
    assert code == 0 and "no 95% interval with one split" in text


@pytest.mark.parametrize("flags, message", [
    (["--rerank-n", -1], "--rerank-n must be an integer >= 0, got '-1'"),
    (["--rerank-n", "x"], "--rerank-n must be an integer >= 0, got 'x'"),
    (["--compact", "int4"], "--compact must be one of int8, fp16, got 'int4'"),
    (["--rerank-sweep", "2,,3"], "--rerank-sweep must be an integer >= 1, got ''"),
    (["--rerank-sweep", "0"], "--rerank-sweep must be an integer >= 1, got '0'"),
    (["--rerank-sweep", "2,2"], "--rerank-sweep repeats a value"),
    (["--splits", 0, "--split-classes"], "--splits must be an integer >= 1, got '0'"),
    (["--splits", 2], "--splits only applies with --split-classes"),
    (["--splits", 2, "--split-classes", "--rerank-sweep", "2"], "--rerank-sweep needs a single split"),
])
def test_bad_flag_values_exit_2_with_one_line(toy_npz, flags, message):
    code, out, err = run("hash", "eval", "--embeddings", toy_npz, *flags)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message in err, err
