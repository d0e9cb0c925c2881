"""`convert --precision int8` for ONNX bundles: calibrated on real photos through the runtime's own
pre-processing, recorded in the manifest, a quarter of the size, usable by the runtime as is."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest

from edge_shitu.bundle import Bundle
from edge_shitu.cli import main
from edge_shitu.errors import ConversionError, InvalidInputError

pytestmark = [pytest.mark.paddle, pytest.mark.slow]


@pytest.fixture(scope="module")
def calib(drink_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("calib")
    for sub in ("0", "1", "10", "100"):
        shutil.copytree(drink_dir / "gallery" / sub, d / sub)
    return d


@pytest.fixture(scope="module")
def int8_bundle(replica_dirs, calib, tmp_path_factory):
    from edge_shitu_converters.convert import convert

    return convert(replica_dirs["detector"], replica_dirs["extractor"], tmp_path_factory.mktemp("int8") / "b",
                   precision="int8", calib_dir=calib, calib_count=8)


def test_int8_bundle_is_small_and_self_describing(int8_bundle, replica_bundle):
    b, f = Bundle.load(int8_bundle), Bundle.load(replica_bundle)
    for role in ("detector", "extractor"):
        spec = b.models[role]
        assert spec.precision == "int8" and spec.backend == "onnxruntime"
        assert spec.quantization["tool"] == "onnxruntime.quantization"
        assert spec.quantization["calibration_images"] == 8 and spec.quantization["mode"] == "static"
        assert spec.path.stat().st_size < 0.35 * f.models[role].path.stat().st_size
    total = sum(m.path.stat().st_size for m in b.models.values())
    assert total <= 13.8e6, f"int8 detector + extractor = {total / 1e6:.1f} MB, goal <= 13.8 MB"
    assert b.code_fingerprint != f.code_fingerprint  # int8 codes differ: galleries are not shared silently


def test_int8_bundle_runs_in_the_runtime(int8_bundle, replica_bundle, test_images):
    from edge_shitu.embedder import Embedder

    with Embedder.from_bundle(int8_bundle) as q, Embedder.from_bundle(replica_bundle) as f:
        a, b = q.features(test_images[:4]), f.features(test_images[:4])
    assert np.all(np.sum(a * b, axis=1) > 0.98)
    out = io.StringIO()
    assert main(["detect", "--bundle", str(int8_bundle), "--json", str(test_images[0])], stdout=out) == 0
    assert json.loads(out.getvalue())[0]["image"] == str(test_images[0])


def test_int8_extractor_passes_verification(replica_dirs, calib, test_images, tmp_path, monkeypatch):
    from edge_shitu_converters import verify
    from edge_shitu_converters.convert import convert

    photos = tmp_path / "photos"
    photos.mkdir()
    for p in test_images[:3]:
        shutil.copy(p, photos / p.name)
    runs = []
    monkeypatch.setattr(verify, "verify_bundle", lambda *a, _run=verify.verify_bundle, **k: runs.append(1) or _run(*a, **k))
    out = convert(None, replica_dirs["extractor"], tmp_path / "rec", precision="int8", calib_dir=calib,
                  calib_count=8, verify=True, verify_images=photos)
    report = json.loads((out / "verify.json").read_text())
    assert report["passed"] and report["precision"] == "int8"
    assert report["extractor"]["mean_bit_agreement"] >= 0.95
    assert "int8_search" not in report
    assert len(runs) == 1  # passing as built: the search's first verification is the bundle's


def test_dynamic_int8_needs_no_photos(replica_dirs, verify_photos, tmp_path, monkeypatch):
    from dataclasses import replace

    from edge_shitu_converters import verify
    from edge_shitu_converters.convert import convert

    out = convert(None, replica_dirs["extractor"], tmp_path / "dyn", precision="int8", quant_mode="dynamic")
    assert Bundle.load(out).extractor.quantization["mode"] == "dynamic"
    # Nothing to rank blocks on: a dynamic model that fails --verify is refused by the verification, not searched.
    monkeypatch.setitem(verify.THRESHOLDS, "int8", replace(verify.THRESHOLDS["int8"], extractor_min_cosine=1.5))
    with pytest.raises(ConversionError, match="disagree with their sources: extractor min cosine"):
        convert(None, replica_dirs["extractor"], tmp_path / "strict", precision="int8", quant_mode="dynamic",
                verify=True, verify_images=verify_photos)


def test_int8_argument_errors(replica_dirs, tmp_path):
    from edge_shitu_converters.convert import convert

    with pytest.raises(InvalidInputError, match="static int8 needs calibration photos"):
        convert(None, replica_dirs["extractor"], tmp_path / "a", precision="int8")
    with pytest.raises(InvalidInputError, match="calib_method and quant_mode are for onnx int8"):
        convert(None, replica_dirs["extractor"], tmp_path / "b", calib_method="entropy")
    err = io.StringIO()
    assert main(["convert", "--rec", str(replica_dirs["extractor"]), "--out", str(tmp_path / "c"),
                 "--precision", "int8"], stdout=io.StringIO(), stderr=err) == 2
    assert "--calib DIR" in err.getvalue()


def test_int8_layers_n_keeps_the_most_damaging_blocks_float(replica_dirs, calib, test_images, tmp_path):
    from edge_shitu_converters.convert import convert

    out = convert(None, replica_dirs["extractor"], tmp_path / "rec", precision="int8", calib_dir=calib,
                  calib_count=8, int8_layers=3)
    quant = Bundle.load(out).manifest["models"]["extractor"]["quantization"]
    assert quant["int8_layers"] == 3 and len(quant["float_blocks"]) == 3 and quant["blocks"] > 10
    plain = convert(None, replica_dirs["extractor"], tmp_path / "all", precision="int8", calib_dir=calib,
                    calib_count=8, int8_layers="all")
    plain_quant = Bundle.load(plain).manifest["models"]["extractor"]["quantization"]
    assert plain_quant["float_blocks"] == []
    # The manifest names the convolutions re-laid for faster kernels: PP-LCNetV2's image stem (its one 3-channel
    # stride-2 convolution); its depthwise channel counts are multiples of 16 already.
    assert len(plain_quant["kernel_shapes"]) == 1 and plain_quant["kernel_shapes"][0].startswith("Conv")
    onnx = pytest.importorskip("onnx")

    def activation_quantizers(path):
        return sum(n.op_type == "QuantizeLinear" for n in onnx.load(str(path)).graph.node)

    assert activation_quantizers(out / "extractor.onnx") < activation_quantizers(plain / "extractor.onnx")


def _convert_rec(replica_dirs, calib, photos, out):
    return main(["convert", "--rec", str(replica_dirs["extractor"]), "--out", str(out), "--precision", "int8",
                 "--calib", str(calib), "--calib-count", "8", "--verify", "--verify-images", str(photos)])


def test_a_failing_int8_model_is_searched_until_it_passes(replica_dirs, calib, verify_photos, tmp_path, monkeypatch,
                                                          capsys):
    """Stricter limits than the INT8 ones make the all-INT8 extractor fail, so `convert --verify` searches, with the
    real quantiser and the real verification against Paddle Inference. First with a limit no candidate reaches:
    nothing is published and the failure report holds every step; then with a limit between the all-INT8 and the
    most-float candidates' agreement: the first candidate that passes is published."""
    from dataclasses import replace

    from edge_shitu_converters import verify

    photos = verify_photos
    limits = verify.THRESHOLDS["int8"]
    strict = replace(limits, extractor_min_cosine=1.5)  # a cosine never exceeds 1
    monkeypatch.setitem(verify.THRESHOLDS, "int8", strict)
    assert _convert_rec(replica_dirs, calib, photos, tmp_path / "never") == 1
    assert not (tmp_path / "never").exists()
    failed = json.loads((tmp_path / "never.verify-failed.json").read_text())
    search = failed["int8_search"]["extractor"]
    steps = search["steps"]
    assert search["chosen"] is None and not any(s["passed"] for s in steps)
    assert {p: r["passed"] for p, r in search["int8_parts"].items()} == {"weights": False, "activations": False}
    assert [s["float_blocks"] for s in steps][:3] == [0, 1, 2] and steps[-1]["float_blocks"] == search["blocks"] - 1
    first, most = steps[0]["figures"]["mean_bit_agreement"], steps[-1]["figures"]["mean_bit_agreement"]
    assert most > first  # keeping the noisiest blocks float brings the codes closer to fp32

    middle = replace(limits, extractor_mean_bit_agreement=(first + most) / 2)
    monkeypatch.setitem(verify.THRESHOLDS, "int8", middle)
    capsys.readouterr()
    assert _convert_rec(replica_dirs, calib, photos, tmp_path / "rec") == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "rec" / "verify.json").read_text())
    search = report["int8_search"]["extractor"]
    steps, chosen = search["steps"], search["chosen"]
    assert report["passed"] and steps[0]["float_blocks"] == 0 and not steps[0]["passed"] and chosen > 0
    assert search["float_blocks"] == [r["block"] for r in search["ranking"][:chosen]]
    # Every candidate tried with fewer float blocks failed, the chosen one passed: the fastest that passes.
    assert all(not s["passed"] for s in steps if s["float_blocks"] < chosen)
    assert any(s["passed"] and s["float_blocks"] == chosen for s in steps)
    assert report["extractor"]["mean_bit_agreement"] >= middle.extractor_mean_bit_agreement
    quant = Bundle.load(tmp_path / "rec").manifest["models"]["extractor"]["quantization"]
    assert quant["float_blocks"] == search["float_blocks"] and quant["search"]["chosen"] == chosen
    assert "extractor int8 search:" in printed and f"{chosen} kept float" in printed
    # Every block INT8 failed, so its weights and its activations were verified apart, and each, keeping part of
    # the rounding only, agrees more than the whole.
    parts = search["int8_parts"]
    assert set(parts) == {"weights", "activations"}
    assert all(p["figures"]["mean_bit_agreement"] > first for p in parts.values())
    for part, result in parts.items():
        state = "passed" if result["passed"] else "failed"
        assert f"only the {part} INT8 (every block): {state}" in printed
    assert printed.index("only the weights INT8") < printed.index("only the activations INT8")
