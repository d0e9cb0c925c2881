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
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple

import numpy as np

from edge_shitu_converters.onnx_graph import GraphIndex

__all__ = ["integer_hard_sigmoids"]

# Code range of each quantised type onnxruntime's static quantiser writes.
_RANGES = {np.dtype(np.uint8): (0, 255), np.dtype(np.int8): (-128, 127)}


def integer_hard_sigmoids(model: Any) -> Tuple[str, ...]:
    """Turn every quantised ``HardSigmoid`` into a ``QLinearAdd``-fusable ``Add`` (in place; module docstring).

    A node is rewritten when its input comes from a per-tensor ``DequantizeLinear``, its output goes to
    exactly one per-tensor ``QuantizeLinear`` (and is no graph output), ``alpha > 0``, and that quantiser's
    zero point and scale make its saturation do the clipping. The ``HardSigmoid`` becomes
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
    attrs = {a.name: a.f for a in node.attribute}
    alpha, beta = np.float32(attrs.get("alpha", 0.2)), np.float32(attrs.get("beta", 0.5))
    scale, zero = scalar(quantizer.input[1]), scalar(quantizer.input[2])
    if scale is None or zero is None or zero.dtype not in _RANGES or not alpha > 0:
        return None
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
