"""Exact rewrites of a quantised ONNX model's convolutions into shapes onnxruntime's integer kernels run faster.

Both rewrites change which kernel onnxruntime picks, never a value: integer sums are exact, and the
weights they add are zeros of symmetric (zero point 0) int8 weights, the quantiser's default; models with
other weight zero points, and graphs with subgraphs, are left as they are. The rewritten model's outputs
are bit-identical to the original's (tests/test_kernel_shapes.py on random models,
tests/test_quantize.py on the replica detector).

- **Space-to-depth stems** (:func:`space_to_depth_stems`). A stride-2 convolution of an image with 3
  channels reaches only a few GMAC/s in ``QLinearConv``: its im2col rows are 27 values long. Every
  output pixel of a stride-2 convolution reads whole 2x2 cells of its input, so the same sums come from
  a stride-1 convolution over the cells (``SpaceToDepth``: 4x the channels, half the height and width)
  with the weights re-laid, zeros where a cell position falls outside the original kernel. On the
  replica detector the 3 -> 40 channel stem went from 10-15 ms to about 3 ms, plus 0.8 ms for the
  ``SpaceToDepth``.
- **Depthwise channels padded** (:func:`pad_depthwise_channels`). onnxruntime's integer depthwise
  kernel runs about twice as fast on a channel count that is a multiple of 16 (3x3 on 320x320:
  40 channels 5.9 ms, 48 channels 3.0 ms). The convolution that makes the channels gets zero filters,
  the depthwise one zero filters, and the convolutions that read the result zero weights for the new
  channels, so the extra channels never reach an output.

Figures: docs/benchmarks.md, "Kernel-friendly convolution shapes".
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

import numpy as np

from edge_shitu_converters.onnx_graph import GraphIndex, drop_unread

__all__ = ["space_to_depth_stems", "pad_depthwise_channels", "STEM_MAX_CHANNELS", "PAD_MAX_GROWTH"]

# A stem is rewritten only for image-like inputs: with more input channels im2col rows are long enough
# for the kernel already, and the rewrite's extra multiplications by zero (16/9 for 3x3) would cost.
STEM_MAX_CHANNELS = 4

# A depthwise group is padded only when it grows by at most this factor: the depthwise kernel gains
# about 2x, while the convolution that makes the channels and the element-wise ops between them grow by it.
PAD_MAX_GROWTH = 1.25

# Ops that treat every channel alike, with per-tensor (scalar) constants: the padded channels pass through.
_ELEMENTWISE = frozenset({
    "QuantizeLinear", "DequantizeLinear", "Add", "Sub", "Mul", "Div", "HardSigmoid", "HardSwish", "Relu",
    "LeakyRelu", "Clip", "Sigmoid", "Identity",
})


def _scalar_constant(g: GraphIndex, name: str) -> bool:
    """An omitted input, an initializer of one value, or a Q/DQ of such initializers only."""
    if not name or g.scalar(name) is not None:
        return True
    if name in g.inits:
        return False
    node = g.producer.get(name)
    return (node is not None and node.op_type in ("QuantizeLinear", "DequantizeLinear")
            and all(g.scalar(i) is not None for i in node.input if i))


def _weight(g: GraphIndex, node: Any) -> Optional[Tuple[Any, np.ndarray]]:
    """``(DequantizeLinear node, int weights)`` of a 2-D Conv whose weights are a DQ of an initializer used by
    nothing else, with zero points 0 (or none), so that a code 0 is a weight 0; else None."""
    dq = g.producer.get(node.input[1]) if len(node.input) > 1 else None
    if dq is None or dq.op_type != "DequantizeLinear" or len(g.consumers.get(dq.output[0], [])) != 1:
        return None
    values = g.array(dq.input[0])
    if values is None or values.ndim != 4 or len(g.consumers.get(dq.input[0], [])) != 1:
        return None
    zero = g.array(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
    if len(dq.input) > 2 and dq.input[2] and (zero is None or zero.any()):
        return None
    return dq, values


def _attrs(node: Any) -> Dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _shape_of(model: Any) -> Callable[[str], Optional[List[int]]]:
    """A lookup of a tensor's shape (unknown dims as -1): the graph's declared inputs and recorded shapes first,
    onnx's shape inference of the whole model only when a tensor is not among them (and then once)."""
    inferred: Dict[str, List[int]] = {}

    def dims(info: Any) -> List[int]:
        return [d.dim_value if d.HasField("dim_value") else -1 for d in info.type.tensor_type.shape.dim]

    declared = {info.name: dims(info) for info in (*model.graph.input, *model.graph.value_info)
                if info.type.tensor_type.HasField("shape")}

    def lookup(name: str) -> Optional[List[int]]:
        if name in declared:
            return declared[name]
        if not inferred:
            from onnx import shape_inference

            graph = shape_inference.infer_shapes(model).graph
            inferred.update({info.name: dims(info) for info in (*graph.value_info, *graph.input, *graph.output)})
            inferred.setdefault("", [])  # inferred once, even when it found nothing
        return inferred.get(name)

    return lookup


def space_to_depth_stems(model: Any) -> Tuple[str, ...]:
    """Rewrite each quantised stride-2 image convolution as ``SpaceToDepth`` + a stride-1 convolution (in place).

    A Conv is rewritten when: its input is a ``DequantizeLinear`` of a ``QuantizeLinear`` (per tensor)
    of a float 4-D tensor with at most :data:`STEM_MAX_CHANNELS` channels and a known, even height and
    width (the image input of a QDQ model); its weights are a ``DequantizeLinear`` of an initializer
    used by nothing else; ``group`` 1, strides 2x2, dilations 1. The 2x2 cells are formed on the float
    tensor (``SpaceToDepth`` has float kernels in every onnxruntime; 8-bit ones only since 2026, and a
    6-D ``Transpose`` of 8-bit values took longer than the convolution saves) and quantised with the
    same scale and zero point, so the codes are the same values re-laid. Padding stays exact: a padded
    cell holds the zero point, as the original padding did.

    Args:
      model: an ``onnx.ModelProto`` (opset >= 13), e.g. the QDQ output of ``quantize_static``; its nodes
        stay in topological order.

    Returns:
      Names of the rewritten Conv nodes (an unnamed one gets a name), in graph order; none for a graph with
      subgraphs (``If``, ``Loop``), whose reads of outer tensors are not followed. Weights with non-zero zero
      points are left alone (their code 0 is no weight 0).

    Raises:
      Nothing of its own: a node that does not fit is left as it is.
    """
    from onnx import helper, numpy_helper

    g = GraphIndex(model)
    if g.has_subgraphs:
        return ()
    shape_of = _shape_of(model)
    done: List[str] = []
    nodes: List[Any] = []
    replaced: Set[str] = set()   # first outputs of the old weight DQs, input DQs and image quantisers
    old_weights: Set[str] = set()
    for node in g.graph.node:
        plan = _stem_plan(g, node, shape_of) if node.op_type == "Conv" else None
        if plan is None:
            nodes.append(node)
            continue
        quantizer, source, weight_dq, weights, begins, (rows, cols) = plan
        base = node.name or g.fresh(f"Conv_{len(done)}")
        names = {key: g.fresh(f"{base}_s2d_{key}")
                 for key in ("cells", "quantized", "input", "weights", "weights_dq")}
        cells = _cell_weights(weights, begins, rows, cols)
        g.graph.initializer.append(numpy_helper.from_array(cells, names["weights"]))
        nodes += [
            helper.make_node("SpaceToDepth", [quantizer.input[0]], [names["cells"]], blocksize=2, name=names["cells"]),
            helper.make_node("QuantizeLinear", [names["cells"], *quantizer.input[1:]], [names["quantized"]],
                             name=names["quantized"], **_attrs(quantizer)),
            helper.make_node("DequantizeLinear", [names["quantized"], *source.input[1:]], [names["input"]],
                             name=names["input"], **_attrs(source)),
            helper.make_node("DequantizeLinear", [names["weights"], *weight_dq.input[1:]], [names["weights_dq"]],
                             name=names["weights_dq"], **_attrs(weight_dq)),
            helper.make_node("Conv", [names["input"], names["weights_dq"], *node.input[2:]], list(node.output),
                             name=base, group=1, kernel_shape=[rows[0], cols[0]], strides=[1, 1], dilations=[1, 1],
                             pads=[rows[1], cols[1], rows[2], cols[2]]),
        ]
        done.append(base)
        replaced |= {weight_dq.output[0], source.output[0], quantizer.output[0]}
        old_weights.add(weight_dq.input[0])
    if done:
        del g.graph.node[:]
        g.graph.node.extend(nodes)
        # The old weights go; the old input DQs and image quantisers go once nothing else reads them (a quantiser
        # shared by several stems, once all of them are rewritten).
        drop_unread(g.graph, nodes=replaced, initializers=old_weights)
    return tuple(done)


def _stem_plan(g: GraphIndex, node: Any, shape_of: Callable[[str], Optional[List[int]]]
               ) -> Optional[Tuple[Any, Any, Any, np.ndarray, Tuple[int, int], Tuple[Tuple[int, int, int], ...]]]:
    """``(quantizer, input DQ, weight DQ, int weights (Cout, C, kh, kw), begin pads, (row, column geometry of
    :func:`_cell_geometry`))`` when ``node`` can be rewritten, else None."""
    attrs = _attrs(node)
    if (attrs.get("group", 1) != 1 or list(attrs.get("strides", [1, 1])) != [2, 2]
            or list(attrs.get("dilations", [1, 1])) != [1, 1] or attrs.get("auto_pad", b"NOTSET") != b"NOTSET"):
        return None
    source = g.producer.get(node.input[0])
    if (source is None or source.op_type != "DequantizeLinear"
            or not all(_scalar_constant(g, i) for i in source.input[1:])):
        return None
    quantizer = g.producer.get(source.input[0])
    if (quantizer is None or quantizer.op_type != "QuantizeLinear"
            or not all(_scalar_constant(g, i) for i in quantizer.input[1:])):
        return None
    weight = _weight(g, node)
    if weight is None:
        return None
    shape = shape_of(quantizer.input[0])
    if shape is None or len(shape) != 4:
        return None
    weight_dq, weights = weight
    _, channels, height, width = shape
    if not 0 < channels <= STEM_MAX_CHANNELS or weights.shape[1] != channels:
        return None
    if height <= 0 or width <= 0 or height % 2 or width % 2:
        return None
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    rows = _cell_geometry(height, pads[0], pads[2], weights.shape[2])
    cols = _cell_geometry(width, pads[1], pads[3], weights.shape[3])
    if rows is None or cols is None:
        return None
    return quantizer, source, weight_dq, weights, (pads[0], pads[1]), (rows, cols)


def _cell_geometry(size: int, begin: int, end: int, k: int) -> Optional[Tuple[int, int, int]]:
    """``(kernel, pad begin, pad end)`` along one axis of the stride-1 convolution over 2x2 cells.

    Output ``o`` of the original reads input ``2o - begin + t`` (``0 <= t < k``), i.e. cell ``o + d`` with
    ``d = (t - begin) // 2``: cells ``o + low`` to ``o + high``. The end padding is what gives the
    original's output size; None when that would need a negative one.
    """
    low, high = (0 - begin) // 2, (k - 1 - begin) // 2
    kernel = high - low + 1
    out = (size + begin + end - k) // 2 + 1
    pad_end = out - size // 2 + low + kernel - 1
    return (kernel, -low, pad_end) if pad_end >= 0 else None


def _cell_weights(weights: np.ndarray, begins: Tuple[int, int], rows: Tuple[int, int, int],
                  cols: Tuple[int, int, int]) -> np.ndarray:
    """Weights of the stride-1 convolution over 2x2 cells (zeros where a cell position is outside the kernel).

    Tap ``t`` of the original kernel (begin padding ``begin``) lies in cell ``d = (t - begin) // 2`` at position
    ``p = (t - begin) % 2``, i.e. at tap ``d + pad`` of the new kernel (``pad``: its begin padding); ``SpaceToDepth``'s
    channel for position ``(ph, pw)`` and input channel ``c`` is ``(2 ph + pw) C + c``.
    """
    out_channels, channels, kh, kw = weights.shape
    (kernel_h, pad_h, _), (kernel_w, pad_w, _) = rows, cols
    begin_h, begin_w = begins
    cells = np.zeros((out_channels, 4 * channels, kernel_h, kernel_w), weights.dtype)
    for th in range(kh):
        for tw in range(kw):
            (dh, ph), (dw, pw) = divmod(th - begin_h, 2), divmod(tw - begin_w, 2)
            first = (2 * ph + pw) * channels
            cells[:, first:first + channels, dh + pad_h, dw + pad_w] = weights[:, :, th, tw]
    return cells


def pad_depthwise_channels(model: Any, multiple: int = 16) -> Tuple[str, ...]:
    """Pad the channels of quantised depthwise convolutions to a multiple of ``multiple`` (in place).

    A depthwise Conv (``group`` = its input and output channels C, C not a multiple) is padded with
    its whole channel group: the tensors reachable from its input and output through element-wise
    ops with per-tensor constants (``Q``/``DQ``, ``Add``, ``Mul``, ``HardSigmoid``, ...). The group must
    start at convolutions with ``group`` 1 (they get zero filters for the new channels), end at
    convolutions with ``group`` 1 reading it as their input (they get zero weights for them), hold only
    depthwise convolutions of C channels besides, and reach no graph input or output and no other op
    (a ``Concat``, a pooling, a shape). Every convolution's weights must be a ``DequantizeLinear`` of an
    initializer used by it alone. Groups that grow by more than :data:`PAD_MAX_GROWTH` are left.

    Args:
      model: an ``onnx.ModelProto`` (opset >= 13) in QDQ form; its nodes stay in topological order.
      multiple: the channel multiple, >= 2.

    Returns:
      Names of the padded depthwise Conv nodes (an unnamed one gets a name), in graph order; none for a graph
      with subgraphs (``If``, ``Loop``), whose reads of outer tensors are not followed.

    Raises:
      ValueError: ``multiple`` below 2.
    """
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 2:
        raise ValueError(f"multiple must be an int >= 2, got {multiple!r}")
    g = GraphIndex(model)
    if g.has_subgraphs:
        return ()
    reshaped: Set[str] = set()
    padded: List[str] = []
    for node in g.graph.node:
        # A group padded already holds a multiple of channels now, and is passed over.
        channels = _depthwise_channels(g, node)
        if channels is None or channels % multiple == 0:
            continue
        target = -(-channels // multiple) * multiple
        if target > PAD_MAX_GROWTH * channels:
            continue
        group = _channel_group(g, node, channels)
        if group is None:
            continue
        tensors, heads, depthwise, tails = group
        extra = target - channels
        for conv in heads:
            _pad_filters(g, conv, extra)
        for conv in depthwise:
            _pad_filters(g, conv, extra)
            next(a for a in conv.attribute if a.name == "group").i = target
        for conv in tails:
            dq, values = _weight(g, conv)
            g.set_array(dq.input[0], np.pad(values, ((0, 0), (0, extra), (0, 0), (0, 0))))
        # Every tensor of the group, and the dequantised weights and biases, changed shape.
        reshaped |= tensors | {g.producer[i].output[0] for conv in (*heads, *depthwise, *tails)
                               for i in conv.input[1:3] if i in g.producer}
        for conv in depthwise:
            conv.name = conv.name or g.fresh("Conv_depthwise")
            padded.append(conv.output[0])
    if padded:
        kept = [v for v in g.graph.value_info if v.name not in reshaped]
        del g.graph.value_info[:]
        g.graph.value_info.extend(kept)
    return tuple(n.name for n in g.graph.node if n.op_type == "Conv" and n.output[0] in padded)


def _depthwise_channels(g: GraphIndex, node: Any) -> Optional[int]:
    """C of a depthwise Conv (``group`` = C, weights C x 1 x kh x kw) with DQ weights, else None."""
    if node.op_type != "Conv":
        return None
    weight = _weight(g, node)
    if weight is None:
        return None
    channels = weight[1].shape[0]
    return channels if weight[1].shape[1] == 1 and _attrs(node).get("group", 1) == channels > 1 else None


def _is_dense(g: GraphIndex, node: Any) -> bool:
    return node.op_type == "Conv" and _attrs(node).get("group", 1) == 1 and _weight(g, node) is not None


def _paddable(g: GraphIndex, conv: Any, *, filters: bool) -> bool:
    """Whether every initializer padding would change belongs to ``conv`` alone: its weights, and with
    ``filters`` their per-channel scale and zero point and its bias (an initializer, or a DQ of one)."""
    dq, _ = _weight(g, conv)
    names = [dq.input[0]]
    if filters:
        names += [i for i in dq.input[1:] if i]
        if len(conv.input) > 2 and conv.input[2]:
            source = g.producer.get(conv.input[2])
            if source is None:
                names.append(conv.input[2])
            elif source.op_type != "DequantizeLinear" or len(g.consumers.get(conv.input[2], [])) != 1:
                return False
            else:
                names += [i for i in source.input if i]
    return all(name in g.inits and len(g.consumers.get(name, [])) == 1 for name in names)


def _input_scale(g: GraphIndex, conv: Any) -> Optional[float]:
    """The per-tensor scale of a Conv's dequantised input, or None when it has none."""
    source = g.producer.get(conv.input[0])
    if source is None or source.op_type != "DequantizeLinear" or len(source.input) < 2:
        return None
    scale = g.array(source.input[1])
    return float(scale.reshape(())) if scale is not None and scale.size == 1 else None


def _channel_group(g: GraphIndex, start: Any, channels: int
                   ) -> Optional[Tuple[Set[str], List[Any], List[Any], List[Any]]]:
    """``(tensor names, head convs, depthwise convs, tail convs)`` of ``start``'s channel group (see
    :func:`pad_depthwise_channels`), or None when it cannot be padded."""
    tensors: Set[str] = set()
    queue: List[str] = []
    # Nodes are keyed by their first output, which a valid graph keeps unique (names may be empty).
    inside: Dict[str, Any] = {start.output[0]: start}
    heads: Dict[str, Any] = {}
    tails: Dict[str, Any] = {}

    def add(names: Iterable[str]) -> None:
        for name in names:
            if name and name not in tensors:
                tensors.add(name)
                queue.append(name)

    def enter(node: Any) -> bool:
        """Take an element-wise or depthwise node into the group; False if it cannot be."""
        if node.output[0] in inside:
            return True
        if node.op_type in _ELEMENTWISE:
            constants = [i for i in node.input if _scalar_constant(g, i)]
            # Q/DQ must be per tensor: scale and zero point are scalars.
            if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(constants) < len(node.input) - 1:
                return False
            if any(i in g.inits for i in node.input if i not in constants):
                return False
            inside[node.output[0]] = node
            add([i for i in node.input if i not in constants])
            add(node.output)
            return True
        if (_depthwise_channels(g, node) == channels and _input_scale(g, node) is not None
                and _paddable(g, node, filters=True)):
            inside[node.output[0]] = node
            add([node.input[0], node.output[0]])
            return True
        return False

    if _input_scale(g, start) is None or not _paddable(g, start, filters=True):
        return None
    add([start.input[0], start.output[0]])
    while queue:
        name = queue.pop()
        if name in g.boundary or name in g.inits:
            return None
        producer = g.producer.get(name)
        if producer is None:
            return None
        if producer.output[0] not in inside and producer.output[0] not in heads:
            if (_is_dense(g, producer) and producer.output[0] == name and _input_scale(g, producer) is not None
                    and _weight(g, producer)[1].shape[0] == channels and _paddable(g, producer, filters=True)):
                heads[name] = producer
            elif not enter(producer):
                return None
        for user in g.consumers.get(name, []):
            if user.output[0] in inside or user.output[0] in tails:
                continue
            if (_is_dense(g, user) and user.input[0] == name and name not in user.input[1:]
                    and _paddable(g, user, filters=False)):
                tails[user.output[0]] = user
            elif not enter(user) or (user.op_type == "Conv" and user.input[0] != name):
                return None
    if not heads or not tails:
        return None
    depthwise = [n for n in inside.values() if n.op_type == "Conv"]
    return tensors, list(heads.values()), depthwise, list(tails.values())


def _pad_filters(g: GraphIndex, conv: Any, extra: int) -> None:
    """Append ``extra`` zero filters to ``conv`` (weights, per-channel scale and zero point, bias)."""
    dq, values = _weight(g, conv)
    g.set_array(dq.input[0], np.pad(values, ((0, extra), (0, 0), (0, 0), (0, 0))))
    _pad_channel_params(g, dq, extra)
    if len(conv.input) > 2 and conv.input[2]:
        bias = conv.input[2]
        source = g.producer.get(bias)
        if source is not None and source.op_type == "DequantizeLinear":
            g.set_array(source.input[0], np.pad(g.array(source.input[0]), (0, extra)))
            # onnxruntime fuses the Conv into its integer kernel only if each bias scale is the input's
            # scale times the weight's (1 for the new filters); without it the Conv runs in float.
            _pad_channel_params(g, source, extra, scale=_input_scale(g, conv))
        else:
            g.set_array(bias, np.pad(g.array(bias), (0, extra)))


def _pad_channel_params(g: GraphIndex, dq: Any, extra: int, scale: float = 1.0) -> None:
    """Per-channel scale (padded with ``scale``) and zero point (with 0) of a DQ; per-tensor ones stay."""
    for index, fill in ((1, scale), (2, 0)):
        if len(dq.input) > index and dq.input[index]:
            value = g.array(dq.input[index])
            if value.ndim == 1 and value.size > 1:
                g.set_array(dq.input[index], np.concatenate([value, np.full(extra, fill, value.dtype)]))
