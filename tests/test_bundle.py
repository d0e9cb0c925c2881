"""Bundle manifests are parsed strictly and model files are verified."""

from __future__ import annotations

import json

import pytest

from edge_shitu.bundle import Bundle
from edge_shitu.errors import BundleError, IntegrityError, MissingFileError


def _rewrite(root, mutate):
    m = json.loads((root / "manifest.json").read_text())
    mutate(m)
    (root / "manifest.json").write_text(json.dumps(m))


def test_load_valid(fake_bundle):
    b = Bundle.load(fake_bundle)
    assert b.detector.input.width == 640 and b.detector.input.interpolation == "cubic"
    assert b.extractor.output.dim == 512 and b.codes.nbytes == 64
    assert b.is_replica
    assert len(b.code_fingerprint) == 32
    assert Bundle.load(b) is b


def test_fingerprint_depends_on_extractor_not_detector(fake_bundle):
    before = Bundle.load(fake_bundle).code_fingerprint
    (fake_bundle / "detector.onnx").write_bytes(b"other detector")
    import hashlib

    _rewrite(fake_bundle, lambda m: m["models"]["detector"].update(
        sha256=hashlib.sha256(b"other detector").hexdigest()))
    assert Bundle.load(fake_bundle).code_fingerprint == before
    (fake_bundle / "extractor.onnx").write_bytes(b"other extractor")
    _rewrite(fake_bundle, lambda m: m["models"]["extractor"].update(
        sha256=hashlib.sha256(b"other extractor").hexdigest()))
    assert Bundle.load(fake_bundle).code_fingerprint != before


def test_damaged_model_file_is_refused(fake_bundle):
    (fake_bundle / "extractor.onnx").write_bytes(b"tampered")
    with pytest.raises(IntegrityError, match="extractor.onnx: sha256"):
        Bundle.load(fake_bundle)
    Bundle.load(fake_bundle, verify=False)  # explicit opt-out still parses


def test_missing_things(tmp_path, fake_bundle):
    with pytest.raises(MissingFileError, match="bundle directory not found"):
        Bundle.load(tmp_path / "nope")
    with pytest.raises(MissingFileError, match="no manifest"):
        Bundle.load(tmp_path)
    (fake_bundle / "detector.onnx").unlink()
    with pytest.raises(MissingFileError, match="detector.onnx"):
        Bundle.load(fake_bundle)


@pytest.mark.parametrize("mutate, message", [
    (lambda m: m.update(extra=1), "unknown key"),
    (lambda m: m["models"]["detector"]["input"].update(colour="RGB"), r"unknown key.*colour"),
    (lambda m: m.update(format_version=2), "format_version 2 is not supported"),
    (lambda m: m.update(format="other"), "expected 'edge-shitu-bundle'"),
    (lambda m: m["models"]["detector"]["input"].pop("mean"), r"input\.mean is missing"),
    (lambda m: m["models"]["detector"]["input"].update(interpolation="area"), "must be one of cubic, linear"),
    (lambda m: m["models"]["extractor"]["input"].update(std=[0.2, 0.0, 0.2]), "std must be positive"),
    (lambda m: m["models"]["extractor"].update(file="../x.onnx"), "path inside the bundle"),
    (lambda m: m["models"]["extractor"].update(sha256="abc"), "64 lowercase hex"),
    (lambda m: m["codes"].update(bits=500), "multiple of 8"),
    (lambda m: m["codes"].update(bits=256), r"differs from the extractor dim"),
    (lambda m: m["models"]["detector"]["output"].update(strides=[8, 16]), "one scores and one boxes output per stride"),
    (lambda m: m["models"]["detector"].update(labels=["a", "b"]), "2 names for 1 classes"),
    (lambda m: m["recognition"].update(max_distance=True), "got a boolean"),
    (lambda m: m.update(models={}), "detector, an extractor or both"),
])
def test_schema_errors_name_the_key(fake_bundle, mutate, message):
    _rewrite(fake_bundle, mutate)
    with pytest.raises(BundleError, match=message):
        Bundle.load(fake_bundle)


def test_not_json(fake_bundle):
    (fake_bundle / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        Bundle.load(fake_bundle)


def test_require_missing_role(fake_bundle):
    _rewrite(fake_bundle, lambda m: m["models"].pop("detector"))
    b = Bundle.load(fake_bundle)
    with pytest.raises(BundleError, match="no detector model"):
        b.require("detector")
