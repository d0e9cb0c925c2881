"""How close a model runs to this CPU: GEMM rates measured with onnxruntime, and the multiply-accumulates
(MACs) of an ONNX model counted from its graph.

The rate of a model is its MACs divided by its inference time; the *fraction* of the machine is that rate
divided by what onnxruntime's own GEMM kernels reach on this CPU with the same threads: an fp32 ``MatMul``
of ``size × size × size`` for float layers, a u8 × s8 ``MatMulInteger`` for integer layers (MLAS's integer
GEMM, onnxruntime's fastest integer kernel on x86; it uses AMX where the CPU has it). The ``QLinearConv``
kernels that quantised convolutions run on are other, slower ones, so an int8 model's fraction also says
how far those kernels are from the machine's integer rate.

MACs per node, from the shapes of :func:`onnx.shape_inference.infer_shapes` at a given input size:

- ``Conv``, ``ConvInteger``, ``QLinearConv``: output elements × input channels / groups × kernel elements,
  where a constant weight (an initializer, or a ``DequantizeLinear`` of one) counts only its structurally
  live part: filters with a non-zero weight, and input-channel × kernel positions non-zero in some filter
  (a quantised weight is zero where its code equals its zero point). The
  converter's kernel-shape rewrites add zero filters and zero positions (padded channels, space-to-depth
  stems) that a CPU multiplies but the model does not need, so a re-laid model counts the work of its source;
- ``MatMul``, ``MatMulInteger``, ``QLinearMatMul``, ``Gemm``: output elements × K (so M × N × K per matrix);
- other ops: none (element-wise work, pooling and resizes move memory; they do no GEMM work).

A weighted node runs on integer kernels when it is a ``QLinear*``/``*Integer`` op, or, in a QDQ model, when
its data and weight inputs come from ``DequantizeLinear`` (and, for a ``Conv``, every consumer of its
output is a ``QuantizeLinear``): the node groups onnxruntime fuses into integer kernels at load.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from edge_shitu.errors import BackendUnavailableError, InvalidInputError
from edge_shitu.options import check_threads
from edge_shitu_bench.report import BENCH_EXTRA_HINT
from edge_shitu_converters.onnx_graph import GraphIndex, constants_to_initializers

__all__ = ["GEMM_SIZE", "PRECISIONS", "GemmRate", "ModelMacs", "require_onnx", "gemm_model",
           "measure_gemm_rate", "count_macs", "bundle_model_macs", "rate_for", "fraction_of_rate",
           "mixed_limit_fraction"]

GEMM_SIZE = 2048
PRECISIONS = ("fp32", "int8")
_ONNX_OPSET = 13
_ONNX_IR_VERSION = 8
_WEIGHT_INPUT = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3, "MatMul": 1, "MatMulInteger": 1,
                 "QLinearMatMul": 3, "Gemm": 1}
_CONVS = ("Conv", "ConvInteger", "QLinearConv")
# Index of a convolution's weight zero point (the weight is at _WEIGHT_INPUT).
_WEIGHT_ZERO_POINT = {"ConvInteger": 3, "QLinearConv": 5}
_INTEGER_OPS = ("ConvInteger", "QLinearConv", "MatMulInteger", "QLinearMatMul")
ModelSource = Union[bytes, str, Path, Any]


def require_onnx() -> Any:
    """The ``onnx`` module.

    Raises:
      BackendUnavailableError: onnx is not installed (the message says how to install it).
    """
    try:
        import onnx
    except ImportError as exc:
        raise BackendUnavailableError(f"counting model MACs and building the GEMM models needs onnx ({exc}): "
                                      f"{BENCH_EXTRA_HINT}") from None
    return onnx


@dataclass(frozen=True)
class GemmRate:
    """One GEMM-rate measurement.

    Attributes:
      precision: "fp32" (``MatMul``, float32) or "int8" (``MatMulInteger``, uint8 × int8 -> int32).
      op: the ONNX op that ran.
      size: M = N = K of the product.
      threads: onnxruntime intra-op threads.
      runs_ms: wall time of the timed runs, in order (a warm-up run before them is discarded).
      cpu_ms: CPU time of this process (all its threads) during each timed run; empty when not measured.
        On a busy machine the wall time grows while the CPU time of one thread does not, so
        :attr:`gmac_per_cpu_s` beside :attr:`gmac_per_s` shows how much other work slowed the measurement.
    """

    precision: str
    op: str
    size: int
    threads: int
    runs_ms: Tuple[float, ...]
    cpu_ms: Tuple[float, ...] = ()

    @property
    def gmac(self) -> float:
        """Giga multiply-accumulates of one product (size³ / 1e9)."""
        return self.size ** 3 / 1e9

    @property
    def median_ms(self) -> float:
        return float(statistics.median(self.runs_ms))

    @property
    def gmac_per_s(self) -> float:
        """The rate: :attr:`gmac` over the median run."""
        return self.gmac / (self.median_ms / 1000.0)

    @property
    def gmac_per_cpu_s(self) -> Optional[float]:
        """:attr:`gmac` over the median CPU time of a run (all threads summed; spinning included), or ``None``."""
        if not self.cpu_ms or not statistics.median(self.cpu_ms) > 0:
            return None
        return self.gmac / (float(statistics.median(self.cpu_ms)) / 1000.0)

    def to_json(self) -> Dict[str, Any]:
        return {"precision": self.precision, "op": self.op, "size": self.size, "threads": self.threads,
                "gmac": self.gmac, "runs_ms": list(self.runs_ms), "median_ms": self.median_ms,
                "gmac_per_s": self.gmac_per_s, "cpu_ms": list(self.cpu_ms), "gmac_per_cpu_s": self.gmac_per_cpu_s}


@dataclass(frozen=True)
class ModelMacs:
    """The multiply-accumulates of one model at one input size.

    Attributes:
      input_shapes: input name -> the shape counted at.
      fp32: MACs of the weighted nodes that run on float kernels.
      int8: MACs of those that run on integer kernels.
      by_op: op type -> MACs.
      nodes: weighted nodes counted.
      int8_nodes: of those, the ones on integer kernels.
    """

    input_shapes: Mapping[str, Tuple[int, ...]]
    fp32: int
    int8: int
    by_op: Mapping[str, int] = field(default_factory=dict)
    nodes: int = 0
    int8_nodes: int = 0

    @property
    def total(self) -> int:
        return self.fp32 + self.int8

    @property
    def gmac(self) -> float:
        return self.total / 1e9

    @property
    def int8_share(self) -> float:
        """Share of the MACs on integer kernels, 0 to 1 (0 for a model without weighted nodes)."""
        return self.int8 / self.total if self.total else 0.0

    def to_json(self) -> Dict[str, Any]:
        return {"gmac": self.gmac, "macs": self.total, "macs_fp32": self.fp32, "macs_int8": self.int8,
                "int8_share": self.int8_share, "weighted_nodes": self.nodes, "int8_nodes": self.int8_nodes,
                "by_op": dict(self.by_op), "input_shapes": {k: list(v) for k, v in self.input_shapes.items()}}


def gemm_model(precision: str, size: int = GEMM_SIZE) -> Any:
    """The ONNX model of one ``size³`` GEMM: input ``a`` (size, size), constant ``b`` (size, size) from
    ``default_rng(0)``, output ``y``.

    Args:
      precision: "fp32": ``MatMul`` of float32; "int8": ``MatMulInteger`` of uint8 ``a`` (zero point 128) and
        int8 ``b`` (zero point 0), int32 out.
      size: M = N = K, >= 1.

    Returns:
      an ``onnx.ModelProto`` (opset 13, IR 8), checked.

    Raises:
      InvalidInputError: an unknown precision or a bad size.
      BackendUnavailableError: onnx is not installed.
    """
    _check_precision(precision)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InvalidInputError(f"size must be an int >= 1, got {size!r}")
    onnx = require_onnx()
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    dims = [size, size]
    if precision == "fp32":
        b = rng.standard_normal(dims, dtype=np.float32)
        nodes = [helper.make_node("MatMul", ["a", "b"], ["y"])]
        inits = [numpy_helper.from_array(b, "b")]
        a_type, y_type = TensorProto.FLOAT, TensorProto.FLOAT
    else:
        b = rng.integers(-127, 128, size=dims, dtype=np.int8)
        nodes = [helper.make_node("MatMulInteger", ["a", "b", "a_zero", "b_zero"], ["y"])]
        inits = [numpy_helper.from_array(b, "b"), numpy_helper.from_array(np.array(128, np.uint8), "a_zero"),
                 numpy_helper.from_array(np.array(0, np.int8), "b_zero")]
        a_type, y_type = TensorProto.UINT8, TensorProto.INT32
    graph = helper.make_graph(nodes, f"gemm-{precision}-{size}", [helper.make_tensor_value_info("a", a_type, dims)],
                              [helper.make_tensor_value_info("y", y_type, dims)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _ONNX_OPSET)],
                              producer_name="edge-shitu bench")
    model.ir_version = _ONNX_IR_VERSION
    onnx.checker.check_model(model)
    return model


def _gemm_input(precision: str, size: int) -> np.ndarray:
    rng = np.random.default_rng(1)
    if precision == "fp32":
        return rng.standard_normal((size, size), dtype=np.float32)
    return rng.integers(0, 256, size=(size, size), dtype=np.uint8)


def measure_gemm_rate(precision: str, *, size: int = GEMM_SIZE, threads: int = 1, runs: int = 5,
                      budget_s: float = 20.0, clock: Callable[[], float] = time.perf_counter,
                      cpu_clock: Callable[[], float] = time.process_time) -> GemmRate:
    """Time :func:`gemm_model` with onnxruntime's CPU provider: one warm-up run, then ``runs`` timed runs,
    fewer when the timed runs have taken ``budget_s`` (at least one always runs). Inputs are fixed
    (``default_rng``), so every call computes the same product.

    Args:
      precision: "fp32" or "int8".
      size: M = N = K.
      threads: intra-op threads, 1 to the CPU count (inter-op: 1).
      runs: timed runs, >= 1.
      budget_s: stop timing after this many seconds of timed runs, > 0.
      clock: seconds (monotonic); injectable for tests.
      cpu_clock: CPU seconds of this process; injectable for tests.

    Returns:
      the :class:`GemmRate`.

    Raises:
      InvalidInputError: a bad precision, size, thread count, runs or budget.
      BackendUnavailableError: onnx or onnxruntime is not installed.
    """
    _check_precision(precision)
    check_threads(threads)
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise InvalidInputError(f"runs must be an int >= 1, got {runs!r}")
    if isinstance(budget_s, bool) or not isinstance(budget_s, (int, float)) or not budget_s > 0:
        raise InvalidInputError(f"budget_s must be a number > 0, got {budget_s!r}")
    from edge_shitu.backends.onnxruntime import OnnxRuntimeSession

    model = gemm_model(precision, size)
    # The runtime's own session settings, so the rate is measured as the models run.
    session = OnnxRuntimeSession.from_bytes(model.SerializeToString(), where=f"{precision} GEMM {size}³",
                                            threads=threads)
    feeds = {"a": _gemm_input(precision, size)}
    times: list = []
    cpu: list = []
    try:
        session.run(feeds)
        spent = 0.0
        while len(times) < runs and (not times or spent < budget_s):
            cpu_start, start = cpu_clock(), clock()
            session.run(feeds)
            elapsed = clock() - start
            cpu.append((cpu_clock() - cpu_start) * 1000.0)
            spent += elapsed
            times.append(elapsed * 1000.0)
    finally:
        session.close()
    return GemmRate(precision, model.graph.node[0].op_type, size, threads, tuple(times), tuple(cpu))


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise InvalidInputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def _load(model: ModelSource) -> Any:
    onnx = require_onnx()
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, bytes):
        return onnx.load_from_string(model)
    if isinstance(model, (str, Path)):
        path = Path(model)
        if not path.is_file():
            from edge_shitu.errors import MissingFileError

            raise MissingFileError(f"{path}: ONNX model not found")
        return onnx.load(str(path))
    raise InvalidInputError(f"model must be an onnx.ModelProto, bytes or a path, got {type(model).__name__}")


def _with_input_shapes(model: Any, input_shapes: Mapping[str, Sequence[int]]) -> Tuple[Any, Dict[str, Tuple[int, ...]]]:
    onnx = require_onnx()
    model = onnx.ModelProto.FromString(model.SerializeToString())
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    known = {i.name for i in inputs}
    unknown = sorted(set(input_shapes) - known)
    if unknown:
        raise InvalidInputError(f"input_shapes names {unknown}, but the model's inputs are {sorted(known)}")
    used: Dict[str, Tuple[int, ...]] = {}
    for inp in inputs:
        dims = inp.type.tensor_type.shape.dim
        if inp.name in input_shapes:
            shape = tuple(input_shapes[inp.name])
            if len(shape) != len(dims) or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1
                                              for d in shape):
                raise InvalidInputError(f"input {inp.name!r}: expected {len(dims)} positive int dims, "
                                        f"got {list(shape)}")
            for d, value in zip(dims, shape):
                if d.HasField("dim_value") and d.dim_value > 0 and d.dim_value != value:
                    raise InvalidInputError(f"input {inp.name!r}: the model fixes dims "
                                            f"{[_dim_text(x) for x in dims]}, got {list(shape)}")
                d.Clear()
                d.dim_value = int(value)
            used[inp.name] = tuple(int(v) for v in shape)
        else:
            free = [_dim_text(d) for d in dims if not (d.HasField("dim_value") and d.dim_value > 0)]
            if free:
                raise InvalidInputError(f"input {inp.name!r} has free dims {[_dim_text(d) for d in dims]}; "
                                        "give its shape in input_shapes")
            used[inp.name] = tuple(int(d.dim_value) for d in dims)
    return model, used


def _dim_text(d: Any) -> Any:
    return d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")


def count_macs(model: ModelSource, input_shapes: Optional[Mapping[str, Sequence[int]]] = None) -> ModelMacs:
    """Count the multiply-accumulates of one inference (see the module docstring for the rules).

    Args:
      model: an ``onnx.ModelProto``, the bytes of a ``.onnx`` file, or its path.
      input_shapes: input name -> shape for inputs with free dims (e.g. ``{"x": (1, 3, 224, 224)}`` for one
        crop); fixed inputs may be left out.

    Returns:
      the :class:`ModelMacs`.

    Raises:
      BackendUnavailableError: onnx is not installed.
      MissingFileError: the path does not exist.
      InvalidInputError: an input shape is missing, unknown or contradicts the model; or a weighted node's
        shapes cannot be inferred (the message names the node).
    """
    onnx = require_onnx()
    proto, used = _with_input_shapes(_load(model), dict(input_shapes or {}))
    constants_to_initializers(proto, identities=True)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True)
    except Exception as exc:  # onnx raises its own error types for graphs it cannot type
        raise InvalidInputError(f"onnx shape inference failed on this model: {exc}") from None
    graph = inferred.graph
    shapes: Dict[str, Optional[Tuple[int, ...]]] = {}
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            dims = vi.type.tensor_type.shape.dim
            known = all(d.HasField("dim_value") for d in dims)
            shapes[vi.name] = tuple(int(d.dim_value) for d in dims) if known else None
    for t in graph.initializer:
        shapes[t.name] = tuple(int(d) for d in t.dims)
    index = GraphIndex(inferred)
    graph_outputs = {o.name for o in graph.output}
    fp32 = int8 = nodes = int8_nodes = 0
    by_op: Dict[str, int] = {}
    for i, node in enumerate(graph.node):
        if node.domain not in ("", "ai.onnx") or node.op_type not in _WEIGHT_INPUT:
            continue
        macs = _node_macs(node, shapes, i, _constant_weight(node, index))
        integer = _on_integer_kernels(node, index.producer, index.consumers, graph_outputs)
        nodes += 1
        by_op[node.op_type] = by_op.get(node.op_type, 0) + macs
        if integer:
            int8 += macs
            int8_nodes += 1
        else:
            fp32 += macs
    return ModelMacs(used, fp32, int8, by_op, nodes, int8_nodes)


def _shape(shapes: Mapping[str, Optional[Tuple[int, ...]]], name: str, node: Any, index: int) -> Tuple[int, ...]:
    shape = shapes.get(name)
    if shape is None:
        raise InvalidInputError(f"node {index} ({node.op_type} {node.name or '(unnamed)'}): the shape of "
                                f"{name!r} could not be inferred")
    return shape


def _constant_weight(node: Any, index: GraphIndex) -> Optional[np.ndarray]:
    """A convolution's weight minus its zero point (int64, or the float values), when the weight is constant (an
    initializer, or a DQ of one) and so is its zero point; else None."""
    if node.op_type not in _CONVS:
        return None
    name = node.input[_WEIGHT_INPUT[node.op_type]]
    zero_index = _WEIGHT_ZERO_POINT.get(node.op_type)
    zero = node.input[zero_index] if zero_index is not None and len(node.input) > zero_index else ""
    axis = 0  # a convolution's own per-channel zero point runs along its output channels
    source = index.producer.get(name)
    if source is not None and source.op_type == "DequantizeLinear" and source.domain in ("", "ai.onnx"):
        name, zero = source.input[0], (source.input[2] if len(source.input) > 2 else "")
        axis = next((a.i for a in source.attribute if a.name == "axis"), 1)
    values, offset = index.array(name), (index.array(zero) if zero else None)
    if values is None or (zero and offset is None):
        return None
    if not zero:
        return values
    offset = offset.astype(np.int64)
    if offset.size == 1:
        return values.astype(np.int64) - offset.reshape(())
    if offset.ndim != 1 or not -values.ndim <= axis < values.ndim or offset.size != values.shape[axis]:
        return None  # a layout this count does not read (blocked zero points): count every product
    shape = [1] * values.ndim
    shape[axis] = offset.size
    return values.astype(np.int64) - offset.reshape(shape)


def _node_macs(node: Any, shapes: Mapping[str, Optional[Tuple[int, ...]]], index: int,
               weight_values: Optional[np.ndarray] = None) -> int:
    out = _shape(shapes, node.output[0], node, index)
    out_elements = int(np.prod(out, dtype=np.int64))
    if node.op_type in _CONVS:
        weight = _shape(shapes, node.input[_WEIGHT_INPUT[node.op_type]], node, index)
        # weight: (Cout, Cin / groups, k1, k2, ...): each output element sums Cin/groups × kernel products.
        per_output = int(np.prod(weight[1:], dtype=np.int64))
        if weight_values is None or weight_values.ndim < 2 or weight_values.shape[0] != weight[0]:
            return out_elements * per_output
        nonzero = (weight_values != 0).reshape(weight_values.shape[0], -1)
        live_filters, live_positions = int(nonzero.any(axis=1).sum()), int(nonzero.any(axis=0).sum())
        return out_elements // weight[0] * live_filters * live_positions
    a = _shape(shapes, node.input[0], node, index)
    if node.op_type == "Gemm":
        trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
        k = a[0] if trans_a else a[1]
    else:
        k = a[-1]
    return out_elements * int(k)


def _on_integer_kernels(node: Any, producers: Mapping[str, Any], consumers: Mapping[str, list],
                        graph_outputs: set) -> bool:
    if node.op_type in _INTEGER_OPS:
        return True
    dequantized = all(name in producers and producers[name].op_type == "DequantizeLinear"
                      for name in (node.input[0], node.input[_WEIGHT_INPUT[node.op_type]]))
    if not dequantized:
        return False
    if node.op_type != "Conv":
        # onnxruntime fuses DQ -> MatMul / Gemm into MatMulIntegerToFloat / QGemm, a quantised output or not.
        return True
    after = consumers.get(node.output[0], [])
    return bool(after) and node.output[0] not in graph_outputs and all(n.op_type == "QuantizeLinear" for n in after)


def bundle_model_macs(spec: Any) -> Optional[ModelMacs]:
    """The MACs of one bundle model per inference at its manifest's input size, one image (a dynamic batch
    counts as 1: the extractor per crop).

    Args:
      spec: an :class:`edge_shitu.bundle.ModelSpec`.

    Returns:
      the :class:`ModelMacs`, or ``None`` for a model onnxruntime does not run (a Paddle-Lite file).

    Raises:
      BackendUnavailableError: onnx is not installed.
      MissingFileError: the model file is missing.
      InvalidInputError: the graph's shapes cannot be inferred at that size.
    """
    if spec.backend != "onnxruntime":
        return None
    n, c, h, w = spec.input.shape
    return count_macs(spec.read_bytes(), {spec.input.name: (max(n, 1), c, h, w)})


def rate_for(precision: str) -> str:
    """The GEMM rate a model of this manifest precision is measured against: "int8" for int8, else "fp32"."""
    return "int8" if precision == "int8" else "fp32"


def fraction_of_rate(gmac: float, ms: Optional[float], gmac_per_s: Optional[float]) -> Optional[float]:
    """``gmac / (ms / 1000 × gmac_per_s)``: the share of a GEMM rate a model reaches; ``None`` when a value is
    missing or the time or rate is not positive.

    Raises:
      InvalidInputError: ``gmac`` is negative or not finite.
    """
    if isinstance(gmac, bool) or not isinstance(gmac, (int, float)) or not np.isfinite(gmac) or gmac < 0:
        raise InvalidInputError(f"gmac must be a finite number >= 0, got {gmac!r}")
    if ms is None or gmac_per_s is None or not ms > 0 or not gmac_per_s > 0:
        return None
    return float(gmac) / (ms / 1000.0 * gmac_per_s)


def mixed_limit_fraction(macs: ModelMacs, ms: Optional[float], rates: Mapping[str, Optional[float]]) -> Optional[float]:
    """The time the model would take with its float MACs at the fp32 rate and its integer MACs at the int8 rate,
    over its measured time: the share of the machine it reaches given which layers are integer. Equals
    :func:`fraction_of_rate` against the one rate for a model all float or all integer.

    Args:
      macs: the model's :class:`ModelMacs`.
      ms: its inference time.
      rates: ``{"fp32": GMAC/s, "int8": GMAC/s}``.

    Returns:
      the fraction, or ``None`` when the time or a needed rate is missing.
    """
    if ms is None or not ms > 0:
        return None
    ideal_s = 0.0
    for precision, count in (("fp32", macs.fp32), ("int8", macs.int8)):
        if count:
            rate = rates.get(precision)
            if rate is None or not rate > 0:
                return None
            ideal_s += count / 1e9 / rate
    return ideal_s / (ms / 1000.0)
