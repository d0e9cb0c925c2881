"""convert --verify: converted models are compared with Paddle Inference on real photos, and a damaged
model fails the check."""

from __future__ import annotations

import hashlib
import io
import json
import shutil

import numpy as np
import pytest

from edge_shitu_converters import verify as verify_mod
from edge_shitu_converters.verify import match_boxes, verify_bundle
from edge_shitu.cli import main
from edge_shitu.errors import ConversionError, InvalidInputError

pytestmark = pytest.mark.paddle


def _copy_bundle(src, dst):
    shutil.copytree(src, dst)
    (dst / "verify.json").unlink(missing_ok=True)
    return dst


def _damage(bundle, role, scale):
    """Multiply one mid-network weight tensor of a model by ``scale`` and re-record its sha256."""
    import onnx
    from onnx import numpy_helper

    manifest = json.loads((bundle / "manifest.json").read_text())
    path = bundle / manifest["models"][role]["file"]
    model = onnx.load(str(path))
    # paddle2onnx stores weights as initializers or as Constant nodes, depending on its version.
    tensors = list(model.graph.initializer) + [n.attribute[0].t for n in model.graph.node if n.op_type == "Constant"]
    convs = [t for t in tensors if len(t.dims) == 4 and t.dims[0] >= 64]
    target = convs[len(convs) // 2]
    target.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(target) * scale, target.name))
    onnx.save(model, str(path))
    manifest["models"][role]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def test_fp32_bundle_passes(replica_bundle, replica_dirs, verify_photos, tmp_path):
    b = _copy_bundle(replica_bundle, tmp_path / "b")
    report = verify_bundle(b, det_dir=replica_dirs["detector"], rec_dir=replica_dirs["extractor"],
                           images_dir=verify_photos)
    assert report["passed"], report["failures"]
    assert report["extractor"]["min_bit_agreement"] >= 0.99 and report["detector"]["match_rate"] == 1.0
    assert report["extractor"]["crops"] > 3  # whole photos plus the reference detector's crops
    assert json.loads((b / "verify.json").read_text())["passed"] is True


@pytest.mark.parametrize("role, scale", [("extractor", -1.0), ("detector", 0.5)])
def test_damaged_model_fails(replica_bundle, replica_dirs, verify_photos, tmp_path, role, scale):
    b = _copy_bundle(replica_bundle, tmp_path / "b")
    _damage(b, role, scale)
    report = verify_bundle(b, det_dir=replica_dirs["detector"], rec_dir=replica_dirs["extractor"],
                           images_dir=verify_photos)
    assert not report["passed"]
    # Each model's section lists its own failures: the damaged model's are all there are.
    other = {"extractor": "detector", "detector": "extractor"}[role]
    assert report[role]["failures"] and report[other]["failures"] == []
    assert report["failures"] == report[role]["failures"]


def test_one_role_and_shared_references_give_the_full_reports_figures(replica_bundle, replica_dirs, verify_photos,
                                                                      tmp_path, monkeypatch):
    """What the INT8 search does at each step: one role, the Paddle side remembered. Its figures are those of a
    plain full verification, the reference models run once per distinct input, and a damaged model is still
    caught with the remembered references."""
    from edge_shitu_converters import paddle_reference

    b = _copy_bundle(replica_bundle, tmp_path / "b")
    dirs = dict(det_dir=replica_dirs["detector"], rec_dir=replica_dirs["extractor"], images_dir=verify_photos)
    full = verify_bundle(b, **dirs)
    calls = {"det": 0, "rec": 0}
    for cls, key in ((paddle_reference.PaddleDetectorReference, "det"),
                     (paddle_reference.PaddleExtractorReference, "rec")):
        def counted(self, *args, _run=cls.run, _key=key):
            calls[_key] += 1
            return _run(self, *args)
        monkeypatch.setattr(cls, "run", counted)
    refs = verify_mod.PaddleReferences()
    for _ in range(2):
        for role in ("extractor", "detector"):
            one = verify_bundle(b, **dirs, roles=(role,), references=refs)
            other = {"extractor": "detector", "detector": "extractor"}[role]
            assert one[role] == full[role] and other not in one and one["passed"]
    assert calls == {"det": len(full["images"]), "rec": -(-full["extractor"]["crops"] // 16)}

    _damage(b, "extractor", -1.0)
    damaged = verify_bundle(b, **dirs, roles=("extractor",), references=refs)
    assert not damaged["passed"] and damaged["failures"][0].startswith("extractor")
    assert calls["rec"] == -(-full["extractor"]["crops"] // 16)  # same crops: the reference was not run again
    with pytest.raises(InvalidInputError, match="unknown model role"):
        verify_bundle(b, **dirs, roles=("classifier",))
    with pytest.raises(InvalidInputError, match="no model to verify"):
        verify_bundle(b, **dirs, roles=())
    # A role the bundle has no model for is refused, not passed with nothing checked.
    manifest = json.loads((b / "manifest.json").read_text())
    (b / manifest["models"].pop("detector")["file"]).unlink()
    (b / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InvalidInputError, match="no detector to verify; the bundle has extractor"):
        verify_bundle(b, **dirs, roles=("detector",))


def test_references_run_again_when_the_input_changes(replica_dirs):
    from edge_shitu_converters.paddle_reference import PaddleExtractorReference

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((3, 3, 224, 224)).astype(np.float32) for _ in range(2))
    refs = verify_mod.PaddleReferences()
    first = refs.extractor(replica_dirs["extractor"], a)
    assert refs.extractor(replica_dirs["extractor"], a) is first and not first.flags.writeable
    oracle = PaddleExtractorReference(replica_dirs["extractor"], threads=2)
    np.testing.assert_array_equal(refs.extractor(replica_dirs["extractor"], b), oracle.run(b))
    np.testing.assert_array_equal(first, oracle.run(a))
    # Another spelling of the same folder shares the model and its remembered outputs.
    rec = replica_dirs["extractor"]
    other = rec.parent / ".." / rec.parent.name / rec.name
    assert refs.extractor(other, a) is first and len(refs._models) == 1


def test_convert_verify_publishes_only_agreeing_bundles(replica_dirs, verify_photos, tmp_path, monkeypatch):
    from edge_shitu_converters.convert import convert

    out = convert(None, replica_dirs["extractor"], tmp_path / "ok", verify=True, verify_images=verify_photos)
    assert json.loads((out / "verify.json").read_text())["passed"]

    strict = verify_mod.VerifyThresholds(1.01, 1.0, 1.0, 1.0, 0.0)  # a cosine above 1 cannot be reached
    monkeypatch.setitem(verify_mod.THRESHOLDS, "fp32", strict)
    with pytest.raises(ConversionError, match="disagree with their sources: extractor min cosine"):
        convert(None, replica_dirs["extractor"], tmp_path / "bad", verify=True, verify_images=verify_photos)
    assert not (tmp_path / "bad").exists()
    assert json.loads((tmp_path / "bad.verify-failed.json").read_text())["passed"] is False


def test_cli_convert_verify_and_bundle_info(replica_dirs, verify_photos, tmp_path):
    out, err = io.StringIO(), io.StringIO()
    code = main(["convert", "--rec", str(replica_dirs["extractor"]), "--out", str(tmp_path / "b"), "--verify",
                 "--verify-images", str(verify_photos)], stdout=out, stderr=err)
    assert code == 0, err.getvalue()
    assert "PASSED" in out.getvalue() and "code bits equal" in out.getvalue()
    out = io.StringIO()
    assert main(["bundle", "info", str(tmp_path / "b")], stdout=out) == 0
    text = out.getvalue()
    assert "extractor: extractor.onnx" in text and "replica seed 0" in text and "PASSED" in text
    out = io.StringIO()
    assert main(["bundle", "info", str(tmp_path / "b"), "--json"], stdout=out) == 0
    info = json.loads(out.getvalue())
    assert info["verification"]["passed"] and info["sizes"]["extractor"] > 1_000_000


def test_match_boxes_is_one_to_one():
    ref = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float)
    ours = np.array([[0, 0, 10, 10.5], [0, 0, 10, 10], [50, 50, 60, 60]], float)
    pairs = match_boxes(ref, ours)
    assert [(i, j) for i, j, _ in pairs] == [(0, 1)]
    assert match_boxes(ref, np.zeros((0, 4))) == []


def test_lite_x86_bundle_is_verified_in_the_side_environment(replica_dirs, verify_photos, tmp_path, lite_opt,
                                                             lite_python):
    from edge_shitu_converters.convert import convert

    out = convert(replica_dirs["detector"], replica_dirs["extractor"], tmp_path / "lite", format="lite-x86",
                  verify=True, verify_images=verify_photos, lite_opt=lite_opt, lite_python=lite_python)
    report = json.loads((out / "verify.json").read_text())
    assert report["passed"] and report["detector"]["match_rate"] == 1.0
    assert report["extractor"]["min_cosine"] > 0.9999


def test_lite_arm_bundle_is_marked_unverifiable(replica_dirs, verify_photos, tmp_path, lite_opt):
    from edge_shitu_converters.convert import convert

    out = convert(None, replica_dirs["extractor"], tmp_path / "arm", format="lite-arm", verify=True,
                  verify_images=verify_photos, lite_opt=lite_opt)
    report = json.loads((out / "verify.json").read_text())
    assert report["passed"] is None and "cannot run on this" in report["unverifiable"]
    text = io.StringIO()
    assert main(["bundle", "info", str(out)], stdout=text) == 0
    assert "NOT VERIFIED" in text.getvalue() and "target arm" in text.getvalue()
