"""Integer hard sigmoids (edge_shitu_converters.integer_ops): the QLinearAdd rewrite against onnxruntime's own float
path on every input code, the Clip rewrite against the exact hard sigmoid of its rescaled codes, the cases each
leaves alone, onnxruntime's fusion of the results, and the quantiser's use of them on a small model (the replica
detector: tests/test_quantize.py)."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxruntime.quantization", reason="onnxruntime.quantization needs ml_dtypes")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edge_shitu_converters.integer_ops import MAX_STEP_GROWTH, clip_hard_sigmoids, integer_hard_sigmoids  # noqa: E402
from edge_shitu_converters.quantize import ModelQuantizer, QuantizeOptions, compare_outputs  # noqa: E402
from conftest import add_subgraph_reader  # noqa: E402
from test_int8_search import _chain_model, _quantizer  # noqa: E402
from test_quantize import _spec, _write_photos  # noqa: E402

_TYPES = {np.uint8: TensorProto.UINT8, np.int8: TensorProto.INT8}


def _gate_model(sx, zx, sh, zh, alpha=None, beta=None, dtype=np.uint8, *, extra_user=False, expose=False,
                input_zero_point=True, name="hs"):
    """codes q (1, 256, 1, 1) -> DequantizeLinear -> HardSigmoid -> QuantizeLinear -> codes (alpha/beta None:
    the attribute is left out, for ONNX's default)."""
    t = _TYPES[dtype]
    inits = [numpy_helper.from_array(np.array(sx, np.float32), "sx"), numpy_helper.from_array(np.array(zx, dtype), "zx"),
             numpy_helper.from_array(np.array(sh, np.float32), "sh"), numpy_helper.from_array(np.array(zh, dtype), "zh")]
    attrs = {k: v for k, v in (("alpha", alpha), ("beta", beta)) if v is not None}
    nodes = [helper.make_node("DequantizeLinear", ["q", "sx", "zx"] if input_zero_point else ["q", "sx"], ["x"],
                              name="dq"),
             helper.make_node("HardSigmoid", ["x"], ["h"], name=name, **attrs),
             helper.make_node("QuantizeLinear", ["h", "sh", "zh"], ["hq"], name="qh")]
    outputs = [helper.make_tensor_value_info("hq", t, [1, 256, 1, 1])]
    if extra_user:
        nodes.append(helper.make_node("Relu", ["h"], ["r"], name="relu"))
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 256, 1, 1]))
    if expose:
        outputs.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 256, 1, 1]))
    graph = helper.make_graph(nodes, "gate", [helper.make_tensor_value_info("q", t, [1, 256, 1, 1])], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _session(model, optimized: Path = None, *, fuse: bool = True):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not fuse:
        # What a runtime without onnxruntime's QDQ fusion runs: the rewritten nodes as written, in float.
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _all_codes(dtype) -> np.ndarray:
    low = np.iinfo(dtype).min
    return (np.arange(256) + low).astype(dtype).reshape(1, 256, 1, 1)


def _assert_same_codes_but_ties(got, expected, codes, sx, zx, sh, zh, alpha, beta):
    """The float path and the rewrite round the same real number, ``(alpha x + beta) / sh``, in different float
    steps: they must agree wherever it is not within float noise of a tie (k + 1/2), and by 1 there."""
    x = (codes.astype(np.float64) - zx) * np.float64(np.float32(sx))
    exact = (np.float64(np.float32(alpha)) * x + np.float64(np.float32(beta))) / np.float64(np.float32(sh))
    tie = np.abs(exact - np.floor(exact) - 0.5) < 1e-4
    diff = np.abs(got.astype(np.int64) - expected.astype(np.int64))
    assert not np.any(diff[~tie]), f"codes differ away from ties at inputs {codes[(diff > 0) & ~tie][:5]}"
    assert diff.max(initial=0) <= 1


def _copy(model):
    return onnx.load_from_string(model.SerializeToString())


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_rewritten_gate_gives_the_float_paths_codes_for_every_input_code(dtype, rng):
    low = int(np.iinfo(dtype).min)
    for trial in range(40):
        sx = float(rng.uniform(0.005, 0.2))
        zx = int(rng.integers(low, low + 256))
        sh = float(rng.uniform(0.5, 1.0)) / 255  # a calibrated range [0, <= 1]
        # PP-LCNet's hard sigmoid (1/6, 1/2), then others, offsets beta/alpha of both signs and zero.
        alpha, beta = ((1 / 6, 0.5) if trial % 3 == 0 else (0.2, 0.0) if trial == 1
                       else (float(rng.uniform(0.05, 0.5)), float(rng.uniform(-1.0, 1.5))))
        if trial == 2:  # ONNX's defaults, 0.2 and 0.5
            model = _gate_model(sx, zx, sh, low, None, None, dtype)
            alpha, beta = 0.2, 0.5
        else:
            model = _gate_model(sx, zx, sh, low, alpha, beta, dtype)
        rewritten = _copy(model)
        assert integer_hard_sigmoids(rewritten) == ("hs",)
        onnx.checker.check_model(rewritten)
        codes = _all_codes(dtype)
        expected = _session(model).run(None, {"q": codes})[0]
        got = _session(rewritten).run(None, {"q": codes})[0]
        _assert_same_codes_but_ties(got, expected, codes, sx, zx, sh, low, alpha, beta)
        unfused = _session(rewritten, fuse=False).run(None, {"q": codes})[0]
        _assert_same_codes_but_ties(unfused, expected, codes, sx, zx, sh, low, alpha, beta)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_onnxruntime_runs_the_rewritten_gate_on_its_integer_add(dtype, tmp_path):
    low = int(np.iinfo(dtype).min)
    model = _gate_model(0.05, low + 100, 1 / 255, low, 1 / 6, 0.5, dtype)
    integer_hard_sigmoids(model)
    _session(model, tmp_path / "optimized.onnx")
    ops = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)
    assert ops["QLinearAdd"] == 1 and ops["HardSigmoid"] == 0 and ops["Add"] == 0, ops


@pytest.mark.parametrize("case, kwargs", [
    ("zero point above the lowest code: the bottom clip is not the saturation",
     dict(sx=0.05, zx=128, sh=1 / 255, zh=10, alpha=1 / 6, beta=0.5)),
    ("range above 1: the top clip is not the saturation", dict(sx=0.05, zx=128, sh=1 / 200, zh=0, alpha=1 / 6, beta=0.5)),
    ("alpha 0", dict(sx=0.05, zx=128, sh=1 / 255, zh=0, alpha=0.0, beta=0.5)),
    ("alpha < 0", dict(sx=0.05, zx=128, sh=1 / 255, zh=0, alpha=-0.2, beta=0.5)),
    ("a float user besides the quantiser", dict(sx=0.05, zx=128, sh=1 / 255, zh=0, alpha=1 / 6, beta=0.5,
                                                 extra_user=True)),
    ("a graph output", dict(sx=0.05, zx=128, sh=1 / 255, zh=0, alpha=1 / 6, beta=0.5, expose=True)),
    ("symmetric int8 output (zero point 0): the bottom clip is not the saturation",
     dict(sx=0.05, zx=0, sh=1 / 127, zh=0, alpha=1 / 6, beta=0.5, dtype=np.int8)),
    ("7-bit range (reduce_range): the top clip is not the saturation",
     dict(sx=0.05, zx=64, sh=1 / 127, zh=0, alpha=1 / 6, beta=0.5)),
    ("input zero point omitted: the offset's type is not read from a zero point",
     dict(sx=0.05, zx=0, sh=1 / 255, zh=0, alpha=1 / 6, beta=0.5, input_zero_point=False)),
])
def test_gates_the_rewrite_would_change_are_left_alone(case, kwargs):
    model = _gate_model(**kwargs)
    before = model.SerializeToString()
    assert integer_hard_sigmoids(model) == (), case
    assert model.SerializeToString() == before, case


def test_float_and_per_channel_inputs_are_left_alone():
    float_input = _gate_model(0.05, 128, 1 / 255, 0, 1 / 6, 0.5)
    graph = float_input.graph
    graph.node[1].input[0] = "xf"
    graph.input.append(helper.make_tensor_value_info("xf", TensorProto.FLOAT, [1, 256, 1, 1]))
    assert integer_hard_sigmoids(float_input) == ()
    per_channel = _gate_model(0.05, 128, 1 / 255, 0, 1 / 6, 0.5)
    for init in per_channel.graph.initializer:
        if init.name == "sh":
            init.CopyFrom(numpy_helper.from_array(np.full(256, 1 / 255, np.float32), "sh"))
    assert integer_hard_sigmoids(per_channel) == ()


def test_new_names_do_not_collide_and_shared_scales_stay_for_the_other_users():
    model = _gate_model(0.05, 128, 1 / 255, 0, 1 / 6, 0.5)
    # An initializer already bearing the name the rewrite would pick, and the quantiser's scale shared with a
    # DequantizeLinear of the result (as onnxruntime's quantiser shares them).
    model.graph.initializer.append(numpy_helper.from_array(np.array(7, np.uint8), "hs_offset_code"))
    model.graph.node.append(helper.make_node("DequantizeLinear", ["hq", "sh", "zh"], ["hf"], name="dq_out"))
    model.graph.output.append(helper.make_tensor_value_info("hf", TensorProto.FLOAT, [1, 256, 1, 1]))
    expected = _session(model).run(None, {"q": _all_codes(np.uint8)})
    assert integer_hard_sigmoids(model) == ("hs",)
    onnx.checker.check_model(model)
    names = [i.name for i in model.graph.initializer]
    assert len(names) == len(set(names))
    assert numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "hs_offset_code")) == 7
    by_name = {n.name: n for n in model.graph.node}
    assert by_name["dq_out"].input[1] == "sh" and by_name["qh"].input[1] != "sh"
    assert by_name["hs"].op_type == "Add"
    codes = _all_codes(np.uint8)
    got = _session(model).run(None, {"q": codes})
    # Round scales put some inputs on exact ties ((160 - 128) * 0.05 = 1.6 gives (1.6 / 6 + 0.5) * 255 = 195.5).
    _assert_same_codes_but_ties(got[0], expected[0], codes, 0.05, 128, 1 / 255, 0, 1 / 6, 0.5)
    np.testing.assert_array_equal(got[1], (got[0].astype(np.float32)) * np.float32(1 / 255))


def test_unnamed_nodes_and_tensor_names_already_taken():
    # An unnamed gate, and a tensor already called what the rewrite would call its offset.
    model = _gate_model(0.05, 128, 1 / 255, 0, 1 / 6, 0.5, name="")
    model.graph.node.append(helper.make_node("Identity", ["hq"], ["HardSigmoid_0_offset"], name="id"))
    model.graph.output.append(helper.make_tensor_value_info("HardSigmoid_0_offset", TensorProto.UINT8, [1, 256, 1, 1]))
    expected = _session(model).run(None, {"q": _all_codes(np.uint8)})
    (name,) = integer_hard_sigmoids(model)
    onnx.checker.check_model(model)  # single static assignment kept
    assert name and name in {n.name for n in model.graph.node if n.op_type == "Add"}
    outputs = [o for n in model.graph.node for o in n.output]
    assert len(outputs) == len(set(outputs))
    got = _session(model).run(None, {"q": _all_codes(np.uint8)})
    for a, b in zip(got, expected):
        _assert_same_codes_but_ties(a, b, _all_codes(np.uint8), 0.05, 128, 1 / 255, 0, 1 / 6, 0.5)


@pytest.fixture
def photos(tmp_path, rng) -> Path:
    root = tmp_path / "photos"
    _write_photos(root, rng, n=12)
    return root


def test_quantizer_rewrites_the_gates_and_keeps_the_outputs(tmp_path, rng, photos):
    chain = _chain_model(tmp_path / "chain.onnx", rng)
    runs = {}
    for flag in (True, False):
        q = _quantizer(chain, photos, tmp_path, name=f"q{flag}", integer_hard_sigmoid=flag, clip_hard_sigmoid=False)
        report = q.quantize(tmp_path / f"int8-{flag}.onnx")
        ops = collections.Counter(n.op_type for n in onnx.load(str(report.output)).graph.node)
        runs[flag] = (report, ops, q)
    on, off = runs[True], runs[False]
    quantized_gates = tuple(n for n in (f"gate{i}" for i in range(6)) if n not in on[2].tail)
    assert on[0].integer_hard_sigmoids == quantized_gates and len(quantized_gates) == 5
    assert off[0].integer_hard_sigmoids == ()
    assert on[1]["HardSigmoid"] == 1 and off[1]["HardSigmoid"] == 6  # the float tail's gate stays
    feeds = on[2].probe_feeds(3)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    a, b = (ort.InferenceSession(str(r[0].output), so, providers=["CPUExecutionProvider"]) for r in (on, off))
    for feed in feeds:
        np.testing.assert_array_equal(a.run(None, feed)[0], b.run(None, feed)[0])


def test_dynamic_quantization_is_not_rewritten(tmp_path, rng):
    # Dynamic quantisation writes no DequantizeLinear -> HardSigmoid -> QuantizeLinear chain, so this shows that
    # nothing matches there, not that the quantiser's static-only guard works (it is there for clarity).
    chain = _chain_model(tmp_path / "chain.onnx", rng)
    work = tmp_path / "dyn"
    work.mkdir()
    q = ModelQuantizer.prepare(chain, work, input_spec=_spec(),
                               options=QuantizeOptions(mode="dynamic", float_tail=0))
    assert q.quantize(tmp_path / "dyn.onnx").integer_hard_sigmoids == ()


def test_graphs_with_subgraphs_are_left_alone():
    """A subgraph may read any outer tensor, which the rewrite's map of readers does not see."""
    model = _gate_model(0.05, 128, 1 / 255, 0)
    add_subgraph_reader(model, "h")
    before = model.SerializeToString()
    assert integer_hard_sigmoids(model) == ()
    assert model.SerializeToString() == before


# --- hard sigmoids as a Clip of codes -------------------------------------------------------------------------------

def _swish_model(sx, zx, sh, zh, alpha=1 / 6, beta=0.5, dtype=np.uint8, *, opset=13, writer=True, x_reader=None,
                 expose=(), hq_reader=None, h_reader=None, hd_reader=None, before="Mul", per_channel_x=False,
                 name="hs"):
    """f (float) -> ``before`` (Mul by 1) -> QuantizeLinear(sx, zx) -> q -> DequantizeLinear -> x; x -> HardSigmoid
    -> QuantizeLinear(sh, zh) -> hq -> DequantizeLinear -> hd; Mul(x, hd) -> QuantizeLinear(0.02, z) -> "out" (codes).
    Outputs "out" and "hd" (the sigmoid's values), plus ``expose``. ``writer=False``: q is the graph input;
    ``x_reader``, ``h_reader``, ``hq_reader``, ``hd_reader``: another op (type) reading x, h, hq or hd."""
    t = _TYPES[dtype]
    low = int(np.iinfo(dtype).min)
    shape = [1, 512, 1, 1]
    sx_value = np.full(512, sx, np.float32) if per_channel_x else np.array(sx, np.float32)
    zx_value = np.full(512, zx, dtype) if per_channel_x else np.array(zx, dtype)
    inits = [numpy_helper.from_array(sx_value, "sx"), numpy_helper.from_array(zx_value, "zx"),
             numpy_helper.from_array(np.array(sh, np.float32), "sh"), numpy_helper.from_array(np.array(zh, dtype), "zh"),
             numpy_helper.from_array(np.array(0.02, np.float32), "so"), numpy_helper.from_array(np.array(low + 20, dtype), "zo"),
             numpy_helper.from_array(np.array(1, np.float32), "one")]
    upstream = [helper.make_node("Mul", ["f", "one"], ["fx"], name="before") if before == "Mul"
                else helper.make_node(before, ["f"], ["fx"], name="before")]
    nodes = upstream + [helper.make_node("QuantizeLinear", ["fx", "sx", "zx"], ["q"], name="qx")] if writer else []
    nodes += [helper.make_node("DequantizeLinear", ["q", "sx", "zx"], ["x"], name="dqx"),
              helper.make_node("HardSigmoid", ["x"], ["h"], name=name, alpha=alpha, beta=beta),
              helper.make_node("QuantizeLinear", ["h", "sh", "zh"], ["hq"], name="qh"),
              helper.make_node("DequantizeLinear", ["hq", "sh", "zh"], ["hd"], name="dqh"),
              helper.make_node("Mul", ["x", "hd"], ["m"], name="mul"),
              helper.make_node("QuantizeLinear", ["m", "so", "zo"], ["out"], name="qo")]
    outputs = [helper.make_tensor_value_info("out", t, shape), helper.make_tensor_value_info("hd", TensorProto.FLOAT, shape)]
    if x_reader is not None:
        nodes.append(helper.make_node(x_reader, ["x"], ["xr"], name="x_reader"))
        outputs.append(helper.make_tensor_value_info("xr", TensorProto.FLOAT, shape))
    for reader, value, kind in ((hq_reader, "hq", t), (h_reader, "h", TensorProto.FLOAT),
                                (hd_reader, "hd", TensorProto.FLOAT)):
        if reader is not None:
            nodes.append(helper.make_node(reader, [value], [f"{value}_read"], name=f"{value}_reader"))
            outputs.append(helper.make_tensor_value_info(f"{value}_read", kind, shape))
    for value in expose:
        outputs.append(helper.make_tensor_value_info(value, t if value in ("q", "hq") else TensorProto.FLOAT, shape))
    inputs = [helper.make_tensor_value_info("f", TensorProto.FLOAT, shape) if writer
              else helper.make_tensor_value_info("q", t, shape)]
    graph = helper.make_graph(nodes, "swish", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _ramp(sx, alpha, beta):
    """The oracle's ramp width n (in codes), by trying every n: the largest with beta * n whole and a step
    1 / (alpha * n) no finer than sx (a smaller n only coarsens the step more); 0 when there is none."""
    fits = [n for n in range(1, 4096) if abs(beta * n - round(beta * n)) < 1e-6 and 1 / (alpha * n) >= sx * (1 - 1e-9)]
    return max(fits, default=0)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_clip_gate_is_the_exact_hard_sigmoid_of_the_rescaled_codes(dtype, rng):
    low, high = int(np.iinfo(dtype).min), int(np.iinfo(dtype).max)
    done = 0
    for trial in range(60):
        alpha, beta = [(1 / 6, 0.5), (0.2, 0.5), (0.2, 0.0), (0.25, 0.25), (0.1, 1 / 3)][trial % 5]
        sx = float(rng.uniform(0.01, 0.3))
        n = _ramp(sx, alpha, beta)
        zx = int(rng.integers(low + round(beta * n), high + 1)) if beta * n <= 255 else low
        model = _swish_model(sx, zx, 1 / 255, low, alpha, beta, dtype)
        rewritten = _copy(model)
        if not (n > 0 and (1 / (alpha * n)) / sx - 1 <= MAX_STEP_GROWTH and low <= zx - round(beta * n) <= high):
            assert clip_hard_sigmoids(rewritten) == (), (sx, zx, alpha, beta)
            continue
        assert clip_hard_sigmoids(rewritten) == ("hs",), (sx, zx, alpha, beta)
        done += 1
        onnx.checker.check_model(rewritten)
        step = np.float32(1 / (alpha * n))
        # Every code of the rescaled input, and values between them.
        f = np.linspace((low - zx - 2) * step, (high - zx + 2) * step, 512, dtype=np.float32).reshape(1, 512, 1, 1)
        codes = np.clip(np.rint(f.astype(np.float64) / np.float64(step)) + zx, low, high)
        x = (codes - zx) * np.float64(step)
        exact = np.clip(alpha * x + beta, 0, 1)
        for fuse in (True, False):
            out, hd = _session(rewritten, fuse=fuse).run(None, {"f": f})
            ties = np.abs(f.astype(np.float64) / np.float64(step) - np.floor(f.astype(np.float64) / np.float64(step)) - 0.5) < 1e-4
            assert np.abs(hd - exact)[~ties].max() < 1e-6, (sx, zx, alpha, beta, fuse)
            product = np.clip(np.rint(x * exact / 0.02) + low + 20, low, high)
            assert np.abs(out.astype(np.int64) - product)[~ties].max() <= 1, (sx, zx, alpha, beta, fuse)
    assert done >= 20


def test_clip_gate_coarsens_the_step_of_its_input_within_the_limit():
    model = _swish_model(0.0525, 137, 1 / 255, 0)
    # A recorded shape for the sigmoid's float output (which goes), and an initializer no node reads (not the
    # rewrite's to remove).
    model.graph.value_info.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 512, 1, 1]))
    model.graph.initializer.append(numpy_helper.from_array(np.array(3, np.float32), "unread"))
    assert clip_hard_sigmoids(model) == ("hs",)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    by_name = {n.name: n for n in model.graph.node}
    step = inits[by_name["qx"].input[1]]
    assert by_name["dqx"].input[1] == by_name["qx"].input[1]
    # 3 / 0.0525 = 57.1 codes from the zero point to the ramp's start: 57, so the step is 3 / 57.
    assert abs(step - 3 / 57) < 1e-8 and 0.0525 <= step <= 0.0525 * (1 + MAX_STEP_GROWTH)
    clip = by_name["hs"]
    assert clip.op_type == "Clip" and [int(inits[v]) for v in clip.input[1:]] == [137 - 57, 137 - 57 + 114]
    assert float(inits[by_name["dqh"].input[1]]) == np.float32(1 / 114) and int(inits[by_name["dqh"].input[2]]) == 80
    # The replaced scales and zero point went; the input's zero point and the product's quantiser stayed.
    assert not {"sx", "sh", "zh"} & set(inits) and {"zx", "so", "zo", "unread"} <= set(inits)
    assert {n.op_type for n in model.graph.node} == {"QuantizeLinear", "DequantizeLinear", "Clip", "Mul"}
    assert "h" not in {v.name for v in model.graph.value_info}


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_onnxruntime_runs_the_clip_gate_and_its_product_on_integer_kernels(dtype, tmp_path):
    low = int(np.iinfo(dtype).min)
    model = _swish_model(0.05, low + 128, 1 / 255, low, dtype=dtype)
    assert clip_hard_sigmoids(model) == ("hs",)
    _session(model, tmp_path / "optimized.onnx")
    ops = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)
    assert ops["Clip"] == 1 and ops["QLinearMul"] == 1, ops
    assert ops["Mul"] == 1 and not {"HardSigmoid", "QLinearAdd", "Add"} & set(ops), ops  # the Mul: the float one before


@pytest.mark.parametrize("case, kwargs", [
    ("input range inside the ramp: its start is below the lowest code", dict(sx=0.01, zx=128, sh=1 / 255, zh=0)),
    ("the step would grow by more than the limit", dict(sx=1.2, zx=128, sh=1 / 255, zh=0)),
    ("beta has no small denominator", dict(sx=0.05, zx=128, sh=1 / 255, zh=0, beta=0.1234567)),
    ("alpha 0", dict(sx=0.05, zx=128, sh=1 / 255, zh=0, alpha=0.0)),
    ("alpha < 0", dict(sx=0.05, zx=128, sh=1 / 255, zh=0, alpha=-0.2)),
    ("the codes are a graph input: no quantiser to rescale", dict(sx=0.05, zx=128, sh=1 / 255, zh=0, writer=False)),
    ("another op reads the input and needs its scale", dict(sx=0.05, zx=128, sh=1 / 255, zh=0, x_reader="MaxPool")),
    ("another op reads the sigmoid's codes", dict(sx=0.05, zx=128, sh=1 / 255, zh=0, hq_reader="Identity")),
    ("the sigmoid's codes are a graph output", dict(sx=0.05, zx=128, sh=1 / 255, zh=0, expose=("hq",))),
    ("the input's codes are a graph output", dict(sx=0.05, zx=128, sh=1 / 255, zh=0, expose=("q",))),
    ("the sigmoid's float output is a graph output", dict(sx=0.05, zx=128, sh=1 / 255, zh=0, expose=("h",))),
    ("the sigmoid's float output has a second reader", dict(sx=0.05, zx=128, sh=1 / 255, zh=0, h_reader="Relu")),
    ("the sigmoid's values feed an op that needs equal scales", dict(sx=0.05, zx=128, sh=1 / 255, zh=0,
                                                                     hd_reader="MaxPool")),
    ("the input comes after an op that needs equal scales", dict(sx=0.05, zx=128, sh=1 / 255, zh=0,
                                                                 before="MaxPool")),
    ("per-channel input", dict(sx=0.05, zx=128, sh=1 / 255, zh=0, per_channel_x=True)),
    ("opset 11: Clip takes no 8-bit codes", dict(sx=0.05, zx=128, sh=1 / 255, zh=0, opset=11)),
    ("the sigmoid's codes of another type", dict(sx=0.05, zx=128, sh=1 / 255, zh=0, hq_type=np.int8)),
])
def test_gates_a_clip_cannot_take_are_left_alone(case, kwargs):
    kwargs = dict(kwargs)
    hq_type = kwargs.pop("hq_type", None)
    model = _swish_model(**kwargs)
    if hq_type is not None:
        for init in model.graph.initializer:
            if init.name == "zh":
                init.CopyFrom(numpy_helper.from_array(np.array(0, hq_type), "zh"))
    for node in model.graph.node:
        if node.op_type == "MaxPool":
            node.attribute.append(helper.make_attribute("kernel_shape", [1, 1]))
    before = model.SerializeToString()
    assert clip_hard_sigmoids(model) == (), case
    assert model.SerializeToString() == before, case


@pytest.mark.parametrize("alpha, beta", [(1 / 6, float("inf")), (float("nan"), 0.5), (float("inf"), 0.5)])
def test_clip_gates_with_non_finite_attributes_are_left_alone(alpha, beta):
    model = _swish_model(0.05, 128, 1 / 255, 0, alpha, beta)
    before = model.SerializeToString()
    assert clip_hard_sigmoids(model) == ()
    assert model.SerializeToString() == before


def test_clip_gates_whose_scales_are_graph_inputs_are_left_alone():
    """An initializer that is also a graph input is a default the caller may override: it must stay."""
    for name in ("sx", "sh"):
        model = _swish_model(0.05, 128, 1 / 255, 0)
        model.graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, []))
        before = model.SerializeToString()
        assert clip_hard_sigmoids(model) == (), name
        assert model.SerializeToString() == before, name


def test_clip_gates_whose_codes_are_read_with_another_scale_are_left_alone():
    model = _swish_model(0.05, 128, 1 / 255, 0)
    model.graph.initializer.append(numpy_helper.from_array(np.array(2 / 255, np.float32), "sh2"))
    next(n for n in model.graph.node if n.name == "dqh").input[1] = "sh2"
    before = model.SerializeToString()
    assert clip_hard_sigmoids(model) == ()
    assert model.SerializeToString() == before


def test_a_scale_shared_with_other_tensors_stays_for_them():
    """The input's quantiser shares its scale with an unrelated tensor's quantiser pair: the rewrite gives the
    input a scale of its own, and the other pair keeps its codes."""
    model = _swish_model(0.0525, 137, 1 / 255, 0)
    graph = model.graph
    graph.node.extend([helper.make_node("QuantizeLinear", ["f", "sx", "zx"], ["other_q"], name="other_q"),
                       helper.make_node("DequantizeLinear", ["other_q", "sx", "zx"], ["other"], name="other_dq")])
    graph.output.append(helper.make_tensor_value_info("other", TensorProto.FLOAT, [1, 512, 1, 1]))
    f = np.linspace(-8, 8, 512, dtype=np.float32).reshape(1, 512, 1, 1)
    expected = _session(model).run(["other"], {"f": f})[0]
    assert clip_hard_sigmoids(model) == ("hs",)
    by_name = {n.name: n for n in graph.node}
    assert by_name["other_q"].input[1] == by_name["other_dq"].input[1] == "sx" and by_name["qx"].input[1] != "sx"
    np.testing.assert_array_equal(_session(model).run(["other"], {"f": f})[0], expected)


def test_clip_gates_leave_graphs_with_subgraphs_alone():
    model = _swish_model(0.05, 128, 1 / 255, 0)
    add_subgraph_reader(model, "hd")
    before = model.SerializeToString()
    assert clip_hard_sigmoids(model) == ()
    assert model.SerializeToString() == before


def test_unnamed_clip_gates_get_fresh_names():
    model = _swish_model(0.05, 128, 1 / 255, 0, name="")
    model.graph.initializer.append(numpy_helper.from_array(np.array(1, np.uint8), "HardSigmoid_0_low"))
    model.graph.node.append(helper.make_node("Identity", ["out"], ["HardSigmoid_0_scale"], name="HardSigmoid_0"))
    model.graph.output.append(helper.make_tensor_value_info("HardSigmoid_0_scale", TensorProto.UINT8, [1, 512, 1, 1]))
    (name,) = clip_hard_sigmoids(model)
    onnx.checker.check_model(model)
    names = [n.name for n in model.graph.node]
    tensors = [o for n in model.graph.node for o in n.output] + [i.name for i in model.graph.initializer]
    assert name and len(names) == len(set(names)) and len(tensors) == len(set(tensors))
    assert next(n for n in model.graph.node if n.name == name).op_type == "Clip"


def test_quantizer_turns_the_gates_it_can_into_clips_and_stays_close_to_the_add_form(tmp_path, rng, photos):
    """On this chain the LeakyReLU inputs of most gates stay above -3 (their ramp would start below code 0): one
    gate takes the Clip, the others the QLinearAdd (the replica detector, where most take the Clip:
    tests/test_quantize.py)."""
    chain = _chain_model(tmp_path / "chain.onnx", rng)
    runs = {}
    for flag in (True, False):
        q = _quantizer(chain, photos, tmp_path, name=f"clip{flag}", clip_hard_sigmoid=flag)
        runs[flag] = (q.quantize(tmp_path / f"clip-{flag}.onnx"), q)
    (on, q), (off, _) = runs[True], runs[False]
    gates = {f"gate{i}" for i in range(6)} - set(q.tail)
    assert on.clip_hard_sigmoids and not set(on.clip_hard_sigmoids) & set(on.integer_hard_sigmoids)
    assert set(on.clip_hard_sigmoids) | set(on.integer_hard_sigmoids) == gates == set(off.integer_hard_sigmoids)
    assert off.clip_hard_sigmoids == ()
    ops = collections.Counter(n.op_type for n in onnx.load(str(on.output)).graph.node)
    assert ops["Clip"] == len(on.clip_hard_sigmoids) and ops["HardSigmoid"] == 6 - len(gates)
    feeds = q.probe_feeds(3)
    agreement = compare_outputs(chain, on.output, feeds), compare_outputs(chain, off.output, feeds)
    # Against the float model, the clip form is about as close as the add form (a recalibration, not a loss).
    assert agreement[0]["feat"].sqnr_db >= agreement[1]["feat"].sqnr_db - 3, agreement


def test_clip_gates_whose_input_feeds_a_biased_convolution_are_left_alone():
    """A Conv stores its bias in int32 at its input's step: a new step would scale that bias silently."""
    model = _swish_model(0.0525, 137, 1 / 255, 0)
    graph = model.graph
    graph.initializer.extend([numpy_helper.from_array(np.ones((512, 1, 1, 1), np.float32), "w"),
                              numpy_helper.from_array(np.full(512, 2.0, np.float32), "b")])
    graph.node.append(helper.make_node("Conv", ["x", "w", "b"], ["conv"], name="conv", group=512))
    graph.output.append(helper.make_tensor_value_info("conv", TensorProto.FLOAT, [1, 512, 1, 1]))
    before = model.SerializeToString()
    assert clip_hard_sigmoids(model) == ()
    assert model.SerializeToString() == before


def test_both_rewrites_leave_non_finite_gates_alone():
    for alpha, beta in ((1 / 6, float("inf")), (float("inf"), 0.5), (1 / 6, float("nan"))):
        model = _swish_model(0.05, 128, 1 / 255, 0, alpha, beta)
        before = model.SerializeToString()
        assert clip_hard_sigmoids(model) == () and integer_hard_sigmoids(model) == (), (alpha, beta)
        assert model.SerializeToString() == before


def test_a_ramp_scale_shared_with_a_gate_left_alone_stays_for_it():
    """Two gates share the sigmoid quantiser's scale and zero point (as a quantiser may); the second's input lies
    within the ramp, so only the first becomes a Clip, and the second keeps reading the shared constants."""
    model = _swish_model(0.0525, 137, 1 / 255, 0)
    graph = model.graph
    graph.initializer.append(numpy_helper.from_array(np.array(0.01, np.float32), "sx2"))
    graph.node.extend([
        helper.make_node("Mul", ["f", "one"], ["f2"], name="before2"),
        helper.make_node("QuantizeLinear", ["f2", "sx2", "zx"], ["q2"], name="qx2"),
        helper.make_node("DequantizeLinear", ["q2", "sx2", "zx"], ["x2"], name="dqx2"),
        helper.make_node("HardSigmoid", ["x2"], ["h2"], name="hs2", alpha=1 / 6, beta=0.5),
        helper.make_node("QuantizeLinear", ["h2", "sh", "zh"], ["hq2"], name="qh2"),
        helper.make_node("DequantizeLinear", ["hq2", "sh", "zh"], ["hd2"], name="dqh2")])
    graph.output.append(helper.make_tensor_value_info("hd2", TensorProto.FLOAT, [1, 512, 1, 1]))
    f = np.linspace(-8, 8, 512, dtype=np.float32).reshape(1, 512, 1, 1)
    expected = _session(model).run(["hd2"], {"f": f})[0]
    assert clip_hard_sigmoids(model) == ("hs",)
    onnx.checker.check_model(model)
    by_name = {n.name: n for n in model.graph.node}
    assert list(by_name["qh2"].input[1:]) == list(by_name["dqh2"].input[1:]) == ["sh", "zh"]
    np.testing.assert_array_equal(_session(model).run(["hd2"], {"f": f})[0], expected)


def test_the_quantisers_op_count_includes_the_clip_gates():
    from edge_shitu_converters.quantize import _quantized_ops

    model = _swish_model(0.05, 128, 1 / 255, 0)
    assert _quantized_ops(model, []) == {"HardSigmoid": 1, "Mul": 1}
    clip_hard_sigmoids(model)
    assert _quantized_ops(model, []) == {"Clip": 1, "Mul": 1}


def test_block_damage_measures_the_blocks_with_their_clip_gates(tmp_path, rng, photos):
    """The INT8 search ranks blocks by the noise each adds alone: with the Clip rewrite on, a block holding a gate
    that takes it is measured rewritten, as it will run."""
    chain = _chain_model(tmp_path / "chain.onnx", rng)
    damage = {}
    for flag in (True, False):
        q = _quantizer(chain, photos, tmp_path, name=f"damage{flag}", clip_hard_sigmoid=flag)
        clipped = q.quantize(tmp_path / f"d-{flag}.onnx").clip_hard_sigmoids
        damage[flag] = ({d.block: d.sqnr_db for d in q.block_damage(q.probe_feeds(2))}, clipped)
    (on, clipped), (off, _) = damage[True], damage[False]
    blocks = [b for b in on if any(g.replace("gate", "conv") == b for g in clipped)]
    assert blocks, (on, clipped)
    for block in blocks:
        assert on[block] != off[block], block
    for block in set(on) - set(blocks):
        assert on[block] == off[block], block
