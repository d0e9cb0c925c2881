"""The index benchmark: a short run writes every file, measures every index and computes the ratios."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edge_shitu_bench import index as bench_index
from edge_shitu.errors import InvalidInputError

from conftest import run_cli as run

RERANKED = {"ours-rerank-int8", "ours-rerank-fp16"}
KINDS = {"ours-numpy", "ours-faiss", "faiss-binary-flat", "reference-files", "hnswlib-float", "float-flat"} | RERANKED
D = bench_index.DIM


@pytest.mark.slow
def test_short_run_writes_json_markdown_and_chart(tmp_path):
    out_dir = tmp_path / "out"
    code, out, err = run("bench", "index", "--sizes", "400,1200", "--float-max", "400", "--runs", "3",
                         "--warmup", "1", "--out", out_dir)
    assert code == 0, err
    report = json.loads((out_dir / "index.json").read_text(encoding="utf-8"))
    assert report["baseline"] == "faiss-binary-flat" and report["threads"] == 1
    assert {"cpu_model", "logical_cpus"} <= set(report["machine"])
    first, second = report["sizes"]
    assert (first["size"], second["size"]) == (400, 1200)
    assert set(first["indexes"]) == KINDS and set(second["indexes"]) == KINDS - {"hnswlib-float", "float-flat"}
    for entry in report["sizes"]:
        base = entry["indexes"]["faiss-binary-flat"]
        assert base["search_1_ratio_to_faiss"] == pytest.approx(1.0)
        for name, r in entry["indexes"].items():
            assert r["file_bytes_per_item"] > 0
            if name == "reference-files":
                assert set(r) == {"file_bytes", "file_bytes_per_item"}
                continue
            for key in ("search_1_ms", "search_batch_ms"):
                assert r[key]["n"] == 3 and r[key]["p50"] > 0
            assert r["search_1_ratio_to_faiss"] == pytest.approx(r["search_1_ms"]["p50"] / base["search_1_ms"]["p50"])
            assert r["batch_over_single"] == pytest.approx(r["search_batch_ms"]["p50"] / r["search_1_ms"]["p50"])
            assert r["open_s"] >= 0 and "memory_bytes_per_item" in r
        for kind in ("ours-numpy", "ours-faiss", "faiss-binary-flat"):
            # timed on the whole gallery, before the removal at the end changes its file
            assert entry["indexes"][kind]["searched_items"] == entry["size"]
        for kind in RERANKED:  # timed on the whole gallery too: they run before the removal
            assert entry["indexes"][kind]["searched_items"] == entry["size"]
        ours = entry["indexes"]["ours-numpy"]
        assert ours["xor_pass_ms"]["n"] == 3 and ours["xor_pass_ms"]["p50"] > 0
        assert ours["xor_pass_ratio_to_faiss"] == pytest.approx(ours["xor_pass_ms"]["p50"] / base["search_1_ms"]["p50"])
        assert ours["removed"] == min(10_000, entry["size"] - 1) and ours["remove_s"] >= 0
        # codes are 64 bytes; anything under 64 would mean the file lost data
        assert 64 < ours["file_bytes_per_item"] < 400
    assert 0.0 <= first["indexes"]["hnswlib-float"]["recall_at_1"] <= 1.0
    md = (out_dir / "index.md").read_text(encoding="utf-8")
    assert "| 1,200 | ours-numpy |" in md and "reference-files" in md and md in out + "\n"
    assert "Re-ranked galleries: the Hamming top-16" in md and md.count("| ours-rerank-fp16 |") == 2 * 2
    assert "XOR pass" in md and "huge pages" not in md
    assert (out_dir / "index.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_reranked_rows_size_recall_and_ratios_to_the_plain_search(tmp_path):
    options = bench_index.IndexBenchOptions(sizes=(600,), float_max=0, runs=3, warmup=1, remove=0, chart=False,
                                            out=tmp_path / "out")
    rows = bench_index.run(options)["sizes"][0]["indexes"]
    assert set(rows) == {"ours-numpy", "ours-faiss", "faiss-binary-flat", "reference-files"} | RERANKED
    plain = rows["ours-numpy"]
    # Deterministic data: sign codes find the exact float neighbour for about a third of the queries, the
    # top-16 re-ranked by int8 or fp16 features for nearly all (the rest lie outside the shortlist).
    assert 0.2 < plain["recall_at_1"] < 0.6
    for kind, value_bytes in (("ours-rerank-int8", D + 4), ("ours-rerank-fp16", 2 * D)):
        r = rows[kind]
        assert r["shortlist"] == 16 and r["searched_items"] == 600
        assert r["plain_recall_at_1"] == plain["recall_at_1"] and r["recall_at_1"] >= 0.9
        # The plain gallery plus the compact row: the value bytes and SQLite's row and page overhead
        # (a 4 KiB page holds 7 int8 rows or 3 fp16 rows), never float32's 4 d.
        extra = r["file_bytes_per_item"] - plain["file_bytes_per_item"]
        assert value_bytes <= extra < 1.5 * value_bytes
        assert r["memory_bytes_per_item"] > 0 and r["open_s"] >= 0 and r["build_s"] >= 0
        for key in ("search_1", "search_batch"):
            found, base = r[f"{key}_ms"], r[f"plain_{key}_ms"]
            assert found["n"] == base["n"] == 3
            assert r[f"{key}_ratio_to_plain"] == pytest.approx(found["p50"] / base["p50"])
            assert np.isfinite(r[f"{key}_extra_ms"])
    assert rows["ours-rerank-int8"]["recall_at_1"] >= plain["recall_at_1"] + 0.3


def test_rerank_none_measures_no_reranked_gallery(tmp_path):
    options = bench_index.IndexBenchOptions(sizes=(100,), float_max=0, runs=1, warmup=0, remove=0, chart=False,
                                            rerank=(), out=tmp_path / "out")
    result = bench_index.run(options)
    rows = result["sizes"][0]["indexes"]
    assert not RERANKED & set(rows) and "recall_at_1" not in rows["ours-numpy"]
    assert "Re-ranked" not in bench_index.markdown(result)


def test_rerank_option_values():
    assert bench_index.parse_rerank("int8,fp16") == ("int8", "fp16")
    assert bench_index.parse_rerank(" fp16 ") == ("fp16",)
    assert bench_index.parse_rerank("none") == ()
    for bad in ("", "int4", "int8,int8", "none,int8"):
        with pytest.raises(InvalidInputError, match="--rerank must be 'none' or distinct formats"):
            bench_index.parse_rerank(bad)
    with pytest.raises(InvalidInputError, match="rerank must be a tuple"):
        bench_index.IndexBenchOptions(rerank=("int4",))
    with pytest.raises(InvalidInputError, match="rerank must be a tuple"):
        bench_index.IndexBenchOptions(rerank="int8")
    with pytest.raises(InvalidInputError, match="shortlist"):
        bench_index.IndexBenchOptions(shortlist=0)


def test_item_embeddings_are_drawn_again_identically(monkeypatch):
    monkeypatch.setattr(bench_index, "_CHUNK_ITEMS", 7)
    owner, codes, emb, qfloat, qcodes = bench_index._synthetic(23, 5, 3, want_float=True)
    again = list(bench_index._item_embeddings(23, 3))
    assert [x.shape[0] for x in again] == [7, 7, 7, 2]
    np.testing.assert_array_equal(np.concatenate(again), emb)
    np.testing.assert_array_equal(np.packbits(emb > 0, axis=1), codes)
    np.testing.assert_array_equal(bench_index._exact_top1(again, qfloat), np.argmax(qfloat @ emb.T, axis=1))
    assert bench_index._exact_top1(bench_index._embedding_chunks(23, 3, None), qfloat).tolist() == \
        bench_index._exact_top1(bench_index._embedding_chunks(23, 3, emb), qfloat).tolist()


def test_bad_sizes_are_one_line_errors(tmp_path):
    code, _, err = run("bench", "index", "--sizes", "10,abc", "--out", tmp_path)
    assert code == 2 and "--sizes must be comma-separated integers" in err
    code, _, err = run("bench", "index", "--sizes", "10", "--out", tmp_path)
    assert code == 2 and "sizes must be integers >= 100" in err


def test_options_are_checked():
    with pytest.raises(InvalidInputError, match="batch"):
        bench_index.IndexBenchOptions(batch=100, queries=10)
    with pytest.raises(InvalidInputError, match="runs"):
        bench_index.IndexBenchOptions(runs=0)


def test_xor_pass_reads_every_code_once_in_the_numpy_block_layout(monkeypatch):
    import numpy as np

    from edge_shitu import search

    monkeypatch.setattr(search, "_BLOCK_ROWS", 7)
    codes = np.random.default_rng(0).integers(0, 256, (23, bench_index.BITS // 8), dtype=np.uint8)
    run = bench_index._xor_pass(codes)
    assert run(codes[:1]) == 23
