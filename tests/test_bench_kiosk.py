"""The kiosk load benchmark, end to end on the tiny bundle: the service really runs as its own process and
every request is answered; the figures themselves are for docs/benchmarks.md, never asserted."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("starlette", reason="starlette (the 'kiosk' extra) is not installed")

from edge_shitu.cli import main  # noqa: E402


def test_bench_kiosk_runs_the_service_and_reports_every_row(tiny_bundle, drink_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["bench", "kiosk", "--bundle", str(tiny_bundle), "--images", str(drink_dir / "test_images"),
                 "--clients", "1,3", "--seconds", "5", "--max-requests", "12", "--threads", "1", "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    report = json.loads((out / "kiosk.json").read_text())
    assert [r["clients"] for r in report["rows"]] == [1, 3]
    for row in report["rows"]:
        assert row["errors"] == 0 and row["ok"] == row["requests"] and 1 <= row["requests"] <= 12
        assert row["p50_ms"] > 0 and row["p99_ms"] >= row["p50_ms"] and row["p50_vs_direct"] > 0
        assert row["rss_mb"] > 0
    assert report["direct"]["requests"] >= 1 and report["service_rss_mb_start"] > 0
    assert report["bundle"]["replica"] is True
    assert "p50 / in-process" in (out / "kiosk.md").read_text() and "| 3 |" in printed.out


def test_bench_kiosk_refuses_a_folder_without_photos(tiny_bundle, tmp_path, capsys):
    code = main(["bench", "kiosk", "--bundle", str(tiny_bundle), "--images", str(tmp_path), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "expected a folder of photos" in capsys.readouterr().err
