"""Graph rewrites that move the float glue of a quantised ONNX model onto onnxruntime's integer kernels.

onnxruntime fuses ``DequantizeLinear -> op -> QuantizeLinear`` into an integer kernel only for the ops it
has one for (Conv, MatMul, Add, Mul, LeakyRelu, Sigmoid, pooling, Concat, ...). ``HardSigmoid`` is not
among them: in a PP-LCNet/ESNet hard-swish (``x * HardSigmoid(x)``) it runs in float between a dequantise
and a quantise, and on the replica detector those three passes took about a third of the INT8 model's
time (docs/benchmarks.md, "Integer hard-swish").

A hard sigmoid whose output is quantised is an affine map followed by the quantiser's own saturation::

    Q(clip(alpha * x + beta, 0, 1); s, z) == saturate(round((x + beta / alpha) / (s / alpha)) + z)

when ``alpha > 0``, the zero point ``z`` is the type's lowest code (0.0 is the lowest value the output can
hold, so the bottom clip is the saturation) and ``round(1 / s) + z`` reaches the type's highest code (the
top clip is too). The ranges onnxruntime's static quantiser calibrates for a hard sigmoid satisfy both with
its default asymmetric activations (the values lie in [0, 1] and the ranges include 0); other settings
(symmetric int8 activations, ``reduce_range``) do not, and their nodes are left alone. The right-hand side is ``QuantizeLinear(Add(x, beta / alpha))`` with the
output scale divided by ``alpha``, which onnxruntime fuses into ``QLinearAdd``; a runtime without that fusion
runs the ``Add`` and the quantiser in float, with the same codes. The codes can differ from the float path's
only where the two float routes round a value within float error of a tie (k + 1/2) differently
(tests/test_integer_ops.py checks both).

Cheaper still is no arithmetic at all (:func:`clip_hard_sigmoids`). When the step ``s`` of the hard sigmoid's
input is ``1 / (alpha * n)`` for a whole number ``n`` and ``beta * n`` is whole too, the sigmoid's ramp starts and
ends on whole codes, ``lo = z - beta * n`` and ``lo + n``, and::

    clip(alpha * x + beta, 0, 1) == (clip(q, lo, lo + n) - lo) / n        for x = s * (q - z)

exactly: the hard sigmoid is a ``Clip`` of its input's codes, read with scale ``1 / n`` and zero point ``lo``.
The input's step is made such a value by coarsening it slightly (``n`` rounded down, by at most
:data:`MAX_STEP_GROWTH`), so its calibrated range only widens. That moves the input's codes a little (a
recalibration, not the same codes), while the sigmoid's value then has no rounding of its own. onnxruntime runs
``Clip`` on 8-bit codes faster than ``QLinearAdd`` (docs/benchmarks.md, "On the machine the issue was measured
on: hard sigmoids as clips, ...").
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, NamedTuple, Optional, Set, Tuple

import numpy as np

from edge_shitu_converters.onnx_graph import GraphIndex, drop_unread

__all__ = ["MAX_STEP_GROWTH", "clip_hard_sigmoids", "integer_hard_sigmoids"]

# Code range of each quantised type onnxruntime's static quantiser writes.
_RANGES = {np.dtype(np.uint8): (0, 255), np.dtype(np.int8): (-128, 127)}

#: How much :func:`clip_hard_sigmoids` may coarsen a hard sigmoid input's step (relative): a sixteenth.
MAX_STEP_GROWTH = 1 / 16

# beta * n must be whole: n is a multiple of the smallest q <= this with q * beta whole (2 for beta = 0.5).
_MAX_BETA_DENOMINATOR = 16

# ONNX Clip takes 8-bit integers from opset 12 on.
_CLIP_INT8_OPSET = 12

# A new step for a tensor's codes must keep the ops on either side of it on onnxruntime's integer kernels.
# MaxPool, Reshape, Transpose, Resize and the like run on codes only when the scales on both their sides are
# equal; biased Conv and Gemm store their bias in int32 at their input's step, which a new step would silently
# scale. Ops that write their output at a step of their own (Relu and Clip are folded into the op before them
# or into the quantiser's saturation):
_OWN_OUTPUT_STEP = frozenset(["Conv", "ConvTranspose", "MatMul", "Gemm", "Add", "Mul", "LeakyRelu", "Sigmoid",
                              "Softmax", "AveragePool", "GlobalAveragePool", "Concat", "Relu", "Clip"])
# Ops whose integer kernel reads an input at any step, with nothing stored at that step:
_ANY_INPUT_STEP = frozenset(["MatMul", "Add", "Mul", "LeakyRelu", "Sigmoid", "Softmax", "AveragePool",
                             "GlobalAveragePool", "Concat"])


def integer_hard_sigmoids(model: Any) -> Tuple[str, ...]:
    """Turn every quantised ``HardSigmoid`` into a ``QLinearAdd``-fusable ``Add`` (in place; module docstring).

    A node is rewritten when its input comes from a per-tensor ``DequantizeLinear``, its output goes to
    exactly one per-tensor ``QuantizeLinear`` (and is no graph output), ``alpha`` and ``beta`` are finite,
    ``alpha > 0``, and that quantiser's zero point and scale make its saturation do the clipping. The ``HardSigmoid`` becomes
    ``Add(x, DequantizeLinear(beta / alpha))`` and the ``QuantizeLinear`` gets its own scale ``s / alpha``;
    whatever dequantises the result keeps ``s``. Other nodes are left as they are.

    Args:
      model: an ``onnx.ModelProto`` (opset >= 13), e.g. the QDQ output of ``quantize_static``; its nodes
        stay in topological order.

    Returns:
      Names of the rewritten nodes (now ``Add``; an unnamed one gets a name), in graph order; none for a
      graph with subgraphs (``If``, ``Loop``), whose reads of outer tensors are not followed.

    Raises:
      Nothing of its own: a node that does not fit the pattern is left as it is.
    """
    from onnx import helper, numpy_helper

    index = GraphIndex(model)
    graph = index.graph
    if index.has_subgraphs:
        return ()
    scalar, fresh = index.scalar, index.fresh

    done: List[str] = []
    nodes: List[Any] = []
    for node in graph.node:
        plan = None
        if node.op_type == "HardSigmoid" and node.output[0] not in index.boundary:
            plan = _plan(node, index.producer.get(node.input[0]), index.consumers.get(node.output[0], []), scalar)
        if plan is None:
            nodes.append(node)
            continue
        quantizer, offset, scale, dtype = plan
        base = node.name or fresh(f"HardSigmoid_{len(done)}")
        code, step, zero = _constant(offset, dtype)
        names = [fresh(f"{base}_offset_{part}") for part in ("code", "scale", "zero_point")]
        graph.initializer.extend([numpy_helper.from_array(code, names[0]), numpy_helper.from_array(step, names[1]),
                                  numpy_helper.from_array(zero, names[2])])
        offset_value = fresh(f"{base}_offset")
        nodes.append(helper.make_node("DequantizeLinear", names, [offset_value], name=fresh(f"{base}_offset_dq")))
        add = helper.make_node("Add", [node.input[0], offset_value], list(node.output), name=base)
        nodes.append(add)
        new_scale = fresh(f"{base}_requantize_scale")
        graph.initializer.append(numpy_helper.from_array(scale, new_scale))
        quantizer.input[1] = new_scale
        done.append(base)
    del graph.node[:]
    graph.node.extend(nodes)
    return tuple(done)


def _plan(node: Any, source: Any, users: List[Any], scalar: Callable[[str], Optional[np.ndarray]]
          ) -> Optional[Tuple[Any, np.float32, np.ndarray, np.dtype]]:
    """``(quantizer, offset, new scale, code dtype)`` when ``node`` can be rewritten, else None."""
    if source is None or source.op_type != "DequantizeLinear" or len(users) != 1:
        return None
    quantizer = users[0]
    if quantizer.op_type != "QuantizeLinear" or len(quantizer.input) < 3:
        return None
    # The offset is stored in the dequantised input's type, read from its zero point: an omitted zero
    # point (whose type is the input's) is left alone rather than guessed.
    if len(source.input) < 3 or not source.input[2] or scalar(source.input[1]) is None:
        return None
    code = scalar(source.input[2])
    if code is None or code.dtype not in _RANGES:
        return None
    slope = _slope(node)
    scale, zero = scalar(quantizer.input[1]), scalar(quantizer.input[2])
    if scale is None or zero is None or zero.dtype not in _RANGES or slope is None:
        return None
    alpha, beta = (np.float32(v) for v in slope)
    scale = np.float32(scale.reshape(()))
    low, high = _RANGES[zero.dtype]
    zero_code = int(zero.reshape(()))
    if not (np.isfinite(scale) and scale > 0) or zero_code != low or np.rint(np.float32(1) / scale) + zero_code < high:
        return None
    offset = np.float32(np.float64(beta) / np.float64(alpha))
    return quantizer, offset, np.array(scale / alpha, dtype=np.float32), code.dtype


def _constant(offset: np.float32, dtype: np.dtype) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(code, scale, zero point)`` of ``dtype`` whose dequantised value is ``offset`` (to float32 rounding)."""
    low, high = _RANGES[dtype]
    if offset == 0:
        return np.array(0, dtype), np.array(1, np.float32), np.array(0, dtype)
    if offset > 0:
        return np.array(high, dtype), np.array(offset / np.float32(high), np.float32), np.array(0, dtype)
    if low < 0:
        return np.array(-high, dtype), np.array(-offset / np.float32(high), np.float32), np.array(0, dtype)
    return np.array(0, dtype), np.array(-offset / np.float32(high), np.float32), np.array(high, dtype)


def clip_hard_sigmoids(model: Any) -> Tuple[str, ...]:
    """Turn every quantised ``HardSigmoid`` whose input step can be made ``1 / (alpha * n)`` into a ``Clip`` of
    its input's codes (in place; module docstring).

    A node is rewritten when:

    - its input is a per-tensor ``DequantizeLinear`` of codes that a per-tensor ``QuantizeLinear`` writes from the
      output of an op that writes at a step of its own (:data:`_OWN_OUTPUT_STEP`, e.g. ``Conv``); every reader of
      those codes is a ``DequantizeLinear`` with the same scale and zero point, and every reader of the
      dequantised values is this node or an op that reads any step (:data:`_ANY_INPUT_STEP`, e.g. ``Mul``). An
      op that onnxruntime runs on codes only when the scales on both its sides are equal (``MaxPool``, ...)
      would fall back to float, and a biased ``Conv`` would keep a bias stored at the old step;
    - its output goes to exactly one per-tensor ``QuantizeLinear`` of the input's code type, whose codes only
      ``DequantizeLinear`` nodes with its scale and zero point read, into ops of :data:`_ANY_INPUT_STEP` only;
    - ``alpha`` and ``beta`` are finite, ``alpha > 0``, ``q * beta`` is whole for some ``q <= 16``, and with ``n``
      the largest multiple of ``q`` at most ``1 / (alpha * s)``, the step grows by at most
      :data:`MAX_STEP_GROWTH` and the ramp's start ``lo = z - beta * n`` is a code of the type (so that it can
      be a zero point);
    - neither the input's codes nor the sigmoid's are a graph output (their meaning changes), and none of the
      scales and zero points involved is a graph input (an initializer that is also a graph input is a default the
      caller may override).

    Two rewrites never share a node: the codes' quantiser follows an op of :data:`_OWN_OUTPUT_STEP`, never a
    ``HardSigmoid``, and every other node of a rewrite reads the codes of its own sigmoid or input.

    The input's quantiser and its dequantisers get the step ``1 / (alpha * n)``; the ``HardSigmoid`` and its
    quantiser become ``Clip(codes, lo, min(lo + n, highest code))``, and the dequantisers of the result get
    scale ``1 / n`` and zero point ``lo``. The result equals the hard sigmoid of the rescaled codes up to the
    float32 rounding of ``1 / n`` (and of ``beta``, taken as the fraction it is within 1e-6 of). Other nodes are
    left as they are.

    Args:
      model: an ``onnx.ModelProto`` (opset >= 12, for 8-bit ``Clip``), e.g. the QDQ output of
        ``quantize_static``; its nodes stay in topological order.

    Returns:
      Names of the rewritten ``HardSigmoid`` nodes (an unnamed one gets a name; the ``Clip`` bears it), in
      graph order; none for a graph with subgraphs or of an opset without 8-bit ``Clip``.

    Raises:
      Nothing of its own: a node that does not fit the pattern is left as it is.
    """
    from onnx import helper, numpy_helper

    index = GraphIndex(model)
    graph = index.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if index.has_subgraphs or opset < _CLIP_INT8_OPSET:
        return ()
    fresh = index.fresh

    def constant(base: str, value: np.ndarray) -> str:
        name = fresh(base)
        graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    done: List[str] = []
    clips: Dict[str, Any] = {}  # the sigmoid quantiser's output -> the Clip that replaces it
    removed: Set[str] = set()  # outputs of the HardSigmoid nodes that go
    stale: Set[str] = set()
    for node in graph.node:
        plan = None
        if node.op_type == "HardSigmoid" and node.output[0] not in index.boundary:
            plan = _clip_plan(node, index)
        if plan is None:
            continue
        base = node.name or fresh(f"HardSigmoid_{len(done)}")
        stale.update([plan.writer.input[1], *plan.quantizer.input[1:], *(r.input[1] for r in plan.readers),
                      *(name for r in plan.ramp_readers for name in r.input[1:])])
        step_name = constant(f"{base}_input_scale", np.array(plan.step, np.float32))
        for user in (plan.writer, *plan.readers):
            user.input[1] = step_name
        bounds = [constant(f"{base}_{part}", np.array(code, plan.dtype))
                  for part, code in (("low", plan.low), ("high", plan.high))]
        ramp_scale = constant(f"{base}_scale", np.array(np.float32(1) / np.float32(plan.width), np.float32))
        ramp_zero = constant(f"{base}_zero_point", np.array(plan.low, plan.dtype))
        for reader in plan.ramp_readers:
            reader.input[1] = ramp_scale
            reader.input[2] = ramp_zero
        clips[plan.quantizer.output[0]] = helper.make_node(
            "Clip", [plan.codes, *bounds], [plan.quantizer.output[0]], name=base)
        removed.add(node.output[0])
        done.append(base)
    if done:
        nodes = [clips.get(n.output[0], n) for n in graph.node]
        del graph.node[:]
        graph.node.extend(nodes)
        # The sigmoids, which nothing reads now, with their recorded shapes, and the replaced scales and zero
        # points, unless another node still reads them.
        drop_unread(graph, nodes=removed, initializers=stale)
    return tuple(done)


class _ClipPlan(NamedTuple):
    """What :func:`clip_hard_sigmoids` changes for one ``HardSigmoid``."""

    codes: str  # the input's codes
    writer: Any  # their QuantizeLinear
    readers: Tuple[Any, ...]  # their DequantizeLinear nodes
    quantizer: Any  # the sigmoid's QuantizeLinear, which the Clip replaces
    ramp_readers: Tuple[Any, ...]  # the DequantizeLinear nodes of its codes
    step: np.float32  # the input's new step, 1 / (alpha * width)
    low: int  # the ramp's first code (the Clip's min and the result's zero point)
    high: int  # the Clip's max: low + width, or the type's highest code
    width: int  # n: the ramp's length in codes
    dtype: np.dtype  # the codes' type


def _clip_plan(node: Any, index: GraphIndex) -> Optional[_ClipPlan]:
    """The rewrite of ``node`` by :func:`clip_hard_sigmoids`, or None when it does not fit."""
    slope = _slope(node)
    if slope is None:
        return None
    alpha, beta = slope
    multiple = next((m for m in range(1, _MAX_BETA_DENOMINATOR + 1)
                     if abs(m * beta - round(m * beta)) < 1e-6), None)
    source = index.producer.get(node.input[0])
    users = index.consumers.get(node.output[0], [])
    if multiple is None or source is None or source.op_type != "DequantizeLinear" or len(users) != 1:
        return None
    quantizer = users[0]
    codes = source.input[0]
    writer = index.producer.get(codes)
    if (quantizer.op_type != "QuantizeLinear" or writer is None or writer.op_type != "QuantizeLinear"
            or getattr(index.producer.get(writer.input[0]), "op_type", None) not in _OWN_OUTPUT_STEP):
        return None
    params, ramp_params = _per_tensor(writer, index), _per_tensor(quantizer, index)
    readers = index.consumers.get(codes, [])
    ramp_readers = index.consumers.get(quantizer.output[0], [])
    if params is None or ramp_params is None or not ramp_readers:
        return None
    if any(r.op_type != "DequantizeLinear" or _per_tensor(r, index) != params for r in readers) or any(
            r.op_type != "DequantizeLinear" or _per_tensor(r, index) != ramp_params for r in ramp_readers):
        return None
    if any(user is not node and user.op_type not in _ANY_INPUT_STEP
           for reader in readers for user in index.consumers.get(reader.output[0], [])) or any(
            user.op_type not in _ANY_INPUT_STEP for reader in ramp_readers
            for user in index.consumers.get(reader.output[0], [])):
        return None
    # Codes a caller reads would change meaning, and scales a caller may override would be dropped.
    tensors = {codes, quantizer.output[0], writer.input[1], *quantizer.input[1:],
               *(name for r in (*readers, *ramp_readers) for name in r.input[1:])}
    dtype = np.dtype(index.scalar(writer.input[2]).dtype)
    if tensors & index.boundary or index.scalar(quantizer.input[2]).dtype != dtype:
        return None
    step, zero = params
    width = int(np.floor(1.0 / (alpha * step) / multiple + 1e-9)) * multiple
    if width < multiple:
        return None
    new_step = np.float32(1.0 / (alpha * width))
    if new_step / step - 1 > MAX_STEP_GROWTH:
        return None
    lowest, highest = _RANGES[dtype]
    low = zero - int(round(beta * width))
    if not lowest <= low <= highest:
        return None
    return _ClipPlan(codes, writer, tuple(readers), quantizer, tuple(ramp_readers), new_step, low,
                     min(low + width, highest), width, dtype)


def _slope(node: Any) -> Optional[Tuple[np.float64, np.float64]]:
    """A ``HardSigmoid``'s ``(alpha, beta)`` (ONNX's defaults 0.2 and 0.5 when left out, as the float32 values
    stored), or None unless both are finite and ``alpha > 0`` (the rewrites' common condition)."""
    attrs = {a.name: a.f for a in node.attribute}
    alpha, beta = np.float64(np.float32(attrs.get("alpha", 0.2))), np.float64(np.float32(attrs.get("beta", 0.5)))
    return (alpha, beta) if np.isfinite(alpha) and np.isfinite(beta) and alpha > 0 else None


def _per_tensor(node: Any, index: GraphIndex) -> Optional[Tuple[float, int]]:
    """``(scale, zero point)`` of a ``QuantizeLinear``/``DequantizeLinear`` with scalar constants and a given
    8-bit zero point, else None."""
    if len(node.input) < 3 or not node.input[2]:
        return None
    scale, zero = index.scalar(node.input[1]), index.scalar(node.input[2])
    if scale is None or zero is None or zero.dtype not in _RANGES:
        return None
    value = float(scale.reshape(()))
    if not (np.isfinite(value) and value > 0):
        return None
    return value, int(zero.reshape(()))
