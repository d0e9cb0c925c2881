"""Replica models: deterministic weights by rule, the params file format, provenance, and a detector
replica that finds a handful of plausible boxes on the drink test images."""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest

from conftest import translate_to_pir

from edge_shitu_converters.shared import DET_GRAPH, REC_GRAPH
from edge_shitu.errors import (
    ConversionError,
    InvalidDtypeError,
    InvalidInputError,
    MissingFileError,
)

pytestmark = pytest.mark.paddle

_DTYPES = {5: np.float32, 3: np.int64, 2: np.int32}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_params_slowly(path: Path, names: list) -> dict:
    """Independent reader of Paddle's save_combine format (the oracle for write_params)."""
    data = path.read_bytes()
    pos, out = 0, {}
    for name in names:
        version, lod_level, tensor_version, desc_len = struct.unpack_from("<IQIi", data, pos)
        assert (version, lod_level, tensor_version) == (0, 0, 0)
        pos += 20
        desc = data[pos : pos + desc_len]
        pos += desc_len
        fields, i = [], 0
        while i < len(desc):
            tag = desc[i]
            i += 1
            value, shift = 0, 0
            while True:
                byte = desc[i]
                i += 1
                value |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    break
            fields.append((tag >> 3, value))
        dtype = np.dtype(_DTYPES[fields[0][1]])
        shape = tuple(v for f, v in fields[1:] if f == 2)
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        out[name] = np.frombuffer(data[pos : pos + size], dtype=dtype).reshape(shape)
        pos += size
    assert pos == len(data), "trailing bytes in the params file"
    return out


@pytest.fixture(scope="module")
def det_weights(replica_dirs):
    from edge_shitu_converters import paddle_io

    files = paddle_io.find_model_files(replica_dirs["detector"])
    variables = paddle_io.list_persistables(files.program)
    return variables, _read_params_slowly(files.params, [v.name for v in variables])


def test_same_seed_gives_byte_identical_files_and_another_seed_does_not(shared_dir, replica_dirs, tmp_path):
    from edge_shitu_converters.replica import write_replica

    graph = shared_dir / "models" / "ppshitu-graphs" / REC_GRAPH
    again = write_replica(graph, tmp_path / "again", seed=0)
    first = replica_dirs["extractor"]
    names = sorted(p.name for p in first.iterdir())
    assert names == ["inference.pdiparams", "inference.pdiparams.info", "inference.pdmodel", "replica.json"]
    assert sorted(p.name for p in again.iterdir()) == names
    for name in names:
        assert _sha(first / name) == _sha(again / name), name

    other = write_replica(graph, tmp_path / "other", seed=1)
    assert _sha(other / "inference.pdiparams") != _sha(first / "inference.pdiparams")
    assert _sha(other / "inference.pdmodel") == _sha(first / "inference.pdmodel")


def test_program_and_side_files_are_copied_byte_for_byte(shared_dir, replica_dirs):
    graphs = shared_dir / "models" / "ppshitu-graphs"
    for role, graph in (("detector", DET_GRAPH), ("extractor", REC_GRAPH)):
        for name in ("inference.pdmodel", "inference.pdiparams.info", "infer_cfg.yml"):
            source = graphs / graph / name
            if source.is_file():
                assert (replica_dirs[role] / name).read_bytes() == source.read_bytes(), (role, name)
            else:
                assert not (replica_dirs[role] / name).exists()


def test_replica_json_records_provenance(shared_dir, replica_dirs):
    graphs = shared_dir / "models" / "ppshitu-graphs"
    for role, graph in (("detector", DET_GRAPH), ("extractor", REC_GRAPH)):
        info = json.loads((replica_dirs[role] / "replica.json").read_text())
        assert sorted(info) == ["kind", "params_sha256", "rules", "seed", "source_program_sha256"]
        assert info["kind"] == "replica" and info["seed"] == 0
        assert info["source_program_sha256"] == _sha(graphs / graph / "inference.pdmodel")
        assert info["params_sha256"] == _sha(replica_dirs[role] / "inference.pdiparams")
        assert ("picodet_class" in info["rules"]) == (role == "detector")
    rule = json.loads((replica_dirs["detector"] / "replica.json").read_text())["rules"]["picodet_class"]
    assert rule["class_bias"] == -2.0 and rule["class_gain"] == 12.0
    assert rule["class_shift"] == [0.31, 0.25, 0.15, 0.0]


def test_detector_weights_follow_the_rules(det_weights):
    variables, weights = det_weights
    assert len(variables) == 407
    by_use = {}
    for var in variables:
        for use in var.uses:
            by_use.setdefault(use, []).append(var.name)
    for name in by_use[("batch_norm", "Scale")] + by_use[("batch_norm", "Variance")]:
        assert np.all(weights[name] == 1.0), name
    for name in by_use[("batch_norm", "Bias")] + by_use[("batch_norm", "Mean")]:
        assert np.all(weights[name] == 0.0), name
    np.testing.assert_array_equal(weights["dygraph_tmp_4"], np.arange(8, dtype=np.float32))

    heads = [f"conv2d_{i}" for i in (84, 85, 86, 87)]
    for name in by_use[("elementwise_add", "Y")]:
        expected = np.zeros(weights[name].shape, np.float32)
        if name.split(".")[0] in heads:
            expected[0] = -2.0
        np.testing.assert_array_equal(weights[name], expected, err_msg=name)

    # He-normal: for every filter with enough weights the sample std is within a few % of sqrt(2/fan_in).
    filters = by_use[("conv2d", "Filter")] + by_use[("depthwise_conv2d", "Filter")]
    checked = 0
    for name in filters:
        w = weights[name].astype(np.float64)
        if name.split(".")[0] in heads:
            w = w[1:]  # the box rows; row 0 is the class row
        if w.size < 20000:
            continue
        fan_in = w.shape[1] * w.shape[2] * w.shape[3]
        assert abs(w.std() / math.sqrt(2.0 / fan_in) - 1) < 0.05, name
        assert abs(w.mean()) < 0.05 * math.sqrt(2.0 / fan_in), name
        checked += 1
    assert checked >= 15


def test_detector_class_row_is_gain_times_shifted_he_normal(det_weights):
    from edge_shitu_converters.replica import _rng

    _, weights = det_weights
    for i, shift in zip((84, 85, 86, 87), (0.31, 0.25, 0.15, 0.0)):
        w = weights[f"conv2d_{i}.w_0"]
        fan_in = w.shape[1] * w.shape[2] * w.shape[3]
        he = _rng(0, f"conv2d_{i}.w_0").standard_normal(w.shape) * math.sqrt(2.0 / fan_in)
        np.testing.assert_allclose(w[0], 12.0 * (he[0] - shift * math.sqrt(2.0 / fan_in)), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(w[1:], he[1:], rtol=1e-6, atol=1e-7)


def test_weights_do_not_depend_on_variable_order(det_weights):
    from edge_shitu_converters.replica import replica_weights

    variables, weights = det_weights
    shuffled = list(variables)
    np.random.default_rng(3).shuffle(shuffled)
    again = replica_weights(shuffled, seed=0)
    assert sorted(again) == sorted(weights)
    for name, array in again.items():
        assert array.dtype == np.float32
        np.testing.assert_array_equal(array, weights[name], err_msg=name)


def test_paddle_loads_the_replica_weights_unchanged(replica_dirs, det_weights):
    from edge_shitu_converters import paddle_io

    _, weights = det_weights
    model = paddle_io.load_inference_model(replica_dirs["detector"])
    for name in ("conv2d_84.w_0", "conv2d_84.b_0", "dygraph_tmp_4", "batch_norm2d_0.w_2"):
        loaded = np.array(model.scope.find_var(name).get_tensor())
        np.testing.assert_array_equal(loaded, weights[name], err_msg=name)


def test_write_params_matches_paddles_own_serializer(tmp_path):
    from edge_shitu_converters import paddle_io

    paddle_io.import_paddle()
    from paddle.base import core

    rng = np.random.default_rng(7)
    tensors = {
        "b.w_0": rng.standard_normal((3, 2, 1, 5)).astype(np.float32),
        "a.b_0": np.arange(4, dtype=np.int64),
        "c": np.ones((300,), np.float32),
    }
    ours = tmp_path / "ours.pdiparams"
    paddle_io.write_params(ours, tensors.items())
    holders = []
    for name in sorted(tensors):
        t = core.DenseTensor()
        t.set(tensors[name], core.CPUPlace())
        holders.append(t)
    theirs = tmp_path / "theirs.pdiparams"
    core.save_combine_func(holders, sorted(tensors), str(theirs), True, False, False)
    assert ours.read_bytes() == theirs.read_bytes()
    back = _read_params_slowly(ours, sorted(tensors))
    for name, array in tensors.items():
        np.testing.assert_array_equal(back[name], array)


def test_write_params_rejects_bad_dtypes_and_duplicates(tmp_path):
    from edge_shitu_converters.paddle_io import write_params

    with pytest.raises(InvalidDtypeError, match="complex64"):
        write_params(tmp_path / "p", [("x", np.zeros(2, np.complex64))])
    with pytest.raises(InvalidInputError, match="duplicate"):
        write_params(tmp_path / "p", [("x", np.zeros(2, np.float32)), ("x", np.ones(2, np.float32))])


def test_unknown_weight_use_is_an_error_not_a_silent_zero():
    from edge_shitu_converters.paddle_io import VarInfo
    from edge_shitu_converters.replica import replica_weights

    ok = VarInfo("conv.w_0", (4, 3, 1, 1), "float32", (("conv2d", "Filter"),))
    odd = VarInfo("gate.w_0", (4,), "float32", (("prelu", "Alpha"),))
    mixed = VarInfo("both.w_0", (4,), "float32", (("batch_norm", "Scale"), ("elementwise_add", "Y")))
    assert replica_weights([ok], seed=0)["conv.w_0"].shape == (4, 3, 1, 1)
    with pytest.raises(ConversionError, match="gate.w_0"):
        replica_weights([ok, odd], seed=0)
    with pytest.raises(ConversionError, match="both.w_0"):
        replica_weights([mixed], seed=0)
    with pytest.raises(ConversionError, match="float16"):
        replica_weights([VarInfo("h.w_0", (4, 3, 1, 1), "float16", (("conv2d", "Filter"),))], seed=0)


def test_a_variable_no_op_reads_is_zero_with_a_warning(caplog):
    from edge_shitu_converters.paddle_io import VarInfo
    from edge_shitu_converters.replica import replica_weights

    unused = VarInfo("orphan.w_0", (2, 3), "float32", ())
    weights = replica_weights([unused], seed=0)
    np.testing.assert_array_equal(weights["orphan.w_0"], np.zeros((2, 3), np.float32))
    assert "orphan.w_0" in caplog.text and "used by no op" in caplog.text


def test_bad_arguments(shared_dir, tmp_path):
    from edge_shitu_converters.replica import ReplicaOptions, write_replica

    graph = shared_dir / "models" / "ppshitu-graphs" / REC_GRAPH
    for seed in (-1, 1.5, True, "0"):
        with pytest.raises(InvalidInputError, match="seed"):
            write_replica(graph, tmp_path / "x", seed=seed)
    with pytest.raises(InvalidInputError, match="differ"):
        write_replica(graph, graph, seed=0)
    with pytest.raises(MissingFileError, match="no Paddle program"):
        write_replica(tmp_path, tmp_path / "y", seed=0)
    with pytest.raises(MissingFileError, match="not found"):
        write_replica(tmp_path / "absent", tmp_path / "z", seed=0)
    with pytest.raises(InvalidInputError, match="class_shift"):
        ReplicaOptions(class_shift=(0.1, 0.2))
    with pytest.raises(InvalidInputError, match="class_gain"):
        ReplicaOptions(class_gain=0.0)


def test_pir_json_program_gives_the_same_weights(replica_dirs, tmp_path):
    """A Paddle 3 ``inference.json`` program of the same model gets byte-identical replica weights."""
    from edge_shitu_converters.replica import write_replica

    graph = tmp_path / "json_graph"
    graph.mkdir()
    translate_to_pir(replica_dirs["extractor"], graph)
    (graph / "inference.pdiparams").unlink()  # a graph folder holds no weights
    assert (graph / "inference.json").is_file()

    out = write_replica(graph, tmp_path / "replica", seed=0)
    assert sorted(p.name for p in out.iterdir()) == ["inference.json", "inference.pdiparams", "replica.json"]
    assert _sha(out / "inference.pdiparams") == _sha(replica_dirs["extractor"] / "inference.pdiparams")


def _preprocess_detector(path: Path):
    import cv2

    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert bgr is not None, path
    h, w = bgr.shape[:2]
    resized = cv2.resize(bgr[:, :, ::-1], (640, 640), interpolation=cv2.INTER_CUBIC)
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    x = ((resized.astype(np.float32) / 255.0 - mean) / std).transpose(2, 0, 1)[None]
    return (
        np.ascontiguousarray(x, dtype=np.float32),
        np.array([[640.0, 640.0]], np.float32),
        np.array([[640.0 / h, 640.0 / w]], np.float32),
        (h, w),
    )


def test_detector_replica_finds_a_handful_of_plausible_boxes(replica_dirs, test_images):
    pytest.importorskip("cv2", reason="opencv (the 'dev' extra) is needed for the reference pre-processing")
    from edge_shitu_converters.paddle_reference import PaddleDetectorReference

    detector = PaddleDetectorReference(replica_dirs["detector"], threads=2)
    assert len(test_images) == 13
    counts = {}
    for path in test_images:
        image, im_shape, scale_factor, (h, w) = _preprocess_detector(path)
        boxes = detector.run(image, im_shape, scale_factor)
        assert boxes.dtype == np.float32 and boxes.ndim == 2 and boxes.shape[1] == 6
        assert np.all(np.diff(boxes[:, 1]) <= 0), "multiclass_nms3 sorts by score"
        kept = boxes[boxes[:, 1] > 0.2]
        counts[path.name] = len(kept)
        assert np.all(kept[:, 0] == 0) and np.all(kept[:, 1] <= 1.0)
        widths, heights = kept[:, 4] - kept[:, 2], kept[:, 5] - kept[:, 3]
        assert np.all(widths > 0.02 * w) and np.all(heights > 0.02 * h), path.name
        assert np.all(widths * heights < 0.9 * w * h), f"{path.name}: whole-image boxes"
    assert all(1 <= c <= 20 for c in counts.values()), counts
    assert len(set(counts.values())) > 1, counts
