"""Bundle manifests are parsed strictly and model files are verified."""

from __future__ import annotations

import json

import pytest

from conftest import write_shape_probe_extractor
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


def _det(m):
    return m["models"]["detector"]


def _ext(m):
    return m["models"]["extractor"]


# Every value of the manifest is checked at load, by type and range; defaults through the options classes.
@pytest.mark.parametrize("mutate, message", [
    (lambda m: _det(m)["defaults"].update(min_score="high"),
     r"models\.detector\.defaults: min_score must be a number in \[0, 1\], got 'high'"),
    (lambda m: _det(m)["defaults"].update(score_threshold=None), r"defaults: detector option\(s\) score_threshold must have a value"),
    (lambda m: _det(m)["defaults"].update(nms_iou=1.5), r"defaults: nms_iou must be a number in \[0, 1\]"),
    (lambda m: _det(m)["defaults"].update(nms_top_k=0), r"defaults: nms_top_k must be a positive integer"),
    (lambda m: _det(m)["defaults"].update(keep_top_k=10**12),
     r"defaults: keep_top_k must be a positive integer at most"),
    (lambda m: _det(m)["defaults"].update(max_detections=2.5), r"defaults: max_detections must be a positive integer"),
    (lambda m: _det(m)["defaults"].update(clip="yes"), r"defaults: clip must be true or false"),
    (lambda m: _det(m)["defaults"].update(backend={"threads": 100000}), r"unknown key.*defaults: backend"),
    (lambda m: _det(m)["defaults"].update(colour=1), r"defaults: unknown detector option\(s\): colour"),
    (lambda m: m["recognition"].update(top_k=0), r"manifest\.recognition: top_k must be a positive integer"),
    (lambda m: m["recognition"].update(top_k=10**9), r"recognition: top_k must be a positive integer at most 1000"),
    (lambda m: m["recognition"].update(final_nms_iou=2), r"recognition: final_nms_iou must be a number in \[0, 1\]"),
    (lambda m: m["recognition"].update(final_nms_iou="0.5"), r"recognition\.final_nms_iou must be int or float"),
    (lambda m: m["recognition"].update(max_distance=-1), r"recognition\.max_distance must be an integer from 0 to"),
    (lambda m: m["recognition"].update(whole_image="sometimes"), r"whole_image must be one of if_none, always, never"),
    (lambda m: _ext(m)["input"].update(shape=[-1, 3, 0, 224]), r"input\.shape must be \[N, 3, H, W\]"),
    (lambda m: _ext(m)["input"].update(shape=[-1, 3, 224, 100_000]), r"H, W from 1 to 4096"),
    (lambda m: _ext(m)["input"].update(shape=[0, 3, 224, 224]), r"N = -1 \(any batch\) or 1 to 256"),
    (lambda m: _ext(m)["input"].update(shape=[-7, 3, 224, 224]), r"input\.shape must be"),
    (lambda m: _ext(m)["input"].update(shape=[100_000, 3, 224, 224]), r"input\.shape must be"),
    (lambda m: _ext(m)["input"].update(shape=[64, 3, 4096, 4096]), r"describes a float32 input of \d+ bytes"),
    (lambda m: _ext(m)["input"].update(shape=[1, 4, 224, 224]), r"input\.shape must be \[N, 3, H, W\]"),
    (lambda m: _ext(m)["input"].update(shape=[1, 3, 224]), r"input\.shape must be a list of 4 ints"),
    (lambda m: _ext(m)["input"].update(scale=0), r"input\.scale must be in \(0, 1\]"),
    (lambda m: _ext(m)["input"].update(scale=1e300), r"input\.scale must be in \(0, 1\]"),
    (lambda m: _ext(m)["input"].update(mean=[1e9, 0, 0]), r"input\.mean must be numbers in \[-255, 255\]"),
    (lambda m: _ext(m)["input"].update(std=[0.2, -1, 0.2]), r"input\.std must be positive"),
    (lambda m: _ext(m)["input"].update(mean=[0.5, 0.5]), r"input\.mean must be a list of 3 floats"),
    (lambda m: _ext(m)["input"].update(name=""), r"input\.name must be a non-empty string"),
    (lambda m: _ext(m)["input"].update(channel_order="rgb"), r"channel_order must be one of RGB, BGR"),
    (lambda m: _ext(m)["output"].update(dim=4), r"output\.dim must be an integer from 8 to 8192"),
    (lambda m: _ext(m)["output"].update(dim=10**6), r"output\.dim must be an integer from 8 to 8192"),
    (lambda m: _ext(m)["output"].update(normalized="no"), r"output\.normalized must be bool"),
    (lambda m: _det(m)["output"].update(reg_max=0), r"output\.reg_max must be an integer from 1 to 64"),
    (lambda m: _det(m)["output"].update(cell_offset=3), r"output\.cell_offset must be a number from 0"),
    (lambda m: _det(m)["output"].update(num_classes=10**7), r"output\.num_classes must be an integer from 1 to"),
    (lambda m: _det(m)["output"].update(strides=[8, 16, 32, 100_000]), r"output\.strides must be 1 to 8 strides"),
    (lambda m: _det(m)["output"].update(strides=[0, 16, 32, 64]), r"output\.strides must be"),
    (lambda m: _det(m)["output"].update(scores=["s8", "s8", "s32", "s64"]), r"names an output twice"),
    (lambda m: _det(m).update(labels=[""]), r"labels must be a list of non-empty strings"),
    (lambda m: _det(m).update(target="mips"), r"target must be any, x86 or arm"),
    (lambda m: _ext(m).update(file=""), r"file must be a path inside the bundle"),
    (lambda m: _ext(m).update(file="/etc/passwd"), r"file must be a path inside the bundle"),
    (lambda m: m["codes"].update(bits=1 << 20), r"codes\.bits must be a positive multiple of 8 up to 8192"),
    (lambda m: m["codes"].update(method="pca"), r"codes\.method must be one of sign"),
    (lambda m: m.update(tools={"edge_shitu": 1}), r"tools must map tool names to version strings"),
    (lambda m: m.update(name=""), r"manifest\.name must be a non-empty string"),
    (lambda m: m.update(hash={"file": "hash.npz", "sha256": "0" * 64, "bits": 1 << 14, "dim": 512}),
     r"hash must have bits a positive multiple of 8 up to 4096"),
])
def test_every_manifest_value_is_checked_at_load(fake_bundle, mutate, message):
    _rewrite(fake_bundle, mutate)
    with pytest.raises(BundleError, match=message) as info:
        Bundle.load(fake_bundle)
    text = str(info.value)
    assert text.startswith(str(fake_bundle / "manifest.json")) and "\n" not in text


def _write_manifest_text(root, text):
    (root / "manifest.json").write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))


def _manifest_text(root):
    return (root / "manifest.json").read_text(encoding="utf-8")


@pytest.mark.parametrize("edit, message", [
    (lambda t: t[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}", r"nested deeper than 32 levels"),
    (lambda t: t.replace('"source": {', '"source": {"deep": ' + "[" * 40 + "]" * 40 + ", ", 1),
     r"nested deeper than 32 levels"),
    (lambda t: t.replace('"name": "fake"', '"name": "fake", "name": "other"'), r"duplicate key 'name'"),
    (lambda t: t.replace('"final_nms_iou": 0.05', '"final_nms_iou": NaN'), r"NaN is not a JSON number"),
    (lambda t: t.replace('"final_nms_iou": 0.05', '"final_nms_iou": Infinity'), r"Infinity is not a JSON number"),
    (lambda t: t.replace('"final_nms_iou": 0.05', '"final_nms_iou": -Infinity'), r"-Infinity is not a JSON number"),
    (lambda t: t.replace('"final_nms_iou": 0.05', '"final_nms_iou": 1e400'), r"number 1e400 is out of range"),
    (lambda t: t.replace('"max_distance": 100', '"max_distance": ' + "9" * 5000),
     r"not valid JSON \(Exceeds the limit"),
    (lambda t: t.encode("utf-8").replace(b'"fake"', b'"fa\xffke"'), r"not UTF-8 text \(byte 0xff at offset \d+\)"),
    (lambda t: t + " " * (1 << 20), r"\d+ bytes, more than the 1048576 a bundle's JSON file may have"),
    (lambda t: "[" + t + "]", r"manifest must be an object, got list"),
    (lambda t: "{not json", r"not valid JSON \(Expecting property name"),
])
def test_manifest_json_is_read_strictly(fake_bundle, edit, message):
    _write_manifest_text(fake_bundle, edit(_manifest_text(fake_bundle)))
    with pytest.raises(BundleError, match=message) as info:
        Bundle.load(fake_bundle)
    text = str(info.value)
    assert text.startswith(str(fake_bundle / "manifest.json")) and "\n" not in text


def test_manifest_that_is_not_a_file(fake_bundle):
    (fake_bundle / "manifest.json").unlink()
    (fake_bundle / "manifest.json").mkdir()
    with pytest.raises(BundleError, match="manifest.json: not a regular file"):
        Bundle.load(fake_bundle)


def test_verify_json_is_read_with_the_same_limits(fake_bundle):
    bundle = Bundle.load(fake_bundle)
    assert bundle.verification is None
    (fake_bundle / "verify.json").write_text('{"passed": true, "min_cosine": NaN}')
    assert bundle.verification["passed"] is True  # the converter's json.dumps writes NaN figures
    (fake_bundle / "verify.json").write_text('{"passed": true, "passed": false}')
    with pytest.raises(BundleError, match="verify.json: .*duplicate key 'passed'"):
        bundle.verification
    (fake_bundle / "verify.json").write_text("[" * 50_000 + "]" * 50_000)
    with pytest.raises(BundleError, match="verify.json: .*nested deeper"):
        bundle.verification


def test_hash_head_file_is_size_checked_before_it_is_read(fake_bundle, monkeypatch):
    import numpy as np

    from edge_shitu import hashing
    from edge_shitu_converters import hash_heads
    from edge_shitu.errors import HashHeadError

    head = hashing.HashHead.from_arrays(np.eye(512, dtype=np.float32)[:64], np.zeros(64, np.float32))
    hash_heads.install_head(fake_bundle, head)
    bundle = Bundle.load(fake_bundle)
    assert bundle.load_hash_head().bits == 64
    monkeypatch.setattr(hashing, "MAX_FILE_BYTES", 1000)
    monkeypatch.setattr(type(bundle.hash.path), "read_bytes",
                        lambda self: pytest.fail("read before its size was checked"))
    with pytest.raises(HashHeadError, match=r"hash\.npz: \d+ bytes, more than the 1000"):
        bundle.load_hash_head()


# ---------------------------------------------------------------- the manifest's input against the model's


def _with_model(root, model_dims, manifest_shape, input_name="x"):
    import hashlib

    pytest.importorskip("onnxruntime", reason="onnxruntime (the 'onnx' extra) is not installed")
    write_shape_probe_extractor(root / "extractor.onnx", input_name, model_dims)
    sha = hashlib.sha256((root / "extractor.onnx").read_bytes()).hexdigest()
    _rewrite(root, lambda m: (_ext(m).update(sha256=sha), _ext(m)["input"].update(shape=manifest_shape)))
    return Bundle.load(root).extractor


@pytest.mark.parametrize("model_dims, manifest_shape", [
    (("N", 3, 224, 224), [-1, 3, 224, 224]),
    (("N", 3, 224, 224), [8, 3, 224, 224]),
    ((None, 3, "h", "w"), [1, 3, 224, 224]),
    ((1, 3, 224, 224), [1, 3, 224, 224]),
])
def test_manifest_input_agrees_with_the_model(fake_bundle, model_dims, manifest_shape):
    from edge_shitu.backends import create_session

    spec = _with_model(fake_bundle, model_dims, manifest_shape)
    session = create_session(spec, threads=1)
    assert session.input_names == ("x",)
    session.close()


@pytest.mark.parametrize("model_dims, manifest_shape, shown", [
    ((1, 3, 224, 224), [-1, 3, 224, 224], r"\[-1, 3, 224, 224\], but extractor\.onnx takes 'x' of shape "
                                          r"\[1, 3, 224, 224\]"),
    (("N", 3, 112, 112), [-1, 3, 224, 224], r"takes 'x' of shape \[N, 3, 112, 112\]"),
    (("N", 3, 224, 224), [4, 3, 448, 448], r"\[4, 3, 448, 448\], but extractor\.onnx takes 'x' of shape "
                                           r"\[N, 3, 224, 224\]; fixed dimensions must agree"),
    (("N", 224, 224), [-1, 3, 224, 224], r"takes 'x' of shape \[N, 224, 224\]"),
])
def test_manifest_input_that_contradicts_the_model_is_a_bundle_error(fake_bundle, model_dims, manifest_shape, shown):
    from edge_shitu.backends import create_session

    spec = _with_model(fake_bundle, model_dims, manifest_shape)
    with pytest.raises(BundleError, match=r"manifest\.json: models\.extractor\.input\.shape is .*" + shown) as info:
        create_session(spec)
    assert str(fake_bundle / "manifest.json") in str(info.value)


def test_manifest_input_name_must_be_the_models_only_input(fake_bundle):
    from edge_shitu.backends import create_session

    spec = _with_model(fake_bundle, ("N", 3, 224, 224), [-1, 3, 224, 224], input_name="pixels")
    with pytest.raises(BundleError, match=r"input\.name is 'x', but extractor\.onnx takes the inputs \['pixels'\]"):
        create_session(spec)
