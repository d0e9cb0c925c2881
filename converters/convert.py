"""Convert Paddle PP-ShiTu models (official or replica) into an edge-shitu bundle directory.

A bundle directory holds ``detector.onnx``, ``extractor.onnx`` (either may be absent) and
``manifest.json``, which records each model's input pre-processing, output layout, file digest and
provenance, plus the code and recognition settings the runtime needs. The formats are listed in
:data:`EXPORT_FORMATS`; ``lite-x86`` and ``lite-arm`` bundles hold Paddle-Lite ``.nb`` files instead
and are built by :mod:`edge_shitu_converters.lite` from the same detector cut.

The detector is *not* converted whole: its in-graph post-process (a ``while`` loop over the batch and
``multiclass_nms3``) is where paddle2onnx fails and what the runtime re-implements in numpy. The
program is cut at its 8 raw head outputs (``sigmoid_0.tmp_0`` ... ``sigmoid_3.tmp_0``: class scores
``[N, H, W, 1]``, and ``transpose_1.tmp_0``, ``transpose_3.tmp_0``, ``transpose_5.tmp_0``,
``transpose_7.tmp_0``: box logits ``[N, H, W, 32]``, strides 8/16/32/64), each reshaped to the
layout of a PaddleDetection raw export (``export.post_process=False``): ``[1, H*W, C]``, row-major over
(H, W). The single ``image`` input is fixed at ``1x3x640x640``.

Both program formats are cut, each in its own IR; the two cuts give the same head outputs (tested):

- a legacy ``inference.pdmodel`` is cut by variable name (above), in a clone truncated after the
  heads, because a legacy ``while`` op lists the heads among its outputs and pruning would keep it;
- a Paddle 3 PIR ``inference.json`` has no variable names (they are lost when a program is translated
  to PIR or exported from dygraph), so the heads are found by structure: the four ``sigmoid`` results
  whose input is an NHWC ``transpose`` (class scores) and the four NHWC ``transpose`` results that the
  decode reads and no ``sigmoid`` does (box logits), put in stride order (largest grid first) and
  validated by their shapes ``[N, H/s, W/s, num_classes]`` and ``[N, H/s, W/s, 4*(reg_max+1)]`` as
  in the legacy cut. PIR values are SSA, so pruning back from the reshaped heads drops the
  post-process by itself. The ``image`` feed is replaced by a fixed-shape ``data`` op, and the
  outputs get the legacy cut's names. Translating the PIR program back to a legacy one to reuse the
  legacy cut is not possible: Paddle 3.3 has a legacy-to-PIR translator, not the reverse.

Two incompatibilities of paddle2onnx 2.1 with Paddle 3.3 (which stores some float attributes as
doubles) are worked around, in both IRs, and the numerical check below would catch any other:
``nearest_interp`` ``scale`` lists abort the export, so resize ops get their static output size
instead; and ``leaky_relu`` slopes come out as garbage, so they are written back into the ONNX
``LeakyRelu`` nodes from the Paddle program.

paddle2onnx is called through its Python API, with its optimisation tools off: with a ``save_file`` it
runs Polygraphy constant folding and sets ``POLYGRAPHY_AUTOINSTALL_DEPS=1``, which lets Polygraphy
``pip install`` missing packages at run time. Passing ``save_file=None`` returns the ONNX bytes before
any of that; ``auto_upgrade_opset=False`` keeps the opset asked for. Its own logging prints to stdout
and its error path calls ``sys.exit``; both are contained here.

Every step is timed and logged (logger ``edge_shitu_converters.convert``); a failure is re-raised as
:class:`~edge_shitu.errors.ConversionError` naming the step and the model folder. Right after each
export the ONNX file is checked (``onnx.checker``) and run with onnxruntime against Paddle Inference on
deterministic inputs.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from edge_shitu_converters import paddle_io
from edge_shitu_converters.paddle_io import INSTALL_HINT, ModelFiles
from edge_shitu_converters.fetch import read_fetch_record
from edge_shitu_converters.onnx_graph import drop_unread
from edge_shitu_converters.replica import read_replica_info
from edge_shitu.bundle import FORMAT, FORMAT_VERSION, MANIFEST_NAME, Bundle, sha256_file
from edge_shitu.errors import (
    BackendUnavailableError,
    ConversionError,
    InvalidInputError,
    MissingFileError,
)

__all__ = [
    "DetectorHeads",
    "ExportFormat",
    "EXPORT_FORMATS",
    "convert",
    "cut_detector_heads",
    "validate_export",
]

_LOG = logging.getLogger(__name__)



@dataclass(frozen=True)
class ExportFormat:
    """One target format of the converter.

    Attributes:
      name: format name, e.g. ``"onnx"``.
      suffix: model file suffix, e.g. ``".onnx"``.
      backend: the runtime backend recorded in the manifest.
      precisions: precisions this converter can write now.
      planned: precisions known to be coming (rejected as "not supported yet").
      opsets: inclusive range of ONNX opsets accepted (None when the format has no opset).
      target: machine the model files are built for (``"any"``, ``"x86"``, ``"arm"``).
    """

    name: str
    suffix: str
    backend: str
    precisions: Tuple[str, ...]
    planned: Tuple[str, ...] = ()
    opsets: Optional[Tuple[int, int]] = None
    target: str = "any"


# The one table that drives validation (and, later, the CLI's choices).
EXPORT_FORMATS: Dict[str, ExportFormat] = {
    "onnx": ExportFormat(
        name="onnx",
        suffix=".onnx",
        backend="onnxruntime",
        precisions=("fp32", "int8"),
        opsets=(11, 17),
    ),
    # Paddle-Lite naive-buffer models (edge_shitu_converters.lite): kernels are compiled in for one machine.
    "lite-x86": ExportFormat(
        name="lite-x86", suffix=".nb", backend="paddlelite", precisions=("fp32", "int8"), target="x86"
    ),
    "lite-arm": ExportFormat(
        name="lite-arm", suffix=".nb", backend="paddlelite", precisions=("fp32", "int8"), target="arm"
    ),
}


def validate_export(fmt: str, precision: str, opset: Optional[int]) -> ExportFormat:
    """Check a (format, precision, opset) request against :data:`EXPORT_FORMATS`.

    Args:
      fmt: a key of :data:`EXPORT_FORMATS`.
      precision: e.g. ``"fp32"``.
      opset: the ONNX opset (int) for formats that have one.

    Returns:
      The :class:`ExportFormat`.

    Raises:
      ConversionError: unknown format, or a precision it does not support (yet), or an opset out of
        its range.
    """
    spec = EXPORT_FORMATS.get(fmt) if isinstance(fmt, str) else None
    if spec is None:
        raise ConversionError(f"unknown export format {fmt!r}; expected one of {sorted(EXPORT_FORMATS)}")
    if precision not in spec.precisions:
        planned = " (planned)" if precision in spec.planned else ""
        raise ConversionError(
            f"precision {precision!r}{planned} is not supported yet for {spec.name} bundles; "
            f"supported: {list(spec.precisions)}"
        )
    if spec.opsets is not None:
        low, high = spec.opsets
        if isinstance(opset, bool) or not isinstance(opset, int) or not low <= opset <= high:
            raise ConversionError(f"opset must be an int in [{low}, {high}] for {spec.name}, got {opset!r}")
    return spec


# The reference pipeline's pre-processing, for a model folder without a config.
_IMAGENET_MEAN = [0.485, 0.456, 0.406]
_IMAGENET_STD = [0.229, 0.224, 0.225]
_SCALE_1_255 = 1.0 / 255.0
_CV2_INTERP = {0: "nearest", 1: "linear", 2: "cubic", 3: "area", 4: "lanczos"}
_DETECTOR_SIZE = (640, 640)

# The official PicoDet mainbody program: raw head outputs per stride.
_HEAD_STRIDES = (8, 16, 32, 64)
_HEAD_SCORES = ("sigmoid_0.tmp_0", "sigmoid_1.tmp_0", "sigmoid_2.tmp_0", "sigmoid_3.tmp_0")
_HEAD_BOXES = ("transpose_1.tmp_0", "transpose_3.tmp_0", "transpose_5.tmp_0", "transpose_7.tmp_0")

# The detector's in-graph multiclass_nms3 settings and PaddleClas' filtering.
_DETECTOR_DEFAULTS = {
    "score_threshold": 0.025,
    "nms_iou": 0.6,
    "nms_top_k": 1000,
    "keep_top_k": 100,
    "max_detections": 5,
    "min_score": 0.2,
}
_CODES = {"bits": 512, "method": "sign", "bit_order": "big"}
_RECOGNITION = {"max_distance": 100, "final_nms_iou": 0.05, "whole_image": "if_none", "top_k": 5}

# Official programs (sha256 of inference.pdmodel) -> bundle name family.
_FAMILY_BY_REC_SHA = {
    "3e0ade05639ff7b5fe450a55883a8087dc2b5c2349fe6b73897cbe2a5eeb6ee8": "ppshituv2",
    "67a6c2544357a259996e9aac37464996d6a7f884638329a678641f95afb2703d": "ppshituv1",
}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")

# Deterministic verification inputs: cheap, and enough to catch a wrong conversion.
_VERIFY_SEED = 20240611
_EXTRACTOR_VERIFY_BATCH = 2


@contextlib.contextmanager
def _step(name: str, model_dir: Optional[Path], timings: Dict[str, float]) -> Iterator[None]:
    """Time a conversion step, log it, and re-raise its failure as a ConversionError naming it."""
    folder = f" ({model_dir})" if model_dir is not None else ""
    start = time.perf_counter()
    _LOG.debug("step %s%s: start", name, folder)
    try:
        yield
    except (MissingFileError, BackendUnavailableError, InvalidInputError):
        raise
    except (Exception, SystemExit) as exc:  # paddle2onnx calls sys.exit on error
        where = f" for {model_dir}" if model_dir is not None else ""
        raise ConversionError(f"conversion step '{name}' failed{where}: {exc}") from exc
    finally:
        elapsed = time.perf_counter() - start
        timings[name] = elapsed
        _LOG.info("step %s%s: %.2f s", name, folder, elapsed)


def _import_runtime_tools() -> Tuple[Any, Any, Any]:
    paddle_io.import_paddle()
    p2o = paddle_io.import_paddle2onnx()
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise BackendUnavailableError(f"onnx/onnxruntime are not installed ({exc}): {INSTALL_HINT}") from exc
    return p2o, onnx, onnxruntime


def _paddle2onnx(p2o: Any, files: ModelFiles, opset: int) -> bytes:
    """Export a Paddle program to ONNX bytes with no optimiser, installer or opset upgrade."""
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        try:
            model_bytes = p2o.export(
                str(files.program),
                str(files.params),
                save_file=None,
                opset_version=opset,
                auto_upgrade_opset=False,
                verbose=False,
                enable_onnx_checker=True,
                enable_experimental_op=False,
                enable_optimize=True,
                deploy_backend="onnxruntime",
                export_fp16_model=False,
            )
        except SystemExit as exc:  # its logging.error() exits; the reason is in what it printed
            errors = [line for line in _plain(captured.getvalue()).splitlines() if "[ERROR]" in line]
            raise ConversionError(f"paddle2onnx failed on {files.program}: {' '.join(errors) or exc}") from exc
        finally:
            text = _plain(captured.getvalue()).strip()
            if text:
                _LOG.debug("paddle2onnx said: %s", text)
    if not isinstance(model_bytes, bytes) or not model_bytes:
        raise ConversionError(f"paddle2onnx returned no model for {files.program}")
    return model_bytes


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _rename_outputs(onnx: Any, model_bytes: bytes, names: Sequence[str]) -> Any:
    """Give the ONNX graph outputs the Paddle fetch names (paddle2onnx calls them fetch_name_<i>)."""
    model = onnx.load_from_string(model_bytes)
    outputs = list(model.graph.output)
    if len(outputs) != len(names):
        raise ConversionError(f"expected {len(names)} ONNX outputs, paddle2onnx wrote {len(outputs)}")
    mapping = {o.name: new for o, new in zip(outputs, names)}
    for node in model.graph.node:
        for i, name in enumerate(node.output):
            if name in mapping:
                node.output[i] = mapping[name]
        for i, name in enumerate(node.input):
            if name in mapping:
                node.input[i] = mapping[name]
    for output in outputs:
        output.name = mapping[output.name]
    return model


def _leaky_relu_slopes(files: ModelFiles) -> List[float]:
    """The negative slopes of a program's top-level leaky_relu ops, in program order."""
    paddle = paddle_io.import_paddle()
    program = paddle_io.load_program(files.program)
    if files.is_pir:
        with paddle.pir_utils.IrGuard():
            return [
                float(op.attrs()["negative_slope"])
                for op in program.global_block().ops
                if op.name() == "pd_op.leaky_relu"
            ]
    return [float(op.attr("alpha")) for op in program.global_block().ops if op.type == "leaky_relu"]


def _fix_leaky_relu(model: Any, slopes: Sequence[float]) -> None:
    """Write the Paddle slopes into the ONNX LeakyRelu nodes (paddle2onnx 2.1 loses them).

    Paddle 3.3 stores ``negative_slope`` as a double; paddle2onnx 2.1 reads a float and writes
    garbage (0.0, or a stale 0.1667) into ``alpha``. Nodes are emitted in program order.
    """
    nodes = [n for n in model.graph.node if n.op_type == "LeakyRelu"]
    if len(nodes) != len(slopes):
        raise ConversionError(f"paddle2onnx wrote {len(nodes)} LeakyRelu nodes for {len(slopes)} leaky_relu ops")
    for node, slope in zip(nodes, slopes):
        attrs = [a for a in node.attribute if a.name == "alpha"]
        if not attrs:
            attrs = [node.attribute.add()]
            attrs[0].name = "alpha"
            attrs[0].type = attrs[0].FLOAT
        attrs[0].f = slope


def _onnx_io_shape(value_info: Any) -> List[int]:
    return [d.dim_value if d.HasField("dim_value") else -1 for d in value_info.type.tensor_type.shape.dim]


def _ort_session(onnxruntime: Any, path: Path) -> Any:
    from edge_shitu.backends.onnxruntime import session_options

    return onnxruntime.InferenceSession(str(path), sess_options=session_options(onnxruntime, threads=1),
                                        providers=["CPUExecutionProvider"])


def _max_abs_diff(reference: np.ndarray, actual: np.ndarray, what: str) -> float:
    if reference.shape != actual.shape:
        raise ConversionError(f"{what}: Paddle gives shape {reference.shape}, onnxruntime {actual.shape}")
    diff = float(np.max(np.abs(reference.astype(np.float64) - actual.astype(np.float64))))
    bound = 1e-4 + 1e-4 * float(np.max(np.abs(reference)))
    if not math.isfinite(diff) or diff > bound:
        raise ConversionError(f"{what}: onnxruntime differs from Paddle Inference by {diff:.3g} (allowed {bound:.3g})")
    return diff


def _verification_image(shape: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """A normalised-looking float32 NCHW input: smooth gradients plus noise."""
    n, c, h, w = shape
    yy, xx = np.meshgrid(np.linspace(-2, 2, h), np.linspace(-2, 2, w), indexing="ij")
    base = np.stack([np.sin(xx * (k + 1)) + np.cos(yy * (k + 2)) for k in range(c)])
    noise = rng.standard_normal((n, c, h, w))
    return (0.8 * base[None] + 0.5 * noise).astype(np.float32)


def _source(files: ModelFiles) -> Dict[str, Any]:
    """The manifest's provenance record of one model folder."""
    params_sha = sha256_file(files.params)
    info = read_replica_info(files.directory)
    program_sha = sha256_file(files.program)
    if info is not None:
        for key, actual in (("source_program_sha256", program_sha), ("params_sha256", params_sha)):
            recorded = info.get(key)
            if recorded is not None and recorded != actual:
                raise ConversionError(
                    f"{files.directory}: replica.json records {key} {recorded} but the file has {actual}; "
                    "if these are the official weights, delete replica.json"
                )
    source = {
        "kind": "replica" if info is not None else "official",
        "model_dir_name": files.directory.name,
        "program_sha256": program_sha,
        "params_sha256": params_sha,
        "seed": info["seed"] if info is not None else None,
    }
    archive = read_fetch_record(files.directory)
    if archive is not None:
        source["archive"] = archive
    return source


def _detector_input_spec(model_dir: Path) -> Tuple[Dict[str, Any], List[str]]:
    """Pre-processing of the detector from its ``infer_cfg.yml`` (or the reference defaults)."""
    spec: Dict[str, Any] = {
        "name": "image",
        "shape": [1, 3, *_DETECTOR_SIZE],
        "resize": "stretch",
        "interpolation": "cubic",
        "channel_order": "RGB",
        "scale": _SCALE_1_255,
        "mean": list(_IMAGENET_MEAN),
        "std": list(_IMAGENET_STD),
        "layout": "NCHW",
    }
    labels = ["foreground"]
    cfg_path = model_dir / "infer_cfg.yml"
    if not cfg_path.is_file():
        _LOG.info("%s has no infer_cfg.yml: using the reference detector pre-processing", model_dir)
        return spec, labels
    try:
        import yaml
    except ImportError as exc:
        raise BackendUnavailableError(f"PyYAML is needed to read {cfg_path} ({exc}): {INSTALL_HINT}") from exc
    try:
        cfg = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConversionError(f"{cfg_path}: not readable YAML ({exc})") from exc
    if not isinstance(cfg, dict) or not isinstance(cfg.get("Preprocess"), list):
        raise ConversionError(f"{cfg_path}: expected a mapping with a Preprocess list")
    seen = set()
    for op in cfg["Preprocess"]:
        kind = op.get("type") if isinstance(op, dict) else None
        seen.add(kind)
        if kind == "Resize":
            size = op.get("target_size")
            if op.get("keep_ratio", False) or not (isinstance(size, list) and len(size) == 2):
                raise ConversionError(f"{cfg_path}: only keep_ratio: false resizes to [h, w] are supported, got {op}")
            if op.get("interp", 1) not in _CV2_INTERP:
                raise ConversionError(f"{cfg_path}: unknown cv2 interpolation {op.get('interp')!r}")
            spec["shape"] = [1, 3, int(size[0]), int(size[1])]
            spec["interpolation"] = _CV2_INTERP[op.get("interp", 1)]
        elif kind == "NormalizeImage":
            if op.get("norm_type", "mean_std") != "mean_std":
                raise ConversionError(f"{cfg_path}: only norm_type mean_std is supported, got {op}")
            spec["scale"] = _SCALE_1_255 if op.get("is_scale", True) else 1.0
            spec["mean"] = [float(v) for v in op.get("mean", _IMAGENET_MEAN)]
            spec["std"] = [float(v) for v in op.get("std", _IMAGENET_STD)]
            if len(spec["mean"]) != 3 or len(spec["std"]) != 3:
                raise ConversionError(f"{cfg_path}: mean/std must have 3 values, got {op}")
        elif kind == "Permute":
            spec["layout"] = "NCHW"
        elif kind == "PadStride":
            stride = int(op.get("stride", 0))
            if stride > 0 and any(d % stride for d in spec["shape"][2:]):
                raise ConversionError(f"{cfg_path}: PadStride {stride} would pad a {spec['shape'][2:]} input")
        else:
            raise ConversionError(f"{cfg_path}: unsupported pre-processing step {op!r}")
    if "Resize" not in seen or "Permute" not in seen:
        raise ConversionError(f"{cfg_path}: expected Resize and Permute steps, got {sorted(map(str, seen))}")
    if cfg.get("label_list") is not None:
        labels = [str(v) for v in cfg["label_list"]]
    return spec, labels


def _pin_interp_sizes(block: Any) -> None:
    """Replace the ``scale`` of resize ops by their (static) output size.

    paddle2onnx 2.1 cannot read the ``scale`` list of ``nearest_interp`` once Paddle 3.3 has translated
    it to PIR ("the 0th elementwise MUST be ir::FloatAttribute"); with the input fixed, the output
    size is known and gives the same result.
    """
    for op in block.ops:
        if op.type not in ("nearest_interp_v2", "bilinear_interp_v2") or not op.attr("scale"):
            continue
        if op.input("OutSize") or op.input("SizeTensor") or op.input("Scale"):
            raise ConversionError(f"{op.type} with tensor-valued sizes cannot be pinned")
        out_shape = block.var(op.output("Out")[0]).shape
        if len(out_shape) != 4 or op.attr("data_layout") != "NCHW" or min(out_shape[2:]) <= 0:
            raise ConversionError(f"{op.type}: cannot pin the output size of shape {out_shape}")
        op._set_attr("out_h", int(out_shape[2]))
        op._set_attr("out_w", int(out_shape[3]))
        op._set_attr("scale", [])


_PIR_INTERP_OPS = ("pd_op.nearest_interp", "pd_op.bilinear_interp")


def _pin_interp_sizes_pir(paddle: Any, block: Any) -> None:
    """PIR version of :func:`_pin_interp_sizes`: rebuild resize ops with their static output size.

    PIR ops cannot have a float-list attribute rewritten from Python, so each resize op with a
    ``scale`` is replaced by the same op with ``out_h``/``out_w`` set and no ``scale``. Call inside
    ``IrGuard`` and ``program_guard`` of the block's program.
    """
    for op in list(block.ops):
        if op.name() not in _PIR_INTERP_OPS or not op.attrs().get("scale"):
            continue
        if any(op.operand_source(i).initialized() for i in range(1, op.num_operands())):
            raise ConversionError(f"{op.name()} with tensor-valued sizes cannot be pinned")
        attrs = op.attrs()
        out_shape = [int(d) for d in op.result(0).shape]
        if len(out_shape) != 4 or attrs["data_format"] != "NCHW" or min(out_shape[2:]) <= 0:
            raise ConversionError(f"{op.name()}: cannot pin the output size of shape {out_shape}")
        make = getattr(paddle._C_ops, op.name().split(".", 1)[1])
        pinned = make(
            op.operand_source(0),
            None,
            None,
            None,
            attrs["data_format"],
            attrs["out_d"],
            out_shape[2],
            out_shape[3],
            [],
            attrs["interp_method"],
            attrs["align_corners"],
            attrs["align_mode"],
        )
        pinned.get_defining_op().move_before(op)
        op.result(0).replace_all_uses_with(pinned)
        block.remove_op(op)


@dataclass(frozen=True)
class DetectorHeads:
    """A PicoDet program cut at its raw heads (see :func:`cut_detector_heads`).

    Attributes:
      files: the saved cut program (``inference.pdmodel`` + ``inference.pdiparams``).
      input_name: ``"image"``.
      input_shape: ``(1, 3, H, W)``, e.g. ``(1, 3, 640, 640)``.
      scores: output names of the class scores per stride, each float32 ``[1, H/s * W/s, num_classes]``
        (already sigmoid-ed).
      boxes: output names of the box logits per stride, each float32 ``[1, H/s * W/s, 4 * (reg_max + 1)]``
        (left, top, right, bottom distributions).
      strides: ``(8, 16, 32, 64)``.
      reg_max: 7.
      labels: class names, e.g. ``("foreground",)``.
    """

    files: ModelFiles
    input_name: str
    input_shape: Tuple[int, int, int, int]
    scores: Tuple[str, ...]
    boxes: Tuple[str, ...]
    strides: Tuple[int, ...]
    reg_max: int
    labels: Tuple[str, ...]


def cut_detector_heads(det_dir: "os.PathLike[str] | str", out_dir: "os.PathLike[str] | str") -> DetectorHeads:
    """Save the PicoDet mainbody detector without its in-graph post-process.

    The program is cut at its 8 raw head outputs; each is reshaped to ``[1, H*W, C]`` (the layout of a
    PaddleDetection raw export) and the ``image`` input is fixed to the size of ``infer_cfg.yml``
    (1x3x640x640 for the official model). The result runs in Paddle Inference and is what
    :func:`convert` exports to ONNX.

    A legacy ``inference.pdmodel`` gives a legacy cut (``inference.pdmodel``), a Paddle 3 PIR
    ``inference.json`` a PIR cut (``inference.json``); the heads, their names and their values are
    the same (see the module docstring for how each is found).

    Args:
      det_dir: the detector folder (``inference.pdmodel`` or ``inference.json``, ``inference.pdiparams``,
        ``infer_cfg.yml``).
      out_dir: folder for the cut program (created).

    Returns:
      The :class:`DetectorHeads`.

    Raises:
      MissingFileError: a file is missing.
      ConversionError: not the PicoDet mainbody program (inputs, heads or their shapes differ), an
        unsupported ``infer_cfg.yml``, or Paddle fails.
      BackendUnavailableError: paddlepaddle or PyYAML is missing.
    """
    files = paddle_io.find_model_files(det_dir)
    input_spec, labels = _detector_input_spec(files.directory)
    model = paddle_io.load_inference_model(files.directory)
    shape = tuple(int(d) for d in input_spec["shape"])
    cut_program = _cut_detector_pir if files.is_pir else _cut_detector
    cut, scores, boxes, reg_max = cut_program(model, (shape[2], shape[3]), len(labels), Path(out_dir))
    return DetectorHeads(
        files=cut,
        input_name="image",
        input_shape=shape,  # type: ignore[arg-type]
        scores=tuple(scores),
        boxes=tuple(boxes),
        strides=_HEAD_STRIDES,
        reg_max=reg_max,
        labels=tuple(labels),
    )


def _cut_detector(
    model: paddle_io.LoadedModel, size: Tuple[int, int], num_classes: int, out_dir: Path
) -> Tuple[ModelFiles, List[str], List[str], int]:
    """Save the detector program cut at its raw heads, reshaped to [1, H*W, C]."""
    block = model.program.global_block()
    missing = [n for n in _HEAD_SCORES + _HEAD_BOXES if not block.has_var(n)]
    if missing or sorted(model.feed_names) != ["im_shape", "image", "scale_factor"]:
        raise ConversionError(
            f"not the PicoDet mainbody program: expected inputs image/im_shape/scale_factor and head outputs "
            f"{list(_HEAD_SCORES + _HEAD_BOXES)}; missing {missing}, inputs {model.feed_names}"
        )
    bins = _check_head_shapes(
        size,
        num_classes,
        [(s, block.var(s).shape, b, block.var(b).shape) for s, b in zip(_HEAD_SCORES, _HEAD_BOXES)],
    )

    program = paddle_io.truncated_clone(model, _HEAD_SCORES + _HEAD_BOXES)
    block = program.global_block()
    _pin_interp_sizes(block)
    score_names = [f"scores_stride{s}" for s in _HEAD_STRIDES]
    box_names = [f"boxes_stride{s}" for s in _HEAD_STRIDES]
    for stride, src, dst, channels in [
        *zip(_HEAD_STRIDES, _HEAD_SCORES, score_names, [num_classes] * 4),
        *zip(_HEAD_STRIDES, _HEAD_BOXES, box_names, [bins] * 4),
    ]:
        cells = (size[0] // stride) * (size[1] // stride)
        source = block.var(src)
        out = block.create_var(name=dst, shape=(1, cells, channels), dtype=source.dtype)
        xshape = block.create_var(name=dst + ".xshape", dtype=source.dtype)
        block.append_op(
            type="reshape2",
            inputs={"X": [source]},
            outputs={"Out": [out], "XShape": [xshape]},
            attrs={"shape": [1, cells, channels]},
        )
    files = paddle_io.save_pruned_inference_model(
        model,
        out_dir,
        feed_names=["image"],
        fetch_names=score_names + box_names,
        input_shapes={"image": (1, 3, *size)},
        program=program,
    )
    return files, score_names, box_names, bins // 4 - 1


_NHWC = [0, 2, 3, 1]


def _check_head_shapes(
    size: Tuple[int, int], num_classes: int, heads: Sequence[Tuple[str, Sequence[int], str, Sequence[int]]]
) -> int:
    """Check per-stride (score name, shape, box name, shape) against the input size; return the bins."""
    bins = 0
    for stride, (score_name, score_shape, box_name, box_shape) in zip(_HEAD_STRIDES, heads):
        h, w = size[0] // stride, size[1] // stride
        score_shape, box_shape = tuple(score_shape), tuple(box_shape)
        if (
            len(score_shape) != 4
            or len(box_shape) != 4
            or score_shape[1:] != (h, w, num_classes)
            or box_shape[1:3] != (h, w)
            or box_shape[3] <= 0
            or box_shape[3] % 4
        ):
            raise ConversionError(
                f"stride {stride}: expected {score_name} [N, {h}, {w}, {num_classes}] and {box_name} "
                f"[N, {h}, {w}, 4*(reg_max+1)], got {score_shape} and {box_shape}"
            )
        bins = bins or int(box_shape[3])
        if box_shape[3] != bins:
            raise ConversionError(f"box logits of different widths across strides: {box_shape[3]} vs {bins}")
    return bins


def _pir_heads(block: Any, program_path: Path) -> Tuple[List[Any], List[Any]]:
    """Find the raw head values of a PIR PicoDet program by structure (see the module docstring).

    Returns the score and box values, each in stride order (largest grid first); the caller checks
    their shapes. Call inside ``IrGuard``.
    """
    scores, boxes = [], []
    for op in block.ops:
        if op.name() == "pd_op.sigmoid":
            source = op.operand_source(0).get_defining_op()
            if source is not None and source.name() == "pd_op.transpose" and list(source.attrs()["perm"]) == _NHWC:
                scores.append(op.result(0))
        elif op.name() == "pd_op.transpose" and list(op.attrs()["perm"]) == _NHWC:
            value = op.result(0)
            users = [user.name() for user in value.all_used_ops()]
            if users and "pd_op.sigmoid" not in users:
                boxes.append(value)
    count = len(_HEAD_STRIDES)
    if len(scores) != count or len(boxes) != count:
        raise ConversionError(
            f"{program_path}: not the PicoDet mainbody program: expected {count} class-score heads "
            f"(sigmoid of an NHWC transpose) and {count} box-logit heads (NHWC transposes the decode reads), "
            f"found {len(scores)} and {len(boxes)}"
        )

    def grid_order(value: Any) -> int:
        shape = list(value.shape)
        return -(shape[1] * shape[2]) if len(shape) == 4 else 0

    # sorted() is stable: equal grids keep program order, and the shape check rejects them anyway.
    return sorted(scores, key=grid_order), sorted(boxes, key=grid_order)


def _cut_detector_pir(
    model: paddle_io.LoadedModel, size: Tuple[int, int], num_classes: int, out_dir: Path
) -> Tuple[ModelFiles, List[str], List[str], int]:
    """The PIR version of :func:`_cut_detector` (edits ``model.program`` in place)."""
    if sorted(model.feed_names) != ["im_shape", "image", "scale_factor"]:
        raise ConversionError(
            f"{model.files.program}: not the PicoDet mainbody program: expected inputs image/im_shape/scale_factor, "
            f"got {model.feed_names}"
        )
    paddle = paddle_io.import_paddle()
    program = model.program
    score_names = [f"scores_stride{s}" for s in _HEAD_STRIDES]
    box_names = [f"boxes_stride{s}" for s in _HEAD_STRIDES]
    with paddle.pir_utils.IrGuard():
        block = program.global_block()
        scores, boxes = _pir_heads(block, model.files.program)
        bins = _check_head_shapes(
            size,
            num_classes,
            [
                (f"class scores (sigmoid {i})", list(s.shape), f"box logits (transpose {i})", list(b.shape))
                for i, (s, b) in enumerate(zip(scores, boxes))
            ],
        )
        feeds = [op for op in block.ops if op.name() in ("pd_op.feed", "pd_op.data") and op.attrs()["name"] == "image"]
        if len(feeds) != 1:
            raise ConversionError(f"{model.files.program}: expected one input named image, found {len(feeds)}")
        feed = feeds[0]
        with paddle.static.program_guard(program):
            image = paddle.static.data("image", [1, 3, *size], feed.result(0).dtype)
            image.get_defining_op().move_before(feed)
            feed.result(0).replace_all_uses_with(image)
            block.remove_op(feed)
            _pin_interp_sizes_pir(paddle, block)
            fetches = []
            for stride, name, value, channels in [
                *zip(_HEAD_STRIDES, score_names, scores, [num_classes] * 4),
                *zip(_HEAD_STRIDES, box_names, boxes, [bins] * 4),
            ]:
                cells = (size[0] // stride) * (size[1] // stride)
                fetches.append((name, paddle.reshape(value, [1, cells, channels])))
        files = paddle_io.save_pir_inference_model(model, out_dir, feeds=[image], fetches=fetches, program=program)
    return files, score_names, box_names, bins // 4 - 1


def _export_onnx(role: str, model_dir: Path, files: "paddle_io.ModelFiles", output_names: Sequence[str], path: Path,
                 p2o: Any, onnx: Any, opset: int, timings: Dict[str, float]) -> Any:
    """paddle2onnx, then our repairs (output names, LeakyRelu slopes, dead nodes), the ONNX checker, and save."""
    with _step(f"{role}: paddle2onnx", model_dir, timings):
        model = _rename_outputs(onnx, _paddle2onnx(p2o, files, opset), output_names)
        _fix_leaky_relu(model, _leaky_relu_slopes(files))
        # paddle2onnx leaves unused Constant nodes, and onnxruntime warns about each one whenever a session is made.
        drop_unread(model.graph)
    with _step(f"{role}: onnx check and save", model_dir, timings):
        onnx.checker.check_model(model, full_check=True)
        onnx.save_model(model, str(path))
    return model


def _convert_extractor(
    rec_dir: Path, staging: Path, opset: int, tools: Tuple[Any, Any, Any], timings: Dict[str, float]
) -> Dict[str, Any]:
    p2o, onnx, onnxruntime = tools
    with _step("extractor: load", rec_dir, timings):
        files = paddle_io.find_model_files(rec_dir)
        source = _source(files)
        predictor = paddle_io.create_predictor(files)
        input_names = list(predictor.get_input_names())
        output_names = list(predictor.get_output_names())
        if len(input_names) != 1 or len(output_names) != 1:
            raise ConversionError(f"expected one input and one output, got {input_names} -> {output_names}")
        fetch_name = output_names[0]
        if files.is_pir or fetch_name.startswith("fetch_name_"):
            fetch_name = "features"
    path = staging / "extractor.onnx"
    model = _export_onnx("extractor", rec_dir, files, [fetch_name], path, p2o, onnx, opset, timings)
    with _step("extractor: onnx check", rec_dir, timings):
        (graph_input,) = model.graph.input
        input_shape = _onnx_io_shape(graph_input)
        output_shape = _onnx_io_shape(model.graph.output[0])
        if len(input_shape) != 4 or input_shape[1] != 3 or len(output_shape) != 2 or output_shape[1] <= 0:
            raise ConversionError(f"expected input [N,3,H,W] and output [N,D], got {input_shape} -> {output_shape}")
    with _step("extractor: verify", rec_dir, timings):
        rng = np.random.default_rng(_VERIFY_SEED)
        x = _verification_image((_EXTRACTOR_VERIFY_BATCH, 3, input_shape[2], input_shape[3]), rng)
        ref = paddle_io.run_predictor(predictor, {input_names[0]: x})[output_names[0]]
        out = _ort_session(onnxruntime, path).run(None, {graph_input.name: x})[0]
        diff = _max_abs_diff(ref, out, "extractor")
        _LOG.info("extractor: onnxruntime vs Paddle Inference max abs diff %.3g on %s", diff, x.shape)
    return {
        "file": path.name,
        "sha256": sha256_file(path),
        "backend": EXPORT_FORMATS["onnx"].backend,
        "precision": "fp32",
        **_extractor_fields(graph_input.name, input_shape, fetch_name, output_shape[1]),
        "source": source,
    }


def _extractor_fields(input_name: str, input_shape: Sequence[int], output_name: str, dim: int) -> Dict[str, Any]:
    """The manifest's ``input`` and ``output`` of a feature extractor (the reference pre-processing)."""
    return {
        "input": {
            "name": input_name,
            "shape": [int(d) for d in input_shape],
            "resize": "stretch",
            "interpolation": "linear",
            "channel_order": "RGB",
            "scale": _SCALE_1_255,
            "mean": list(_IMAGENET_MEAN),
            "std": list(_IMAGENET_STD),
            "layout": "NCHW",
        },
        "output": {"kind": "embedding", "name": output_name, "dim": int(dim), "normalized": False},
    }


def _convert_detector(
    det_dir: Path,
    staging: Path,
    work: Path,
    opset: int,
    tools: Tuple[Any, Any, Any],
    timings: Dict[str, float],
) -> Dict[str, Any]:
    p2o, onnx, onnxruntime = tools
    with _step("detector: load", det_dir, timings):
        source = _source(paddle_io.find_model_files(det_dir))
        input_spec, _ = _detector_input_spec(det_dir)
    with _step("detector: cut at raw heads", det_dir, timings):
        heads = cut_detector_heads(det_dir, work / "detector_heads")
        cut, score_names, box_names = heads.files, list(heads.scores), list(heads.boxes)
    path = staging / "detector.onnx"
    onnx_model = _export_onnx("detector", det_dir, cut, score_names + box_names, path, p2o, onnx, opset, timings)
    with _step("detector: onnx check", det_dir, timings):
        (graph_input,) = onnx_model.graph.input
        if graph_input.name != "image" or _onnx_io_shape(graph_input) != input_spec["shape"]:
            raise ConversionError(
                f"expected ONNX input image {input_spec['shape']}, got {graph_input.name} {_onnx_io_shape(graph_input)}"
            )
    with _step("detector: verify", det_dir, timings):
        rng = np.random.default_rng(_VERIFY_SEED)
        image = _verification_image(input_spec["shape"], rng)
        reference = paddle_io.run_predictor(paddle_io.create_predictor(cut), {"image": image})
        outputs = _ort_session(onnxruntime, path).run(score_names + box_names, {"image": image})
        diffs = [_max_abs_diff(reference[n], o, f"detector {n}") for n, o in zip(score_names + box_names, outputs)]
        _LOG.info("detector: onnxruntime vs Paddle Inference max abs diff %.3g over the 8 heads", max(diffs))
    return {
        "file": path.name,
        "sha256": sha256_file(path),
        "backend": EXPORT_FORMATS["onnx"].backend,
        "precision": "fp32",
        **_detector_fields(input_spec, heads),
        "source": source,
    }


def _detector_fields(input_spec: Dict[str, Any], heads: "DetectorHeads") -> Dict[str, Any]:
    """The manifest's ``input``, ``output``, ``labels`` and ``defaults`` of a detector cut at its heads."""
    return {
        "input": dict(input_spec),
        "output": {
            "kind": "picodet_heads",
            "scores": list(heads.scores),
            "boxes": list(heads.boxes),
            "strides": list(heads.strides),
            "reg_max": heads.reg_max,
            "cell_offset": 0.5,
            "num_classes": len(heads.labels),
        },
        "labels": list(heads.labels),
        "defaults": dict(_DETECTOR_DEFAULTS),
    }


def _bundle_name(models: Dict[str, Dict[str, Any]], suffix: str) -> str:
    """Default bundle name, e.g. ``ppshituv2-replica-s0-fp32``; ``suffix`` names format and precision."""
    tags = []
    for role in ("detector", "extractor"):
        if role in models:
            src = models[role]["source"]
            tag = f"replica-s{src['seed']}" if src["kind"] == "replica" else "official"
            if tag not in tags:
                tags.append(tag)
    family = "ppshitu"
    if "extractor" in models:
        family = _FAMILY_BY_REC_SHA.get(models["extractor"]["source"]["program_sha256"], "ppshitu")
    roles = "" if len(models) == 2 else ("-det" if "detector" in models else "-rec")
    return f"{family}{roles}-{'+'.join(tags)}-{suffix}"


def _tool_versions(tools: Tuple[Any, Any, Any]) -> Dict[str, str]:
    import edge_shitu

    p2o, onnx, onnxruntime = tools
    return {
        "edge_shitu": edge_shitu.__version__,
        "paddlepaddle": paddle_io.paddle_version(),
        "paddle2onnx": str(p2o.__version__),
        "onnx": str(onnx.__version__),
        "onnxruntime": str(onnxruntime.__version__),
    }


def _quantize_onnx_entry(role: str, entry: Dict[str, Any], staging: Path, work: Path, timings: Dict[str, float], *,
                         calib_dir, calib_count: Optional[int], method: Optional[str], mode: Optional[str],
                         budget: Union[str, int]) -> Any:
    """Replace a bundle's fp32 ONNX model by its INT8 version (edge_shitu_converters.quantize); update its manifest
    entry. Returns the prepared :class:`~edge_shitu_converters.quantize.ModelQuantizer`, for the INT8 search."""
    from edge_shitu_converters.int8_search import rank_blocks
    from edge_shitu_converters.quantize import ModelQuantizer, QuantizeOptions
    from edge_shitu.bundle import InputSpec

    overrides = {k: v for k, v in (("mode", mode), ("method", method), ("calib_count", calib_count)) if v is not None}
    options = QuantizeOptions.for_role(role, **overrides)
    spec = entry["input"]
    input_spec = InputSpec(name=spec["name"], shape=tuple(spec["shape"]), resize=spec["resize"],
                           interpolation=spec["interpolation"], channel_order=spec["channel_order"],
                           scale=float(spec["scale"]), mean=tuple(spec["mean"]), std=tuple(spec["std"]),
                           layout=spec["layout"])
    final = staging / entry["file"]
    fp32 = work / f"{role}.fp32.onnx"
    os.replace(final, fp32)
    scratch = work / f"{role}.quantize"
    scratch.mkdir()
    with _step(f"{role}: int8 quantisation ({options.mode}, {options.method})", None, timings):
        quantizer = ModelQuantizer.prepare(fp32, scratch, input_spec=input_spec,
                                           calib_dir=calib_dir if options.mode == "static" else None, options=options)
        float_blocks: List[str] = []
        if isinstance(budget, int) and budget > 0:
            float_blocks = [d.block for d in rank_blocks(quantizer)[:budget]]
        report = quantizer.quantize(final, float_blocks=float_blocks)
    static = options.mode == "static"
    entry["precision"] = "int8"
    entry["quantization"] = {
        "tool": "onnxruntime.quantization", "mode": options.mode, "method": options.method if static else None,
        "format": options.quant_format, "per_channel": options.per_channel,
        "activations": options.activation_type, "weights": options.weight_type,
        "float_tail_layers": options.float_tail, "calibration_images": report.calib_images,
        "calibration_folder": Path(calib_dir).name if static else None, "preprocessing": "edge_shitu runtime",
        "int8_layers": budget, "blocks": len(quantizer.blocks), **_written_model(float_blocks, report),
    }
    entry["sha256"] = sha256_file(final)
    return quantizer


def _written_model(float_blocks: Sequence[str], report: Any) -> Dict[str, Any]:
    """The manifest's record of what the INT8 model written (its :class:`QuantReport`) keeps float or rewrote."""
    return {"float_blocks": list(float_blocks), "integer_hard_sigmoids": len(report.integer_hard_sigmoids),
            "clip_hard_sigmoids": len(report.clip_hard_sigmoids),
            "kernel_shapes": list(report.kernel_shapes)}


def _rewrite_manifest(staging: Path, role: str, update: Mapping[str, Any]) -> None:
    """Updates one model's manifest entry in a staging bundle (after its file was replaced)."""
    path = staging / MANIFEST_NAME
    manifest = json.loads(path.read_text(encoding="utf-8"))
    manifest["models"][role].update(update)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _search_failing_models(staging: Path, quantizers: Mapping[str, Any], det: Optional[Path], rec: Optional[Path],
                           images: "os.PathLike[str] | str | None", timings: Dict[str, float],
                           references: Any) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``int8_layers="auto"``: each INT8 model that fails the verification is searched for the fewest float blocks
    with which it passes (:func:`edge_shitu_converters.int8_search.search_int8`). Returns role -> search record,
    and the verification of the bundle as built (still the bundle's when nothing was searched).
    ``references`` (:class:`~edge_shitu_converters.verify.PaddleReferences`) holds the Paddle side, which gives the
    same answers at every step."""
    from edge_shitu_converters.int8_search import search_int8
    from edge_shitu_converters.verify import verify_bundle

    if images is None:
        raise InvalidInputError("verify needs a folder of real photos (verify_images / --verify-images)")
    with _step("verify the INT8 models", None, timings):
        first = verify_bundle(Bundle.load(staging), det_dir=det, rec_dir=rec, images_dir=Path(images),
                              references=references)
    records: Dict[str, Any] = {}
    for role, quantizer in quantizers.items():
        as_built = _role_result(first, role)
        if as_built[0]:
            continue
        entry = Bundle.load(staging).manifest["models"][role]
        target = staging / entry["file"]

        def check(path: Path, role: str = role) -> Tuple[bool, List[str], Dict[str, Any]]:
            _rewrite_manifest(staging, role, {"sha256": sha256_file(path)})
            return verify_role(staging, role, det, rec, images, references)

        with _step(f"{role}: int8 search", None, timings):
            result = search_int8(quantizer, target, check, first=as_built)
        record = result.record()
        quantization = dict(entry["quantization"], **_written_model(result.float_blocks, result.report),
                            search={"steps": len(result.steps), "chosen": record["chosen"]})
        _rewrite_manifest(staging, role, {"sha256": sha256_file(target), "quantization": quantization})
        records[role] = record
    return records, first


def verify_role(staging: Path, role: str, det: Optional[Path], rec: Optional[Path], images: "os.PathLike[str] | str",
                references: Any, session_factory: Optional[Callable[[Any], Any]] = None,
                ) -> Tuple[bool, List[str], Dict[str, Any]]:
    """One step of an INT8 search: ``verify_bundle`` of one model of a staging bundle, the Paddle side from
    ``references`` (a :class:`~edge_shitu_converters.verify.PaddleReferences`). Returns ``(passed, failures,
    figures)`` of that model."""
    from edge_shitu_converters.verify import verify_bundle

    report = verify_bundle(Bundle.load(staging), det_dir=det, rec_dir=rec, images_dir=Path(images), roles=(role,),
                           references=references, session_factory=session_factory)
    return _role_result(report, role)


def _role_result(report: Mapping[str, Any], role: str) -> Tuple[bool, List[str], Dict[str, Any]]:
    """``(passed, failures, figures)`` of one model in a ``verify_bundle`` report."""
    failures = list(report[role]["failures"])
    figures = {k: v for k, v in report.get(role, {}).items() if isinstance(v, (int, float))}
    return not failures, failures, figures


def failure_report_path(out: Path) -> Path:
    """Where a conversion that fails its verification leaves the report, beside the bundle it did not publish."""
    return out.parent / f"{out.name}.verify-failed.json"


def verify_adding_search(staging: Path, out: Path, records: Mapping[str, Any],
                         verify: Optional[Callable[[Path], None]]) -> None:
    """Runs the final ``verify`` step of a staging bundle; the INT8 search ``records`` go into its report, or into
    the failure report it leaves beside ``out``."""
    from edge_shitu_converters.verify import VERIFY_FILE

    try:
        if verify is not None:
            verify(staging)
    except ConversionError:
        failed = failure_report_path(out)
        if records and failed.is_file():  # the failure report says what the search tried
            _add_search_to_verify_json(failed, records)
        raise
    if records and (staging / VERIFY_FILE).is_file():
        _add_search_to_verify_json(staging / VERIFY_FILE, records)


def _add_search_to_verify_json(path: Path, records: Mapping[str, Any]) -> None:
    """Adds the INT8 search (ranking, every step tried, the blocks kept float) to a verification report."""
    report = json.loads(path.read_text(encoding="utf-8"))
    report["int8_search"] = dict(records)
    path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _verify_or_fail(staging: Path, out: Path, det: Optional[Path], rec: Optional[Path],
                    images: "os.PathLike[str] | str | None", timings: Dict[str, float], *,
                    lite_python: "os.PathLike[str] | str | None" = None, references: Any = None,
                    report: Optional[Mapping[str, Any]] = None) -> None:
    """Verifies a staging bundle (``report``: its verification when already made, which is then not repeated);
    a failing one leaves its report beside ``out`` and raises ConversionError."""
    import functools
    import platform

    from edge_shitu_converters.verify import VERIFY_FILE, verify_bundle, write_unverifiable

    if images is None:
        raise InvalidInputError("verify needs a folder of real photos (verify_images / --verify-images)")
    bundle = Bundle.load(staging)
    factory = None
    lite = [m for m in bundle.models.values() if m.backend == "paddlelite"]
    if lite:
        from edge_shitu.backends.paddlelite import machine_target

        here = machine_target()
        foreign = sorted({m.target for m in lite if m.target != here})
        if foreign:
            write_unverifiable(staging, f"{'/'.join(foreign)} .nb models cannot run on this {platform.machine()} "
                                        "machine; verify the matching lite-x86 bundle (same program and weights) "
                                        "here, and the device bundle on the device")
            return
        from edge_shitu_converters.lite_worker import SideEnvSession, find_lite_python

        factory = functools.partial(SideEnvSession, python=find_lite_python(lite_python))
    if report is None:
        with _step("verify against Paddle Inference on real photos", None, timings):
            report = verify_bundle(bundle, det_dir=det, rec_dir=rec, images_dir=Path(images),
                                   session_factory=factory, references=references)
    if not report["passed"]:
        failed = failure_report_path(out)
        os.replace(staging / VERIFY_FILE, failed)
        raise ConversionError(
            f"{out}: converted models disagree with their sources: {'; '.join(report['failures'])} "
            f"(full report: {failed})"
        )


def _check_request(
    det_dir: "os.PathLike[str] | str | None",
    rec_dir: "os.PathLike[str] | str | None",
    out_dir: "os.PathLike[str] | str",
    name: Optional[str],
) -> Tuple[Optional[Path], Optional[Path], Path]:
    """Check the arguments every format shares; return the model folders and the bundle folder."""
    if det_dir is None and rec_dir is None:
        raise InvalidInputError("convert needs a detector folder, an extractor folder, or both; got neither")
    if name is not None and (not isinstance(name, str) or not _NAME_RE.match(name)):
        raise InvalidInputError(f"bundle name must match {_NAME_RE.pattern}, got {name!r}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidInputError(f"bundle folder {out} already exists and is not empty")
    det = Path(det_dir) if det_dir is not None else None
    rec = Path(rec_dir) if rec_dir is not None else None
    return det, rec, out


def _check_model_folders(det: Optional[Path], rec: Optional[Path]) -> None:
    for role, folder in (("detector", det), ("extractor", rec)):
        if folder is not None and not folder.is_dir():
            raise MissingFileError(f"{role} model folder not found: {folder}")


BuildModels = Callable[[Path, Path, Dict[str, float]], Tuple[Dict[str, Dict[str, Any]], Dict[str, str]]]


def _publish_bundle(
    out: Path,
    build: BuildModels,
    *,
    name: Optional[str],
    name_suffix: str,
    timings: Dict[str, float],
    before_publish: Optional[Callable[[Path], None]] = None,
) -> Path:
    """Build a bundle in a temporary sibling folder and move it to ``out`` only when all went well.

    ``build(staging, work, timings)`` writes the model files into ``staging`` (``work`` is scratch
    space, removed afterwards) and returns the manifest's ``models`` and ``tools``. The manifest is
    written and loaded back with :meth:`Bundle.load` (the converter never hands out a bundle the
    runtime would refuse); ``before_publish(staging)`` may then check it further (``--verify``).
    """
    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(6)
    staging = out.parent / f".{out.name}.partial-{token}"
    work = out.parent / f".{out.name}.work-{token}"
    staging.mkdir()  # with the umask's permissions, unlike tempfile.mkdtemp's 0700
    work.mkdir()
    try:
        models, tools = build(staging, work, timings)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": name if name is not None else _bundle_name(models, name_suffix),
            "models": models,
            "codes": dict(_CODES),
            "recognition": dict(_RECOGNITION),
            "tools": tools,
        }
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        Bundle.load(staging)
        if before_publish is not None:
            before_publish(staging)
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    _LOG.info(
        "bundle %s written in %.2f s (%s)",
        out,
        time.perf_counter() - start,
        ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()),
    )
    return out


def convert(
    det_dir: "os.PathLike[str] | str | None",
    rec_dir: "os.PathLike[str] | str | None",
    out_dir: "os.PathLike[str] | str",
    *,
    format: str = "onnx",
    precision: str = "fp32",
    opset: int = 11,
    name: Optional[str] = None,
    verify: bool = False,
    verify_images: "os.PathLike[str] | str | None" = None,
    calib_dir: "os.PathLike[str] | str | None" = None,
    calib_count: Optional[int] = None,
    lite_algo: Optional[str] = None,
    lite_skip: Optional[Sequence[str]] = None,
    lite_qat: Optional[int] = None,
    lite_bias_correction: Optional[bool] = None,
    lite_opt: "os.PathLike[str] | str | None" = None,
    lite_python: "os.PathLike[str] | str | None" = None,
    calib_method: Optional[str] = None,
    quant_mode: Optional[str] = None,
    int8_layers: Union[str, int] = "auto",
    hash_head: "os.PathLike[str] | str | None" = None,
) -> Path:
    """Convert a detector and/or a feature extractor into an edge-shitu bundle directory.

    Each model folder holds ``inference.pdmodel`` (legacy) or ``inference.json`` (Paddle 3 PIR) and
    ``inference.pdiparams``: official weights, or a replica from :func:`edge_shitu_converters.replica.write_replica`
    (recognised by its ``replica.json``). The bundle is assembled in a temporary sibling folder and
    moved to ``out_dir`` only when every step succeeded.

    The format comes from :data:`EXPORT_FORMATS`: ``"onnx"`` (onnxruntime, this module) or
    ``"lite-x86"`` / ``"lite-arm"`` (Paddle-Lite ``.nb`` files, :func:`edge_shitu_converters.lite.convert_lite`;
    legacy ``.pdmodel`` programs only).

    Args:
      det_dir: the PicoDet mainbody detector folder, or None for an extractor-only bundle.
      rec_dir: the feature extractor folder, or None for a detector-only bundle.
      out_dir: the bundle folder to create; it must not exist or be empty.
      format: a key of :data:`EXPORT_FORMATS`.
      precision: a precision the format supports (``"fp32"``; ``"int8"`` for the Lite formats).
      opset: ONNX opset, within the ``onnx`` format's range (ignored by formats without an opset).
      name: bundle name; default e.g. ``ppshituv2-replica-s0-fp32`` or ``ppshituv2-replica-s0-lite-x86-int8``.
      verify: run the source models in Paddle Inference and the converted ones in the runtime on the
        photos of ``verify_images`` (see :mod:`edge_shitu_converters.verify`); the bundle gets ``verify.json``, and a
        bundle under the thresholds is not published (its report is left beside ``out_dir`` as
        ``<name>.verify-failed.json``). Lite x86 bundles run in the side environment; Lite arm bundles
        cannot run on this machine, so their ``verify.json`` says they are unverified, and why.
      verify_images: folder of real photos for ``verify``.
      calib_dir: INT8 only: folder of real photos to calibrate activation ranges on.
      calib_count: INT8 only: number of calibration photos (default: the format's default).
      lite_algo: Lite INT8 only: paddleslim's algorithm, one of :data:`edge_shitu_converters.lite.PTQ_ALGOS`.
      lite_skip: Lite INT8 only: weight names whose ops stay in float (see :mod:`edge_shitu_converters.lite`).
      lite_qat: Lite INT8 only: paddleslim's quantisation-aware training for this many iterations after
        post-training quantisation (``lite_algo``), whose activation scales it keeps (see
        :func:`edge_shitu_converters.lite.quantize_aware_training`).
      lite_bias_correction: Lite INT8 only: paddleslim's bias correction of the weights' quantisation error.
      lite_opt: Lite only: the ``paddle_lite_opt`` executable (see :func:`edge_shitu_converters.lite.find_opt`).
      calib_method: ONNX int8 only: "minmax" (default), "entropy" or "percentile" (see :mod:`edge_shitu_converters.quantize`).
      quant_mode: ONNX int8 only: "static" (default; calibrated on ``calib_dir``) or "dynamic".
      int8_layers: int8 only: which parts stay float (ONNX: :mod:`edge_shitu_converters.int8_search`;
        Paddle-Lite: :mod:`edge_shitu_converters.lite_search`, whose unit is a weight of paddleslim's skip list).
        ``"auto"`` (default): with ``verify``, when a quantised model fails the verification, search for
        the fewest float blocks with which it passes (without ``verify``, as ``"all"``); ``"all"``:
        quantise every block (only the float tail stays float); ``N``: keep the ``N`` blocks of most
        output noise float.
      lite_python: Lite only: the side environment's Python that quantises (int8) and runs ``.nb`` files
        (verify; see :func:`edge_shitu_converters.lite_worker.find_lite_python`).
      hash_head: a learned hash head file (``edge-shitu hash train``) to put into the bundle as
        ``hash.npz`` (see :mod:`edge_shitu.hashing`); it needs the extractor. It is read and checked
        before anything is converted.

    Returns:
      ``out_dir`` as a Path, holding ``detector.<suffix>`` and/or ``extractor.<suffix>`` and ``manifest.json``.

    Raises:
      InvalidInputError: both model folders are None, a bad name, ``out_dir`` is not empty, an
        option that the format or precision does not use, or a hash head without an extractor.
      HashHeadError: ``hash_head`` is malformed or does not take the extractor's features.
      MissingFileError: a model folder or one of its files is missing.
      BackendUnavailableError: paddlepaddle, paddle2onnx, onnx, onnxruntime, PyYAML or (Lite)
        ``paddle_lite_opt`` is missing.
      ConversionError: an unsupported format/precision/opset, or a conversion step failed (the message
        names the step and the model folder).
    """
    spec = validate_export(format, precision, opset)
    head = _read_hash_head(hash_head, rec_dir)
    if verify and verify_images is None:
        raise InvalidInputError("verify needs a folder of real photos (verify_images / --verify-images)")
    if precision != "int8" and (calib_dir is not None or calib_count is not None):
        raise InvalidInputError(f"calib_dir and calib_count are for int8 bundles; precision is {precision!r}")
    if (calib_method is not None or quant_mode is not None) and not (spec.name == "onnx" and precision == "int8"):
        raise InvalidInputError("calib_method and quant_mode are for onnx int8 bundles")
    if spec.name == "onnx" and precision == "int8" and (quant_mode or "static") == "static" and calib_dir is None:
        raise InvalidInputError("static int8 needs calibration photos: give calib_dir (--calib DIR, e.g. the drink "
                                "gallery), or quant_mode='dynamic'")
    from edge_shitu_converters.int8_search import parse_int8_layers

    budget = parse_int8_layers(int8_layers)
    if budget != "auto" and precision != "int8":
        raise InvalidInputError(f"int8_layers is for int8 bundles; precision is {precision!r}")
    if budget == "auto" and precision == "int8" and not verify:
        _LOG.info("int8_layers 'auto' searches only with verify: every block is quantised")
    if spec.backend == "paddlelite":
        from edge_shitu_converters.lite import convert_lite
        from edge_shitu_converters.verify import VERIFY_THREADS, PaddleReferences

        det_path, rec_path = (Path(det_dir) if det_dir else None), (Path(rec_dir) if rec_dir else None)
        references = PaddleReferences()

        def check_lite(staging: Path) -> None:
            _verify_or_fail(staging, Path(out_dir), det_path, rec_path, verify_images, {}, lite_python=lite_python,
                            references=references)

        def check_program(staging: Path, role: str, program: Path) -> Tuple[bool, List[str], Dict[str, Any]]:
            from edge_shitu_converters.paddle_reference import ProgramSession

            return verify_role(staging, role, det_path, rec_path, verify_images, references,
                               session_factory=lambda _spec: ProgramSession(program, threads=VERIFY_THREADS))

        return convert_lite(
            det_dir,
            rec_dir,
            out_dir,
            target=spec.target,
            precision=precision,
            calib_dir=calib_dir,
            calib_count=calib_count,
            algo=lite_algo,
            skip=lite_skip,
            qat_iters=lite_qat,
            bias_correction=lite_bias_correction,
            opt=lite_opt,
            python=lite_python,
            name=name,
            int8_layers=budget if precision == "int8" else "all",
            check_program=check_program if verify else None,
            before_publish=_with_head(head, hash_head, check_lite if verify else None),
        )
    lite_only = [k for k, v in {"lite_algo": lite_algo, "lite_skip": lite_skip, "lite_qat": lite_qat,
                                "lite_bias_correction": lite_bias_correction, "lite_opt": lite_opt,
                                "lite_python": lite_python}.items() if v is not None]
    if lite_only:
        raise InvalidInputError(f"{' and '.join(lite_only)} {'is' if len(lite_only) == 1 else 'are'} for the "
                                f"Paddle-Lite formats, not {spec.name}")
    det, rec, out = _check_request(det_dir, rec_dir, out_dir, name)
    if budget != "auto" and (quant_mode or "static") != "static" and not isinstance(budget, str):
        raise InvalidInputError("int8_layers N ranks blocks on calibration photos: it needs static quantisation")
    quantizers: Dict[str, Any] = {}
    timings: Dict[str, float] = {}
    with _step("import tools", None, timings):
        tools = _import_runtime_tools()
    _check_model_folders(det, rec)

    def build(staging: Path, work: Path, timings: Dict[str, float]) -> Tuple[Dict[str, Dict[str, Any]], Dict[str, str]]:
        models: Dict[str, Dict[str, Any]] = {}
        if det is not None:
            models["detector"] = _convert_detector(det, staging, work, opset, tools, timings)
        if rec is not None:
            models["extractor"] = _convert_extractor(rec, staging, opset, tools, timings)
        if precision == "int8":
            for role, entry in models.items():
                quantizer = _quantize_onnx_entry(
                    role, entry, staging, work, timings, calib_dir=calib_dir, calib_count=calib_count,
                    method=calib_method, mode=quant_mode, budget=budget)
                # Only a calibrated (static) model has the photos the search ranks blocks on.
                if quantizer.options.mode == "static":
                    quantizers[role] = quantizer
        return models, _tool_versions(tools)

    def check(staging: Path) -> None:
        from edge_shitu_converters.verify import PaddleReferences

        # The search's steps and the final verification compare with the same Paddle outputs: computed once.
        references = PaddleReferences()
        searched: Dict[str, Any] = {}
        as_built = None
        if budget == "auto" and quantizers:
            searched, as_built = _search_failing_models(staging, quantizers, det, rec, verify_images, timings,
                                                        references)
        verify_adding_search(staging, out, searched,
                             lambda s: _verify_or_fail(s, out, det, rec, verify_images, timings,
                                                       references=references,
                                                       report=None if searched else as_built))

    return _publish_bundle(
        out, build, name=name, name_suffix=precision, timings=timings,
        before_publish=_with_head(head, hash_head, check if verify else None),
    )


def _read_hash_head(path: "os.PathLike[str] | str | None", rec_dir: "os.PathLike[str] | str | None"):
    """The hash head to put into the bundle, read and checked before any conversion work."""
    if path is None:
        return None
    if rec_dir is None:
        raise InvalidInputError("a hash head needs the extractor: give rec_dir (--rec) with hash_head (--hash-head)")
    from edge_shitu.hashing import HashHead

    return HashHead.load(path)


def _with_head(head: Any, path: "os.PathLike[str] | str | None",
               then: Optional[Callable[[Path], None]]) -> Optional[Callable[[Path], None]]:
    """A ``before_publish`` step that installs the hash head into the staging bundle, then runs ``then``."""
    if head is None:
        return then

    def step(staging: Path) -> None:
        from edge_shitu_converters.hash_heads import install_head

        install_head(staging, head, source={"installed_from": Path(path).name})
        if then is not None:
            then(staging)

    return step
