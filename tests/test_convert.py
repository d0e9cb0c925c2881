"""Paddle -> ONNX bundle conversion: the manifest schema, runtime parity with Paddle Inference,
argument validation, error reporting, determinism, and no installs or network at conversion time."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import translate_to_pir

from edge_shitu_converters.shared import DET_GRAPH, REC_GRAPH
from edge_shitu.errors import ConversionError, InvalidDtypeError, InvalidInputError, MissingFileError

_KEYS = {
    "top": {"format", "format_version", "name", "models", "codes", "recognition", "tools"},
    "detector": {"file", "sha256", "backend", "precision", "input", "output", "labels", "defaults", "source"},
    "extractor": {"file", "sha256", "backend", "precision", "input", "output", "source"},
    "input": {"name", "shape", "resize", "interpolation", "channel_order", "scale", "mean", "std", "layout"},
    "det_output": {"kind", "scores", "boxes", "strides", "reg_max", "cell_offset", "num_classes"},
    "rec_output": {"kind", "name", "dim", "normalized"},
    "defaults": {"score_threshold", "nms_iou", "nms_top_k", "keep_top_k", "max_detections", "min_score"},
    "source": {"kind", "model_dir_name", "program_sha256", "params_sha256", "seed"},
    "codes": {"bits", "method", "bit_order"},
    "recognition": {"max_distance", "final_nms_iou", "whole_image", "top_k"},
    "tools": {"edge_shitu", "paddlepaddle", "paddle2onnx", "onnx", "onnxruntime"},
}
_MEAN = [0.485, 0.456, 0.406]
_STD = [0.229, 0.224, 0.225]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _session(path: Path):
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def manifest(replica_bundle) -> dict:
    return json.loads((replica_bundle / "manifest.json").read_text(encoding="utf-8"))


@pytest.mark.paddle
def test_bundle_holds_exactly_the_models_and_the_manifest(replica_bundle):
    assert sorted(p.name for p in replica_bundle.iterdir()) == ["detector.onnx", "extractor.onnx", "manifest.json"]
    leftovers = [p.name for p in replica_bundle.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == [], "staging folders must be cleaned up"


@pytest.mark.paddle
def test_manifest_has_exactly_the_schema(manifest, replica_bundle):
    text = (replica_bundle / "manifest.json").read_text(encoding="utf-8")
    assert text == json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    assert set(manifest) == _KEYS["top"]
    assert manifest["format"] == "edge-shitu-bundle" and manifest["format_version"] == 1
    assert manifest["name"] == "ppshituv2-replica-s0-fp32"
    assert set(manifest["models"]) == {"detector", "extractor"}
    det, rec = manifest["models"]["detector"], manifest["models"]["extractor"]
    assert set(det) == _KEYS["detector"] and set(rec) == _KEYS["extractor"]
    for model in (det, rec):
        assert set(model["input"]) == _KEYS["input"] and set(model["source"]) == _KEYS["source"]
        assert model["backend"] == "onnxruntime" and model["precision"] == "fp32"
    assert set(det["output"]) == _KEYS["det_output"] and set(rec["output"]) == _KEYS["rec_output"]
    assert set(det["defaults"]) == _KEYS["defaults"]
    assert set(manifest["codes"]) == _KEYS["codes"] and set(manifest["recognition"]) == _KEYS["recognition"]
    assert set(manifest["tools"]) == _KEYS["tools"] and all(isinstance(v, str) for v in manifest["tools"].values())

    assert det["file"] == "detector.onnx" and rec["file"] == "extractor.onnx"
    assert det["input"] == {
        "name": "image", "shape": [1, 3, 640, 640], "resize": "stretch", "interpolation": "cubic",
        "channel_order": "RGB", "scale": 1 / 255, "mean": _MEAN, "std": _STD, "layout": "NCHW",
    }  # fmt: skip
    assert rec["input"] == {
        "name": "x", "shape": [-1, 3, 224, 224], "resize": "stretch", "interpolation": "linear",
        "channel_order": "RGB", "scale": 1 / 255, "mean": _MEAN, "std": _STD, "layout": "NCHW",
    }  # fmt: skip
    out = det["output"]
    assert out["kind"] == "picodet_heads" and out["strides"] == [8, 16, 32, 64]
    assert out["reg_max"] == 7 and out["cell_offset"] == 0.5 and out["num_classes"] == 1
    assert len(out["scores"]) == 4 and len(out["boxes"]) == 4
    assert det["labels"] == ["foreground"]
    assert det["defaults"] == {
        "score_threshold": 0.025, "nms_iou": 0.6, "nms_top_k": 1000, "keep_top_k": 100,
        "max_detections": 5, "min_score": 0.2,
    }  # fmt: skip
    assert rec["output"] == {"kind": "embedding", "name": "batch_norm_25.tmp_2", "dim": 512, "normalized": False}
    assert manifest["codes"] == {"bits": 512, "method": "sign", "bit_order": "big"}
    assert manifest["recognition"] == {"max_distance": 100, "final_nms_iou": 0.05, "whole_image": "if_none", "top_k": 5}


@pytest.mark.paddle
def test_manifest_digests_and_provenance_match_the_files(manifest, replica_bundle, replica_dirs, shared_dir):
    graphs = shared_dir / "models" / "ppshitu-graphs"
    for role, graph in (("detector", DET_GRAPH), ("extractor", REC_GRAPH)):
        model = manifest["models"][role]
        assert model["sha256"] == _sha(replica_bundle / model["file"])
        assert model["source"] == {
            "kind": "replica",
            "model_dir_name": graph,
            "program_sha256": _sha(graphs / graph / "inference.pdmodel"),
            "params_sha256": _sha(replica_dirs[role] / "inference.pdiparams"),
            "seed": 0,
        }


@pytest.mark.paddle
def test_onnx_files_pass_the_checker_and_name_their_io_as_the_manifest_says(manifest, replica_bundle):
    import onnx

    det, rec = manifest["models"]["detector"], manifest["models"]["extractor"]
    for model in (det, rec):
        onnx.checker.check_model(str(replica_bundle / model["file"]), full_check=True)
    session = _session(replica_bundle / "detector.onnx")
    assert [(i.name, i.shape) for i in session.get_inputs()] == [("image", [1, 3, 640, 640])]
    shapes = {o.name: o.shape for o in session.get_outputs()}
    assert set(shapes) == set(det["output"]["scores"] + det["output"]["boxes"])
    for stride, scores, boxes in zip((8, 16, 32, 64), det["output"]["scores"], det["output"]["boxes"]):
        cells = (640 // stride) ** 2
        assert shapes[scores] == [1, cells, 1] and shapes[boxes] == [1, cells, 32]
    session = _session(replica_bundle / "extractor.onnx")
    (inp,) = session.get_inputs()
    (out,) = session.get_outputs()
    assert inp.name == "x" and inp.shape[1:] == [3, 224, 224]
    assert out.name == rec["output"]["name"] and out.shape[1] == 512


@pytest.mark.paddle
def test_extractor_onnx_matches_paddle_inference(manifest, replica_bundle, replica_dirs):
    from edge_shitu_converters.paddle_reference import PaddleExtractorReference

    reference = PaddleExtractorReference(replica_dirs["extractor"])
    session = _session(replica_bundle / "extractor.onnx")
    name = manifest["models"]["extractor"]["output"]["name"]
    rng = np.random.default_rng(11)
    for batch in (1, 3, 2):
        x = rng.standard_normal((batch, 3, 224, 224)).astype(np.float32)
        expected = reference.run(x)
        (got,) = session.run([name], {"x": x})
        assert expected.shape == got.shape == (batch, 512) and got.dtype == np.float32
        scale = float(np.abs(expected).max())
        assert scale > 0
        assert float(np.abs(expected - got).max()) <= 1e-5 * max(1.0, scale)
        assert not np.allclose(expected[0], 0)


@pytest.fixture(scope="module")
def paddle_heads(replica_dirs, tmp_path_factory):
    from edge_shitu_converters.convert import cut_detector_heads

    return cut_detector_heads(replica_dirs["detector"], tmp_path_factory.mktemp("heads"))


def _detector_input(path: Path) -> np.ndarray:
    import cv2

    rgb = cv2.imread(str(path), cv2.IMREAD_COLOR)[:, :, ::-1]
    resized = cv2.resize(rgb, (640, 640), interpolation=cv2.INTER_CUBIC).astype(np.float32)
    x = ((resized / 255.0 - np.float32(_MEAN)) / np.float32(_STD)).transpose(2, 0, 1)[None]
    return np.ascontiguousarray(x, dtype=np.float32)


@pytest.mark.paddle
def test_detector_onnx_raw_heads_match_the_cut_paddle_program(manifest, replica_bundle, paddle_heads, test_images):
    pytest.importorskip("cv2", reason="opencv (the 'dev' extra) is needed for the reference pre-processing")
    from edge_shitu_converters import paddle_io

    out = manifest["models"]["detector"]["output"]
    assert list(paddle_heads.scores) == out["scores"] and list(paddle_heads.boxes) == out["boxes"]
    assert paddle_heads.input_shape == (1, 3, 640, 640) and paddle_heads.reg_max == 7
    predictor = paddle_io.create_predictor(paddle_heads.files, threads=2)
    session = _session(replica_bundle / "detector.onnx")
    names = out["scores"] + out["boxes"]
    for path in (test_images[0], test_images[-1]):
        image = _detector_input(path)
        expected = paddle_io.run_predictor(predictor, {"image": image})
        got = dict(zip(names, session.run(names, {"image": image})))
        for name in names:
            assert expected[name].shape == got[name].shape, name
            scale = max(1.0, float(np.abs(expected[name]).max()))
            assert float(np.abs(expected[name] - got[name]).max()) <= 1e-4 * scale, (path.name, name)
        scores = np.concatenate([got[n].reshape(-1) for n in out["scores"]])
        assert np.all((scores >= 0) & (scores <= 1)) and np.any(scores > 0.2), path.name


@pytest.mark.paddle
def test_detector_heads_explain_the_full_graphs_boxes(replica_dirs, paddle_heads, test_images):
    """The cut program is the full program minus its post-process: decoding its heads by hand gives
    the full graph's top box (scale_factor 1, so in network-input pixels)."""
    pytest.importorskip("cv2", reason="opencv (the 'dev' extra) is needed for the reference pre-processing")
    from edge_shitu_converters import paddle_io
    from edge_shitu_converters.paddle_reference import PaddleDetectorReference

    image = _detector_input(test_images[0])
    full = PaddleDetectorReference(replica_dirs["detector"]).run(
        image, np.array([[640, 640]], np.float32), np.array([[1, 1]], np.float32)
    )
    heads = paddle_io.run_predictor(paddle_io.create_predictor(paddle_heads.files), {"image": image})
    best = None
    for stride, s_name, b_name in zip(paddle_heads.strides, paddle_heads.scores, paddle_heads.boxes):
        side = 640 // stride
        scores = heads[s_name].reshape(-1)
        logits = heads[b_name].reshape(-1, 4, 8).astype(np.float64)
        prob = np.exp(logits - logits.max(-1, keepdims=True))
        dist = (prob / prob.sum(-1, keepdims=True)) @ np.arange(8) * stride
        i = int(np.argmax(scores))
        cx, cy = (i % side + 0.5) * stride, (i // side + 0.5) * stride
        # This hosted graph clips boxes to the network input before rescaling (release/2.3 decode).
        box = np.clip([cx - dist[i, 0], cy - dist[i, 1], cx + dist[i, 2], cy + dist[i, 3]], 0, 640)
        if best is None or scores[i] > best[0]:
            best = (scores[i], box)
    np.testing.assert_allclose(full[0, 1], best[0], rtol=1e-4)
    np.testing.assert_allclose(full[0, 2:], best[1], rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("precision", ["fp16", "FP32", "", "int4"])
def test_unsupported_precision_raises_before_any_work(precision, tmp_path):
    from edge_shitu_converters.convert import convert

    with pytest.raises(ConversionError, match="not supported yet"):
        convert(tmp_path / "absent-det", tmp_path / "absent-rec", tmp_path / "out", precision=precision)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("opset", [10, 18, "11", True])
def test_opset_out_of_range_raises(opset, tmp_path):
    from edge_shitu_converters.convert import convert

    with pytest.raises(ConversionError, match="opset"):
        convert(tmp_path, None, tmp_path / "out", opset=opset)


def test_the_formats_table_drives_validation():
    from edge_shitu_converters.convert import EXPORT_FORMATS, validate_export

    spec = validate_export("onnx", "fp32", 11)
    assert spec is EXPORT_FORMATS["onnx"] and spec.suffix == ".onnx"
    assert validate_export("onnx", "int8", 11) is spec
    for fmt in ("lite-x86", "lite-arm"):
        lite = validate_export(fmt, "int8", None)
        assert lite.suffix == ".nb" and lite.backend == "paddlelite" and lite.target == fmt[5:]
    with pytest.raises(ConversionError, match="'fp16' is not supported yet for onnx"):
        validate_export("onnx", "fp16", 11)
    with pytest.raises(ConversionError, match="unknown export format"):
        validate_export("tflite", "fp32", None)


def test_argument_errors(tmp_path):
    from edge_shitu_converters.convert import convert

    with pytest.raises(InvalidInputError, match="neither"):
        convert(None, None, tmp_path / "out")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(InvalidInputError, match="not empty"):
        convert(None, tmp_path, tmp_path / "full")
    with pytest.raises(InvalidInputError, match="bundle name"):
        convert(None, tmp_path, tmp_path / "out", name="../evil")


@pytest.mark.paddle
def test_missing_model_folder(tmp_path):
    from edge_shitu_converters.convert import convert

    with pytest.raises(MissingFileError, match="extractor model folder not found"):
        convert(None, tmp_path / "absent", tmp_path / "out")
    with pytest.raises(MissingFileError, match="no Paddle program"):
        convert(tmp_path, None, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_missing_paddle_names_the_extra(tmp_path, monkeypatch):
    import sys

    from edge_shitu_converters.convert import convert
    from edge_shitu_converters.replica import write_replica
    from edge_shitu.errors import BackendUnavailableError

    for name in [m for m in sys.modules if m == "paddle" or m.startswith("paddle.") or m.startswith("paddle2onnx")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "paddle", None)
    with pytest.raises(BackendUnavailableError, match=r'pip install "edge-shitu\[convert\]"'):
        write_replica(tmp_path, tmp_path / "out", seed=0)
    with pytest.raises(BackendUnavailableError, match=r'pip install "edge-shitu\[convert\]"'):
        convert(None, tmp_path, tmp_path / "bundle")


@pytest.mark.paddle
def test_conversion_installs_nothing_and_opens_no_connection(replica_dirs, tmp_path, monkeypatch):
    from edge_shitu_converters.convert import convert

    calls = []

    def forbidden(what):
        def refuse(*args, **kwargs):
            calls.append(what)
            raise AssertionError(f"conversion must not call {what}")

        return refuse

    monkeypatch.setattr(subprocess, "Popen", forbidden("subprocess.Popen"))
    monkeypatch.setattr(os, "system", forbidden("os.system"))
    monkeypatch.setattr(urllib.request, "urlopen", forbidden("urllib.request.urlopen"))
    monkeypatch.setattr(socket, "create_connection", forbidden("socket.create_connection"))
    monkeypatch.setattr(socket.socket, "connect", forbidden("socket.connect"))
    monkeypatch.delenv("POLYGRAPHY_AUTOINSTALL_DEPS", raising=False)
    out = convert(replica_dirs["detector"], replica_dirs["extractor"], tmp_path / "bundle")
    assert (out / "manifest.json").is_file()
    assert calls == []
    assert "POLYGRAPHY_AUTOINSTALL_DEPS" not in os.environ


@pytest.mark.paddle
def test_identical_inputs_give_identical_bundles(replica_bundle, replica_dirs, tmp_path):
    from edge_shitu_converters.convert import convert

    first = convert(None, replica_dirs["extractor"], tmp_path / "a")
    again = convert(None, replica_dirs["extractor"], tmp_path / "b")
    assert (first / "manifest.json").read_bytes() == (again / "manifest.json").read_bytes()
    assert (first / "extractor.onnx").read_bytes() == (replica_bundle / "extractor.onnx").read_bytes()
    manifest = json.loads((first / "manifest.json").read_text())
    assert manifest["name"] == "ppshituv2-rec-replica-s0-fp32" and set(manifest["models"]) == {"extractor"}


@pytest.mark.paddle
def test_official_weights_are_recorded_as_official(replica_dirs, tmp_path):
    from edge_shitu_converters.convert import convert

    official = tmp_path / REC_GRAPH
    shutil.copytree(replica_dirs["extractor"], official)
    (official / "replica.json").unlink()
    out = convert(None, official, tmp_path / "bundle")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["name"] == "ppshituv2-rec-official-fp32"
    assert manifest["models"]["extractor"]["source"]["kind"] == "official"
    assert manifest["models"]["extractor"]["source"]["seed"] is None


@pytest.mark.paddle
def test_stale_replica_json_is_refused(replica_dirs, tmp_path):
    from edge_shitu_converters.convert import convert

    folder = tmp_path / "mixed"
    shutil.copytree(replica_dirs["extractor"], folder)
    params = folder / "inference.pdiparams"
    data = bytearray(params.read_bytes())
    data[-1] ^= 0xFF  # "official" weights dropped into a replica folder
    params.write_bytes(bytes(data))
    with pytest.raises(ConversionError, match="delete replica.json"):
        convert(None, folder, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


@pytest.mark.paddle
def test_failures_name_the_step_and_the_model_folder(replica_dirs, tmp_path):
    from edge_shitu_converters.convert import convert

    folder = tmp_path / "broken"
    shutil.copytree(replica_dirs["extractor"], folder)
    (folder / "replica.json").unlink()
    params = folder / "inference.pdiparams"
    params.write_bytes(params.read_bytes()[:1000])
    with pytest.raises(ConversionError, match=r"'extractor: load' failed for .*broken"):
        convert(None, folder, tmp_path / "bundle")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"], "no half-written bundle or staging folder"


@pytest.mark.paddle
def test_detector_config_is_read_from_infer_cfg(replica_dirs, tmp_path):
    from edge_shitu_converters.convert import _detector_input_spec

    folder = tmp_path / "det"
    folder.mkdir()
    source = (replica_dirs["detector"] / "infer_cfg.yml").read_text()
    (folder / "infer_cfg.yml").write_text(source.replace("interp: 2", "interp: 1").replace("0.485", "0.5"))
    spec, labels = _detector_input_spec(folder)
    assert spec["interpolation"] == "linear" and spec["mean"] == [0.5, 0.456, 0.406] and labels == ["foreground"]
    (folder / "infer_cfg.yml").write_text(source.replace("keep_ratio: false", "keep_ratio: true"))
    with pytest.raises(ConversionError, match="keep_ratio"):
        _detector_input_spec(folder)
    (folder / "infer_cfg.yml").write_text(source.replace("type: Permute", "type: Mystery"))
    with pytest.raises(ConversionError, match="Mystery"):
        _detector_input_spec(folder)
    (folder / "infer_cfg.yml").unlink()
    spec, labels = _detector_input_spec(folder)
    assert spec["interpolation"] == "cubic" and spec["shape"] == [1, 3, 640, 640] and labels == ["foreground"]


@pytest.mark.paddle
def test_reference_runners_reject_bad_inputs(replica_dirs):
    from edge_shitu_converters.paddle_reference import PaddleDetectorReference, PaddleExtractorReference

    extractor = PaddleExtractorReference(replica_dirs["extractor"])
    with pytest.raises(InvalidDtypeError, match="float32"):
        extractor.run(np.zeros((1, 3, 224, 224), np.float64))
    with pytest.raises(InvalidInputError, match=r"\(B, 3, 224, 224\)"):
        extractor.run(np.zeros((1, 224, 224, 3), np.float32))
    with pytest.raises(InvalidInputError, match="at least one"):
        extractor.run(np.zeros((0, 3, 224, 224), np.float32))
    detector = PaddleDetectorReference(replica_dirs["detector"])
    with pytest.raises(InvalidInputError, match="scale_factor"):
        detector.run(np.zeros((1, 3, 640, 640), np.float32), np.ones((1, 2), np.float32), np.ones((2,), np.float32))
    with pytest.raises(InvalidInputError, match="threads"):
        PaddleExtractorReference(replica_dirs["extractor"], threads=0)
    with pytest.raises(MissingFileError):
        PaddleExtractorReference(replica_dirs["extractor"].parent / "absent")
    with pytest.raises(ConversionError, match="image/im_shape/scale_factor"):
        PaddleDetectorReference(replica_dirs["extractor"])


@pytest.fixture(scope="module")
def pir_detector_dir(replica_dirs, tmp_path_factory) -> Path:
    """The detector replica as a PIR program: the official graph translated to ``inference.json``, then
    given replica weights by write_replica (so it has its own replica.json, naming the .json program)."""
    from edge_shitu_converters.replica import write_replica

    root = tmp_path_factory.mktemp("pir")
    graph = translate_to_pir(replica_dirs["detector"], root / "graph")
    (graph / "inference.pdiparams").unlink()  # a graph folder holds no weights
    return write_replica(graph, root / DET_GRAPH, seed=0)


@pytest.fixture(scope="module")
def pir_bundle(pir_detector_dir, tmp_path_factory) -> Path:
    from edge_shitu_converters.convert import convert

    return convert(pir_detector_dir, None, tmp_path_factory.mktemp("pir-bundle") / "bundle")


@pytest.mark.paddle
def test_pir_detector_replica_carries_the_legacy_weights(pir_detector_dir, replica_dirs):
    names = sorted(p.name for p in pir_detector_dir.iterdir())
    assert names == ["infer_cfg.yml", "inference.json", "inference.pdiparams", "replica.json"]
    params = pir_detector_dir / "inference.pdiparams"
    assert _sha(params) == _sha(replica_dirs["detector"] / "inference.pdiparams")


@pytest.mark.paddle
def test_pir_detector_cut_gives_the_legacy_cut_heads(pir_detector_dir, paddle_heads, tmp_path, test_images):
    pytest.importorskip("cv2", reason="opencv (the 'dev' extra) is needed for the reference pre-processing")
    from edge_shitu_converters import paddle_io
    from edge_shitu_converters.convert import cut_detector_heads

    heads = cut_detector_heads(pir_detector_dir, tmp_path / "heads")
    assert heads.files.is_pir and heads.files.program.name == "inference.json"
    assert not paddle_heads.files.is_pir
    for field in ("input_name", "input_shape", "scores", "boxes", "strides", "reg_max", "labels"):
        assert getattr(heads, field) == getattr(paddle_heads, field), field
    pir = paddle_io.create_predictor(heads.files, threads=2)
    legacy = paddle_io.create_predictor(paddle_heads.files, threads=2)
    names = list(heads.scores + heads.boxes)
    assert list(pir.get_input_names()) == ["image"] and list(pir.get_output_names()) == names
    image = _detector_input(test_images[0])
    expected = paddle_io.run_predictor(legacy, {"image": image})
    got = paddle_io.run_predictor(pir, {"image": image})
    for name in names:
        assert got[name].shape == expected[name].shape, name
        scale = max(1.0, float(np.abs(expected[name]).max()))
        assert float(np.abs(got[name] - expected[name]).max()) <= 1e-5 * scale, name
    scores = np.concatenate([got[n].reshape(-1) for n in heads.scores])
    assert np.any(scores > 0.2) and float(np.ptp(got["boxes_stride8"])) > 1.0


@pytest.mark.paddle
def test_pir_detector_bundle_matches_the_legacy_bundle(pir_bundle, pir_detector_dir, replica_bundle, manifest, test_images):
    pytest.importorskip("cv2", reason="opencv (the 'dev' extra) is needed for the reference pre-processing")
    assert sorted(p.name for p in pir_bundle.iterdir()) == ["detector.onnx", "manifest.json"]
    pir_manifest = json.loads((pir_bundle / "manifest.json").read_text(encoding="utf-8"))
    assert pir_manifest["name"] == "ppshitu-det-replica-s0-fp32"
    det, legacy = pir_manifest["models"]["detector"], manifest["models"]["detector"]
    assert det["sha256"] == _sha(pir_bundle / "detector.onnx")
    assert det["source"] == {
        "kind": "replica",
        "model_dir_name": DET_GRAPH,
        "program_sha256": _sha(pir_detector_dir / "inference.json"),
        "params_sha256": legacy["source"]["params_sha256"],
        "seed": 0,
    }
    assert det["source"]["program_sha256"] != legacy["source"]["program_sha256"]
    for key in set(det) - {"sha256", "source"}:
        assert det[key] == legacy[key], key

    names = det["output"]["scores"] + det["output"]["boxes"]
    pir, ref = _session(pir_bundle / "detector.onnx"), _session(replica_bundle / "detector.onnx")
    assert [(i.name, i.shape) for i in pir.get_inputs()] == [("image", [1, 3, 640, 640])]
    assert [(o.name, o.shape) for o in pir.get_outputs()] == [(o.name, o.shape) for o in ref.get_outputs()]
    for path in (test_images[0], test_images[-1]):
        image = _detector_input(path)
        expected = dict(zip(names, ref.run(names, {"image": image})))
        got = dict(zip(names, pir.run(names, {"image": image})))
        for name in names:
            scale = max(1.0, float(np.abs(expected[name]).max()))
            assert float(np.abs(got[name] - expected[name]).max()) <= 1e-5 * scale, (path.name, name)


@pytest.mark.paddle
def test_pir_detector_heads_are_validated_by_shape(pir_detector_dir, tmp_path):
    from edge_shitu_converters.convert import cut_detector_heads

    folder = tmp_path / "det"
    folder.mkdir()
    for name in ("inference.json", "inference.pdiparams"):
        os.symlink(pir_detector_dir / name, folder / name)
    cfg = (pir_detector_dir / "infer_cfg.yml").read_text()
    assert "640" in cfg
    (folder / "infer_cfg.yml").write_text(cfg.replace("640", "320"))
    with pytest.raises(ConversionError, match=r"stride 8: expected class scores .* \[N, 40, 40, 1\]"):
        cut_detector_heads(folder, tmp_path / "heads")


@pytest.mark.paddle
def test_a_pir_program_that_is_not_the_detector_is_refused(replica_dirs, tmp_path):
    from edge_shitu_converters import paddle_io
    from edge_shitu_converters.convert import _pir_heads, cut_detector_heads

    folder = translate_to_pir(replica_dirs["extractor"], tmp_path / "rec")
    with pytest.raises(ConversionError, match="image/im_shape/scale_factor"):
        cut_detector_heads(folder, tmp_path / "heads")
    paddle = paddle_io.import_paddle()
    model = paddle_io.load_inference_model(folder)
    with paddle.pir_utils.IrGuard(), pytest.raises(ConversionError, match="found 0 and 0"):
        _pir_heads(model.program.global_block(), model.files.program)


def test_the_manifest_records_what_the_quantiser_rewrote():
    """The manifest's record of an INT8 model: the float blocks, how many hard sigmoids took each integer form, and
    the convolutions re-laid (from the quantiser's report)."""
    from types import SimpleNamespace

    from edge_shitu_converters.convert import _written_model

    report = SimpleNamespace(integer_hard_sigmoids=("HardSigmoid.53", "HardSigmoid.54"),
                             clip_hard_sigmoids=("HardSigmoid.0", "HardSigmoid.2", "HardSigmoid.4"),
                             kernel_shapes=("Conv.0", "Conv.1"))
    assert _written_model(["Conv.7"], report) == {
        "float_blocks": ["Conv.7"], "integer_hard_sigmoids": 2, "clip_hard_sigmoids": 3,
        "kernel_shapes": ["Conv.0", "Conv.1"]}
