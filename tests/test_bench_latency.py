"""The latency benchmark: report helpers, the reference pipeline's documented steps (oracles), and short real
runs of ``edge-shitu bench latency`` (replica bundle, a few images, a small gallery)."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_shitu_bench import latency, machine, reference, report
from edge_shitu.bundle import Bundle
from edge_shitu.errors import BackendUnavailableError, ImageDecodeError, InvalidInputError, MissingFileError
from edge_shitu.recognizer import STAGES

REPO = Path(__file__).resolve().parent.parent


def _oracle_percentile(values, q):
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def test_percentiles_match_linear_interpolation_oracle(rng):
    values = list(rng.gamma(2.0, 10.0, size=37))
    got = report.percentiles(values)
    assert set(got) == {"p50", "p90", "p99"}
    for q in (50, 90, 99):
        assert got[f"p{q}"] == pytest.approx(_oracle_percentile(values, q), rel=1e-12)
    assert report.percentiles([4.0]) == {"p50": 4.0, "p90": 4.0, "p99": 4.0}
    s = report.summarize([1.0, 2.0, 3.0, 10.0])
    assert (s["n"], s["min"], s["max"], s["mean"], s["p50"]) == (4, 1.0, 10.0, 4.0, 2.5)


@pytest.mark.parametrize("values, message", [([], "non-empty"), ([1.0, float("nan")], "finite"),
                                             ([[1.0, 2.0]], "1-D")])
def test_percentiles_reject_bad_samples(values, message):
    with pytest.raises(InvalidInputError, match=message):
        report.percentiles(values)
    with pytest.raises(InvalidInputError, match="percentiles must be in"):
        report.percentiles([1.0], qs=(101,))


def test_ratio():
    assert report.ratio(2.0, 4.0) == 0.5
    assert report.ratio(1.0, 0.0) is None
    assert report.ratio(None, 1.0) is None and report.ratio(1.0, None) is None


def test_markdown_table_escapes_and_checks_rows():
    text = report.markdown_table(["a", "b"], [["x|y", None], [1, 2.5]])
    assert text.splitlines() == ["| a | b |", "|:---|---:|", "| x\\|y |  |", "| 1 | 2.5 |"]
    with pytest.raises(InvalidInputError, match="row 0 has 1 cells, expected 2"):
        report.markdown_table(["a", "b"], [["only one"]])
    with pytest.raises(InvalidInputError, match="align"):
        report.markdown_table(["a"], [], align=["x"])


def test_write_json_is_strict(tmp_path):
    path = report.write_json(tmp_path / "sub" / "r.json", {"a": [1, 2], "b": "é"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"a": [1, 2], "b": "é"}
    with pytest.raises(InvalidInputError, match="cannot write as JSON"):
        report.write_json(tmp_path / "nan.json", {"a": float("nan")})
    assert not (tmp_path / "nan.json").exists()


def test_machine_info_and_versions():
    info = report.machine_info()
    assert {"system", "machine", "python", "cpu_model", "logical_cpus", "usable_cpus", "cpu_flags",
            "memory_total_mb"} <= set(info)
    assert info["usable_cpus"] >= 1
    versions = report.package_versions(["numpy", ("no-such-dist-xyz", "pillow"), "no-such-dist-abc"])
    assert versions["numpy"] == np.__version__
    assert versions["no-such-dist-xyz"] is not None  # found under its alternative name (pillow)
    assert versions["no-such-dist-abc"] is None


def test_peak_rss_of_a_subprocess_is_its_own(tmp_path):
    # Linux keeps ru_maxrss across fork + exec: a child must not report this (bigger) process's peak.
    ballast = np.ones(300 * 2**20 // 8)
    assert report.peak_rss_mb() >= 300
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", "from edge_shitu_bench.report import peak_rss_mb; print(peak_rss_mb())"],
                         capture_output=True, text=True, env=env, check=True).stdout
    assert 5 < float(out) < 200
    del ballast


def test_stacked_bar_chart_writes_a_png(tmp_path):
    from PIL import Image

    path = report.stacked_bar_chart(tmp_path / "c.png", ["a\n1 thread", "b\n1 thread"],
                                    {"x": [1.0, 2.0], "y": [3.0, -1.0]}, title="t", ylabel="ms", totals=[4.0, None])
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 400 and im.size[1] > 300
    with pytest.raises(InvalidInputError, match="stack 'x' has 1 values"):
        report.stacked_bar_chart(tmp_path / "d.png", ["a", "b"], {"x": [1.0]}, title="t", ylabel="ms")
    with pytest.raises(InvalidInputError, match="at least one bar"):
        report.stacked_bar_chart(tmp_path / "d.png", [], {}, title="t", ylabel="ms")


def test_chart_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(BackendUnavailableError, match=r"edge-shitu\[bench\]"):
        report.stacked_bar_chart(tmp_path / "c.png", ["a"], {"x": [1.0]}, title="t", ylabel="ms")
    assert not (tmp_path / "c.png").exists()


def test_parse_det_results_takes_top5_then_threshold():
    scores = [0.9, 0.1, 0.5, 0.3, 0.25, 0.21, 0.8]
    rows = np.array([[0, s, i, i, i + 10, i + 10] for i, s in enumerate(scores)], np.float32)
    kept = reference.parse_det_results(rows)
    # The five best (0.9, 0.8, 0.5, 0.3, 0.25) pass 0.2; 0.21 is sixth, so it is cut before the threshold.
    assert [round(r["score"], 2) for r in kept] == [0.9, 0.8, 0.5, 0.3, 0.25]
    np.testing.assert_array_equal(kept[0]["bbox"], [0, 0, 10, 10])
    low = np.array([[0, 0.9, 0, 0, 5, 5], [0, 0.15, 0, 0, 5, 5], [0, 0.1, 0, 0, 5, 5]], np.float32)
    assert len(reference.parse_det_results(low)) == 1
    assert reference.parse_det_results(np.zeros((0, 6), np.float32)) == []
    with pytest.raises(InvalidInputError, match=r"\(N, 6\)"):
        reference.parse_det_results(np.zeros((2, 5), np.float32))


def test_append_self_and_integer_crops():
    img = np.arange(10 * 12 * 3, dtype=np.uint8).reshape(10, 12, 3)
    regions = reference.append_self([], img.shape)
    np.testing.assert_array_equal(regions[0]["bbox"], [0, 0, 12, 10])
    np.testing.assert_array_equal(reference.crop_region(img, np.array([1.9, 2.7, 5.2, 6.99])), img[2:6, 1:5])
    # Negative coordinates wrap around as numpy slicing does: the reference's bug, kept.
    assert reference.crop_region(img, np.array([-2.0, 0.0, 3.0, 2.0])).shape == (2, 0, 3)


def test_binarize_sign_is_msb_first_packbits(rng):
    feats = rng.standard_normal((5, 512)).astype(np.float32)
    feats[0, :16] = 0.0
    codes = reference.binarize_sign(feats)
    assert codes.dtype == np.uint8 and codes.shape == (5, 64)
    np.testing.assert_array_equal(codes, np.packbits(feats > 0, axis=1))
    assert codes[0, 0] == 0 and codes[0, 1] == 0
    with pytest.raises(InvalidInputError, match="multiple of 8"):
        reference.binarize_sign(np.ones((1, 12)))


def test_l2_normalize_has_no_epsilon():
    x = np.array([[3.0, 4.0], [0.0, 0.0]], np.float32)
    with np.errstate(invalid="ignore"):
        y = reference.l2_normalize(x)
    np.testing.assert_allclose(y[0], [0.6, 0.8])
    assert np.isnan(y[1]).all()


def _nms_oracle(results, thresh):
    order = sorted(range(len(results)), key=lambda i: -results[i]["rec_scores"])
    keep = []
    for i in order:
        a = results[i]["bbox"]
        ok = True
        for j in keep:
            b = results[j]["bbox"]
            w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
            h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
            inter = w * h
            union = (a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1) - inter
            if inter / union > thresh:
                ok = False
                break
        if ok:
            keep.append(i)
    return keep


def test_nms_to_rec_results_matches_greedy_oracle(rng):
    for trial in range(20):
        n = int(rng.integers(1, 9))
        xy = rng.integers(0, 80, size=(n, 2))
        wh = rng.integers(1, 60, size=(n, 2))
        results = [{"bbox": [int(x), int(y), int(x + w), int(y + h)], "rec_scores": int(s)}
                   for (x, y), (w, h), s in zip(xy, wh, rng.permutation(100)[:n])]
        thresh = [0.05, 0.3, 0.6][trial % 3]
        got = reference.nms_to_rec_results(results, thresh)
        assert got == [results[i] for i in _nms_oracle(results, thresh)]
    assert reference.nms_to_rec_results([], 0.05) == []


def test_nms_to_rec_results_uses_plus_one_areas_and_worst_hamming_first():
    touching = [{"bbox": [0, 0, 10, 10], "rec_scores": 5}, {"bbox": [10, 0, 20, 10], "rec_scores": 3}]
    # With +1 pixels the boxes share a column: IoU 11 / 231 = 0.0476 (0 without the +1 convention).
    assert len(reference.nms_to_rec_results(touching, 0.05)) == 2
    assert len(reference.nms_to_rec_results(touching, 0.04)) == 1
    same = [{"bbox": [0, 0, 10, 10], "rec_scores": 10}, {"bbox": [0, 0, 10, 10], "rec_scores": 50}]
    # Ranked by score descending: for Hamming distances the worse match (50 bits) wins.
    assert reference.nms_to_rec_results(same, 0.05) == [same[1]]


def test_det_preprocess_float64_normalisation_oracle(rng):
    cv2 = pytest.importorskip("cv2")
    img = rng.integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    image, im_shape, scale = reference.det_preprocess(img)
    assert image.shape == (1, 3, 640, 640) and image.dtype == np.float32
    np.testing.assert_array_equal(im_shape, [[640, 640]])
    np.testing.assert_array_equal(scale, np.array([[640 / 37, 640 / 53]], np.float32))
    r = cv2.resize(img, None, fx=640 / 53, fy=640 / 37, interpolation=cv2.INTER_CUBIC)
    x = r.astype(np.float32) / np.float32(255.0)
    x = (x.astype(np.float64) - np.array(reference.MEAN)).astype(np.float32)
    x = (x.astype(np.float64) / np.array(reference.STD)).astype(np.float32)
    np.testing.assert_array_equal(image[0], x.transpose(2, 0, 1))


def test_rec_preprocess_oracle(rng):
    cv2 = pytest.importorskip("cv2")
    crop = rng.integers(0, 256, size=(31, 17, 3), dtype=np.uint8)
    got = reference.rec_preprocess(crop)
    r = cv2.resize(crop, (224, 224), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    want = (r * np.float32(1 / 255) - np.array(reference.MEAN, np.float32)) / np.array(reference.STD, np.float32)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want.transpose(2, 0, 1))
    with pytest.raises(InvalidInputError, match="non-empty"):
        reference.rec_preprocess(crop[:0])


def test_reference_index_is_exact_hamming_and_round_trips(rng, tmp_path):
    codes = rng.integers(0, 256, size=(40, 64), dtype=np.uint8)
    docs = [f"img{i}.jpg\tlabel{i % 7}" for i in range(40)]
    index = reference.ReferenceIndex.from_codes(codes, docs)
    queries = rng.integers(0, 256, size=(3, 64), dtype=np.uint8)
    dist, ids = index.search(queries, 5)
    brute = np.unpackbits(queries[:, None, :] ^ codes[None, :, :], axis=2).sum(axis=2)
    for q in range(3):
        np.testing.assert_array_equal(dist[q], np.sort(brute[q])[:5])
        np.testing.assert_array_equal(brute[q][ids[q]], dist[q])
    again = reference.ReferenceIndex.load(index.save(tmp_path / "idx"))
    assert len(again) == 40 and again.id_map[3] == "img3.jpg\tlabel3"
    np.testing.assert_array_equal(again.search(queries, 5)[0], dist)
    with pytest.raises(InvalidInputError, match="40 codes but 2 id-map lines"):
        reference.ReferenceIndex.from_codes(codes, docs[:2])
    with pytest.raises(MissingFileError, match="vector.index"):
        reference.ReferenceIndex.load(tmp_path / "nowhere")


def test_reference_options_are_checked():
    with pytest.raises(InvalidInputError, match="threads must be an int >= 1"):
        reference.ReferenceOptions(threads=0)
    with pytest.raises(InvalidInputError, match="det_threshold"):
        reference.ReferenceOptions(det_threshold=1.5)


def test_the_gemm_job_measures_with_the_what_if_session_entries(monkeypatch):
    """A --session-config entry reaches the GEMM rate's session too (the rate a what-if run is compared with). Each
    job runs in its own subprocess, which the job changes for good; here the backend's entries are a copy."""
    from edge_shitu.backends import onnxruntime as ort_backend

    monkeypatch.setattr(ort_backend, "SESSION_CONFIG", dict(ort_backend.SESSION_CONFIG))
    seen = []
    create = ort_backend.OnnxRuntimeSession._create.__func__

    def spy(cls, model, where, threads):
        session = create(cls, model, where, threads)
        options = session._session.get_session_options()
        seen.append(options.get_session_config_entry("session.intra_op.allow_spinning"))
        return session

    monkeypatch.setattr(ort_backend.OnnxRuntimeSession, "_create", classmethod(spy))
    job = {"kind": "gemm", "precision": "fp32", "size": 32, "threads": 1, "runs": 1}
    rate = latency._work_gemm(dict(job, session_config={"session.intra_op.allow_spinning": "1"}))["gemm"]
    assert rate["size"] == 32 and rate["gmac_per_s"] > 0
    assert seen == ["1"]


def test_the_gemm_jobs_carry_the_what_if_session_entries(tmp_path, monkeypatch):
    jobs = []

    def child(job, name, out, threads):
        jobs.append(job)
        return {"gemm": {"precision": job["precision"], "threads": threads, "gmac_per_s": 1.0}}

    monkeypatch.setattr(latency, "_run_child", child)
    options = latency.LatencyOptions(session_config=(("session.intra_op.allow_spinning", "1"),))
    latency._gemm_rates(1, "before", options, tmp_path, lambda message: None)
    assert len(jobs) == 2 and all(j["kind"] == "gemm" for j in jobs)
    assert all(j["session_config"] == {"session.intra_op.allow_spinning": "1"} for j in jobs)


def test_parse_session_config():
    assert latency.parse_session_config(["session.intra_op.allow_spinning=1", " a = b=c "]) == (
        ("session.intra_op.allow_spinning", "1"), ("a", "b=c"))
    assert latency.parse_session_config([]) == ()
    for bad in ("novalue", "=1", "k=", "k= "):
        with pytest.raises(InvalidInputError, match="--session-config takes KEY=VALUE"):
            latency.parse_session_config([bad])


def test_parse_threads():
    assert latency.parse_threads("1,2") == (1, 2)
    assert latency.parse_threads("4") == (4,)
    for bad in ("", "1,x", "0", "2,2"):
        with pytest.raises(InvalidInputError, match="--threads"):
            latency.parse_threads(bad)


@pytest.mark.parametrize("kwargs, message", [
    ({"warmup": -1}, "warmup must be an int >= 0"),
    ({"runs": 0}, "runs must be an int >= 1"),
    ({"threads": ()}, "threads must be one or more"),
    ({"gallery": Path("g.db"), "gallery_limit": 3}, "not both"),
    ({"reference_det": Path("d")}, "without reference=True"),
    ({"whole_image": "sometimes"}, "whole_image"),
    ({"search_backend": "annoy"}, "search_backend"),
    ({"gemm_runs": -1}, "gemm_runs must be an int >= 0"),
    ({"session_config": (("k",),)}, "session_config must be"),
    ({"session_config": ("kv",)}, "session_config must be"),
    ({"session_config": (("k", ""),)}, "session_config must be"),
    ({"session_config": (("k", "1"), ("k", "2"))}, "repeats a key"),
])
def test_latency_options_are_checked(kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        latency.LatencyOptions(**kwargs)


def _fake_result(rng, scale, n=12):
    samples = {s: list(rng.gamma(4.0, scale, size=n)) for s in STAGES}
    return {"samples_ms": samples, "crops": [3] * n, "results": [1] * n, "peak_rss_mb": 100.0 * scale}


def _fake_report(rng):
    base = latency.summarize_configuration(_fake_result(rng, 2.0))
    other = latency.summarize_configuration(_fake_result(rng, 1.0), base)
    for c, label in ((base, "reference"), (other, "fp32")):
        c.update(label=label, threads=1)
    return {"machine": report.machine_info(), "versions": {"numpy": np.__version__},
            "images": {"dir": "imgs", "count": 12}, "warmup_passes": 1, "timed_passes": 1,
            "gallery": {"items": 5, "source": "test"}, "reference": None, "baseline": "reference",
            "threads": [1], "configurations": [base, other], "notes": ["a note"]}


def test_summaries_ratios_markdown_and_chart(rng, tmp_path):
    rep = _fake_report(rng)
    base, other = rep["configurations"]
    for s in STAGES:
        assert base["ratios_p50"][s] == 1.0
        assert other["ratios_p50"][s] == pytest.approx(other["stages"][s]["p50"] / base["stages"][s]["p50"])
        assert set(other["stages"][s]) == {"p50", "p90", "p99", "mean", "min", "max", "n"}
    assert other["peak_rss_ratio"] == pytest.approx(0.5)
    assert other["crops_per_image"] == 3.0
    text = latency.markdown(rep)
    for title in latency.STAGE_TITLES.values():
        assert title in text
    assert "÷ reference" in text and "peak RSS (MiB)" in text and "a note" in text
    total_row = next(line for line in text.splitlines() if line.startswith("| **total**"))
    assert total_row.endswith(f"| {other['ratios_p50']['total']:.2f} |")
    png = latency.chart(rep, tmp_path / "latency.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summarize_configuration_needs_every_stage(rng):
    result = _fake_result(rng, 1.0)
    result["samples_ms"]["search"] = []
    with pytest.raises(InvalidInputError, match="no samples for stage"):
        latency.summarize_configuration(result)


def test_list_images_errors(tmp_path):
    with pytest.raises(MissingFileError, match="image folder not found"):
        latency.list_images(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(InvalidInputError, match="no images"):
        latency.list_images(tmp_path)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(ImageDecodeError, match="broken.jpg"):
        latency.list_images(tmp_path)


@pytest.fixture
def cli(monkeypatch):
    from edge_shitu import cli as cli_module

    def run(*argv):
        out, err = io.StringIO(), io.StringIO()
        code = cli_module.main([str(a) for a in argv], stdout=out, stderr=err)
        return code, out.getvalue(), err.getvalue()

    return run


def test_cli_missing_bundle_is_a_clear_error(cli, tmp_path):
    code, out, err = cli("bench", "latency", "--bundle", tmp_path / "nope", "--images", tmp_path)
    assert code == 2
    assert "nope" in err and "bundle directory not found" in err and "Traceback" not in err


def test_cli_missing_images_is_a_clear_error(cli, fake_bundle, tmp_path):
    code, _, err = cli("bench", "latency", "--bundle", fake_bundle, "--images", tmp_path / "no-images")
    assert code == 2 and "no-images: image folder not found" in err


def test_cli_bad_threads_is_a_clear_error(cli, fake_bundle, tmp_path):
    code, _, err = cli("bench", "latency", "--bundle", fake_bundle, "--images", tmp_path, "--threads", "1,a")
    assert code == 2 and "--threads takes comma-separated integers" in err


def test_cli_wrong_reference_model_path_is_a_clear_error(cli, fake_bundle, tmp_path):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 24), (10, 200, 30)).save(images / "a.png")
    code, _, err = cli("bench", "latency", "--bundle", fake_bundle, "--images", images, "--reference",
                       "--reference-det", tmp_path / "no-detector", "--out", tmp_path / "out")
    assert code == 2 and "no-detector" in err and "Paddle model folder not found" in err
    assert not (tmp_path / "out" / "galleries").exists()


def _few_images(test_images, tmp_path, n):
    folder = tmp_path / "images"
    folder.mkdir()
    for p in test_images[:n]:
        shutil.copyfile(p, folder / p.name)
    return folder


def _check_outputs(out_dir: Path, n_configs: int, n_samples: int) -> dict:
    from PIL import Image

    rep = json.loads((out_dir / "latency.json").read_text(encoding="utf-8"))
    assert len(rep["configurations"]) == n_configs
    assert rep["stages"] == list(STAGES)
    for key in ("machine", "versions", "threads", "images"):
        assert rep[key]
    by_threads = {}
    for c in rep["configurations"]:
        by_threads.setdefault(c["threads"], []).append(c)
        for s in STAGES:
            assert len(c["samples_ms"][s]) == n_samples
            assert c["stages"][s]["p50"] == pytest.approx(float(np.percentile(c["samples_ms"][s], 50)))
            assert c["stages"][s]["p50"] >= 0
        assert c["stages"]["total"]["p50"] > 0
        assert 10 < c["peak_rss_mb"] < 8192
        # Every image sends at least one region (detections, else the whole image) to the extractor.
        assert len(c["crops"]) == n_samples and min(c["crops"]) >= 1
        assert c["crops_per_image"] == pytest.approx(np.mean(c["crops"]))
        # The stages tile the wall time of each image.
        per_image = np.sum([c["samples_ms"][s] for s in STAGES if s != "total"], axis=0)
        np.testing.assert_allclose(per_image, c["samples_ms"]["total"], rtol=0.02, atol=0.5)
    for rows in by_threads.values():
        base = rows[0]
        assert base["label"] == rep["baseline"]
        for c in rows:
            for s in ("det_infer", "rec_infer", "total"):
                assert c["ratios_p50"][s] == pytest.approx(c["stages"][s]["p50"] / base["stages"][s]["p50"])
            assert c["peak_rss_ratio"] == pytest.approx(c["peak_rss_mb"] / base["peak_rss_mb"])
    text = (out_dir / "latency.md").read_text(encoding="utf-8")
    for title in latency.STAGE_TITLES.values():
        assert title in text
    with Image.open(out_dir / "latency.png") as im:
        assert im.format == "PNG"
    return rep


@pytest.mark.slow
def test_cli_two_bundles_two_thread_counts(cli, replica_bundle, test_images, tmp_path):
    images = _few_images(test_images, tmp_path, 2)
    out_dir = tmp_path / "out"
    code, out, err = cli("bench", "latency", "--bundle", replica_bundle, "--bundle", replica_bundle,
                         "--images", images, "--threads", "1,2", "--warmup", "0", "--runs", "2",
                         "--gallery-limit", "4", "--gemm-runs", "1", "--out", out_dir)
    assert code == 0, err
    rep = _check_outputs(out_dir, n_configs=4, n_samples=4)
    # Against the machine: GEMM rates at 1 and 2 threads, the replicas' GMAC, a fraction per model and config.
    against = rep["against_machine"]
    assert [(g["threads"], g["precision"], g["when"]) for g in against["gemm"]] == [
        (t, p, w) for t in (1, 2) for w in ("before", "after") for p in ("fp32", "int8")]
    assert all(len(g["runs_ms"]) == 1 and g["gmac_per_s"] > 0 and g["size"] == 2048 for g in against["gemm"])
    bundle = Bundle.load(replica_bundle)
    for role in ("detector", "extractor"):
        # Wiring only (the report carries each role's own count); the counts themselves are checked against the
        # issue's figures in test_bench_machine.py::test_replica_bundle_macs_are_the_issues_figures.
        assert against["models"]["replica-fp32"][role]["macs"] == machine.bundle_model_macs(bundle.models[role]).total
    for t in (1, 2):
        both = [g["gmac_per_s"] for g in against["gemm"] if g["threads"] == t and g["precision"] == "fp32"]
        assert against["rates"][str(t)]["fp32"] == pytest.approx(sum(both) / 2)
    for c in rep["configurations"]:
        det, ext = c["models"]["detector"], c["models"]["extractor"]
        assert det["ms_p50"] == pytest.approx(c["stages"]["det_infer"]["p50"])
        assert det["rate_gmac_per_s"] == pytest.approx(against["rates"][str(c["threads"])]["fp32"])
        assert det["fraction_of_rate"] == pytest.approx(8.182032 / (det["ms_p50"] / 1000 * det["rate_gmac_per_s"]))
        per_crop = [ms / n for ms, n in zip(c["samples_ms"]["rec_infer"], c["crops"])]
        assert ext["ms_p50"] == pytest.approx(float(np.percentile(per_crop, 50)))
    assert "detector GMAC/s (of the GEMM rate)" in out and "per CPU-second" in out
    assert "--gemm-runs 1" in rep["command"]
    assert [(c["label"], c["threads"]) for c in rep["configurations"]] == [
        ("replica-fp32", 1), ("replica-fp32 (2)", 1), ("replica-fp32", 2), ("replica-fp32 (2)", 2)]
    assert rep["gallery"]["items"] == 4 and rep["gallery"]["built_here"]
    assert rep["reference"] is None and rep["baseline"] == "replica-fp32"
    assert "## 1 thread" in out and "## 2 threads" in out and "÷ replica-fp32" in out
    assert "latency.png" in err
    # The same gallery is reused by a second run.
    code, _, err = cli("bench", "latency", "--bundle", replica_bundle, "--images", images, "--runs", "1",
                       "--warmup", "0", "--gallery-limit", "4", "--search-backend", "numpy", "--out", out_dir)
    assert code == 0, err
    again = json.loads((out_dir / "latency.json").read_text())
    assert again["gallery"]["reused"] is True
    assert again["configurations"][0]["details"]["gallery_backend"] == "numpy"
    assert "--search-backend numpy" in again["command"]


@pytest.mark.slow
def test_cli_reference_is_the_baseline(cli, replica_bundle, replica_dirs, test_images, tmp_path):
    images = _few_images(test_images, tmp_path, 2)
    out_dir = tmp_path / "out"
    # The detector comes from the shared graph: without official weights a seed-0 replica is written for
    # the reference, which must be the very replica the bundle was converted from.
    code, out, err = cli("bench", "latency", "--bundle", replica_bundle, "--reference",
                         "--reference-rec", replica_dirs["extractor"],
                         "--images", images, "--warmup", "1", "--runs", "1", "--gallery-limit", "4",
                         "--gemm-runs", "0", "--session-config", "session.intra_op.allow_spinning=1", "--out", out_dir)
    assert code == 0, err
    rep = _check_outputs(out_dir, n_configs=2, n_samples=2)
    assert rep["against_machine"] is None and all(c["models"] is None for c in rep["configurations"])
    assert "GMAC/s" not in out
    ref, ours = rep["configurations"]
    assert (ref["label"], ref["kind"], rep["baseline"]) == ("reference", "reference", "reference")
    assert ours["kind"] == "bundle"
    assert rep["reference"]["index"]["items"] == 4 and rep["reference"]["mkldnn"] is True
    models = rep["reference"]["models"]
    assert models["detector"]["weights"].startswith("replica seed 0")
    assert models["extractor"]["weights"] == "given"
    assert all(m["same_weights_as_first_bundle"] for m in models.values())
    # The reference adds the whole image to at most 5 detections; one extractor call per region.
    assert all(2 <= c <= 6 for c in ref["crops"])
    assert "÷ reference" in out
    # The what-if session entry replaced the backend's in the bundle's subprocess only.
    assert ours["details"]["onnxruntime_session_config"]["session.intra_op.allow_spinning"] == "1"
    assert '"session.intra_op.allow_spinning": "1"' in out and "--session-config" in rep["command"]
    from edge_shitu.backends.onnxruntime import SESSION_CONFIG

    assert SESSION_CONFIG["session.intra_op.allow_spinning"] == "0"


@pytest.mark.slow
def test_reference_pipeline_matches_paddle_runners(replica_dirs, test_images, rng):
    """The reference's predictors (MKLDNN, IR optimisation) give the official programs' outputs."""
    from edge_shitu_converters.paddle_reference import PaddleDetectorReference, PaddleExtractorReference

    img = reference.read_image(test_images[0])
    codes = rng.integers(0, 256, size=(3, 64), dtype=np.uint8)
    index = reference.ReferenceIndex.from_codes(codes, [f"g{i}.jpg\tL{i}" for i in range(3)])
    pipe = reference.ReferencePipeline.from_models(replica_dirs["detector"], replica_dirs["extractor"], index)
    got = reference.parse_det_results(pipe.detect(img))
    want = reference.parse_det_results(
        PaddleDetectorReference(replica_dirs["detector"]).run(*reference.det_preprocess(img)))
    assert len(got) == len(want) > 0
    # Matched row by row (MKLDNN changes the last float digits, so near-equal scores may swap places).
    for g in got:
        assert any(abs(g["score"] - w["score"]) < 1e-4 and np.allclose(g["bbox"], w["bbox"], atol=0.05)
                   for w in want), g

    crop = reference.crop_region(img, np.array([0, 0, img.shape[1], img.shape[0]]))
    batch = np.array([reference.rec_preprocess(crop)])
    ours = reference.binarize_sign(reference.l2_normalize(pipe.extractor.run([batch])[0]))
    theirs = np.packbits(PaddleExtractorReference(replica_dirs["extractor"]).run(batch) > 0, axis=1)
    agreement = 1 - np.unpackbits(ours ^ theirs).sum() / ours.size / 8
    assert agreement >= 0.99

    result = pipe.recognize(test_images[0])
    assert set(result.timings_ms) == set(STAGES)
    assert result.crops + result.empty_crops == result.detections + 1
    assert len(result.results) <= result.crops
    assert sum(result.timings_ms[s] for s in STAGES if s != "total") == pytest.approx(result.timings_ms["total"], rel=0.01)


def test_worker_imports_the_edge_shitu_of_the_parent(tmp_path):
    """A checkout put first on PYTHONPATH (to time another version) is what the worker processes run too, not the
    edge_shitu beside the bench's own files."""
    import edge_shitu

    other = tmp_path / "other"
    shutil.copytree(Path(edge_shitu.__file__).parent, other / "edge_shitu",
                    ignore=shutil.ignore_patterns("__pycache__"))
    probe = ("import subprocess, sys; from edge_shitu_bench import latency; "
             "print(subprocess.run([sys.executable, '-c', 'import edge_shitu; print(edge_shitu.__file__)'], "
             "env=latency._child_env(1), capture_output=True, text=True, check=True).stdout.strip())")
    env = dict(os.environ, PYTHONPATH=str(other))
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True,
                         check=True)
    assert Path(out.stdout.strip()).resolve() == (other / "edge_shitu" / "__init__.py").resolve()
