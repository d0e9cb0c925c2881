"""An INT8 model's two sources of error taken apart: its weights alone, or its activations alone.

A QDQ model (onnxruntime's ``quantize_static``) rounds two things: the weights and biases, stored as integer
initializers that a ``DequantizeLinear`` reads, and the activations, each passed through a
``QuantizeLinear`` -> ``DequantizeLinear`` pair. :func:`keep_int8_part` keeps one of the two and undoes the
other, so each can be verified on its own (:func:`edge_shitu_converters.int8_search.search_int8` does,
when every block INT8 fails):

- ``"weights"``: the float model with the INT8 model's weights, dequantised exactly as onnxruntime does.
  When this already fails the verification, no INT8 model with those weights passes, however it is
  calibrated: only keeping layers float (with float weights) can help.
- ``"activations"``: the INT8 model's activation rounding with the float model's weights; its failure
  points at the calibration (photos, method) rather than at the weights.

Both read the quantiser's own output before the converter's later rewrites (hard sigmoids, kernel shapes),
where every activation pair shares one scale and zero point and every node keeps the float model's name.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import numpy as np

from edge_shitu.errors import ConversionError, InvalidInputError
from edge_shitu_converters.onnx_graph import GraphIndex, drop_unread

__all__ = ["INT8_PARTS", "keep_int8_part"]

INT8_PARTS = ("weights", "activations")
"""What :func:`keep_int8_part` can keep INT8."""


def _dequantized(index: GraphIndex, node: Any) -> np.ndarray:
    """The float32 values a ``DequantizeLinear`` of an initializer computes: ``(x - zero_point) * scale``, per
    ``axis`` when the scale has one value per channel."""
    x = index.array(node.input[0])
    scale = index.array(node.input[1])
    zero = index.array(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros((), x.dtype)
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    if scale.ndim == 1 and x.ndim > 0:
        shape = [1] * x.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    # onnxruntime subtracts in the integer type widened to int32, then multiplies in float32.
    return ((x.astype(np.int32) - zero.astype(np.int32)).astype(np.float32) * scale.astype(np.float32)
            ).astype(np.float32)


def keep_int8_part(model: Any, float_model: Any, part: str) -> Tuple[Any, Dict[str, int]]:
    """One half of a QDQ model's quantisation, the other undone.

    Args:
      model: an ``onnx.ModelProto`` as ``quantize_static`` (QDQ) wrote it from ``float_model``: its nodes
        carry the float model's node names, and each activation pair quantises and dequantises with one
        scale and zero point.
      float_model: the float ``onnx.ModelProto`` it was quantised from.
      part: ``"weights"``: the float model, each constant that ``model`` dequantises (weights, biases) replaced
        by its dequantised values, at the same input of the node of the same name (the float model's graph:
        the quantiser drops a ``Relu`` whose work the rounding of its input does, so a quantised graph
        without its pairs is not the float one); ``"activations"``: ``model`` with each such constant
        replaced by the float model's tensor there.
      Neither argument is changed.

    Returns:
      The new model, and ``{"constants": ..., "activation_pairs": ...}``: how many ``DequantizeLinear`` of a
      constant were replaced, and how many activation pairs ``model`` has.

    Raises:
      InvalidInputError: an unknown ``part``.
      ConversionError: the model is not the QDQ form of ``float_model`` (a ``DequantizeLinear`` of neither an
        initializer nor a ``QuantizeLinear``, a pair with two scales, a node ``float_model`` lacks, or a
        float tensor of another shape), or either model has subgraphs.
    """
    from onnx import ModelProto, numpy_helper

    if part not in INT8_PARTS:
        raise InvalidInputError(f"part must be one of {', '.join(INT8_PARTS)}, got {part!r}")
    index, floats = GraphIndex(model), GraphIndex(float_model)
    if index.has_subgraphs or floats.has_subgraphs:
        # Reads from inside an If/Loop body are not in the index's maps.
        raise ConversionError("a model with subgraphs (If, Loop, Scan) cannot be taken apart")
    # (reading node, input slot) -> the DequantizeLinear of a constant it reads.
    constants: Dict[Tuple[str, int], Any] = {}
    dequantizers = pairs = 0
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
            continue
        source = node.input[0]
        if source in index.inits:
            dequantizers += 1
            for reader in index.consumers.get(node.output[0], []):
                for slot, name in enumerate(reader.input):
                    if name == node.output[0]:
                        constants[(reader.name, slot)] = node
            continue
        quant = index.producer.get(source)
        if quant is None or quant.op_type != "QuantizeLinear":
            raise ConversionError(f"{node.name}: dequantises {source}, neither a constant nor a QuantizeLinear's "
                                  "codes: not a QDQ model")
        if list(quant.input[1:]) != list(node.input[1:]) and (
                len(quant.input) != len(node.input)
                or not all(np.array_equal(index.array(a), index.array(b))
                           for a, b in zip(quant.input[1:], node.input[1:]))):
            raise ConversionError(f"{node.name}: quantised and dequantised with different scales")
        pairs += 1
    result = ModelProto()
    result.CopyFrom(float_model if part == "weights" else model)
    target = GraphIndex(result)
    other = index if part == "weights" else floats
    nodes = {n.name: n for n in result.graph.node}
    twins = {n.name: n for n in other.graph.node}
    for (name, slot), dq in constants.items():
        node, twin = nodes.get(name), twins.get(name)
        if node is None or twin is None or slot >= len(node.input) or slot >= len(twin.input):
            raise ConversionError(f"{name}: input {slot} is in only one of the quantised and the float model")
        if part == "weights":
            value, current = _dequantized(index, dq), target.array(node.input[slot])
        else:
            value, current = other.array(twin.input[slot]), _dequantized(index, dq)
        if value is None or current is None or value.shape != current.shape:
            raise ConversionError(f"{name}: input {slot} has no float tensor of the quantised one's shape in the float "
                                  "model")
        fresh = target.fresh(f"{node.input[slot]}_{'dequantized' if part == 'weights' else 'float'}")
        result.graph.initializer.append(numpy_helper.from_array(np.asarray(value), fresh))
        node.input[slot] = fresh
    drop_unread(result.graph)
    return result, {"constants": dequantizers, "activation_pairs": pairs}
