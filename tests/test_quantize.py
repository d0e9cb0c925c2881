"""INT8 quantisation (edge_shitu_converters.quantize): option validation, calibration photos made by the runtime's
own pre-processing, the float-tail graph walk and int8 tail weights (against slow oracles), tiny synthetic
models end to end, and the replica models against fp32 through the runtime's Embedder and Detector.

Replica thresholds sit below the measured fidelity and above what a model calibrated on blank images
reaches (figures in docs/benchmarks.md, "tests/test_quantize.py: replica thresholds"). The replicas have
random weights, which makes the detector unusually fragile (even int8 *weights* alone with float
activations lose some of its boxes): these are conversion-fidelity floors, not accuracy figures.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest

from edge_shitu_converters.quantize import (
    QuantizeOptions,
    calibration_feeds,
    compare_outputs,
    float_tail_nodes,
    int8_tail_weights,
    quantize_model,
)
from edge_shitu.bundle import InputSpec
from edge_shitu.errors import ConversionError, InvalidInputError, MissingFileError
from edge_shitu.image import load_image
from edge_shitu.preprocess import image_to_tensor

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxruntime.quantization", reason="onnxruntime.quantization needs ml_dtypes")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
OFFICIAL_LITE_PACKAGE_BYTES = 13.8e6


def _spec(batch: int = -1, size: int = 16, name: str = "x") -> InputSpec:
    return InputSpec(name=name, shape=(batch, 3, size, size), resize="stretch", interpolation="linear",
                     channel_order="RGB", scale=1 / 255, mean=MEAN, std=STD, layout="NCHW")


def _write_photos(folder: Path, rng: np.random.Generator, n: int = 8) -> list:
    """Noise photos of various sizes and formats, some in a sub-folder; returns their paths."""
    from PIL import Image

    paths = []
    for i in range(n):
        sub = folder / ("nested" if i % 3 == 0 else "")
        sub.mkdir(parents=True, exist_ok=True)
        h, w = int(rng.integers(12, 40)), int(rng.integers(12, 40))
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        path = sub / (f"p{i}.png" if i % 2 else f"p{i}.jpg")
        img.save(path)
        paths.append(path)
    return paths


@pytest.fixture
def photos(tmp_path, rng) -> Path:
    root = tmp_path / "photos"
    _write_photos(root, rng)
    (root / "labels.txt").write_text("p0.jpg\tcola\n")
    (root / "empty.jpg").write_bytes(b"")
    return root


def _tiny_model(path: Path, rng: np.random.Generator) -> Path:
    """x (N,3,16,16) -> conv0 -> bn0 -> relu0 -> dwconv1 (weight from a Constant node) -> relu1 -> gap
    -> conv2 (16 1x1) -> flatten = "feat" (N,16); "prob" = sigmoid(feat)."""
    def t(name, arr):
        return numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name)

    inits = [
        t("w0", rng.normal(0, 0.3, (8, 3, 3, 3))), t("b0", rng.normal(0, 0.1, 8)),
        t("bn_s", rng.uniform(0.5, 1.5, 8)), t("bn_b", rng.normal(0, 0.1, 8)),
        t("bn_m", rng.normal(0, 0.1, 8)), t("bn_v", rng.uniform(0.5, 1.5, 8)),
        t("w2", rng.normal(0, 0.3, (16, 8, 1, 1))), t("b2", rng.normal(0, 0.1, 16)),
    ]
    w1 = t("w1_value", rng.normal(0, 0.3, (8, 1, 3, 3)))
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c0", "bn_s", "bn_b", "bn_m", "bn_v"], ["n0"], name="bn0"),
        helper.make_node("Relu", ["n0"], ["r0"], name="relu0"),
        helper.make_node("Constant", [], ["w1"], name="w1_const", value=w1),
        helper.make_node("Conv", ["r0", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1], group=8),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("GlobalAveragePool", ["r1"], ["g"], name="gap"),
        helper.make_node("Conv", ["g", "w2", "b2"], ["c2"], name="conv2"),
        helper.make_node("Flatten", ["c2"], ["feat"], name="flatten"),
        helper.make_node("Sigmoid", ["feat"], ["prob"], name="sigmoid"),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("feat", TensorProto.FLOAT, ["N", 16]),
         helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 16])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture
def tiny(tmp_path, rng) -> Path:
    return _tiny_model(tmp_path / "tiny.onnx", rng)


def _ops(path: Path) -> dict:
    counts: dict = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _conv_weights_stored_int8(path: Path) -> int:
    """Number of Convs whose weight is a DequantizeLinear of an int8 initializer (0 if any is not)."""
    model = onnx.load(str(path))
    int8 = {i.name for i in model.graph.initializer if i.data_type == TensorProto.INT8}
    dq = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    return len(convs) if all(dq.get(c.input[1]) in int8 for c in convs) else 0


@pytest.mark.parametrize("kwargs, match", [
    ({"method": "kl"}, "calibration method 'kl'"),
    ({"method": "MinMax"}, "calibration method 'MinMax'.*minmax, entropy, percentile"),
    ({"mode": "qat"}, "quantisation mode 'qat'"),
    ({"quant_format": "qlinear"}, "quantisation format"),
    ({"activation_type": "int4"}, "activation type"),
    ({"weight_type": "float16"}, "weight type"),
    ({"calib_count": 0}, "calib_count must be an integer >= 1"),
    ({"calib_count": 8.0}, "calib_count"),
    ({"calib_batch": True}, "calib_batch"),
    ({"seed": -1}, "seed"),
    ({"float_tail": -2}, "float_tail"),
    ({"per_channel": 1}, "per_channel must be True or False"),
    ({"percentile": 0}, "percentile must be in"),
    ({"percentile": 100.5}, "percentile must be in"),
    ({"exclude_nodes": ["conv0"]}, "exclude_nodes must be a tuple"),
    ({"exclude_op_types": ("",)}, "exclude_op_types"),
])
def test_options_are_validated(kwargs, match):
    with pytest.raises(InvalidInputError, match=match):
        QuantizeOptions(**kwargs)


def test_role_defaults_and_overrides():
    assert QuantizeOptions.for_role("detector").float_tail == 3
    assert QuantizeOptions.for_role("extractor").float_tail == 1
    opts = QuantizeOptions.for_role("detector", calib_count=8, method="minmax")
    assert (opts.calib_count, opts.method, opts.float_tail) == (8, "minmax", 3)
    assert QuantizeOptions().method == "percentile" and QuantizeOptions().per_channel
    with pytest.raises(InvalidInputError, match="unknown model role 'classifier'"):
        QuantizeOptions.for_role("classifier")
    with pytest.raises(InvalidInputError, match="unknown quantisation option.*calib_dir"):
        QuantizeOptions.for_role("detector", calib_dir="x")


def test_calibration_feeds_are_the_runtime_preprocessing_of_distinct_readable_photos(photos, caplog):
    spec = _spec()
    readable = sorted(p for p in photos.rglob("*") if p.suffix in (".png", ".jpg") and p.stat().st_size)
    expected = {p: image_to_tensor(load_image(p), spec) for p in readable}
    with caplog.at_level(logging.WARNING, logger="edge_shitu_converters.quantize"):
        feeds = calibration_feeds(photos, spec, count=100, seed=3, batch=3)
    rows = np.concatenate([f["x"] for f in feeds])
    assert [f["x"].shape[0] for f in feeds] == [3, 3, 2] and rows.dtype == np.float32
    used = []
    for row in rows:
        hits = [p for p, t in expected.items() if np.array_equal(t, row)]
        assert len(hits) == 1
        used.append(hits[0])
    assert sorted(used) == readable  # every readable photo exactly once
    skipped = " ".join(r.getMessage() for r in caplog.records)
    assert "labels.txt" in skipped and "empty.jpg" in skipped and "only 8 readable photos" in skipped


def test_calibration_choice_is_seeded_and_deterministic(photos):
    spec = _spec()

    def chosen(seed):
        return np.concatenate([f["x"] for f in calibration_feeds(photos, spec, count=3, seed=seed)])

    a, b, c = chosen(0), chosen(0), chosen(5)
    assert a.shape == (3, 3, 16, 16)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_calibration_feeds_complete_a_fixed_batch_by_repeating(photos):
    feeds = calibration_feeds(photos, _spec(batch=2), count=3, seed=0, batch=2)
    assert [f["x"].shape for f in feeds] == [(2, 3, 16, 16), (2, 3, 16, 16)]
    assert np.array_equal(feeds[1]["x"][1], feeds[0]["x"][0])
    with pytest.raises(InvalidInputError, match="fixed batch of 2"):
        calibration_feeds(photos, _spec(batch=2), count=3, batch=4)


def test_calibration_folder_errors(tmp_path):
    with pytest.raises(MissingFileError, match="nowhere: calibration folder does not exist"):
        calibration_feeds(tmp_path / "nowhere", _spec(), count=4)
    (tmp_path / "a.txt").write_text("not a photo")
    with pytest.raises(InvalidInputError, match="a.txt: calibration path is not a folder"):
        calibration_feeds(tmp_path / "a.txt", _spec(), count=4)
    junk = tmp_path / "junk"
    (junk / "deep").mkdir(parents=True)
    (junk / "deep" / "x.jpg").write_bytes(b"\xff\xd8\xff truncated")
    (junk / "readme.md").write_text("hello")
    with pytest.raises(InvalidInputError, match=r"junk: no readable photo for calibration \(2 files, 2 unreadable\)"):
        calibration_feeds(junk, _spec(), count=4)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidInputError, match=r"empty: no readable photo for calibration \(0 files"):
        calibration_feeds(empty, _spec(), count=4)
    with pytest.raises(InvalidInputError, match="count must be an integer >= 1"):
        calibration_feeds(empty, _spec(), count=0)


def _min_weighted_to_output(model) -> dict:
    """Oracle: for every node, the fewest weighted layers (itself included) on any path to an output."""
    consumers: dict = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in model.graph.output}
    memo: dict = {}

    def best(node) -> float:
        if node.name not in memo:
            own = int(node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul"))
            down = [best(c) for out in node.output for c in consumers.get(out, [])]
            reach = [0.0] if any(out in outputs for out in node.output) else []
            memo[node.name] = own + min(down + reach, default=float("inf"))
        return memo[node.name]

    return {node.name: best(node) for node in model.graph.node}


def _random_dag(rng: np.random.Generator, n: int):
    """A random DAG of Conv/Relu/Add nodes (shapes irrelevant: the walk only reads the topology)."""
    names, nodes = ["x"], []
    for i in range(n):
        op = ["Conv", "Relu", "Add", "MatMul"][int(rng.integers(4))]
        ins = [names[int(rng.integers(len(names)))] for _ in range(2 if op in ("Add", "MatMul", "Conv") else 1)]
        nodes.append(helper.make_node(op, ins, [f"t{i}"], name=f"n{i}"))
        names.append(f"t{i}")
    outs = sorted({names[-1], names[int(rng.integers(1, len(names)))]})
    graph = helper.make_graph(nodes, "dag", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs])
    return helper.make_model(graph)


def test_float_tail_nodes_match_the_oracle(tiny, rng):
    model = onnx.load(str(tiny))
    assert float_tail_nodes(model, -1) == ()
    assert float_tail_nodes(model, 0) == ("flatten", "sigmoid")
    assert float_tail_nodes(model, 1) == ("conv2", "flatten", "gap", "relu1", "sigmoid")
    assert set(float_tail_nodes(model, 2)) == {"conv1", "bn0", "relu0", "w1_const", "conv2", "flatten", "gap",
                                               "relu1", "sigmoid"}
    for _ in range(30):
        dag = _random_dag(rng, int(rng.integers(5, 40)))
        reach = _min_weighted_to_output(dag)
        for depth in range(4):
            assert float_tail_nodes(dag, depth) == tuple(sorted(n for n, k in reach.items() if k <= depth))


def test_int8_tail_weights_are_per_channel_and_within_half_a_step(tiny, tmp_path, rng):
    model = onnx.load(str(tiny))
    w2 = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w2"))
    # conv1's weight comes from a Constant node (not an initializer): left alone; relu1 is not weighted.
    assert int8_tail_weights(model, ["conv1", "conv2", "relu1"]) == ["conv2"]
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert "w2" not in inits and inits["w2_int8"].dtype == np.int8
    scale = inits["w2_int8_scale"]
    assert scale.shape == (16,) and np.allclose(scale, np.abs(w2).reshape(16, -1).max(1) / 127)
    restored = inits["w2_int8"].astype(np.float32) * scale[:, None, None, None]
    assert np.all(np.abs(restored - w2) <= scale[:, None, None, None] / 2 + 1e-7)
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 1 and dq[0].output == ["w2"]
    # Per-channel DequantizeLinear (its axis) exists from opset 13, which quantize_model upgrades to.
    model.opset_import[0].version = 13
    onnx.checker.check_model(model)  # also checks that the DequantizeLinear precedes its consumer
    onnx.save(model, str(tmp_path / "w8.onnx"))
    x = rng.normal(size=(4, 3, 16, 16)).astype(np.float32)
    agree = compare_outputs(tiny, tmp_path / "w8.onnx", [{"x": x}])
    assert agree["feat"].sqnr_db > 35


def test_int8_tail_weights_handle_gemm_and_matmul_axes(rng):
    w_gemm = rng.normal(size=(6, 4)).astype(np.float32)  # transB=1: (out, in), channel axis 0
    w_mm = rng.normal(size=(4, 5)).astype(np.float32)    # (in, out), channel axis 1
    shared = rng.normal(size=(4, 4)).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "wg"], ["g"], name="gemm", transB=1),
        helper.make_node("MatMul", ["x", "wm"], ["m"], name="mm"),
        helper.make_node("MatMul", ["x", "ws"], ["s1"], name="shared1"),
        helper.make_node("MatMul", ["x", "ws"], ["s2"], name="shared2"),
    ]
    graph = helper.make_graph(
        nodes, "fc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("g", "m", "s1", "s2")],
        [numpy_helper.from_array(w_gemm, "wg"), numpy_helper.from_array(w_mm, "wm"), numpy_helper.from_array(shared, "ws")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    assert int8_tail_weights(model, ["gemm", "mm", "shared1", "shared2"]) == ["gemm", "mm"]
    axes = {n.output[0]: n.attribute[0].i for n in model.graph.node if n.op_type == "DequantizeLinear"}
    assert axes == {"wg": 0, "wm": 1}
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert inits["wg_int8_scale"].shape == (6,) and inits["wm_int8_scale"].shape == (5,)
    assert "ws" in inits  # a weight shared by two nodes stays float


def test_int8_tail_weights_leave_depthwise_convolutions_float(rng, tmp_path):
    """onnxruntime cannot pre-pack a weight a DequantizeLinear computes: a depthwise convolution's float kernel then
    runs several times slower, for a weight too small to matter. Depthwise convolutions keep float weights; the
    others around them (grouped with several channels per group, dense with and without an explicit group) get
    int8."""
    weights = {"wd": rng.normal(size=(8, 1, 3, 3)), "wg": rng.normal(size=(8, 4, 3, 3)), "wp": rng.normal(size=(8, 8, 1, 1)),
               "w1": rng.normal(size=(8, 8, 1, 1)), "wm": rng.normal(size=(16, 1, 3, 3))}
    nodes = [helper.make_node("Conv", ["x", "wd"], ["d0"], name="depthwise", group=8, pads=[1, 1, 1, 1]),
             # a channel multiplier of 2: still one input channel per group
             helper.make_node("Conv", ["d0", "wm"], ["d1"], name="multiplier", group=8, pads=[1, 1, 1, 1]),
             helper.make_node("Slice", ["d1", "zero", "eight", "one_axis"], ["d"], name="half"),
             helper.make_node("Conv", ["d", "wg"], ["g"], name="grouped", group=2, pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["g", "wp"], ["p"], name="pointwise"),
             helper.make_node("Conv", ["p", "w1"], ["y"], name="one_group", group=1)]
    graph = helper.make_graph(nodes, "dw", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w.astype(np.float32), name) for name, w in weights.items()]
                              + [numpy_helper.from_array(np.array([v], np.int64), name)
                                 for name, v in (("zero", 0), ("eight", 8), ("one_axis", 1))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    assert int8_tail_weights(model, ["depthwise", "multiplier", "grouped", "pointwise", "one_group"]) == [
        "grouped", "pointwise", "one_group"]
    inits = {i.name for i in model.graph.initializer}
    assert {"wd", "wm", "wg_int8", "wp_int8", "w1_int8"} <= inits and not {"wg", "wp", "w1"} & inits


def test_static_quantization_of_a_tiny_model(tiny, photos, tmp_path, rng):
    out = tmp_path / "out" / "tiny-int8.onnx"
    report = quantize_model(tiny, out, input_spec=_spec(), calib_dir=photos,
                            options=QuantizeOptions(calib_count=6, calib_batch=4))
    onnx.checker.check_model(onnx.load(str(out)))
    ops = _ops(out)
    assert ops.get("QuantizeLinear", 0) >= 2 and ops.get("DequantizeLinear", 0) >= 4
    assert report.calib_images == 6 and report.output == out and report.int8_bytes == out.stat().st_size
    assert report.quantized_ops.get("Conv") == 2  # conv0 (BatchNorm folded in) and conv1; conv2 is the float tail
    assert "Flatten" not in report.quantized_ops and "Sigmoid" not in report.quantized_ops
    assert report.weight_only_nodes == ("conv2",)
    assert not any(n.op_type == "BatchNormalization" for n in onnx.load(str(out)).graph.node)
    assert _conv_weights_stored_int8(out) == 3
    x = [{"x": rng.normal(size=(4, 3, 16, 16)).astype(np.float32)}]
    assert compare_outputs(tiny, out, x)["feat"].sqnr_db > 20
    assert not list(out.parent.glob(".*")), "no partial files may be left"


@pytest.mark.parametrize("options", [
    QuantizeOptions(calib_count=6, method="minmax", per_channel=False, float_tail=-1),
    QuantizeOptions(calib_count=6, method="entropy", quant_format="qoperator", float_tail=0),
    QuantizeOptions(calib_count=6, pre_process=False, tail_int8_weights=False),
])
def test_static_variants_give_runnable_models_close_to_float(tiny, photos, tmp_path, rng, options):
    out = tmp_path / "v.onnx"
    quantize_model(tiny, out, input_spec=_spec(), calib_dir=photos, options=options)
    x = [{"x": rng.normal(size=(2, 3, 16, 16)).astype(np.float32)}]
    assert compare_outputs(tiny, out, x)["feat"].sqnr_db > 15


def test_dynamic_quantization_needs_no_photos(tiny, tmp_path, rng):
    out = tmp_path / "dyn.onnx"
    report = quantize_model(tiny, out, input_spec=_spec(), options=QuantizeOptions(mode="dynamic", float_tail=-1))
    assert _ops(out).get("ConvInteger", 0) == 3 and report.calib_images == 0
    x = [{"x": rng.normal(size=(2, 3, 16, 16)).astype(np.float32)}]
    assert compare_outputs(tiny, out, x)["feat"].sqnr_db > 20


def test_quantization_is_deterministic(tiny, photos, tmp_path):
    opts = QuantizeOptions(calib_count=5)
    digests = []
    for name in ("a.onnx", "b.onnx"):
        quantize_model(tiny, tmp_path / name, input_spec=_spec(), calib_dir=photos, options=opts)
        digests.append(hashlib.sha256((tmp_path / name).read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_quantize_model_argument_errors(tiny, photos, tmp_path):
    spec = _spec()
    with pytest.raises(InvalidInputError, match="static quantisation needs a folder of calibration photos"):
        quantize_model(tiny, tmp_path / "o.onnx", input_spec=spec)
    with pytest.raises(MissingFileError, match="nowhere: calibration folder does not exist"):
        quantize_model(tiny, tmp_path / "o.onnx", input_spec=spec, calib_dir=tmp_path / "nowhere")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("x")
    with pytest.raises(InvalidInputError, match="junk: no readable photo"):
        quantize_model(tiny, tmp_path / "o.onnx", input_spec=spec, calib_dir=tmp_path / "junk")
    with pytest.raises(MissingFileError, match="missing.onnx: no such model file"):
        quantize_model(tmp_path / "missing.onnx", tmp_path / "o.onnx", input_spec=spec, calib_dir=photos)
    with pytest.raises(InvalidInputError, match="cannot overwrite its float source"):
        quantize_model(tiny, tiny, input_spec=spec, calib_dir=photos)
    with pytest.raises(InvalidInputError, match="options must be QuantizeOptions, got dict"):
        quantize_model(tiny, tmp_path / "o.onnx", input_spec=spec, calib_dir=photos, options={"mode": "static"})
    with pytest.raises(InvalidInputError, match="exclude_nodes names no node.*conv9"):
        quantize_model(tiny, tmp_path / "o.onnx", input_spec=spec, calib_dir=photos,
                       options=QuantizeOptions(calib_count=2, exclude_nodes=("conv9",)))
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(ConversionError, match="quantisation step 'prepare' failed for .*bad.onnx"):
        quantize_model(tmp_path / "bad.onnx", tmp_path / "o.onnx", input_spec=spec, calib_dir=photos)
    assert not (tmp_path / "o.onnx").exists()


def _gallery(drink_dir: Path) -> Path:
    return drink_dir / "gallery"


@pytest.fixture(scope="module")
def int8_replica(replica_bundle, drink_dir, tmp_path_factory) -> dict:
    """Both replica models quantised with the role defaults, calibrated on 8 drink gallery photos."""
    from edge_shitu.bundle import Bundle

    bundle = Bundle.load(replica_bundle)
    out = tmp_path_factory.mktemp("int8")
    reports = {}
    for role in ("detector", "extractor"):
        spec = bundle.require(role)
        reports[role] = quantize_model(spec.path, out / f"{role}.onnx", input_spec=spec.input,
                                       calib_dir=_gallery(drink_dir),
                                       options=QuantizeOptions.for_role(role, calib_count=8))
    return {"bundle": bundle, "reports": reports}


def _session(path: Path):
    from edge_shitu.backends.onnxruntime import OnnxRuntimeSession

    return OnnxRuntimeSession.from_file(Path(path))


def _code_agreement(bundle, int8_path: Path, images: list) -> tuple:
    """(bit agreement per image, cosine per image) of the runtime's Embedder, fp32 vs int8 session."""
    from edge_shitu.embedder import Embedder
    from edge_shitu.options import EmbedderOptions

    spec = bundle.require("extractor")
    fp32 = Embedder(spec, bundle.codes, _session(spec.path), EmbedderOptions())
    int8 = Embedder(spec, bundle.codes, _session(int8_path), EmbedderOptions(max_batch=4))
    f32, f8 = fp32.features(images), int8.features(images)
    c32, c8 = fp32.embed(images), int8.embed(images)
    return 1 - np.unpackbits(c32 ^ c8, axis=1).mean(axis=1), (f32 * f8).sum(axis=1)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lo, hi = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=2)
    area = lambda r: np.prod(r[:, 2:] - r[:, :2], axis=1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def _matched(ref: np.ndarray, got: np.ndarray) -> int:
    return int((_iou(ref, got).max(axis=1) >= 0.9).sum()) if len(ref) and len(got) else 0


@pytest.mark.paddle
def test_replica_int8_models_are_valid_qdq_small_and_fit_the_lite_budget(int8_replica):
    reports = int8_replica["reports"]
    for role, report in reports.items():
        model = onnx.load(str(report.output))
        onnx.checker.check_model(model)
        ops = _ops(report.output)
        assert ops.get("QuantizeLinear", 0) > 40 and ops.get("DequantizeLinear", 0) > 80, role
        assert report.quantized_ops["Conv"] >= 40, role
        assert report.ratio < 0.35, (role, report.ratio)
        big_float = [i.name for i in model.graph.initializer if i.data_type == TensorProto.FLOAT and
                     np.prod(i.dims) > 4096]
        assert big_float == [], f"{role}: weights left in float: {big_float[:5]}"
    total = sum(r.int8_bytes for r in reports.values())
    assert total <= OFFICIAL_LITE_PACKAGE_BYTES, total


@pytest.mark.paddle
def test_replica_int8_detector_runs_its_hard_sigmoids_on_integer_kernels(int8_replica, tmp_path):
    """Every hard sigmoid outside the float tail is rewritten, most as a Clip of codes and the rest for QLinearAdd,
    and onnxruntime's optimised graph keeps no float HardSigmoid but the float tail's."""
    import onnxruntime as ort

    report = int8_replica["reports"]["detector"]
    source = onnx.load(str(report.source))
    float_nodes = set(report.float_nodes)
    gates = [n.name for n in source.graph.node if n.op_type == "HardSigmoid"]
    assert len(gates) > 20
    # quant_pre_process keeps the exporter's HardSigmoid names.
    clipped, added = set(report.clip_hard_sigmoids), set(report.integer_hard_sigmoids)
    assert not clipped & added and clipped | added == {g for g in gates if g not in float_nodes}
    # Which gates a Clip can take is the rewrite's rule (their inputs' ranges); most of the replica's can.
    assert len(clipped) > len(added)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(report.output), so, providers=["CPUExecutionProvider"])
    ops = _ops(tmp_path / "optimized.onnx")
    assert ops.get("HardSigmoid", 0) == len([g for g in gates if g in float_nodes])
    assert ops["QLinearAdd"] >= len(report.integer_hard_sigmoids)
    assert ops["Clip"] == len(report.clip_hard_sigmoids)
    assert ops["QLinearMul"] >= len(clipped) and "Mul" not in ops  # the products of the gates stay integer


@pytest.mark.paddle
def test_replica_int8_detector_kernel_shapes_change_no_output(int8_replica, drink_dir, test_images, tmp_path):
    """The quantiser re-lays the detector's image stem and its depthwise convolutions whose channels are no
    multiple of 16; every output is bit-identical to the same quantisation without, and onnxruntime still runs on
    integer kernels every convolution it ran on them before."""
    from edge_shitu_converters.kernel_shapes import PAD_MAX_GROWTH

    report = int8_replica["reports"]["detector"]
    spec = int8_replica["bundle"].require("detector")
    plain = quantize_model(spec.path, tmp_path / "plain.onnx", input_spec=spec.input, calib_dir=_gallery(drink_dir),
                           options=dataclasses.replace(report.options, kernel_shapes=False))
    assert plain.kernel_shapes == ()
    model = onnx.load(str(plain.output))
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    convs = [n for n in model.graph.node if n.op_type == "Conv" and n.name not in plain.float_nodes]
    channels = {n.name: inits[producer[n.input[1]].input[0]].dims for n in convs}
    # Which depthwise convolutions qualify is the rewrite's own rule (a multiple of 16, growth limit); what this
    # test shows is that they and the stem are re-laid and that no output changes.
    depthwise = [n.name for n in convs if channels[n.name][1] == 1 and channels[n.name][0] % 16
                 and -(-channels[n.name][0] // 16) * 16 <= PAD_MAX_GROWTH * channels[n.name][0]]
    assert channels[convs[0].name][1] == 3 and depthwise
    assert report.kernel_shapes == (convs[0].name, *depthwise)

    ops = {}
    for name, path in (("plain", plain.output), ("relaid", report.output)):
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.optimized_model_filepath = str(tmp_path / f"{name}-optimized.onnx")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        ops[name] = _ops(tmp_path / f"{name}-optimized.onnx")
    assert ops["relaid"]["QLinearConv"] == ops["plain"]["QLinearConv"]
    assert ops["relaid"].get("Conv", 0) + ops["relaid"].get("FusedConv", 0) == \
        ops["plain"].get("Conv", 0) + ops["plain"].get("FusedConv", 0)
    a, b = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (plain.output, report.output))
    for path in test_images[:3]:
        x = {spec.input.name: image_to_tensor(load_image(path), spec.input)[None]}
        for got, want in zip(b.run(None, x), a.run(None, x)):
            assert np.array_equal(got, want), path


@pytest.mark.paddle
def test_replica_int8_extractor_codes_agree_with_fp32(int8_replica, test_images):
    bits, cos = _code_agreement(int8_replica["bundle"], int8_replica["reports"]["extractor"].output, test_images)
    assert bits.mean() >= 0.98 and bits.min() >= 0.95, bits
    assert cos.mean() >= 0.998 and cos.min() >= 0.99, cos


@pytest.mark.paddle
def test_replica_int8_detector_boxes_agree_with_fp32(int8_replica, test_images):
    from edge_shitu.detector import Detector, decode_picodet
    from edge_shitu.options import DetectorOptions

    bundle = int8_replica["bundle"]
    spec = bundle.require("detector")
    int8_path = int8_replica["reports"]["detector"].output
    fp32, int8 = Detector(spec, _session(spec.path), DetectorOptions()), Detector(spec, _session(int8_path), DetectorOptions())
    top5 = [0, 0]
    top100 = [0, 0]
    feeds = []
    for path in test_images:
        image = load_image(path)
        ref = np.array([d.box for d in fp32.detect(image)]).reshape(-1, 4)
        got = np.array([d.box for d in int8.detect(image)]).reshape(-1, 4)
        top5 = [top5[0] + _matched(ref, got), top5[1] + len(ref)]
        tensor, scale = fp32.preprocess(image)
        feeds.append({spec.input.name: tensor})
        kw = dict(heads=spec.output, input_size=(spec.input.width, spec.input.height), scale=scale,
                  options=DetectorOptions())
        a, b = fp32.infer(tensor), int8.infer(tensor)
        ref = decode_picodet(a[:4], a[4:], **kw)[0]
        got = decode_picodet(b[:4], b[4:], **kw)[0]
        top100 = [top100[0] + _matched(ref, got), top100[1] + len(ref)]
    assert top5[1] > 30 and top100[1] > 500  # the replica does detect things on these photos
    assert top5[0] / top5[1] >= 0.25, top5
    assert top100[0] / top100[1] >= 0.2, top100
    agreement = compare_outputs(spec.path, int8_path, feeds)
    for name in spec.output.boxes:
        assert agreement[name].sqnr_db >= 6, (name, agreement[name])


@pytest.mark.paddle
def test_replica_float_tail_improves_code_agreement(int8_replica, drink_dir, test_images, tmp_path):
    bundle = int8_replica["bundle"]
    spec = bundle.require("extractor")
    rounded = tmp_path / "tail0.onnx"
    quantize_model(spec.path, rounded, input_spec=spec.input, calib_dir=_gallery(drink_dir),
                   options=QuantizeOptions.for_role("extractor", calib_count=8, float_tail=0))
    with_tail, _ = _code_agreement(bundle, int8_replica["reports"]["extractor"].output, test_images)
    without, _ = _code_agreement(bundle, rounded, test_images)
    assert with_tail.mean() > without.mean(), (with_tail.mean(), without.mean())


@pytest.mark.paddle
def test_replica_static_quantization_is_deterministic(int8_replica, drink_dir, tmp_path):
    first = int8_replica["reports"]["extractor"]
    again = quantize_model(first.source, tmp_path / "again.onnx", input_spec=int8_replica["bundle"].extractor.input,
                           calib_dir=_gallery(drink_dir), options=first.options)
    assert again.output.read_bytes() == first.output.read_bytes()


@pytest.mark.paddle
def test_replica_dynamic_extractor(int8_replica, test_images, tmp_path):
    spec = int8_replica["bundle"].require("extractor")
    out = tmp_path / "dyn.onnx"
    report = quantize_model(spec.path, out, input_spec=spec.input,
                            options=QuantizeOptions.for_role("extractor", mode="dynamic"))
    assert report.quantized_ops.get("ConvInteger", 0) >= 40 and report.ratio < 0.35
    bits, cos = _code_agreement(int8_replica["bundle"], out, test_images)
    assert bits.mean() >= 0.98 and cos.mean() >= 0.998
