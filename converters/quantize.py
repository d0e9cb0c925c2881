"""INT8 quantisation of a bundle's ONNX models with onnxruntime (static QDQ or dynamic).

Static quantisation calibrates activation ranges on real photos, decoded and pre-processed exactly as
the runtime does (:func:`edge_shitu.image.load_image`, then :func:`edge_shitu.preprocess.image_to_tensor`
with the model's own :class:`~edge_shitu.bundle.InputSpec`), so the ranges are those the deployed model
sees. :func:`quantize_model` runs these steps:

1. the model is upgraded to ONNX opset 13 (per-channel ``DequantizeLinear`` needs its ``axis``) and its
   ``Constant`` weights become initializers (paddle2onnx feeds every weight through a ``Constant``
   node; the quantiser stores only initializers in int8 and would wrap the others in float Q/DQ pairs);
2. ``quant_pre_process`` (on by default) folds BatchNormalization into the convolutions and removes the
   exporter's Identity nodes, so one Conv holds one set of weights and fuses with its activation;
3. the layers next to the outputs kept in float are found (``float_tail``, :func:`float_tail_nodes`);
4. ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations) or ``quantize_dynamic``
   writes the INT8 model; the float tail then gets int8 weights too (:func:`int8_tail_weights`), and
   quantised hard sigmoids are rewritten for onnxruntime's integer kernels
   (:func:`edge_shitu_converters.integer_ops.clip_hard_sigmoids`, then
   :func:`edge_shitu_converters.integer_ops.integer_hard_sigmoids` for the rest), and convolutions of shapes its
   integer kernels run slowly are re-laid without changing a value
   (:mod:`edge_shitu_converters.kernel_shapes`);
5. the result is checked with ``onnx.checker`` and loaded by onnxruntime before it replaces
   ``out_path``.

Why these defaults (figures in ``docs/benchmarks.md``, "Figures behind choices in the code",
"converters/quantize.py: INT8 defaults"):

- ``quant_pre_process``: faster and closer to fp32, since each Conv then fuses with its activation;
- uint8 activations: onnxruntime's x86 integer kernels take u8 x s8; int8 activations fall off them
  (the detector then runs slower than fp32);
- per-channel weights: higher code agreement than per-tensor;
- percentile (99.999) calibration: best or within noise of the best on codes and on detector scores;
  entropy matched slightly more detector boxes but clipped the box logits and was the worst on the
  extractor;
- ``float_tail``: rounding the extractor's 512-d output to 8 bits flips the sign of near-zero features;
  keeping its last layer's activations in float avoids that at little extra cost. Keeping the
  detector's head towers float (3 layers) brings its scores much closer to fp32, also at little extra
  cost; see :data:`ROLE_DEFAULTS` and :meth:`QuantizeOptions.for_role`.

Dynamic quantisation needs no photos but is *slower* than fp32 here: ``ConvInteger`` has no fast
kernel; it is offered for size only. Nothing is installed and nothing is downloaded; the progress
that onnxruntime's tools print is logged at DEBUG (logger ``edge_shitu_converters.quantize``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from edge_shitu.backends.onnxruntime import session_options
from edge_shitu.bundle import InputSpec
from edge_shitu.errors import (
    BackendUnavailableError,
    ConversionError,
    ImageDecodeError,
    InvalidInputError,
    MissingFileError,
)
from edge_shitu.image import load_image
from edge_shitu.preprocess import image_to_tensor
from edge_shitu_converters.integer_ops import clip_hard_sigmoids, integer_hard_sigmoids
from edge_shitu_converters.kernel_shapes import pad_depthwise_channels, space_to_depth_stems
from edge_shitu_converters.onnx_graph import constants_to_initializers

__all__ = [
    "MODES",
    "METHODS",
    "FORMATS",
    "QUANT_TYPES",
    "ROLE_DEFAULTS",
    "QuantizeOptions",
    "QuantReport",
    "OutputAgreement",
    "calibration_feeds",
    "quantize_model",
    "ModelQuantizer",
    "BlockDamage",
    "quantizable_blocks",
    "TAIL_WEIGHTS",
    "float_tail_nodes",
    "int8_tail_weights",
    "compare_outputs",
]

_LOG = logging.getLogger(__name__)

MODES = ("static", "dynamic")
METHODS = ("minmax", "entropy", "percentile")
FORMATS = ("qdq", "qoperator")
QUANT_TYPES = ("uint8", "int8")

# Per-role overrides of the QuantizeOptions defaults, chosen by measurement (module docstring).
ROLE_DEFAULTS: Mapping[str, Mapping[str, Any]] = {
    "detector": {"float_tail": 3},
    "extractor": {"float_tail": 1},
}

# Layers whose weights are quantised; float_tail counts these back from each graph output.
_WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
_OPSET = 13
_INSTALL_HINT = 'pip install "edge-shitu[convert]" (onnx, onnxruntime and ml_dtypes)'


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise InvalidInputError(f"{name} must be True or False, got {value!r}")


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise InvalidInputError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_choice(name: str, value: object, choices: Tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise InvalidInputError(f"unknown {name} {value!r}; expected one of {', '.join(choices)}")


def _check_names(name: str, value: object) -> None:
    if not isinstance(value, tuple) or not all(isinstance(v, str) and v for v in value):
        raise InvalidInputError(f"{name} must be a tuple of non-empty strings, got {value!r}")


@dataclass(frozen=True)
class QuantizeOptions:
    """How a model is quantised. Defaults were chosen by measurement (see the module docstring);
    :meth:`for_role` adds the per-model ones.

    Attributes:
      mode: "static" (activation ranges calibrated on photos; integer kernels end to end) or
        "dynamic" (int8 weights, activation ranges computed at run time: no photos needed, but
        slower than fp32 for convolutional models on x86).
      method: static calibration method: "minmax", "entropy" or "percentile". Ignored in dynamic mode.
      per_channel: one weight scale per output channel instead of one per tensor.
      pre_process: run onnxruntime's ``quant_pre_process`` first (BatchNorm folding, clean-up).
        Without it BatchNorm stays a separate float op after every int8 Conv.
      calib_count: photos used for calibration (fewer if the folder holds fewer readable ones).
      calib_batch: photos per calibration run for a model with a dynamic batch (the extractor); a
        model with a fixed batch (the detector: 1) is always fed its own batch size.
      seed: seed of the photo choice; the same folder, count and seed always give the same photos.
      quant_format: "qdq" (QuantizeLinear/DequantizeLinear pairs that onnxruntime fuses into integer
        kernels at load) or "qoperator" (QLinearConv etc. written in the file). Static mode only.
      activation_type: "uint8" or "int8" activations (static mode). uint8 is the fast one on x86.
      weight_type: "int8" or "uint8" weights.
      reduce_range: quantise weights to 7 bits (only for x86 CPUs without VNNI, where u8 x s8 sums
        can saturate).
      float_tail: number of weighted layers (Conv/Gemm/MatMul) on each path into a graph output whose
        activations stay float, with the plain ops after them (sigmoid, transpose, reshape, split,
        batch norm): the model outputs are never rounded to 8 bits. ``0`` keeps only those plain ops
        float; ``-1`` quantises everything onnxruntime can.
      tail_int8_weights: store the weights of the float-tail layers in int8 anyway (per output
        channel, symmetric, dequantised at run time): a quarter of the size for an error far below
        that of 8-bit activations. Depthwise convolutions keep float weights (:func:`int8_tail_weights`).
      exclude_nodes: names of nodes (of the pre-processed graph, see :func:`float_tail_nodes`) whose
        activations stay float, on top of ``float_tail``.
      exclude_op_types: op types whose nodes are never quantised (e.g. ``("Sigmoid",)``).
      percentile: the percentile of the "percentile" method, in (0, 100].
      integer_hard_sigmoid: rewrite each quantised ``HardSigmoid`` that ``clip_hard_sigmoid`` left so that
        onnxruntime runs it on its integer ``QLinearAdd`` kernel instead of in float between a dequantise and a
        quantise (:func:`edge_shitu_converters.integer_ops.integer_hard_sigmoids`; same codes; docs/benchmarks.md,
        "Integer hard-swish"). Static mode only.
      clip_hard_sigmoid: first turn each quantised ``HardSigmoid`` whose input step can be coarsened by at most
        a sixteenth to ``1 / (alpha * n)`` into a ``Clip`` of its input's codes, which onnxruntime runs faster
        than ``QLinearAdd`` (:func:`edge_shitu_converters.integer_ops.clip_hard_sigmoids`; the sigmoid's value is
        then exact for its input's codes, and those codes move as in a slightly different calibration;
        docs/benchmarks.md, "On the machine the issue was measured on"). Static mode only.
      kernel_shapes: re-lay convolutions whose shapes onnxruntime's integer kernels run slowly: a stride-2
        image stem as ``SpaceToDepth`` + a stride-1 convolution, depthwise channel groups padded to a multiple
        of 16 (:mod:`edge_shitu_converters.kernel_shapes`; the same outputs bit for bit; weights with non-zero
        zero points, as ``weight_type="uint8"`` gives, are left alone). Static mode only.
    """

    mode: str = "static"
    method: str = "percentile"
    per_channel: bool = True
    pre_process: bool = True
    calib_count: int = 64
    calib_batch: int = 8
    seed: int = 0
    quant_format: str = "qdq"
    activation_type: str = "uint8"
    weight_type: str = "int8"
    reduce_range: bool = False
    float_tail: int = 1
    tail_int8_weights: bool = True
    exclude_nodes: Tuple[str, ...] = ()
    exclude_op_types: Tuple[str, ...] = ()
    percentile: float = 99.999
    integer_hard_sigmoid: bool = True
    clip_hard_sigmoid: bool = True
    kernel_shapes: bool = True

    def __post_init__(self) -> None:
        _check_choice("quantisation mode", self.mode, MODES)
        _check_choice("calibration method", self.method, METHODS)
        _check_choice("quantisation format", self.quant_format, FORMATS)
        _check_choice("activation type", self.activation_type, QUANT_TYPES)
        _check_choice("weight type", self.weight_type, QUANT_TYPES)
        for name in ("per_channel", "pre_process", "reduce_range", "tail_int8_weights", "integer_hard_sigmoid",
                     "clip_hard_sigmoid", "kernel_shapes"):
            _check_bool(name, getattr(self, name))
        _check_int("calib_count", self.calib_count, 1)
        _check_int("calib_batch", self.calib_batch, 1)
        _check_int("seed", self.seed, 0)
        _check_int("float_tail", self.float_tail, -1)
        _check_names("exclude_nodes", self.exclude_nodes)
        _check_names("exclude_op_types", self.exclude_op_types)
        p = self.percentile
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 100:
            raise InvalidInputError(f"percentile must be in (0, 100], got {p!r}")

    @classmethod
    def for_role(cls, role: str, **overrides: Any) -> "QuantizeOptions":
        """The measured defaults for a bundle model, then keyword overrides.

        Args:
          role: "detector" or "extractor" (keys of :data:`ROLE_DEFAULTS`).
          **overrides: any attribute of :class:`QuantizeOptions`.

        Raises:
          InvalidInputError: unknown role, unknown option name or bad value.
        """
        if role not in ROLE_DEFAULTS:
            raise InvalidInputError(f"unknown model role {role!r}; expected one of {', '.join(ROLE_DEFAULTS)}")
        unknown = set(overrides) - set(cls.__dataclass_fields__)
        if unknown:
            raise InvalidInputError(f"unknown quantisation option(s): {', '.join(sorted(unknown))}")
        return cls(**{**ROLE_DEFAULTS[role], **overrides})


@dataclass(frozen=True)
class QuantReport:
    """What :func:`quantize_model` did.

    Attributes:
      source: the float model.
      output: the quantised model.
      options: the options used.
      fp32_bytes: size of the float model file.
      int8_bytes: size of the quantised model file.
      calib_images: photos fed to calibration (0 in dynamic mode).
      float_nodes: names of the nodes whose activations stayed float.
      weight_only_nodes: float nodes whose weights are stored in int8 (``tail_int8_weights``).
      quantized_ops: op type -> number of nodes that compute on quantised activations.
      seconds: step name -> wall time in seconds.
      integer_hard_sigmoids: ``HardSigmoid`` nodes rewritten for an integer kernel (``integer_hard_sigmoid``).
      clip_hard_sigmoids: ``HardSigmoid`` nodes rewritten as a ``Clip`` of their input's codes
        (``clip_hard_sigmoid``).
      kernel_shapes: Conv nodes re-laid for faster integer kernels (``kernel_shapes``): space-to-depth
        stems, then padded depthwise convolutions.
    """

    source: Path
    output: Path
    options: QuantizeOptions
    fp32_bytes: int
    int8_bytes: int
    calib_images: int
    float_nodes: Tuple[str, ...]
    weight_only_nodes: Tuple[str, ...]
    quantized_ops: Mapping[str, int] = field(default_factory=dict)
    seconds: Mapping[str, float] = field(default_factory=dict)
    integer_hard_sigmoids: Tuple[str, ...] = ()
    clip_hard_sigmoids: Tuple[str, ...] = ()
    kernel_shapes: Tuple[str, ...] = ()

    @property
    def ratio(self) -> float:
        """Quantised size / float size."""
        return self.int8_bytes / self.fp32_bytes if self.fp32_bytes else float("nan")

    @property
    def total_seconds(self) -> float:
        """Wall time of all steps."""
        return float(sum(self.seconds.values()))


@dataclass(frozen=True)
class OutputAgreement:
    """How closely one output of a quantised model follows the float model.

    Attributes:
      max_abs_diff: largest absolute difference over all elements and feeds.
      sqnr_db: signal-to-quantisation-noise ratio ``10 log10(sum f^2 / sum (f - q)^2)`` in dB
        (``inf`` when identical).
    """

    max_abs_diff: float
    sqnr_db: float


def _image_files(image_dir: Path) -> List[Path]:
    # Sorted by the path relative to the folder, so the choice does not depend on the file system order.
    files = [p for p in image_dir.rglob("*") if p.is_file() and not p.name.startswith(".")]
    return sorted(files, key=lambda p: p.relative_to(image_dir).as_posix())


def calibration_feeds(
    image_dir: Union[str, os.PathLike],
    spec: InputSpec,
    *,
    count: int,
    seed: int = 0,
    batch: int = 1,
) -> List[Dict[str, np.ndarray]]:
    """Model inputs for calibration, made from photos exactly as the runtime pre-processes them.

    The files under ``image_dir`` (recursively, hidden files excepted) are sorted by relative path and
    visited in the order of ``np.random.default_rng(seed).permutation``; the first ``count`` that
    decode are used. Files that do not decode (label files, truncated photos...) are skipped with a
    warning. Each photo goes through :func:`load_image` and :func:`image_to_tensor` with ``spec``.

    Args:
      image_dir: folder of photos (e.g. the drink gallery).
      spec: the model's input description (name, size, resize, mean/std...).
      count: number of photos wanted, >= 1.
      seed: seed of the choice, >= 0.
      batch: photos per feed. A model with a fixed batch (``spec.shape[0] > 0``) must be given that
        batch; its last feed is completed by repeating the first photos.

    Returns:
      Feeds ``{spec.name: float32 (b, 3, spec.height, spec.width)}`` holding
      ``min(count, readable photos)`` photos (plus the repeats that complete a fixed batch).

    Raises:
      MissingFileError: ``image_dir`` does not exist.
      InvalidInputError: ``image_dir`` is not a folder or holds no readable photo; ``count``,
        ``seed`` or ``batch`` is out of range, or ``batch`` differs from a fixed model batch.
    """
    _check_int("count", count, 1)
    _check_int("seed", seed, 0)
    _check_int("batch", batch, 1)
    fixed = spec.shape[0]
    if fixed > 0 and batch != fixed:
        raise InvalidInputError(f"input {spec.name!r} has a fixed batch of {fixed}, got a calibration batch of {batch}")
    root = Path(image_dir)
    if not root.exists():
        raise MissingFileError(f"{root}: calibration folder does not exist")
    if not root.is_dir():
        raise InvalidInputError(f"{root}: calibration path is not a folder of photos")
    files = _image_files(root)
    tensors: List[np.ndarray] = []
    skipped = 0
    for i in np.random.default_rng(seed).permutation(len(files)):
        if len(tensors) == count:
            break
        path = files[int(i)]
        try:
            image = load_image(path)
        except (ImageDecodeError, InvalidInputError, MissingFileError) as exc:
            skipped += 1
            _LOG.warning("calibration: skipping %s: %s", path, exc)
            continue
        tensors.append(image_to_tensor(image, spec))
    if not tensors:
        raise InvalidInputError(
            f"{root}: no readable photo for calibration ({len(files)} files, {skipped} unreadable); "
            "expected a folder (searched recursively) of JPEG, PNG, WebP or BMP photos"
        )
    if len(tensors) < count:
        _LOG.warning("calibration: %s has only %d readable photos (%d asked)", root, len(tensors), count)
    _LOG.info("calibration: %d photos from %s (seed %d, %d unreadable skipped)", len(tensors), root, seed, skipped)
    feeds = []
    for start in range(0, len(tensors), batch):
        group = tensors[start:start + batch]
        if fixed > 0 and len(group) < fixed:
            group = group + [tensors[j % len(tensors)] for j in range(fixed - len(group))]
        feeds.append({spec.name: np.stack(group).astype(np.float32, copy=False)})
    return feeds


def float_tail_nodes(model, depth: int) -> Tuple[str, ...]:
    """Names of the nodes whose activations ``float_tail=depth`` keeps in float.

    Walking back from every graph output, a node belongs to the tail while at most ``depth`` weighted
    layers (Conv, ConvTranspose, Gemm, MatMul) have been met on the way, the node itself included.

    Args:
      model: an ``onnx.ModelProto`` whose nodes all have names.
      depth: ``-1`` (no tail), ``0`` (only the ops after the last weighted layers), or more.

    Returns:
      Node names, sorted.
    """
    if depth < 0:
        return ()
    producer = {out: node for node in model.graph.node for out in node.output}
    best: Dict[str, int] = {}
    stack = [(o.name, 0) for o in model.graph.output]
    while stack:
        tensor, met = stack.pop()
        node = producer.get(tensor)
        if node is None:
            continue
        met += node.op_type in _WEIGHTED_OPS
        if met > depth or best.get(node.name, depth + 1) <= met:
            continue
        best[node.name] = met
        stack.extend((name, met) for name in node.input if name)
    return tuple(sorted(best))


def _weight_axis(node) -> Optional[int]:
    """Output-channel axis of a weighted node's second input, or None when unsupported."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "MatMul":
        return 1
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return None


def _depthwise(node, weight) -> bool:
    """A Conv with more than one group of one input channel each (its weight ``(C_out, 1, kH, kW)``)."""
    return (node.op_type == "Conv" and len(weight.dims) == 4 and weight.dims[1] == 1
            and any(a.name == "group" and a.i > 1 for a in node.attribute))


def int8_tail_weights(model, node_names: Sequence[str]) -> List[str]:
    """Store the float weights of the named weighted nodes as int8 + ``DequantizeLinear`` (in place).

    Per output channel, symmetric: zero point 0, scale = max |w| / 127 (1 for an all-zero channel).
    The nodes keep float inputs and outputs; only their weight storage shrinks 4x. Weights shared
    with another node, non-float or non-initializer weights, 2-D ``MatMul`` weights of other ranks
    and op types without a clear channel axis (ConvTranspose) are left alone, and so are depthwise
    convolutions: onnxruntime cannot pre-pack a weight that a ``DequantizeLinear`` computes, and its
    float kernel for a depthwise convolution then runs several times slower, while such weights are
    small (docs/benchmarks.md, "On the machine the issue was measured on").

    Args:
      model: an ``onnx.ModelProto`` of opset >= 13 (``DequantizeLinear`` with ``axis``).
      node_names: candidate node names (nodes of other op types are ignored).

    Returns:
      Names of the nodes whose weights were converted, in graph order.
    """
    from onnx import TensorProto, helper, numpy_helper

    wanted = set(node_names)
    inits = {i.name: i for i in model.graph.initializer}
    uses: Dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    graph_inputs = {i.name for i in model.graph.input}
    done: List[str] = []
    nodes = []
    for node in model.graph.node:
        axis = _weight_axis(node) if node.name in wanted and len(node.input) > 1 else None
        init = inits.get(node.input[1]) if axis is not None else None
        if (init is not None and uses.get(init.name) == 1 and init.name not in graph_inputs
                and not _depthwise(node, init)
                and init.data_type == TensorProto.FLOAT and len(init.dims) > axis
                and not (node.op_type == "MatMul" and len(init.dims) != 2)):
            w = numpy_helper.to_array(init).astype(np.float32)
            per_channel = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
            scale = (np.abs(per_channel).max(axis=1) / 127.0).astype(np.float32)
            scale[scale == 0] = 1.0
            shape = [1] * w.ndim
            shape[axis] = -1
            q = np.clip(np.rint(w / scale.reshape(shape)), -127, 127).astype(np.int8)
            base = init.name
            model.graph.initializer.remove(init)
            model.graph.initializer.extend([
                numpy_helper.from_array(q, f"{base}_int8"),
                numpy_helper.from_array(scale, f"{base}_int8_scale"),
                numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{base}_int8_zero_point"),
            ])
            nodes.append(helper.make_node(
                "DequantizeLinear", [f"{base}_int8", f"{base}_int8_scale", f"{base}_int8_zero_point"], [base],
                name=f"{node.name}_weight_DequantizeLinear", axis=axis,
            ))
            done.append(node.name)
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return done


def compare_outputs(
    fp32_path: Union[str, os.PathLike],
    int8_path: Union[str, os.PathLike],
    feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    threads: Optional[int] = None,
) -> Dict[str, OutputAgreement]:
    """Run a float and a quantised model on the same feeds and compare every output.

    Args:
      fp32_path: the float model.
      int8_path: the quantised model (same inputs and outputs).
      feeds: input dicts, e.g. from :func:`calibration_feeds` on photos not used for calibration.
      threads: onnxruntime intra-op threads; ``None`` lets onnxruntime decide.

    Returns:
      Output name -> :class:`OutputAgreement`, in the float model's output order.

    Raises:
      BackendUnavailableError: onnxruntime is not installed.
      InvalidInputError: ``feeds`` is empty, or the models' outputs differ.
    """
    if not feeds:
        raise InvalidInputError("compare_outputs needs at least one feed")
    _, ort, _ = _import_tools()
    sessions = []
    for path in (fp32_path, int8_path):
        sessions.append(ort.InferenceSession(str(path), sess_options=session_options(ort, threads=threads),
                                             providers=["CPUExecutionProvider"]))
    names = [o.name for o in sessions[0].get_outputs()]
    if [o.name for o in sessions[1].get_outputs()] != names:
        raise InvalidInputError(f"{int8_path}: outputs differ from those of {fp32_path}")
    max_diff = dict.fromkeys(names, 0.0)
    signal = dict.fromkeys(names, 0.0)
    noise = dict.fromkeys(names, 0.0)
    for feed in feeds:
        ref = sessions[0].run(names, dict(feed))
        got = sessions[1].run(names, dict(feed))
        for name, f, q in zip(names, ref, got):
            f64, d = f.astype(np.float64), f.astype(np.float64) - q
            max_diff[name] = max(max_diff[name], float(np.abs(d).max()) if d.size else 0.0)
            signal[name] += float((f64 * f64).sum())
            noise[name] += float((d * d).sum())
    return {
        n: OutputAgreement(max_diff[n], 10 * math.log10(signal[n] / noise[n]) if noise[n] > 0 else math.inf)
        for n in names
    }


def _import_tools():
    try:
        import onnx
        import onnxruntime
        from onnxruntime import quantization
    except ImportError as exc:
        raise BackendUnavailableError(f"quantisation needs onnx and onnxruntime ({exc}); run: {_INSTALL_HINT}") from None
    return onnx, onnxruntime, quantization


@contextlib.contextmanager
def _step(name: str, source: Path, seconds: Dict[str, float]) -> Iterator[None]:
    """Time a step, log what onnxruntime prints, re-raise its untyped failures as ConversionError."""
    hint = ""
    if name == "quantize_static":
        hint = ("; the entropy and percentile histograms fail on nearly uniform calibration photos: "
                "use varied photos or method='minmax'")
    out = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out):
            yield
    except (ConversionError, InvalidInputError, MissingFileError, BackendUnavailableError):
        raise
    except Exception as exc:  # onnx and onnxruntime raise many untyped errors
        raise ConversionError(
            f"quantisation step {name!r} failed for {source}: {type(exc).__name__}: {exc}{hint}"
        ) from exc
    finally:
        seconds[name] = round(time.perf_counter() - start, 3)
        for line in out.getvalue().splitlines():
            if line.strip():
                _LOG.debug("%s: %s", name, line.strip())
    _LOG.info("step %s (%s): %.2f s", name, source, seconds[name])


def _reader(feeds: Sequence[Dict[str, np.ndarray]]):
    from onnxruntime.quantization import CalibrationDataReader

    class _FeedReader(CalibrationDataReader):
        """Hands the feeds to onnxruntime's calibrator, a slice at a time (``set_range``)."""

        def __init__(self) -> None:
            self._feeds = list(feeds)
            self._iter: Iterator[Dict[str, np.ndarray]] = iter(self._feeds)

        def get_next(self) -> Optional[Dict[str, np.ndarray]]:
            return next(self._iter, None)

        def __len__(self) -> int:
            return len(self._feeds)

        def set_range(self, start_index: int, end_index: int) -> None:
            self._iter = iter(self._feeds[start_index:end_index])

    return _FeedReader()


def _name_nodes(model) -> None:
    # Nodes are excluded by name; the exporter and the optimiser leave some unnamed.
    used = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)


def _quantized_ops(model, float_nodes: Sequence[str]) -> Dict[str, int]:
    """op type -> nodes computing on quantised activations (a first input a DequantizeLinear writes, or the codes
    a QuantizeLinear writes, as a ``Clip`` of a hard sigmoid reads; QLinear*, *Integer)."""
    keep_float = set(float_nodes)
    producer = {out: n.op_type for n in model.graph.node for out in n.output}
    counts: Dict[str, int] = {}
    for node in model.graph.node:
        op = node.op_type
        if op in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear") or node.name in keep_float:
            continue
        first = node.input[0] if node.input else ""
        if (op.startswith("QLinear") or op.endswith("Integer")
                or producer.get(first) in ("DequantizeLinear", "QuantizeLinear")):
            counts[op] = counts.get(op, 0) + 1
    return dict(sorted(counts.items()))


def _unfolded_batchnorms(model) -> int:
    producer = {out: n.op_type for n in model.graph.node for out in n.output}
    return sum(1 for n in model.graph.node if n.op_type == "BatchNormalization" and producer.get(n.input[0]) == "Conv")


def _quantize_static_accepts_cache(q) -> bool:
    """Whether this onnxruntime's ``quantize_static`` can save and reuse its calibration (``calibration_cache_path``)."""
    import inspect

    return "calibration_cache_path" in inspect.signature(q.quantize_static).parameters


def quantizable_blocks(model, float_nodes: Sequence[str]) -> Dict[str, Tuple[str, ...]]:
    """The model's quantisable nodes grouped into blocks: each weighted layer with the plain ops after it.

    A block is a weighted node (Conv, ConvTranspose, Gemm, MatMul) outside ``float_nodes`` and every
    node its outputs reach through non-weighted nodes (activations, Mul, Concat, Resize, ...), in graph
    order; a node reached from two blocks belongs to the first. Keeping a block float keeps every tensor
    it computes float: excluding a weighted layer alone leaves the quantisation of the activations
    around it, which on the PP-ShiTu detector is most of the noise (docs/benchmarks.md).

    Args:
      model: an ``onnx.ModelProto`` whose nodes all have names, in topological order.
      float_nodes: nodes that stay float anyway (the float tail); they join no block.

    Returns:
      Block name (its weighted node's name) -> node names, in graph order.
    """
    keep = set(float_nodes)
    consumers: Dict[str, List[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    owner: Dict[str, str] = {}
    blocks: Dict[str, List[str]] = {}
    for node in model.graph.node:
        if node.op_type not in _WEIGHTED_OPS or node.name in keep or node.name in owner:
            continue
        blocks[node.name] = [node.name]
        owner[node.name] = node.name
        stack = list(node.output)
        while stack:
            for child in consumers.get(stack.pop(), []):
                if child.op_type in _WEIGHTED_OPS or child.name in owner or child.name in keep:
                    continue
                owner[child.name] = node.name
                blocks[node.name].append(child.name)
                stack.extend(child.output)
    return {name: tuple(nodes) for name, nodes in blocks.items()}


@dataclass(frozen=True)
class BlockDamage:
    """How much one block, quantised alone, changes the model's outputs.

    Attributes:
      block: the block's name (its weighted node).
      nodes: the block's nodes.
      noise_share: this block's share of the summed output noise of all blocks, in [0, 1].
      sqnr_db: output SQNR with only this block quantised (``inf`` when it changes nothing).
    """

    block: str
    nodes: Tuple[str, ...]
    noise_share: float
    sqnr_db: float

    def record(self) -> Dict[str, Any]:
        """The damage figures, JSON-ready (``sqnr_db_alone`` None when the block changes nothing)."""
        return {"noise_share": round(self.noise_share, 5),
                "sqnr_db_alone": None if not math.isfinite(self.sqnr_db) else round(self.sqnr_db, 2)}


class ModelQuantizer:
    """One float model prepared and calibrated once, then quantised any number of times with other parts
    kept float (the INT8 search). Create it with :meth:`prepare`; :func:`quantize_model` is the one-shot form.

    Attributes:
      source: the float model.
      options: the quantisation options.
      model: the prepared ``onnx.ModelProto`` (opset >= 13, constants as initializers, pre-processed,
        every node named): node names in :attr:`blocks` and ``exclude_nodes`` are its names.
      tail: nodes of the float tail (``options.float_tail``), float in every result.
      blocks: :func:`quantizable_blocks` outside the tail and ``options.exclude_nodes``.
      calib_images: photos the calibration saw.
    """

    def __init__(self, key: object, source: Path, options: QuantizeOptions, model: Any, prepared: Path, work: Path,
                 feeds: List[Dict[str, np.ndarray]], seconds: Dict[str, float]) -> None:
        if key is not _KEY:
            raise TypeError("use ModelQuantizer.prepare")
        self.source, self.options, self.model = source, options, model
        self._prepared, self._work, self._feeds = prepared, work, feeds
        self._seconds = seconds
        self._cache: Optional[Path] = None
        self._calibrates_each_time = False
        self.tail = tuple(sorted(float_tail_nodes(model, options.float_tail)))
        always = set(self.tail) | set(options.exclude_nodes)
        always |= {n.name for n in model.graph.node if n.op_type in options.exclude_op_types}
        self._always_float = always
        self.blocks = quantizable_blocks(model, sorted(always))
        self.calib_images = sum(next(iter(f.values())).shape[0] for f in feeds)

    @classmethod
    def prepare(
        cls,
        fp32_path: Union[str, os.PathLike],
        work: Union[str, os.PathLike],
        *,
        input_spec: InputSpec,
        calib_dir: Optional[Union[str, os.PathLike]] = None,
        options: Optional[QuantizeOptions] = None,
    ) -> "ModelQuantizer":
        """Prepares a float model for quantisation and reads its calibration photos.

        Args:
          fp32_path: the float model.
          work: an existing scratch folder the quantiser may fill (prepared model, calibration cache).
          input_spec: the model's input description from the bundle manifest: calibration photos are
            pre-processed with it, as the runtime does.
          calib_dir: folder of calibration photos; required in static mode, ignored in dynamic mode.
          options: quantisation settings; ``None`` means ``QuantizeOptions()``.

        Raises:
          As :func:`quantize_model`.
        """
        options = QuantizeOptions() if options is None else options
        if not isinstance(options, QuantizeOptions):
            raise InvalidInputError(f"options must be QuantizeOptions, got {type(options).__name__}")
        if not isinstance(input_spec, InputSpec):
            raise InvalidInputError(f"input_spec must be an edge_shitu.bundle.InputSpec, got {type(input_spec).__name__}")
        source, work = Path(fp32_path), Path(work)
        if not source.is_file():
            raise MissingFileError(f"{source}: no such model file")
        static = options.mode == "static"
        if static and calib_dir is None:
            raise InvalidInputError(
                f"{source}: static quantisation needs a folder of calibration photos (calib_dir, e.g. the drink "
                "gallery); pass one or use mode='dynamic'"
            )
        onnx, _, q = _import_tools()
        seconds: Dict[str, float] = {}
        feeds: List[Dict[str, np.ndarray]] = []
        if static:
            batch = input_spec.shape[0] if input_spec.shape[0] > 0 else options.calib_batch
            with _step("calibration photos", source, seconds):
                feeds = calibration_feeds(calib_dir, input_spec, count=options.calib_count, seed=options.seed,
                                          batch=batch)
        prepared, optimized = work / "prepared.onnx", work / "optimized.onnx"
        with _step("prepare", source, seconds):
            model = onnx.load(str(source))
            opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), _OPSET)
            if opset < _OPSET:
                model = onnx.version_converter.convert_version(model, _OPSET)
            constants_to_initializers(model)
            onnx.save(model, str(prepared))
            if options.pre_process:
                # Given paths, not a ModelProto: onnxruntime 1.2x-1.31 fails on in-memory models
                # without external data and then silently skips the optimisation.
                q.quant_pre_process(str(prepared), str(optimized), skip_symbolic_shape=True)
                model = onnx.load(str(optimized))
                unfolded = _unfolded_batchnorms(model)
                if unfolded:
                    _LOG.warning("%s: %d BatchNormalization nodes after Conv were not folded", source, unfolded)
            _name_nodes(model)
            onnx.save(model, str(prepared))
        names = {n.name for n in model.graph.node}
        unknown = sorted(set(options.exclude_nodes) - names)
        if unknown:
            raise InvalidInputError(
                f"{source}: exclude_nodes names no node of the pre-processed model: {', '.join(unknown[:5])} "
                "(node names are those after quant_pre_process; QuantReport.float_nodes shows some)"
            )
        return cls(_KEY, source, options, model, prepared, work, feeds, seconds)

    def probe_feeds(self, count: int) -> List[Dict[str, np.ndarray]]:
        """The first ``count`` calibration feeds (fewer when there are fewer).

        Raises:
          InvalidInputError: dynamic mode, which reads no calibration photos.
        """
        if not self._feeds:
            raise InvalidInputError(f"{self.source}: dynamic quantisation reads no calibration photos to probe with")
        return list(self._feeds[:count])

    def _run_quantizer(self, out: Path, *, exclude: Sequence[str], only: Optional[Sequence[str]] = None) -> None:
        """``quantize_static``/``quantize_dynamic`` of the prepared model into ``out``; the calibration is
        computed once and reused when onnxruntime can (``calibration_cache_path``)."""
        _, ort, q = _import_tools()
        options = self.options
        qtype = {"uint8": q.QuantType.QUInt8, "int8": q.QuantType.QInt8}
        if options.mode != "static":
            q.quantize_dynamic(str(self._prepared), str(out), per_channel=options.per_channel,
                               reduce_range=options.reduce_range, weight_type=qtype[options.weight_type],
                               nodes_to_exclude=list(exclude), nodes_to_quantize=list(only) if only else None)
            return
        method = {
            "minmax": q.CalibrationMethod.MinMax,
            "entropy": q.CalibrationMethod.Entropy,
            "percentile": q.CalibrationMethod.Percentile,
        }[options.method]
        extra = {
            # One feed per calibration pass: the augmented model outputs every activation, a lot
            # for a 640x640 detector photo (docs/benchmarks.md, "converters/quantize.py: INT8
            # defaults"), and the histogram methods keep them all until the pass ends.
            "CalibStridedMinMax": 1,
            # The percentile calibrator is symmetric by default, which wastes half of a uint8 range.
            "CalibTensorRangeSymmetric": False,
            "CalibPercentile": float(options.percentile),
        }
        reader: Any = _reader(self._feeds)
        cache: Dict[str, Any] = {}
        if _quantize_static_accepts_cache(q):
            path = self._work / "calibration.json"
            if self._cache is not None:
                reader = None
            cache = {"calibration_cache_path": str(path)}
            self._cache = path
        elif not self._calibrates_each_time:
            # Not an error, but a search then pays for a full calibration at every step.
            _LOG.warning("%s: this onnxruntime (%s) cannot reuse a calibration (no calibration_cache_path): every "
                         "quantisation calibrates again", self.source, ort.__version__)
            self._calibrates_each_time = True
        fmt = q.QuantFormat.QDQ if options.quant_format == "qdq" else q.QuantFormat.QOperator
        q.quantize_static(
            str(self._prepared), str(out), reader,
            quant_format=fmt, per_channel=options.per_channel, reduce_range=options.reduce_range,
            activation_type=qtype[options.activation_type], weight_type=qtype[options.weight_type],
            nodes_to_exclude=list(exclude), nodes_to_quantize=list(only) if only else None,
            calibrate_method=method, extra_options=extra, **cache,
        )

    def quantize(self, out_path: Union[str, os.PathLike], *, float_blocks: Sequence[str] = ()) -> QuantReport:
        """Writes the INT8 model with the float tail, ``exclude_nodes`` and the nodes of ``float_blocks`` kept float.

        Args:
          out_path: where to write the quantised model; replaced atomically. Must differ from the source.
          float_blocks: names of :attr:`blocks` to keep float, weights included (``tail_int8_weights``
            applies to the float tail and ``exclude_nodes`` only).

        Returns:
          A :class:`QuantReport`.

        Raises:
          InvalidInputError: ``out_path`` is the source, or an unknown block name.
          ConversionError: a quantisation step failed, quantised nothing, or its result is not a valid,
            loadable model.
        """
        onnx, ort, _ = _import_tools()
        target = Path(out_path)
        if target.resolve() == self.source.resolve():
            raise InvalidInputError(f"{target}: the quantised model cannot overwrite its float source")
        unknown = sorted(set(float_blocks) - set(self.blocks) - {TAIL_WEIGHTS})
        if unknown:
            raise InvalidInputError(f"{self.source}: no quantisable block named {', '.join(unknown[:5])}")
        options, seconds = self.options, dict(self._seconds)
        float_nodes = sorted(self._always_float | {n for b in float_blocks if b != TAIL_WEIGHTS
                                                   for n in self.blocks[b]})
        quantized = self._work / "quantized.onnx"
        target.parent.mkdir(parents=True, exist_ok=True)
        step = "quantize_static" if options.mode == "static" else "quantize_dynamic"
        with _step(step, self.source, seconds):
            self._run_quantizer(quantized, exclude=float_nodes)
        with _step("check", self.source, seconds):
            result = onnx.load(str(quantized))
            weight_only: List[str] = []
            tail = sorted(self._always_float)
            if options.tail_int8_weights and tail and TAIL_WEIGHTS not in float_blocks:
                # Only the float tail's weights: blocks kept float by the INT8 search keep float weights, since
                # what they are kept float for is agreement (int8 weights alone move the replica detector's
                # scores by more than the verification allows).
                weight_only = int8_tail_weights(result, tail)
            clipped: Tuple[str, ...] = ()
            rewritten: Tuple[str, ...] = ()
            relaid: Tuple[str, ...] = ()
            if options.clip_hard_sigmoid and options.mode == "static":
                clipped = clip_hard_sigmoids(result)
            if options.integer_hard_sigmoid and options.mode == "static":
                rewritten = integer_hard_sigmoids(result)
            if options.kernel_shapes and options.mode == "static":
                relaid = space_to_depth_stems(result) + pad_depthwise_channels(result)
            if weight_only or clipped or rewritten or relaid:
                onnx.save(result, str(quantized))
            counts = _quantized_ops(result, float_nodes)
            if not counts:
                raise ConversionError(f"{self.source}: quantisation left every node in float")
            onnx.checker.check_model(result)
            _publish(ort, quantized, target, self.source)
        report = QuantReport(
            source=self.source, output=target, options=options, fp32_bytes=self.source.stat().st_size,
            int8_bytes=target.stat().st_size, calib_images=self.calib_images, float_nodes=tuple(float_nodes),
            weight_only_nodes=tuple(weight_only), quantized_ops=counts, seconds=seconds,
            integer_hard_sigmoids=rewritten, clip_hard_sigmoids=clipped, kernel_shapes=relaid,
        )
        _LOG.info(
            "%s -> %s: %s%s, %.2f MB -> %.2f MB (%.2fx), %d nodes float, in %.1f s",
            self.source, target, options.mode, f" {options.method}" if options.mode == "static" else "",
            report.fp32_bytes / 1e6, report.int8_bytes / 1e6, report.ratio, len(float_nodes), report.total_seconds,
        )
        return report

    @property
    def has_parts(self) -> bool:
        """Whether the models written are static QDQ, whose weights and activations :meth:`quantize_part` takes
        apart."""
        return self.options.mode == "static" and self.options.quant_format == "qdq"

    def quantize_part(self, out_path: Union[str, os.PathLike], part: str) -> Dict[str, int]:
        """Writes the model with every block INT8 but only one ``part`` of it quantised
        (:func:`edge_shitu_converters.int8_parts.keep_int8_part`): ``"weights"`` (activations float) or
        ``"activations"`` (weights float). The float tail is as in :meth:`quantize` (its int8 weights count as
        weights); the hard-sigmoid rewrites, which change activation codes, are applied to ``"activations"``;
        the kernel-shape re-layouts, which change no value, are not.

        Returns:
          What :func:`~edge_shitu_converters.int8_parts.keep_int8_part` replaced.

        Raises:
          InvalidInputError: dynamic mode or the QOperator format (not a QDQ model), an unknown ``part``, or
            ``out_path`` is the source.
          ConversionError: the quantisation failed, or its result is not a valid, loadable model.
        """
        from edge_shitu_converters.int8_parts import keep_int8_part

        onnx, ort, _ = _import_tools()
        options = self.options
        if not self.has_parts:
            raise InvalidInputError(f"{self.source}: only a static QDQ model has parts to take apart")
        target = Path(out_path)
        if target.resolve() == self.source.resolve():
            raise InvalidInputError(f"{target}: the model cannot overwrite its float source")
        work = self._work / "one-part.onnx"
        with _step("quantize_static", self.source, {}):
            self._run_quantizer(work, exclude=sorted(self._always_float))
        result = onnx.load(str(work))
        if options.tail_int8_weights and self._always_float:
            int8_tail_weights(result, sorted(self._always_float))
        result, replaced = keep_int8_part(result, self.model, part)
        if part == "activations":
            if options.clip_hard_sigmoid:
                clip_hard_sigmoids(result)
            if options.integer_hard_sigmoid:
                integer_hard_sigmoids(result)
        onnx.checker.check_model(result)
        onnx.save(result, str(work))
        _publish(ort, work, target, self.source)
        return replaced

    def block_damage(self, feeds: Sequence[Mapping[str, np.ndarray]], *, threads: Optional[int] = None) -> List[BlockDamage]:
        """Each block's effect on the outputs: the model with only that block quantised, against the float model.

        The output noise power of the whole INT8 model is close to the sum of the blocks' (quantisation
        noise of separate tensors adds up), so keeping the blocks of largest noise float removes the
        most noise for the fewest float blocks.

        Args:
          feeds: input dicts (e.g. a few calibration photos).
          threads: onnxruntime intra-op threads; None lets it choose.

        Returns:
          One :class:`BlockDamage` per block, most damaging first (ties by graph order).

        Raises:
          InvalidInputError: ``feeds`` is empty.
          ConversionError: a quantisation step failed.
        """
        if not feeds:
            raise InvalidInputError("block_damage needs at least one feed")
        onnx, ort, _ = _import_tools()
        so = session_options(ort, threads=threads)
        reference = ort.InferenceSession(str(self._prepared), sess_options=so, providers=["CPUExecutionProvider"])
        names = [o.name for o in reference.get_outputs()]
        expected = [reference.run(names, dict(f)) for f in feeds]
        signal = sum(float(np.square(a.astype(np.float64)).sum()) for r in expected for a in r)
        one = self._work / "one-block.onnx"
        noise: Dict[str, float] = {}
        units = dict(self.blocks)

        def measure(unit: str) -> None:
            session = ort.InferenceSession(str(one), sess_options=so, providers=["CPUExecutionProvider"])
            noise[unit] = sum(float(np.square(a.astype(np.float64) - b).sum())
                              for f, r in zip(feeds, expected) for a, b in zip(r, session.run(names, dict(f))))

        for block, nodes in self.blocks.items():
            with _step("quantize one block", self.source, {}):
                self._run_quantizer(one, exclude=sorted(self._always_float), only=nodes)
                if self.options.clip_hard_sigmoid and self.options.mode == "static":
                    # The one rewrite after quantisation that moves codes: the block is measured as it will run.
                    model = onnx.load(str(one))
                    if clip_hard_sigmoids(model):
                        onnx.save(model, str(one))
            measure(block)
        # The float tail's int8 weights, alone: the float model with only those weights rounded.
        model = onnx.load(str(self._prepared))
        tail_weights = int8_tail_weights(model, sorted(self._always_float)) if self.options.tail_int8_weights else []
        if tail_weights:
            onnx.save(model, str(one))
            units[TAIL_WEIGHTS] = tuple(tail_weights)
            measure(TAIL_WEIGHTS)
        total = sum(noise.values())
        order = sorted(units, key=lambda b: -noise[b])  # stable: graph order breaks ties
        return [BlockDamage(b, units[b], noise[b] / total if total > 0 else 0.0,
                            10 * math.log10(signal / noise[b]) if noise[b] > 0 else math.inf) for b in order]


def _publish(ort: Any, model: Path, target: Path, source: Path) -> None:
    """Loads ``model`` as the runtime would, then puts a copy at ``target`` atomically.

    Raises:
      ConversionError: onnxruntime cannot load it (``source`` names the float model it came from).
    """
    try:
        ort.InferenceSession(str(model), sess_options=session_options(ort), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ConversionError(f"{source}: onnxruntime cannot load the quantised model: {exc}") from None
    partial = target.with_name(f".{target.name}.partial")
    try:
        shutil.copyfile(model, partial)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


_KEY = object()

TAIL_WEIGHTS = "float-tail-weights"
"""The unit of :meth:`ModelQuantizer.block_damage` and ``float_blocks`` that stands for the int8 *weights* of the
float tail (``tail_int8_weights``): keeping it "float" keeps those weights float too."""


def quantize_model(
    fp32_path: Union[str, os.PathLike],
    out_path: Union[str, os.PathLike],
    *,
    input_spec: InputSpec,
    calib_dir: Optional[Union[str, os.PathLike]] = None,
    options: Optional[QuantizeOptions] = None,
) -> QuantReport:
    """Quantise one float ONNX model to INT8 (:class:`ModelQuantizer` for several variants of one model).

    Args:
      fp32_path: the float model (e.g. a bundle's ``detector.onnx`` or ``extractor.onnx``).
      out_path: where to write the quantised model; replaced atomically (a partial file never appears
        there). Must differ from ``fp32_path``.
      input_spec: the model's input description from the bundle manifest: calibration photos are
        pre-processed with it, as the runtime does.
      calib_dir: folder of calibration photos; required in static mode, ignored in dynamic mode.
      options: quantisation settings; ``None`` means ``QuantizeOptions()`` (see also
        :meth:`QuantizeOptions.for_role`).

    Returns:
      A :class:`QuantReport` (sizes, step times, what stayed float).

    Raises:
      MissingFileError: ``fp32_path`` or ``calib_dir`` does not exist.
      InvalidInputError: static mode without ``calib_dir``; a calibration folder without readable
        photos; ``out_path`` equal to ``fp32_path``; ``exclude_nodes`` naming no node of the
        pre-processed model; options of the wrong type.
      BackendUnavailableError: onnx / onnxruntime (with its quantisation tools) is not installed.
      ConversionError: a quantisation step failed, quantised nothing, or its result is not a valid,
        loadable model.
    """
    source, target = Path(fp32_path), Path(out_path)
    if source.is_file() and target.resolve() == source.resolve():
        raise InvalidInputError(f"{target}: the quantised model cannot overwrite its float source")
    with tempfile.TemporaryDirectory(prefix="edge-shitu-quant-") as tmp:
        return ModelQuantizer.prepare(source, tmp, input_spec=input_spec, calib_dir=calib_dir,
                                      options=options).quantize(target)
