"""Against the machine: MAC counts of ONNX graphs (hand-computed oracles on tiny models), which nodes run on
integer kernels, the GEMM models and their timing loop (injected clock), and the fractions of the GEMM rate
the latency benchmark reports (injected timings)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from conftest import TINY_STRIDES, write_onnx, write_tiny_detector, write_tiny_extractor
from edge_shitu.errors import InvalidInputError, MissingFileError
from edge_shitu_bench import latency, machine, report

onnx = pytest.importorskip("onnx", reason="onnx (the 'dev' extra) is not installed")
from onnx import TensorProto, helper  # noqa: E402


def _conv_oracle(n, cin, h, w, cout, k, *, stride=1, pad=0, dilation=1, groups=1):
    """Slow and obvious: count the products of every output element of a 2-D convolution."""
    ho = (h + 2 * pad - dilation * (k - 1) - 1) // stride + 1
    wo = (w + 2 * pad - dilation * (k - 1) - 1) // stride + 1
    total = 0
    for _ in range(n * cout * ho * wo):
        for _ in range(cin // groups):
            total += k * k
    return total


def _vi(name, dims, elem=TensorProto.FLOAT):
    """A value info; an int ``dims`` is a rank with free dims (the counter must infer them)."""
    if isinstance(dims, int):
        dims = [f"{name}{i}" for i in range(dims)]
    return helper.make_tensor_value_info(name, elem, dims)


def test_tiny_detector_macs_match_the_hand_count(tmp_path):
    path = write_tiny_detector(tmp_path / "det.onnx")
    # Per stride s: a score conv (1 channel) and a box conv (4 * 8 channels), kernel = stride = s, 3 input channels.
    want = sum(_conv_oracle(1, 3, 640, 640, cout, s, stride=s) for s in TINY_STRIDES for cout in (1, 32))
    assert want == 4 * 640 * 640 * 3 * 33
    got = machine.count_macs(path)
    assert (got.total, got.fp32, got.int8) == (want, want, 0)
    assert got.nodes == 8 and got.int8_nodes == 0 and got.by_op == {"Conv": want}
    assert got.input_shapes == {"image": (1, 3, 640, 640)}
    assert got.gmac == pytest.approx(want / 1e9) and got.int8_share == 0.0
    # The same from bytes and from a ModelProto.
    assert machine.count_macs(path.read_bytes()).total == want
    assert machine.count_macs(onnx.load(str(path))).total == want


def test_tiny_extractor_macs_per_crop_and_per_batch(tmp_path):
    path = write_tiny_extractor(tmp_path / "rec.onnx")
    # AveragePool and Flatten do no GEMM work; the MatMul is (N, 192) x (192, 512).
    assert machine.count_macs(path, {"x": (1, 3, 224, 224)}).total == 192 * 512
    assert machine.count_macs(path, {"x": (3, 3, 224, 224)}).total == 3 * 192 * 512
    assert machine.count_macs(path, {"x": (1, 3, 224, 224)}).by_op == {"MatMul": 192 * 512}
    with pytest.raises(InvalidInputError, match="free dims"):
        machine.count_macs(path)


def test_bundle_model_macs_use_the_manifest_input(tiny_bundle):
    from edge_shitu.bundle import Bundle

    b = Bundle.load(tiny_bundle)
    det = machine.bundle_model_macs(b.models["detector"])
    rec = machine.bundle_model_macs(b.models["extractor"])
    assert det.total == 4 * 640 * 640 * 3 * 33 and det.input_shapes == {"image": (1, 3, 640, 640)}
    assert rec.total == 192 * 512 and rec.input_shapes == {"x": (1, 3, 224, 224)}  # a dynamic batch counts one crop
    lite = SimpleNamespace(backend="paddlelite")
    assert machine.bundle_model_macs(lite) is None


@pytest.mark.parametrize("k, stride, pad, dilation, groups, cin, cout", [
    (3, 1, 1, 1, 1, 4, 6),
    (3, 2, 1, 1, 4, 4, 4),    # depthwise, stride 2
    (5, 1, 2, 2, 2, 4, 6),    # grouped, dilated
    (1, 1, 0, 1, 1, 8, 16),   # pointwise
])
def test_conv_macs_follow_groups_strides_pads_and_dilations(tmp_path, rng, k, stride, pad, dilation, groups, cin, cout):
    w = rng.standard_normal((cout, cin // groups, k, k)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[k, k], strides=[stride, stride],
                            pads=[pad] * 4, dilations=[dilation, dilation], group=groups)
    path = write_onnx(tmp_path / "conv.onnx", [node], [_vi("x", [2, cin, 13, 11])], [_vi("y", 4)], {"w": w})
    want = _conv_oracle(2, cin, 13, 11, cout, k, stride=stride, pad=pad, dilation=dilation, groups=groups)
    assert machine.count_macs(path).total == want


@pytest.mark.parametrize("form", ["float", "dq", "dq_zero_point", "qlinearconv", "convinteger"])
def test_conv_macs_count_only_the_live_part_of_a_constant_weight(tmp_path, rng, form):
    """Zero filters and input-channel x kernel positions zero in every filter (what the converter's padded channels
    and space-to-depth stems add) are not counted, a quantised weight being zero where its code is its zero point;
    a zero inside a live filter and position still is."""
    with_zero_points = form in ("dq_zero_point", "qlinearconv", "convinteger")
    zero = np.arange(6, dtype=np.int64) * 20 + 7 if with_zero_points else np.zeros(6, np.int64)
    live = rng.integers(1, 100, (6, 4, 3, 3))
    live[4:] = 0                 # two dead filters
    live[:, 1] = 0               # a dead input channel
    live[:, 2, 0, 0] = 0         # a dead position
    live[0, 3, 1, 1] = 0         # a zero inside a live filter and position: counted
    oracle = 0
    for _ in range(2 * 13 * 11):                      # output pixels of a stride-1 "same" 3x3 conv, batch 2
        for co in range(6):
            for ci in range(4):
                for ky in range(3):
                    for kx in range(3):
                        oracle += bool(live[co].any() and live[:, ci, ky, kx].any())
    conv = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    u8, ones = TensorProto.UINT8, np.ones(6, np.float32)
    codes = (live + zero[:, None, None, None]).astype(np.uint8)
    if form == "float":
        nodes = [helper.make_node("Conv", ["x", "w"], ["y"], **conv)]
        inits, x, y = {"w": live.astype(np.float32)}, TensorProto.FLOAT, TensorProto.FLOAT
    elif form in ("dq", "dq_zero_point"):
        nodes = [helper.make_node("DequantizeLinear", ["w", "s", "z"], ["wf"], axis=0),
                 helper.make_node("Conv", ["x", "wf"], ["y"], **conv)]
        inits, x, y = {"w": codes, "s": ones, "z": zero.astype(np.uint8)}, TensorProto.FLOAT, TensorProto.FLOAT
    elif form == "qlinearconv":
        # QLinearConv takes a uint8 weight's zero point per tensor.
        inputs = ["x", "one", "x0", "w", "one", "z", "one", "x0"]
        nodes = [helper.make_node("QLinearConv", inputs, ["y"], **conv)]
        inits = {"w": (live + 7).astype(np.uint8), "z": np.uint8(7), "one": np.float32(1), "x0": np.uint8(0)}
        x, y = u8, u8
    else:
        nodes = [helper.make_node("ConvInteger", ["x", "w", "x0", "z"], ["y"], **conv)]
        inits, x, y = {"w": codes, "z": zero.astype(np.uint8), "x0": np.uint8(0)}, u8, TensorProto.INT32
    path = write_onnx(tmp_path / "conv.onnx", nodes, [_vi("x", [2, 4, 13, 11], x)], [_vi("y", 4, y)], inits)
    assert machine.count_macs(path).total == oracle == 2 * 13 * 11 * 4 * (3 * 9 - 1)


def test_conv_macs_read_zero_points_along_the_dequantiser_axis(tmp_path, rng):
    """A DequantizeLinear's zero points run along its axis (1 by default, the input channels of a convolution's
    weight), not always along the output channels."""
    codes = rng.integers(1, 200, (8, 3, 3, 3)).astype(np.uint8)
    codes[:, 1] = 9                                   # input channel 1 is zero: its codes are its zero point
    nodes = [helper.make_node("DequantizeLinear", ["w", "s", "z"], ["wf"]),   # axis 1
             helper.make_node("Conv", ["x", "wf"], ["y"], kernel_shape=[3, 3])]
    inits = {"w": codes, "s": np.ones(3, np.float32), "z": np.array([0, 9, 0], np.uint8)}
    path = write_onnx(tmp_path / "a.onnx", nodes, [_vi("x", [1, 3, 9, 9])], [_vi("y", 4)], inits)
    assert machine.count_macs(path).total == _conv_oracle(1, 3, 9, 9, 8, 3) * 2 // 3
    nodes[0] = helper.make_node("DequantizeLinear", ["w", "s", "z"], ["wf"], axis=2)
    inits["w"] = rng.integers(1, 200, (8, 3, 3, 3)).astype(np.uint8)
    inits["w"][:, :, 1, :] = 9                        # kernel row 1 is zero: its codes are its zero point
    path = write_onnx(tmp_path / "b.onnx", nodes, [_vi("x", [1, 3, 9, 9])], [_vi("y", 4)], inits)
    assert machine.count_macs(path).total == _conv_oracle(1, 3, 9, 9, 8, 3) * 2 // 3


def test_conv_macs_of_a_weight_computed_at_run_time_count_every_product(tmp_path):
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3])
    path = write_onnx(tmp_path / "conv.onnx", [node], [_vi("x", [1, 4, 9, 9]), _vi("w", [6, 4, 3, 3])],
                      [_vi("y", 4)], {})
    assert machine.count_macs(path).total == _conv_oracle(1, 4, 9, 9, 6, 3)


def test_matmul_and_gemm_macs(tmp_path, rng):
    # Batched MatMul with broadcasting: (2, 1, 5, 7) x (3, 7, 4) -> (2, 3, 5, 4), K = 7.
    b = rng.standard_normal((3, 7, 4)).astype(np.float32)
    path = write_onnx(tmp_path / "mm.onnx", [helper.make_node("MatMul", ["a", "b"], ["y"])],
                      [_vi("a", [2, 1, 5, 7])], [_vi("y", 4)], {"b": b})
    assert machine.count_macs(path).total == 2 * 3 * 5 * 4 * 7
    # Gemm with transA: A is (K, M) = (6, 5), B (6, 9) -> (5, 9), K = 6.
    gb = rng.standard_normal((6, 9)).astype(np.float32)
    node = helper.make_node("Gemm", ["a", "b"], ["y"], transA=1)
    path = write_onnx(tmp_path / "gemm.onnx", [node], [_vi("a", [6, 5])], [_vi("y", 2)], {"b": gb})
    assert machine.count_macs(path).total == 5 * 9 * 6


def test_constants_feeding_a_reshape_are_folded(tmp_path, rng):
    # paddle2onnx writes Reshape targets as Constant -> Identity; onnx's shape inference alone cannot see the shape.
    target = helper.make_tensor("t", TensorProto.INT64, [4], [1, 6, 4, 4])
    w = rng.standard_normal((8, 6, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Constant", [], ["shape0"], value=target),
             helper.make_node("Identity", ["shape0"], ["shape1"]),
             helper.make_node("Reshape", ["x", "shape1"], ["r"]),
             helper.make_node("Conv", ["r", "w"], ["y"], kernel_shape=[3, 3])]
    path = write_onnx(tmp_path / "fold.onnx", nodes, [_vi("x", [1, 96])], [_vi("y", 4)], {"w": w})
    assert machine.count_macs(path).total == 8 * 2 * 2 * 6 * 9


def _qdq_conv_model(path, *, quantized_output=True):
    """x -> Q -> DQ -> Conv(w: int8 -> DQ) [-> Q -> DQ] -> y: the QDQ pattern onnxruntime fuses into QLinearConv
    only when the Conv output is quantised."""
    w = np.arange(8 * 4 * 3 * 3, dtype=np.int64).reshape(8, 4, 3, 3) % 7 - 3
    consts = {"w_q": w.astype(np.int8), "w_s": np.full(8, 0.1, np.float32), "w_z": np.zeros(8, np.int8),
              "x_s": np.array(0.05, np.float32), "x_z": np.array(128, np.uint8),
              "y_s": np.array(0.2, np.float32), "y_z": np.array(128, np.uint8)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_s", "x_z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "x_s", "x_z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    out = "c"
    if quantized_output:
        nodes += [helper.make_node("QuantizeLinear", ["c", "y_s", "y_z"], ["cq"]),
                  helper.make_node("DequantizeLinear", ["cq", "y_s", "y_z"], ["y"])]
        out = "y"
    return write_onnx(path, nodes, [_vi("x", [1, 4, 6, 6])], [_vi(out, 4)], consts)


def test_qdq_convs_count_as_integer_only_when_onnxruntime_fuses_them(tmp_path):
    want = 8 * 6 * 6 * 4 * 9
    fused = machine.count_macs(_qdq_conv_model(tmp_path / "q.onnx"))
    assert (fused.int8, fused.fp32, fused.int8_nodes, fused.int8_share) == (want, 0, 1, 1.0)
    unfused = machine.count_macs(_qdq_conv_model(tmp_path / "f.onnx", quantized_output=False))
    assert (unfused.int8, unfused.fp32, unfused.int8_nodes) == (0, want, 0)


def test_qdq_classification_agrees_with_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime (the 'onnx' extra) is not installed")
    for name, quantized in (("q", True), ("f", False)):
        path = _qdq_conv_model(tmp_path / f"{name}.onnx", quantized_output=quantized)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(tmp_path / f"{name}.opt.onnx")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        ops = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
        assert ("QLinearConv" in ops) == quantized == (machine.count_macs(path).int8_nodes == 1), ops


def test_integer_operators_count_as_integer(tmp_path, rng):
    b = rng.integers(-127, 128, (6, 5), dtype=np.int8)
    mmi = helper.make_node("MatMulInteger", ["a", "b", "az", "bz"], ["y"])
    path = write_onnx(tmp_path / "mmi.onnx", [mmi], [_vi("a", [3, 6], TensorProto.UINT8)],
                      [_vi("y", 2, TensorProto.INT32)],
                      {"b": b, "az": np.array(128, np.uint8), "bz": np.array(0, np.int8)})
    got = machine.count_macs(path)
    assert (got.int8, got.fp32, got.int8_nodes) == (3 * 5 * 6, 0, 1)
    w = rng.integers(-127, 128, (4, 2, 3, 3), dtype=np.int8)
    consts = {"xs": np.array(0.1, np.float32), "xz": np.array(128, np.uint8), "w": w,
              "ws": np.array(0.1, np.float32), "wz": np.array(0, np.int8), "ys": np.array(0.1, np.float32),
              "yz": np.array(128, np.uint8)}
    qconv = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"], kernel_shape=[3, 3])
    path = write_onnx(tmp_path / "qc.onnx", [qconv], [_vi("x", [1, 2, 5, 5], TensorProto.UINT8)],
                      [_vi("y", 4, TensorProto.UINT8)], consts)
    assert machine.count_macs(path).int8 == 4 * 3 * 3 * 2 * 9


def test_count_macs_input_errors(tmp_path):
    path = write_tiny_extractor(tmp_path / "rec.onnx")
    with pytest.raises(InvalidInputError, match=r"names \['y'\]"):
        machine.count_macs(path, {"y": (1, 3, 224, 224)})
    with pytest.raises(InvalidInputError, match="expected 4 positive int dims"):
        machine.count_macs(path, {"x": (1, 3, 224)})
    with pytest.raises(InvalidInputError, match="the model fixes dims"):
        machine.count_macs(path, {"x": (1, 3, 200, 224)})
    with pytest.raises(MissingFileError, match="ONNX model not found"):
        machine.count_macs(tmp_path / "none.onnx")
    with pytest.raises(InvalidInputError, match="ModelProto, bytes or a path"):
        machine.count_macs(12)


@pytest.mark.parametrize("precision", machine.PRECISIONS)
def test_gemm_models_compute_the_product(precision):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime (the 'onnx' extra) is not installed")
    model = machine.gemm_model(precision, 6)
    assert [n.op_type for n in model.graph.node] == [{"fp32": "MatMul", "int8": "MatMulInteger"}[precision]]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    a = machine._gemm_input(precision, 6)
    b = onnx.numpy_helper.to_array(model.graph.initializer[0])
    (y,) = session.run(None, {"a": a})
    if precision == "fp32":
        np.testing.assert_allclose(y, a @ b, rtol=1e-5, atol=1e-5)
    else:
        np.testing.assert_array_equal(y, (a.astype(np.int32) - 128) @ b.astype(np.int32))
    # Deterministic: the same constant every time.
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(machine.gemm_model(precision, 6).graph.initializer[0]), b)


def test_gemm_model_errors():
    with pytest.raises(InvalidInputError, match="precision must be one of fp32, int8"):
        machine.gemm_model("fp16")
    with pytest.raises(InvalidInputError, match="size must be an int >= 1"):
        machine.gemm_model("fp32", 0)


class _Clock:
    """Seconds that advance by the given steps, one step per reading pair (start, end)."""

    def __init__(self, durations):
        self.durations = list(durations)
        self.now = 0.0
        self.started = False

    def __call__(self):
        if self.started:
            self.now += self.durations.pop(0)
        self.started = not self.started
        return self.now


def test_measure_gemm_rate_takes_the_median_of_the_timed_runs():
    pytest.importorskip("onnxruntime", reason="onnxruntime (the 'onnx' extra) is not installed")
    rate = machine.measure_gemm_rate("int8", size=8, runs=5, clock=_Clock([0.4, 0.1, 0.3, 0.2, 0.5]),
                                     cpu_clock=_Clock([0.1, 0.1, 0.1, 0.1, 0.2]))
    assert rate.runs_ms == pytest.approx((400.0, 100.0, 300.0, 200.0, 500.0))
    assert rate.cpu_ms == pytest.approx((100.0, 100.0, 100.0, 100.0, 200.0))
    assert rate.gmac_per_cpu_s == pytest.approx(8 ** 3 / 1e9 / 0.1)
    assert (rate.op, rate.size, rate.threads, rate.precision) == ("MatMulInteger", 8, 1, "int8")
    assert rate.median_ms == pytest.approx(300.0)
    assert rate.gmac_per_s == pytest.approx(8 ** 3 / 1e9 / 0.3)
    js = rate.to_json()
    assert js["gmac_per_s"] == pytest.approx(rate.gmac_per_s) and js["runs_ms"] == list(rate.runs_ms)
    assert js["gmac_per_cpu_s"] == pytest.approx(rate.gmac_per_cpu_s)
    assert machine.GemmRate("fp32", "MatMul", 8, 1, (1.0,)).gmac_per_cpu_s is None


def test_measure_gemm_rate_stops_at_its_budget():
    pytest.importorskip("onnxruntime", reason="onnxruntime (the 'onnx' extra) is not installed")
    rate = machine.measure_gemm_rate("fp32", size=8, runs=10, budget_s=15.0, clock=_Clock([10.0, 10.0, 10.0]))
    assert rate.runs_ms == pytest.approx((10000.0, 10000.0))
    one = machine.measure_gemm_rate("fp32", size=8, runs=3, budget_s=1.0, clock=_Clock([5.0]))
    assert len(one.runs_ms) == 1  # at least one timed run, even over budget


@pytest.mark.parametrize("kwargs, message", [({"runs": 0}, "runs must be an int >= 1"),
                                             ({"budget_s": 0}, "budget_s must be a number > 0"),
                                             ({"threads": 0}, "threads must be a positive int")])
def test_measure_gemm_rate_errors(kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        machine.measure_gemm_rate("fp32", size=8, **kwargs)


def test_fractions_of_the_rates():
    # The issue's figures: an 8.2 GMAC detector in 111 ms against 170 GMAC/s is 43 %.
    assert machine.fraction_of_rate(8.2, 111.0, 170.0) == pytest.approx(8.2 / (0.111 * 170.0))
    assert round(machine.fraction_of_rate(8.2, 111.0, 170.0), 2) == 0.43
    assert machine.fraction_of_rate(8.2, None, 170.0) is None
    assert machine.fraction_of_rate(8.2, 100.0, 0.0) is None
    with pytest.raises(InvalidInputError, match="gmac must be a finite number"):
        machine.fraction_of_rate(-1.0, 1.0, 1.0)
    mixed = machine.ModelMacs({"x": (1,)}, fp32=2 * 10**9, int8=8 * 10**9)
    # 2 GMAC at 40 GMAC/s (50 ms) + 8 GMAC at 160 GMAC/s (50 ms) = 100 ms of ideal time in 200 ms.
    assert machine.mixed_limit_fraction(mixed, 200.0, {"fp32": 40.0, "int8": 160.0}) == pytest.approx(0.5)
    assert machine.mixed_limit_fraction(mixed, 200.0, {"fp32": 40.0}) is None
    pure = machine.ModelMacs({"x": (1,)}, fp32=0, int8=8 * 10**9)
    assert machine.mixed_limit_fraction(pure, 100.0, {"int8": 160.0}) == pytest.approx(
        machine.fraction_of_rate(8.0, 100.0, 160.0))
    assert machine.rate_for("int8") == "int8" and machine.rate_for("fp16") == "fp32"


def _result(det_ms, rec_ms, crops):
    from edge_shitu.recognizer import STAGES

    samples = {s: [1.0] * len(det_ms) for s in STAGES}
    samples.update(det_infer=list(det_ms), rec_infer=list(rec_ms))
    return {"samples_ms": samples, "crops": list(crops), "results": [1] * len(det_ms), "peak_rss_mb": 100.0}


def test_bracketed_rates_are_the_mean_of_before_and_after():
    gemm = [{"threads": t, "precision": p, "gmac_per_s": v}
            for t, p, v in ((1, "fp32", 40.0), (1, "fp32", 44.0), (2, "fp32", 70.0), (1, "int8", 160.0))]
    assert latency._bracketed_rates(gemm, 1) == {"fp32": 42.0, "int8": 160.0}
    assert latency._bracketed_rates(gemm, 2) == {"fp32": 70.0}


def test_model_fractions_with_injected_timings():
    macs = {"detector": machine.ModelMacs({"image": (1, 3, 640, 640)}, fp32=0, int8=8_200_000_000),
            "extractor": machine.ModelMacs({"x": (1, 3, 224, 224)}, fp32=830_000_000, int8=0)}
    # Extractor per crop: 40/4, 30/2, 90/3, 12/0 (left out) -> 10, 15, 30 ms -> p50 15 ms.
    result = _result(det_ms=[100.0, 120.0, 110.0, 400.0], rec_ms=[40.0, 30.0, 90.0, 12.0], crops=[4, 2, 3, 0])
    got = latency.model_fractions(result, macs, {"detector": "int8", "extractor": "fp32"},
                                  {"fp32": 40.0, "int8": 160.0})
    det, rec = got["detector"], got["extractor"]
    assert det["ms_p50"] == pytest.approx(115.0) and det["per"] == "image" and det["rate"] == "int8"
    assert det["gmac_per_s"] == pytest.approx(8.2 / 0.115)
    assert det["fraction_of_rate"] == pytest.approx(8.2 / (0.115 * 160.0))
    assert det["fraction_of_mixed_limit"] == pytest.approx(det["fraction_of_rate"])
    assert rec["ms_p50"] == pytest.approx(15.0) and rec["per"] == "crop" and rec["rate"] == "fp32"
    assert rec["fraction_of_rate"] == pytest.approx(0.83 / (0.015 * 40.0))
    assert rec["rate_gmac_per_s"] == 40.0 and rec["int8_share"] == 0.0
    none = latency.model_fractions(result, {"detector": None}, {"detector": "int8"}, {"fp32": 1.0, "int8": 1.0})
    assert none == {"detector": None}
    with pytest.raises(InvalidInputError, match="crop counts"):
        latency.model_fractions(_result([1.0], [1.0], []), {"extractor": macs["extractor"]},
                                {"extractor": "fp32"}, {"fp32": 1.0})
    with pytest.raises(InvalidInputError, match="no precision for the detector"):
        latency.model_fractions(result, {"detector": macs["detector"]}, {}, {"fp32": 1.0})


def test_markdown_shows_rates_model_work_and_fractions():
    base = latency.summarize_configuration(_result([200.0] * 3, [40.0] * 3, [4] * 3))
    other = latency.summarize_configuration(_result([100.0] * 3, [20.0] * 3, [4] * 3), base)
    macs = {"detector": machine.ModelMacs({"image": (1, 3, 640, 640)}, fp32=100_000_000, int8=8_100_000_000),
            "extractor": machine.ModelMacs({"x": (1, 3, 224, 224)}, fp32=0, int8=830_000_000)}
    rates = {"fp32": 40.0, "int8": 160.0}
    base.update(label="reference", threads=1, models=None)
    other.update(label="int8", threads=1,
                 models=latency.model_fractions(_result([100.0] * 3, [20.0] * 3, [4] * 3), macs,
                                                {"detector": "int8", "extractor": "int8"}, rates))
    gemm = [dict(machine.GemmRate("fp32", "MatMul", 2048, 1, (200.0,), (100.0,)).to_json(), when="before"),
            dict(machine.GemmRate("int8", "MatMulInteger", 2048, 1, (50.0,), (25.0,)).to_json(), when="before"),
            dict(machine.GemmRate("fp32", "MatMul", 2048, 1, (200.0,), (100.0,)).to_json(), when="after"),
            dict(machine.GemmRate("int8", "MatMulInteger", 2048, 1, (50.0,), (25.0,)).to_json(), when="after")]
    described = {"int8": {role: dict(m.to_json(), precision="int8", rate="int8",
                                     per="crop" if role == "extractor" else "image") for role, m in macs.items()}}
    rep = {"machine": report.machine_info(), "versions": {}, "images": {"dir": "d", "count": 3}, "warmup_passes": 0,
           "timed_passes": 1, "gallery": {"items": 1, "source": "t"}, "reference": None, "baseline": "reference",
           "threads": [1], "configurations": [base, other], "notes": [],
           "against_machine": {"gemm_size": 2048, "gemm_runs": 1, "gemm": gemm, "models": described,
                               "rates": {"1": {"fp32": 42.95, "int8": 171.8}}}}
    text = latency.markdown(rep)
    assert ("1 thread: fp32 43.0 (before 42.9, after 42.9; per CPU-second 85.9, 85.9), "
            "int8 171.8 (before 171.8, after 171.8; per CPU-second 343.6, 343.6)") in text
    assert "detector 8.2 GMAC per image (1×3×640×640, int8, 99% of it on integer kernels)" in text
    assert "extractor 0.83 GMAC per crop (1×3×224×224, int8, 100% of it on integer kernels)" in text
    det_row = next(line for line in text.splitlines() if line.startswith("| detector GMAC/s"))
    # 8.2 GMAC in 100 ms = 82 GMAC/s = 51 % of 160; mixed: (0.1 / 40 + 8.1 / 160) / 0.1 = 53 %.
    assert det_row == "| detector GMAC/s (of the GEMM rate) | — | 82.0 (51% of int8), mixed 53% |  |"
    rec_row = next(line for line in text.splitlines() if line.startswith("| extractor GMAC/s"))
    assert rec_row == "| extractor GMAC/s (of the GEMM rate) | — | 166.0 (104% of int8) |  |"


@pytest.mark.slow
@pytest.mark.paddle
def test_replica_bundle_macs_are_the_issues_figures(replica_bundle):
    """The replicas have the official graphs: the issue's 8.2 GMAC for the detector at 640 x 640 and 0.83 per
    extractor crop (figures from outside this counter, which the hand counts above check node by node); every
    convolution of the graph is counted."""
    import onnx

    from edge_shitu.bundle import Bundle

    b = Bundle.load(replica_bundle)
    for role, gmac, digits in (("detector", 8.2, 1), ("extractor", 0.83, 2)):  # the issue's figures, as rounded
        macs = machine.bundle_model_macs(b.models[role])
        assert round(macs.total / 1e9, digits) == gmac, role
        graph = onnx.load(str(b.models[role].path)).graph
        assert macs.nodes == sum(n.op_type == "Conv" for n in graph.node), role


# ---------------------------------------------------------------- threads (docs/benchmarks.md, "Threads")


@pytest.mark.parametrize("threads", [None, 1])
def test_onnxruntime_sessions_do_not_spin(tiny_bundle, threads):
    from edge_shitu.backends.onnxruntime import OnnxRuntimeSession

    session = OnnxRuntimeSession.from_file(tiny_bundle / "extractor.onnx", threads=threads)
    options = session._session.get_session_options()
    # Idle workers that spin hold the core the next session's run needs (docs/benchmarks.md, "Threads").
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    session.close()
