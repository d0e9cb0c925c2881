"""The index benchmark: a short run writes every file, measures every index and computes the ratios."""

from __future__ import annotations

import io
import json

import pytest

from edge_shitu_bench import index as bench_index
from edge_shitu.cli import main
from edge_shitu.errors import InvalidInputError

KINDS = {"ours-numpy", "ours-faiss", "faiss-binary-flat", "reference-files", "hnswlib-float", "float-flat"}


def run(*argv):
    out, err = io.StringIO(), io.StringIO()
    code = main(list(map(str, argv)), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


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
        ours = entry["indexes"]["ours-numpy"]
        assert ours["xor_pass_ms"]["n"] == 3 and ours["xor_pass_ms"]["p50"] > 0
        assert ours["xor_pass_ratio_to_faiss"] == pytest.approx(ours["xor_pass_ms"]["p50"] / base["search_1_ms"]["p50"])
        assert ours["removed"] == min(10_000, entry["size"] - 1) and ours["remove_s"] >= 0
        # codes are 64 bytes; anything under 64 would mean the file lost data
        assert 64 < ours["file_bytes_per_item"] < 400
    assert 0.0 <= first["indexes"]["hnswlib-float"]["recall_at_1"] <= 1.0
    md = (out_dir / "index.md").read_text(encoding="utf-8")
    assert "| 1,200 | ours-numpy |" in md and "reference-files" in md and md in out + "\n"
    assert "XOR pass" in md and "huge pages" not in md
    assert (out_dir / "index.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
