"""An INT8 model's weights alone and its activations alone (edge_shitu_converters.int8_parts, issue 17): each part,
run by onnxruntime, against a slow numpy forward pass of the float model with only that part rounded, on a small
model quantised by onnxruntime; and the INT8 search, which verifies both parts when every block INT8 fails."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime.quantization", reason="onnxruntime.quantization needs ml_dtypes")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edge_shitu.backends.onnxruntime import OnnxRuntimeSession, session_options  # noqa: E402
from edge_shitu.errors import ConversionError, InvalidInputError  # noqa: E402
from edge_shitu_converters.int8_parts import keep_int8_part  # noqa: E402
from edge_shitu_converters.int8_search import search_int8, verify_parts  # noqa: E402
from edge_shitu_converters.quantize import ModelQuantizer, compare_outputs  # noqa: E402
from test_int8_search import _chain_model, _save  # noqa: E402
from test_int8_search import _quantizer as _search_quantizer  # noqa: E402
from test_quantize import _write_photos  # noqa: E402


def _two_convs(path: Path, rng: np.random.Generator) -> Path:
    """x (N,3,16,16) -> conv0 1x1 (8 ch) -> Relu -> conv1 1x1 (4 ch) = y. The quantiser drops the Relu: the uint8
    rounding of conv0's output, whose range starts at 0, clamps it."""
    inits = [numpy_helper.from_array(rng.normal(0, 0.8, (8, 3, 1, 1)).astype(np.float32), "w0"),
             numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "b0"),
             numpy_helper.from_array(rng.normal(0, 0.5, (4, 8, 1, 1)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.1, 4).astype(np.float32), "b1")]
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="conv0"),
             helper.make_node("Relu", ["c0"], ["a0"], name="act0"),
             helper.make_node("Conv", ["a0", "w1", "b1"], ["y"], name="conv1")]
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 16, 16])], inits)
    return _save(graph, path)


@pytest.fixture
def photos(tmp_path, rng) -> Path:
    root = tmp_path / "photos"
    _write_photos(root, rng, n=10)
    return root


def _quantizer(tmp_path, rng, photos, name="q", build=_two_convs, **overrides) -> ModelQuantizer:
    return _search_quantizer(build(tmp_path / f"{name}.onnx", rng), photos, tmp_path, name=f"{name}.work", **overrides)


def _forward(model, x: np.ndarray, weights=None, codes=None) -> np.ndarray:
    """Slow and obvious float64 pass of a graph of 1x1 Convs and Relus. ``weights``: initializer name -> values
    used instead of the model's; ``codes``: tensor name -> (scale, zero point) of the uint8 codes it is rounded to
    where it is computed (or, for the graph input, before anything reads it)."""
    inits = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    inits.update({k: np.asarray(v, np.float64) for k, v in (weights or {}).items()})
    codes = codes or {}

    def rounded(name, value):
        if name not in codes:
            return value
        scale, zero = codes[name]
        return (np.clip(np.rint(value / scale) + zero, 0, 255) - zero) * scale

    values = {model.graph.input[0].name: rounded(model.graph.input[0].name, x.astype(np.float64))}
    for node in model.graph.node:
        if node.op_type == "Conv":
            w, b = inits[node.input[1]], inits[node.input[2]]
            out = np.einsum("oc,nchw->nohw", w[:, :, 0, 0], values[node.input[0]]) + b[None, :, None, None]
        elif node.op_type == "Relu":
            out = np.maximum(values[node.input[0]], 0.0)
        else:
            raise AssertionError(f"the oracle has no {node.op_type}")
        values[node.output[0]] = rounded(node.output[0], out)
    return values[model.graph.output[0].name]


def _per_channel_int8(w: np.ndarray) -> np.ndarray:
    """Symmetric per-output-channel int8 rounding, as onnxruntime quantises int8 weights."""
    scale = np.abs(w).reshape(w.shape[0], -1).max(axis=1).reshape(-1, 1, 1, 1) / 127
    return np.clip(np.rint(w / scale), -127, 127) * scale


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    """The model run as the runtime's sessions run it (its session config)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), sess_options=session_options(ort), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0].astype(np.float64)


def _activation_codes(part_model, float_model):
    """Float tensor name -> (scale, zero point) of each ``QuantizeLinear`` of ``part_model``: the tensor it reads, or
    the output of the float model's node of the same name as the node that writes it."""
    producer = {o: n for n in part_model.graph.node for o in n.output}
    float_nodes = {n.name: n for n in float_model.graph.node}
    inits = {i.name: numpy_helper.to_array(i) for i in part_model.graph.initializer}
    codes = {}
    for node in part_model.graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        writer = producer.get(node.input[0])
        name = node.input[0] if writer is None else float_nodes[writer.name].output[list(writer.output).index(
            node.input[0])]
        codes[name] = (float(inits[node.input[1]]), int(inits[node.input[2]]))
    return codes


@pytest.mark.parametrize("float_tail", [0, 1])
def test_each_part_matches_the_float_model_with_only_that_part_rounded(tmp_path, rng, photos, float_tail):
    q = _quantizer(tmp_path, rng, photos, float_tail=float_tail)
    x = next(iter(q.probe_feeds(1)[0].values()))
    float_weights = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in q.model.graph.initializer
                     if i.name.startswith("w")}
    assert sorted(float_weights) == ["w0", "w1"]

    weights_counts = q.quantize_part(tmp_path / "weights.onnx", "weights")
    weights_model = onnx.load(str(tmp_path / "weights.onnx"))
    # The float model's graph: the quantiser drops what a rounding does (a Relu), the float model has it.
    assert [(n.name, n.op_type) for n in weights_model.graph.node] == [(n.name, n.op_type) for n in q.model.graph.node]
    # The float tail's weights are int8 too (tail_int8_weights), its activations float either way.
    expected = _forward(q.model, x, weights={k: _per_channel_int8(v) for k, v in float_weights.items()})
    got = _run(tmp_path / "weights.onnx", x)
    # Only the biases' int32 rounding (a step of input scale x weight scale) is left.
    assert np.abs(got - expected).max() < 1e-4 * np.abs(expected).max()
    assert np.abs(got - _forward(q.model, x)).max() > 1e-3 * np.abs(expected).max()  # the weights did round

    act_counts = q.quantize_part(tmp_path / "activations.onnx", "activations")
    act_model = onnx.load(str(tmp_path / "activations.onnx"))
    codes = _activation_codes(act_model, q.model)
    assert "x" in codes and len(codes) == act_counts["activation_pairs"] == weights_counts["activation_pairs"]
    act_inits = {i.name: numpy_helper.to_array(i) for i in act_model.graph.initializer}
    conv_weights = [act_inits[n.input[1]] for n in act_model.graph.node if n.op_type == "Conv"]
    assert all(w.dtype == np.float32 for w in conv_weights)
    assert [w.tolist() for w in conv_weights] == [float_weights[k].astype(np.float32).tolist() for k in ("w0", "w1")]
    expected = _forward(q.model, x, codes=codes)
    got = _run(tmp_path / "activations.onnx", x)
    # float32 against float64 arithmetic moves a value across a rounding boundary now and then: one code.
    off = np.abs(got - expected) > 1e-4 * np.abs(expected).max()
    assert off.mean() < 0.01
    # The same activation codes as the INT8 model: its scales and zero points, name for name.
    q.quantize(tmp_path / "all.onnx")
    int8_model = onnx.load(str(tmp_path / "all.onnx"))
    assert _activation_codes(int8_model, q.model) == codes
    if not float_tail:
        assert "Relu" not in {n.op_type for n in int8_model.graph.node}  # what the weights part must put back


def test_the_activations_part_has_the_int8_models_hard_sigmoid_rewrites(tmp_path, rng, photos):
    """The rewrites of quantised hard sigmoids move activation codes, so the activations part has them: the same ops as
    the INT8 model but for the weights' and biases' DequantizeLinear."""
    q = _quantizer(tmp_path, rng, photos, build=_chain_model)
    report = q.quantize(tmp_path / "all.onnx")
    assert report.clip_hard_sigmoids or report.integer_hard_sigmoids
    replaced = q.quantize_part(tmp_path / "activations.onnx", "activations")
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "activations.onnx")).graph.node)
    expected = Counter(n.op_type for n in onnx.load(str(tmp_path / "all.onnx")).graph.node)
    expected["DequantizeLinear"] -= replaced["constants"]
    assert ops == expected


def test_the_parts_together_are_the_int8_model(tmp_path, rng, photos):
    """Noise of separate tensors adds up: the two parts' output noise powers add up to about the whole model's."""
    q = _quantizer(tmp_path, rng, photos)
    feeds = q.probe_feeds(2)
    noise = {}
    for name in ("weights", "activations", "all"):
        path = tmp_path / f"{name}.onnx"
        if name == "all":
            q.quantize(path)
        else:
            q.quantize_part(path, name)
        agreement = compare_outputs(q.source, path, feeds)
        noise[name] = sum(10 ** (-o.sqnr_db / 10) for o in agreement.values())
    assert 0.5 < (noise["weights"] + noise["activations"]) / noise["all"] < 2.0
    assert noise["weights"] < noise["all"] and noise["activations"] < noise["all"]


def test_verify_parts_puts_back_the_searched_model_and_checks_each_part(tmp_path, rng, photos):
    q = _quantizer(tmp_path, rng, photos)
    out = tmp_path / "out.onnx"
    q.quantize(out)
    before = out.read_bytes()
    seen = []

    def check(path):
        seen.append(path.read_bytes())
        return len(seen) == 1, [] if len(seen) == 1 else ["too far"], {"sqnr_db": float(len(seen))}

    parts = verify_parts(q, out, check)
    assert out.read_bytes() == before and not list(tmp_path.glob(".out.onnx*"))
    assert len(seen) == 2 and before not in seen and seen[0] != seen[1]
    assert parts == {"weights": {"passed": True, "failures": [], "figures": {"sqnr_db": 1.0}},
                     "activations": {"passed": False, "failures": ["too far"], "figures": {"sqnr_db": 2.0}}}


def test_the_search_verifies_the_parts_only_when_every_block_int8_fails(tmp_path, rng, photos):
    q = _quantizer(tmp_path, rng, photos)
    feeds = q.probe_feeds(2)

    def check_at(threshold):
        def check(path):
            sqnr = min(o.sqnr_db for o in compare_outputs(q.source, path, feeds).values())
            return sqnr >= threshold, [] if sqnr >= threshold else [f"sqnr {sqnr:.1f}"], {"sqnr_db": sqnr}
        return check

    passing = search_int8(q, tmp_path / "a.onnx", check_at(-100.0))
    assert passing.parts == {} and passing.record()["int8_parts"] == {}
    failing = search_int8(q, tmp_path / "b.onnx", check_at(1000.0))
    record = failing.record()["int8_parts"]
    assert set(record) == {"weights", "activations"} and not any(r["passed"] for r in record.values())
    # Each part keeps part of the noise: both are closer to the float model than every block INT8.
    first = failing.steps[0].figures["sqnr_db"]
    assert all(r["figures"]["sqnr_db"] > first for r in record.values())


def test_what_has_no_parts_is_refused(tmp_path, rng, photos):
    dynamic = _quantizer(tmp_path, rng, None, name="dyn", mode="dynamic")
    with pytest.raises(InvalidInputError, match="static QDQ"):
        dynamic.quantize_part(tmp_path / "d.onnx", "weights")
    q = _quantizer(tmp_path, rng, photos)
    with pytest.raises(InvalidInputError, match="part must be one of weights, activations"):
        q.quantize_part(tmp_path / "p.onnx", "biases")
    with pytest.raises(InvalidInputError, match="cannot overwrite its float source"):
        q.quantize_part(q.source, "weights")
    q.quantize(tmp_path / "all.onnx")
    model = onnx.load(str(tmp_path / "all.onnx"))
    # A DequantizeLinear of a computed tensor that no QuantizeLinear wrote: not a QDQ model.
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("_Output"))
    quant = next(n for n in model.graph.node if dq.input[0] in n.output)
    quant.op_type = "Identity"
    del quant.input[1:]
    with pytest.raises(ConversionError, match="neither a constant nor a QuantizeLinear"):
        keep_int8_part(model, q.model, "weights")
    # A pair whose two halves use different scales is no rounding of one tensor.
    model = onnx.load(str(tmp_path / "all.onnx"))
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("_Output"))
    other = next(i for i in model.graph.initializer if i.name == dq.input[1])
    model.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(other) * 2, "doubled"))
    dq.input[1] = "doubled"
    with pytest.raises(ConversionError, match="different scales"):
        keep_int8_part(model, q.model, "activations")
    # A constant whose reader the float model lacks.
    model = onnx.load(str(tmp_path / "all.onnx"))
    next(n for n in model.graph.node if n.op_type == "Conv").name = "renamed"
    for part in ("weights", "activations"):
        with pytest.raises(ConversionError, match="renamed: input [12] is in only one of the quantised and the float"):
            keep_int8_part(model, q.model, part)
    # A float tensor of another shape than the one quantised.
    model = onnx.load(str(tmp_path / "all.onnx"))
    other = onnx.ModelProto()
    other.CopyFrom(q.model)
    weight = next(i for i in other.graph.initializer if i.name == "w0")
    weight.CopyFrom(numpy_helper.from_array(np.zeros((8, 3, 3, 3), np.float32), "w0"))
    with pytest.raises(ConversionError, match="conv0: input 1 has no float tensor of the quantised one's shape"):
        keep_int8_part(model, other, "activations")


def test_the_runtime_keeps_a_float_layer_between_quantised_tensors_float(tmp_path, rng):
    """onnxruntime's WeightBiasQuantization would round the float weights of a Conv that reads a DequantizeLinear and
    whose output is quantised to one int8 scale when the session loads; the runtime's sessions turn it off."""
    w = rng.normal(0, 1, (4, 3, 1, 1)).astype(np.float32)
    w[0] *= 50  # one wide channel: a per-tensor int8 scale then rounds the others coarsely
    scale, zero = np.float32(0.05), np.uint8(128)
    out_scale = np.float32(0.25)
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="quant"),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"], name="dequant"),
         helper.make_node("Conv", ["d", "w"], ["c"], name="conv"),
         helper.make_node("QuantizeLinear", ["c", "os", "z"], ["cq"], name="quant_out"),
         helper.make_node("DequantizeLinear", ["cq", "os", "z"], ["y"], name="dequant_out")],
        "dq_conv_q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [numpy_helper.from_array(np.array(scale), "s"), numpy_helper.from_array(np.array(zero), "z"),
         numpy_helper.from_array(np.array(out_scale), "os"), numpy_helper.from_array(w, "w")])
    _save(graph, tmp_path / "m.onnx")
    x = rng.normal(0, 2, (1, 3, 8, 8)).astype(np.float32)

    def rounded(v, step):
        return (np.clip(np.rint(v / step) + 128, 0, 255) - 128) * np.float64(step)

    expected = rounded(np.einsum("oc,nchw->nohw", w[:, :, 0, 0].astype(np.float64), rounded(x, scale)), out_scale)
    session = OnnxRuntimeSession.from_file(tmp_path / "m.onnx", threads=1)
    got = session.run({"x": x})[0]
    # float32 against float64 arithmetic may move a value across a rounding boundary now and then: one code.
    assert (np.abs(got - expected) > 1e-4).mean() < 0.02


def test_a_model_with_subgraphs_is_not_taken_apart(tmp_path, rng, photos):
    q = _quantizer(tmp_path, rng, photos)
    q.quantize(tmp_path / "all.onnx")
    model = onnx.load(str(tmp_path / "all.onnx"))
    branch = helper.make_graph([helper.make_node("Identity", ["y"], ["z"])], "branch", [],
                               [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)])
    model.graph.node.append(helper.make_node("If", ["cond"], ["w"], name="if", then_branch=branch, else_branch=branch))
    with pytest.raises(ConversionError, match="subgraphs"):
        keep_int8_part(model, q.model, "weights")


def test_a_quantised_model_onnxruntime_cannot_load_is_not_published(tmp_path):
    import onnxruntime as ort

    from edge_shitu_converters.quantize import _publish

    graph = helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["y"], domain="example.none")], "bad",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("example.none", 1)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "bad.onnx"))
    with pytest.raises(ConversionError, match="src.onnx: onnxruntime cannot load the quantised model"):
        _publish(ort, tmp_path / "bad.onnx", tmp_path / "out.onnx", Path("src.onnx"))
    assert not (tmp_path / "out.onnx").exists() and not list(tmp_path.glob(".out.onnx*"))
