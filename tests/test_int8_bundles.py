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
from edge_shitu.errors import InvalidInputError

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


def test_int8_extractor_passes_verification(replica_dirs, calib, test_images, tmp_path):
    from edge_shitu_converters.convert import convert

    photos = tmp_path / "photos"
    photos.mkdir()
    for p in test_images[:3]:
        shutil.copy(p, photos / p.name)
    out = convert(None, replica_dirs["extractor"], tmp_path / "rec", precision="int8", calib_dir=calib,
                  calib_count=8, verify=True, verify_images=photos)
    report = json.loads((out / "verify.json").read_text())
    assert report["passed"] and report["precision"] == "int8"
    assert report["extractor"]["mean_bit_agreement"] >= 0.95


def test_dynamic_int8_needs_no_photos(replica_dirs, tmp_path):
    from edge_shitu_converters.convert import convert

    out = convert(None, replica_dirs["extractor"], tmp_path / "dyn", precision="int8", quant_mode="dynamic")
    assert Bundle.load(out).extractor.quantization["mode"] == "dynamic"


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
