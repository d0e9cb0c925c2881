"""Kernel-friendly convolution shapes (edge_shitu_converters.kernel_shapes): each rewritten QDQ model against its
original, bit for bit, through onnxruntime's fused integer kernels (which must still take every convolution), over
stem geometries and channel groups; the graphs left alone. The replica detector's case is in test_quantize.py."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
quantization = pytest.importorskip("onnxruntime.quantization", reason="onnxruntime.quantization needs ml_dtypes")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from conftest import add_subgraph_reader  # noqa: E402
from edge_shitu_converters.kernel_shapes import (  # noqa: E402
    PAD_MAX_GROWTH,
    STEM_MAX_CHANNELS,
    pad_depthwise_channels,
    space_to_depth_stems,
)


def _float_model(rng, *, channels=3, size=(16, 16), kernel=(3, 3), pads=(1, 1, 1, 1), strides=(2, 2),
                 dilations=(1, 1), width=40, batch="N", concat=False, dw_output=False, bias=True, second_stem=False):
    """x (batch, channels, H, W) -> stem Conv (width, kernel, strides, pads) -> hard-swish -> depthwise 3x3 Conv
    -> Relu -> 1x1 Conv (16) = y. ``concat``: the hard-swish output, concatenated with itself along the
    channels, feeds a second 1x1 Conv (16) = y2; ``dw_output``: the depthwise output is a graph output;
    ``bias``: False leaves every Conv without one; ``second_stem``: another stem Conv of x is output y3."""
    def t(name, arr):
        return numpy_helper.from_array(np.asarray(arr, np.float32), name)

    inits = [t("w0", rng.normal(0, 0.4, (width, channels, *kernel))), t("b0", rng.normal(0, 0.2, width)),
             t("w1", rng.normal(0, 0.4, (width, 1, 3, 3))), t("b1", rng.normal(0, 0.2, width)),
             t("w2", rng.normal(0, 0.2, (16, width, 1, 1))), t("b2", rng.normal(0, 0.2, 16)),
             t("w3", rng.normal(0, 0.2, (16, 2 * width, 1, 1)))]
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="stem", kernel_shape=list(kernel), pads=list(pads),
                         strides=list(strides), dilations=list(dilations)),
        helper.make_node("HardSigmoid", ["c0"], ["h0"], name="gate", alpha=1 / 6, beta=0.5),
        helper.make_node("Mul", ["c0", "h0"], ["s0"], name="swish"),
        helper.make_node("Conv", ["s0", "w1", "b1"], ["c1"], name="dw", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                         group=width),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], name="pw", kernel_shape=[1, 1]),
    ]
    def out(name):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch, None, None, None])

    if second_stem:
        inits.append(t("w4", rng.normal(0, 0.4, (8, channels, *kernel))))
        nodes.append(helper.make_node("Conv", ["x", "w4"], ["y3"], name="stem2", kernel_shape=list(kernel),
                                      pads=list(pads), strides=list(strides), dilations=list(dilations)))
    if not bias:
        for node in nodes:
            del node.input[2:]
        inits = [i for i in inits if not i.name.startswith("b")]
    outputs = [out("y")] + ([out("y3")] if second_stem else [])
    if concat:
        nodes += [helper.make_node("Concat", ["s0", "s0"], ["cat"], name="concat", axis=1),
                  helper.make_node("Conv", ["cat", "w3"], ["y2"], name="pw2", kernel_shape=[1, 1])]
        outputs.append(out("y2"))
    if dw_output:
        outputs.append(out("c1"))
    graph = helper.make_graph(nodes, "stem", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                            [batch, channels, *size])], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _quantized(model, rng, tmp_path: Path, shape, *, per_channel=True, weight_type="QInt8"):
    """The QDQ model onnxruntime's static quantiser writes (per-channel int8 weights, uint8 activations)."""
    source, target = tmp_path / "float.onnx", tmp_path / "qdq.onnx"
    onnx.save(model, str(source))
    feeds = [{"x": rng.uniform(-1, 1, shape).astype(np.float32)} for _ in range(4)]

    class Reader(quantization.CalibrationDataReader):
        def __init__(self):
            self.feeds = iter(feeds)

        def get_next(self):
            return next(self.feeds, None)

    quantization.quantize_static(str(source), str(target), Reader(), quant_format=quantization.QuantFormat.QDQ,
                                 per_channel=per_channel, activation_type=quantization.QuantType.QUInt8,
                                 weight_type=getattr(quantization.QuantType, weight_type))
    return onnx.load(str(target))


def _session(model, optimized: Path = None):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _fused_ops(model, tmp_path: Path, name: str) -> collections.Counter:
    """Op counts of the graph onnxruntime runs (after its QDQ fusion)."""
    path = tmp_path / f"{name}-optimized.onnx"
    _session(model, path)
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _assert_same_outputs(original, rewritten, rng, shape, runs=3):
    a, b = _session(original), _session(rewritten)
    for _ in range(runs):
        x = {"x": rng.uniform(-1.5, 1.5, shape).astype(np.float32)}
        for got, want in zip(b.run(None, x), a.run(None, x)):
            assert got.shape == want.shape and np.array_equal(got, want)


def _copy(model):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


@pytest.mark.parametrize("channels,size,kernel,pads", [
    (3, (16, 16), (3, 3), (1, 1, 1, 1)),    # the PP-LCNet stems
    (3, (16, 16), (3, 3), (0, 0, 0, 0)),
    (3, (16, 24), (3, 3), (0, 0, 1, 1)),    # asymmetric padding, a rectangle
    (1, (12, 20), (5, 5), (2, 2, 2, 2)),
    (4, (16, 16), (2, 2), (0, 0, 0, 0)),
    (3, (16, 16), (4, 4), (1, 1, 2, 2)),
    (2, (10, 14), (1, 1), (0, 0, 0, 0)),
    (3, (16, 16), (3, 5), (1, 2, 1, 2)),    # kernel and padding differ per axis
])
def test_space_to_depth_stem_gives_the_same_codes_on_integer_kernels(channels, size, kernel, pads, rng, tmp_path):
    shape = (2, channels, *size)
    original = _quantized(_float_model(rng, channels=channels, size=size, kernel=kernel, pads=pads, width=32),
                          rng, tmp_path, shape)
    rewritten = _copy(original)
    assert space_to_depth_stems(rewritten) == ("stem",)
    onnx.checker.check_model(rewritten)
    stem = next(n for n in rewritten.graph.node if n.name == "stem")
    attrs = {a.name: helper.get_attribute_value(a) for a in stem.attribute}
    assert attrs["strides"] == [1, 1]
    assert [n.op_type for n in rewritten.graph.node].count("SpaceToDepth") == 1
    # The image's old quantiser and dequantiser and the stem's old weights are gone.
    producer = {o: n for n in original.graph.node for o in n.output}
    stem = next(n for n in original.graph.node if n.name == "stem")
    old_dq = producer[stem.input[0]]
    old = {old_dq.output[0], old_dq.input[0], producer[stem.input[1]].output[0]}
    assert not old & {o for n in rewritten.graph.node for o in n.output}
    assert producer[stem.input[1]].input[0] not in {i.name for i in rewritten.graph.initializer}
    _assert_same_outputs(original, rewritten, rng, shape)
    before, after = _fused_ops(original, tmp_path, "a"), _fused_ops(rewritten, tmp_path, "b")
    assert after["QLinearConv"] == before["QLinearConv"] == 3 and after["Conv"] == before["Conv"] == 0


@pytest.mark.parametrize("change", [
    dict(channels=STEM_MAX_CHANNELS + 1),
    dict(size=(15, 16)),
    dict(size=(16, 17)),
    dict(strides=(1, 1)),
    dict(strides=(2, 1)),
    dict(dilations=(2, 2), pads=(2, 2, 2, 2)),
])
def test_space_to_depth_leaves_other_convolutions(change, rng, tmp_path):
    settings = dict(channels=3, size=(16, 16))
    settings.update(change)
    model = _quantized(_float_model(rng, width=32, **settings), rng, tmp_path, (1, settings["channels"],
                                                                              *settings["size"]))
    before = model.SerializeToString()
    assert space_to_depth_stems(model) == ()
    assert model.SerializeToString() == before


def test_space_to_depth_needs_a_known_even_size(rng, tmp_path):
    model = _quantized(_float_model(rng, size=("H", "W"), width=32), rng, tmp_path, (1, 3, 16, 16))
    assert space_to_depth_stems(model) == ()


def test_a_depthwise_group_is_padded_to_the_multiple_and_gives_the_same_codes(rng, tmp_path):
    shape = (2, 3, 16, 16)
    original = _quantized(_float_model(rng, width=40), rng, tmp_path, shape)
    rewritten = _copy(original)
    assert pad_depthwise_channels(rewritten) == ("dw",)
    onnx.checker.check_model(rewritten)
    inits = {i.name: numpy_helper.to_array(i) for i in rewritten.graph.initializer}
    weights = {n.name: inits[[p for p in rewritten.graph.node if p.output[0] == n.input[1]][0].input[0]]
               for n in rewritten.graph.node if n.op_type == "Conv"}
    assert weights["stem"].shape == (48, 3, 3, 3) and not weights["stem"][40:].any()
    assert weights["dw"].shape == (48, 1, 3, 3) and not weights["dw"][40:].any()
    assert weights["pw"].shape == (16, 48, 1, 1) and not weights["pw"][:, 40:].any()
    dw = next(n for n in rewritten.graph.node if n.name == "dw")
    assert {a.name: helper.get_attribute_value(a) for a in dw.attribute}["group"] == 48
    _assert_same_outputs(original, rewritten, rng, shape)
    # The padded convolutions must still fuse into integer kernels (the new bias scales make that so).
    before, after = _fused_ops(original, tmp_path, "a"), _fused_ops(rewritten, tmp_path, "b")
    assert after["QLinearConv"] == before["QLinearConv"] == 3 and after["Conv"] == before["Conv"] == 0


def test_both_rewrites_together_give_the_same_codes(rng, tmp_path):
    shape = (1, 3, 32, 32)
    original = _quantized(_float_model(rng, size=(32, 32), width=40), rng, tmp_path, shape)
    rewritten = _copy(original)
    assert space_to_depth_stems(rewritten) == ("stem",)
    assert pad_depthwise_channels(rewritten) == ("dw",)
    _assert_same_outputs(original, rewritten, rng, shape)
    assert _fused_ops(rewritten, tmp_path, "b")["QLinearConv"] == 3


@pytest.mark.parametrize("width,multiple,padded", [
    (40, 16, True),
    (48, 16, False),                        # already a multiple
    (20, 16, False),                        # 32 would be more than PAD_MAX_GROWTH times 20
    (20, 8, True),                          # 24 is not
])
def test_padding_follows_the_multiple_and_the_growth_limit(width, multiple, padded, rng, tmp_path):
    assert PAD_MAX_GROWTH == 1.25  # the cases above are chosen around it
    shape = (1, 3, 16, 16)
    original = _quantized(_float_model(rng, width=width), rng, tmp_path, shape)
    rewritten = _copy(original)
    assert pad_depthwise_channels(rewritten, multiple) == (("dw",) if padded else ())
    _assert_same_outputs(original, rewritten, rng, shape, runs=1)


@pytest.mark.parametrize("change", [dict(concat=True), dict(dw_output=True)])
def test_a_group_read_by_other_ops_or_leaving_the_graph_is_not_padded(change, rng, tmp_path):
    model = _quantized(_float_model(rng, width=40, **change), rng, tmp_path, (1, 3, 16, 16))
    before = model.SerializeToString()
    assert pad_depthwise_channels(model) == ()
    assert model.SerializeToString() == before


@pytest.mark.parametrize("multiple", [1, 0, True, 16.0, "16"])
def test_pad_multiple_is_checked(multiple, rng, tmp_path):
    model = _quantized(_float_model(rng, width=40), rng, tmp_path, (1, 3, 16, 16))
    with pytest.raises(ValueError, match="multiple"):
        pad_depthwise_channels(model, multiple)


def test_float_models_are_left_alone(rng):
    model = _float_model(rng, width=40)
    before = model.SerializeToString()
    assert space_to_depth_stems(model) == () and pad_depthwise_channels(model) == ()
    assert model.SerializeToString() == before


def _both(model):
    return space_to_depth_stems(model) + pad_depthwise_channels(model)


@pytest.mark.parametrize("per_channel, bias", [(False, True), (True, False), (False, False)])
def test_per_tensor_weights_and_convolutions_without_bias(per_channel, bias, rng, tmp_path):
    shape = (1, 3, 16, 16)
    original = _quantized(_float_model(rng, bias=bias), rng, tmp_path, shape, per_channel=per_channel)
    rewritten = _copy(original)
    assert _both(rewritten) == ("stem", "dw")
    _assert_same_outputs(original, rewritten, rng, shape)
    assert _fused_ops(rewritten, tmp_path, "b")["QLinearConv"] == _fused_ops(original, tmp_path, "a")["QLinearConv"]


def test_weights_with_zero_points_are_left_alone(rng, tmp_path):
    """uint8 weights have non-zero zero points: a code 0 is no weight 0, so no zeros can be added."""
    model = _quantized(_float_model(rng), rng, tmp_path, (1, 3, 16, 16), weight_type="QUInt8")
    before = model.SerializeToString()
    assert _both(model) == ()
    assert model.SerializeToString() == before


def test_unnamed_nodes_get_names_and_the_same_codes(rng, tmp_path):
    shape = (1, 3, 16, 16)
    original = _quantized(_float_model(rng), rng, tmp_path, shape)
    for node in original.graph.node:
        node.name = ""
    rewritten = _copy(original)
    names = _both(rewritten)
    assert len(names) == 2 and all(names) and set(names) <= {n.name for n in rewritten.graph.node}
    _assert_same_outputs(original, rewritten, rng, shape)


def test_graphs_with_subgraphs_are_left_alone(rng, tmp_path):
    """A subgraph may read any outer tensor, which the rewrites' maps of readers do not see."""
    model = _quantized(_float_model(rng), rng, tmp_path, (1, 3, 16, 16))
    add_subgraph_reader(model, "y")
    before = model.SerializeToString()
    assert _both(model) == ()
    assert model.SerializeToString() == before


def test_recorded_shapes_of_changed_tensors_are_dropped(rng, tmp_path):
    """A model whose tensor shapes were inferred stays valid under the full check: shapes recorded for tensors
    that changed (the padded group, the widened weights) or went away are not left behind."""
    model = onnx.shape_inference.infer_shapes(_quantized(_float_model(rng), rng, tmp_path, (1, 3, 16, 16)))
    assert len(model.graph.value_info) > 10
    assert _both(model) == ("stem", "dw")
    onnx.checker.check_model(model, full_check=True)


def test_two_stems_of_one_image_are_both_rewritten_and_the_old_quantised_image_goes(rng, tmp_path):
    shape = (1, 3, 16, 16)
    original = _quantized(_float_model(rng, second_stem=True), rng, tmp_path, shape)
    producer = {o: n for n in original.graph.node for o in n.output}
    stems = [n for n in original.graph.node if n.name in ("stem", "stem2")]
    old = {producer[s.input[0]].output[0] for s in stems} | {producer[s.input[0]].input[0] for s in stems}
    rewritten = _copy(original)
    assert space_to_depth_stems(rewritten) == ("stem", "stem2")
    # Nothing computes the full-size quantised image any more (the old quantiser and dequantisers are gone).
    assert not old & {o for n in rewritten.graph.node for o in n.output}
    _assert_same_outputs(original, rewritten, rng, shape)


def test_a_rewrite_leaves_unrelated_dead_nodes_alone(rng, tmp_path):
    model = _quantized(_float_model(rng), rng, tmp_path, (1, 3, 16, 16))
    model.graph.initializer.append(numpy_helper.from_array(np.ones(4, np.float32), "unused_value"))
    model.graph.node.append(helper.make_node("Relu", ["unused_value"], ["unused"], name="unused_relu"))
    assert _both(model) == ("stem", "dw")
    assert "unused_relu" in {n.name for n in model.graph.node}
    assert "unused_value" in {i.name for i in model.graph.initializer}
