"""Load, inspect, run and prune Paddle inference models (the converter's only door to Paddle).

Two program formats are handled:

- ``inference.pdmodel``: the legacy protobuf program every official PP-ShiTu archive ships. Paddle 3.x
  reads it only in legacy-IR mode, selected by the environment variable ``FLAGS_enable_pir_api=0``
  *before* ``paddle`` is first imported. :func:`import_paddle` does exactly that (and, when ``paddle``
  was already imported in PIR mode, switches the process to legacy IR as ``OldIrGuard`` does).
- ``inference.json``: the Paddle 3 PIR program. It is read, edited and saved inside
  ``paddle.pir_utils.IrGuard`` (:func:`save_pir_inference_model`).

Both come with ``inference.pdiparams``: every persistable tensor of the program, sorted by name, each
as a serialized ``DenseTensor`` (see :func:`write_params`).

``paddle`` and ``paddle2onnx`` are imported lazily; when they are missing a
:class:`~edge_shitu.errors.BackendUnavailableError` names the extra to install.
"""

from __future__ import annotations

import contextlib

import logging
import os
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from edge_shitu.errors import (
    BackendUnavailableError,
    ConversionError,
    InvalidDtypeError,
    InvalidInputError,
    MissingFileError,
)

__all__ = [
    "native_output_to",
    "INSTALL_HINT",
    "PIR_FLAG",
    "ModelFiles",
    "VarInfo",
    "LoadedModel",
    "import_paddle",
    "import_paddle2onnx",
    "paddle_version",
    "find_model_files",
    "list_persistables",
    "load_program",
    "load_inference_model",
    "run_program",
    "truncated_clone",
    "save_pruned_inference_model",
    "save_pir_inference_model",
    "write_params",
    "create_predictor",
    "run_predictor",
]

_LOG = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "edge-shitu[convert]"'
PIR_FLAG = "FLAGS_enable_pir_api"

PDMODEL = "inference.pdmodel"
PIR_JSON = "inference.json"
PDIPARAMS = "inference.pdiparams"

# Paddle's VarType codes for the dtypes a params file may hold (framework.proto).
_VARTYPE_BY_DTYPE = {
    "bool": 0,
    "int16": 1,
    "int32": 2,
    "int64": 3,
    "float16": 4,
    "float32": 5,
    "float64": 6,
    "uint8": 20,
    "int8": 21,
}
_FALSE_WORDS = ("0", "false", "off", "no")


def import_paddle() -> Any:
    """Import ``paddle`` in legacy-IR mode and switch it to static-graph mode.

    Sets ``FLAGS_enable_pir_api=0`` in ``os.environ`` before the first import, because Paddle 3.x reads
    that flag at import time and needs it off to load legacy ``inference.pdmodel`` programs. When
    ``paddle`` was already imported with the flag on, the process is switched to legacy IR as
    ``paddle.pir_utils.OldIrGuard`` does (with a warning), and stays so. PIR ``inference.json``
    programs are still read, inside ``IrGuard``.

    Returns:
      The ``paddle`` module.

    Raises:
      BackendUnavailableError: paddlepaddle is not installed.
      ConversionError: ``paddle`` was imported in PIR mode and could not be switched to legacy IR.
    """
    if "paddle" not in sys.modules:
        previous = os.environ.get(PIR_FLAG)
        if previous is not None and previous.strip().lower() not in _FALSE_WORDS:
            _LOG.warning("overriding %s=%s with 0: legacy .pdmodel programs need it off", PIR_FLAG, previous)
        os.environ[PIR_FLAG] = "0"
    try:
        import paddle
    except ImportError as exc:
        raise BackendUnavailableError(
            f"paddlepaddle is not installed ({exc}); the converters need it: {INSTALL_HINT}"
        ) from exc
    if paddle.get_flags(PIR_FLAG)[PIR_FLAG]:
        # Imported earlier with the PIR API on (by the caller, a test runner, paddle2onnx...). Switch
        # the process to legacy IR the way paddle.pir_utils.OldIrGuard does, and stay there.
        _LOG.warning(
            "paddle was imported with %s on; switching this process to legacy IR for .pdmodel programs", PIR_FLAG
        )
        paddle.pir_utils.OldIrGuard().__enter__()
        if paddle.get_flags(PIR_FLAG)[PIR_FLAG] or paddle.framework.in_pir_mode():
            raise ConversionError(
                f"paddle was imported with {PIR_FLAG} on and could not be switched to legacy IR; "
                f"start Python with {PIR_FLAG}=0 in the environment"
            )
    paddle.enable_static()
    return paddle


def import_paddle2onnx() -> Any:
    """Import ``paddle2onnx`` (after :func:`import_paddle`, which it imports itself).

    Returns:
      The ``paddle2onnx`` module.

    Raises:
      BackendUnavailableError: paddle2onnx (or paddlepaddle) is not installed.
      ConversionError: see :func:`import_paddle`.
    """
    import_paddle()
    try:
        import paddle2onnx
    except ImportError as exc:
        raise BackendUnavailableError(
            f"paddle2onnx is not installed ({exc}); the converters need it: {INSTALL_HINT}"
        ) from exc
    return paddle2onnx


def paddle_version() -> str:
    """Return the installed paddlepaddle version (importing it as :func:`import_paddle` does).

    Raises:
      BackendUnavailableError: paddlepaddle is not installed.
    """
    return str(import_paddle().__version__)


@dataclass(frozen=True)
class ModelFiles:
    """The files of one Paddle inference model folder.

    Attributes:
      directory: the folder.
      program: ``inference.pdmodel`` (legacy protobuf) or ``inference.json`` (PIR).
      params: ``inference.pdiparams``; may not exist for a graph-only folder (see ``find_model_files``).
    """

    directory: Path
    program: Path
    params: Path

    @property
    def is_pir(self) -> bool:
        """True for a PIR ``.json`` program, False for a legacy ``.pdmodel``."""
        return self.program.suffix == ".json"


@dataclass(frozen=True)
class VarInfo:
    """A persistable variable of a program.

    Attributes:
      name: variable name, e.g. ``conv2d_0.w_0``.
      shape: its shape, e.g. ``(32, 3, 3, 3)``.
      dtype: numpy dtype name, e.g. ``"float32"``.
      uses: how the program consumes it: sorted ``(op_type, slot)`` pairs in legacy terms, e.g.
        ``(("conv2d", "Filter"),)``; PIR programs are mapped to the same names where known.
    """

    name: str
    shape: Tuple[int, ...]
    dtype: str
    uses: Tuple[Tuple[str, str], ...] = ()


@dataclass
class LoadedModel:
    """A program with its weights loaded into a private scope.

    Attributes:
      files: where it came from.
      program: the ``paddle.static.Program`` (legacy or PIR).
      feed_names: input names, in feed order.
      fetch_names: output names (legacy) or fetch targets' names (PIR), in fetch order.
      fetch_targets: the program's fetch variables/values.
      scope: the ``paddle.static.Scope`` that holds the weights.
      executor: a CPU ``paddle.static.Executor``.
    """

    files: ModelFiles
    program: Any
    feed_names: List[str]
    fetch_names: List[str]
    fetch_targets: List[Any] = field(repr=False)
    scope: Any = field(repr=False)
    executor: Any = field(repr=False)


def find_model_files(model_dir: "os.PathLike[str] | str", *, need_params: bool = True) -> ModelFiles:
    """Locate the program and params files in a Paddle inference model folder.

    A folder holding both ``inference.pdmodel`` and ``inference.json`` uses the ``.pdmodel`` (the
    official archives' format).

    Args:
      model_dir: the folder.
      need_params: require ``inference.pdiparams`` to exist.

    Returns:
      The folder's :class:`ModelFiles`.

    Raises:
      MissingFileError: the folder, its program or (when ``need_params``) its params file is missing.
    """
    directory = Path(model_dir)
    if not directory.is_dir():
        raise MissingFileError(f"Paddle model folder not found: {directory}")
    legacy, pir = directory / PDMODEL, directory / PIR_JSON
    if legacy.is_file():
        program = legacy
        if pir.is_file():
            _LOG.info("%s holds both %s and %s; using %s", directory, PDMODEL, PIR_JSON, PDMODEL)
    elif pir.is_file():
        program = pir
    else:
        raise MissingFileError(f"{directory} holds no Paddle program: expected {PDMODEL} or {PIR_JSON}")
    params = directory / PDIPARAMS
    if need_params and not params.is_file():
        raise MissingFileError(
            f"{directory} holds no {PDIPARAMS} (the weights); expected the official file, or a replica "
            "written by edge_shitu_converters.replica.write_replica"
        )
    return ModelFiles(directory=directory, program=program, params=params)


# PIR operand positions -> legacy slot names, for the ops whose weights a replica must classify.
_PIR_SLOTS = {
    "pd_op.conv2d": ("conv2d", ("Input", "Filter")),
    "pd_op.depthwise_conv2d": ("depthwise_conv2d", ("Input", "Filter")),
    "pd_op.conv2d_transpose": ("conv2d_transpose", ("Input", "Filter")),
    "pd_op.batch_norm": ("batch_norm", ("X", "Mean", "Variance", "Scale", "Bias")),
    "pd_op.batch_norm_": ("batch_norm", ("X", "Mean", "Variance", "Scale", "Bias")),
    "pd_op.add": ("elementwise_add", ("X", "Y")),
    "pd_op.matmul": ("matmul_v2", ("X", "Y")),
    "pd_op.multiply": ("elementwise_mul", ("X", "Y")),
}


def load_program(program_path: "os.PathLike[str] | str") -> Any:
    """Read a program file without weights.

    Args:
      program_path: an ``inference.pdmodel`` or ``inference.json`` file.

    Returns:
      A ``paddle.static.Program`` (legacy for ``.pdmodel``, PIR for ``.json``).

    Raises:
      MissingFileError: the file does not exist.
      ConversionError: Paddle cannot parse it.
      BackendUnavailableError: paddlepaddle is not installed.
    """
    path = Path(program_path)
    if not path.is_file():
        raise MissingFileError(f"Paddle program not found: {path}")
    paddle = import_paddle()
    try:
        if path.suffix == ".json":
            with paddle.pir_utils.IrGuard():
                program = paddle.static.Program()
                paddle.base.core.deserialize_pir_program(str(path), program, 1)
            return program
        return paddle.base.framework.Program.parse_from_string(path.read_bytes())
    except Exception as exc:  # Paddle raises a zoo of C++ error types here.
        raise ConversionError(f"cannot parse Paddle program {path}: {exc}") from exc


def list_persistables(program_path: "os.PathLike[str] | str") -> List[VarInfo]:
    """List the persistable variables (the weights) of a program, sorted by name.

    This is the order of the tensors in ``inference.pdiparams``.

    Args:
      program_path: an ``inference.pdmodel`` or ``inference.json`` file.

    Returns:
      One :class:`VarInfo` per persistable variable (``feed``/``fetch`` holders excluded).

    Raises:
      MissingFileError, ConversionError, BackendUnavailableError: see :func:`load_program`.
    """
    path = Path(program_path)
    program = load_program(path)
    if path.suffix == ".json":
        return _list_pir_persistables(program)
    return _list_legacy_persistables(program)


def _numpy_dtype_name(dtype: Any) -> str:
    # paddle.float32 prints as "paddle.float32"; both IRs share that spelling.
    return str(dtype).rsplit(".", 1)[-1]


def _list_legacy_persistables(program: Any) -> List[VarInfo]:
    uses: Dict[str, set] = {}
    for block in program.blocks:
        for op in block.ops:
            for slot in op.input_names:
                for name in op.input(slot):
                    uses.setdefault(name, set()).add((op.type, slot))
    found = {}
    for var in program.list_vars():
        if not var.persistable or var.name in ("feed", "fetch"):
            continue
        found[var.name] = VarInfo(
            name=var.name,
            shape=tuple(int(d) for d in var.shape),
            dtype=_numpy_dtype_name(var.dtype),
            uses=tuple(sorted(uses.get(var.name, ()))),
        )
    return [found[name] for name in sorted(found)]


def _list_pir_persistables(program: Any) -> List[VarInfo]:
    import paddle
    from paddle.static.pir_io import get_pir_parameters

    with paddle.pir_utils.IrGuard():
        params, opts = get_pir_parameters(program)
        found = {}
        for value in params + opts:
            if not value.persistable:
                continue
            found[value.name] = VarInfo(
                name=value.name,
                shape=tuple(int(d) for d in value.shape),
                dtype=_numpy_dtype_name(value.dtype),
                uses=tuple(sorted(_pir_uses(value))),
            )
    return [found[name] for name in sorted(found)]


# PIR ops that only re-view a weight (a conv bias is reshaped to [1, C, 1, 1] before the add).
_PIR_VIEWS = ("pd_op.reshape", "pd_op.reshape_", "pd_op.squeeze", "pd_op.unsqueeze")


def _pir_uses(value: Any) -> set:
    slots = set()
    for op in value.all_used_ops():
        if op.name() in _PIR_VIEWS and op.operand_source(0).is_same(value):
            slots |= _pir_uses(op.result(0))
            continue
        legacy_type, names = _PIR_SLOTS.get(op.name(), (op.name(), ()))
        for i, operand in enumerate(op.operands_source()):
            if operand.is_same(value):
                slots.add((legacy_type, names[i] if i < len(names) else str(i)))
    return slots


def load_inference_model(model_dir: "os.PathLike[str] | str") -> LoadedModel:
    """Load a program and its weights into a private scope.

    Args:
      model_dir: a folder with ``inference.pdmodel`` (or ``.json``) and ``inference.pdiparams``.

    Returns:
      The :class:`LoadedModel`.

    Raises:
      MissingFileError: a file is missing.
      ConversionError: Paddle cannot load the program or its weights (e.g. a params file that does not
        match the program).
      BackendUnavailableError: paddlepaddle is not installed.
    """
    files = find_model_files(model_dir)
    paddle = import_paddle()
    scope = paddle.static.Scope()
    executor = paddle.static.Executor(paddle.CPUPlace())
    prefix = str(files.directory / "inference")
    try:
        with paddle.static.scope_guard(scope):
            if files.is_pir:
                with paddle.pir_utils.IrGuard():
                    program, feed_names, fetch_targets = paddle.static.load_inference_model(prefix, executor)
                fetch_names = [f"fetch_{i}" for i in range(len(fetch_targets))]
            else:
                program, feed_names, fetch_targets = paddle.static.load_inference_model(prefix, executor)
                fetch_names = [v.name for v in fetch_targets]
    except Exception as exc:
        raise ConversionError(f"cannot load the Paddle model in {files.directory}: {exc}") from exc
    return LoadedModel(
        files=files,
        program=program,
        feed_names=list(feed_names),
        fetch_names=fetch_names,
        fetch_targets=list(fetch_targets),
        scope=scope,
        executor=executor,
    )


def run_program(model: LoadedModel, feeds: Mapping[str, np.ndarray]) -> List[np.ndarray]:
    """Run a loaded program with the static-graph executor (no inference-time graph optimisation).

    Args:
      model: from :func:`load_inference_model`.
      feeds: one array per name in ``model.feed_names`` (e.g. ``{"x": float32 (B,3,224,224)}``).

    Returns:
      The program's fetch outputs, in ``model.fetch_names`` order.

    Raises:
      InvalidInputError: ``feeds`` does not name exactly the program's inputs.
      ConversionError: Paddle fails to run the program.
    """
    if sorted(feeds) != sorted(model.feed_names):
        raise InvalidInputError(
            f"{model.files.directory}: expected inputs {sorted(model.feed_names)}, got {sorted(feeds)}"
        )
    paddle = import_paddle()
    try:
        with paddle.static.scope_guard(model.scope):
            if model.files.is_pir:
                with paddle.pir_utils.IrGuard():
                    out = model.executor.run(model.program, feed=dict(feeds), fetch_list=model.fetch_targets)
            else:
                out = model.executor.run(model.program, feed=dict(feeds), fetch_list=model.fetch_targets)
    except Exception as exc:
        raise ConversionError(f"Paddle failed to run the model in {model.files.directory}: {exc}") from exc
    return [np.asarray(o) for o in out]


def truncated_clone(model: LoadedModel, fetch_names: Sequence[str]) -> Any:
    """Clone a legacy program and drop the top-level ops after the first writers of ``fetch_names``.

    A value is taken where it is first computed: later ops cannot change it, but a later op that
    lists it as an output (e.g. a ``while`` loop that passes it through) would make pruning keep that
    op and everything it needs. The feed/fetch ops are dropped too (saving adds new ones).

    Args:
      model: from :func:`load_inference_model` (legacy ``.pdmodel``).
      fetch_names: variable names written by top-level ops.

    Returns:
      The edited clone (a legacy ``paddle.static.Program``).

    Raises:
      ConversionError: the program is PIR, or a name is written by no top-level op.
    """
    if model.files.is_pir:
        raise ConversionError(f"{model.files.program}: editing PIR (.json) programs is not supported yet")
    program = model.program.clone()
    block = program.global_block()
    first_writer: Dict[str, int] = {}
    for index, op in enumerate(block.ops):
        for name in op.output_arg_names:
            first_writer.setdefault(name, index)
    missing = [n for n in fetch_names if n not in first_writer]
    if missing:
        raise ConversionError(f"{model.files.program}: no top-level op computes {missing}")
    last = max(first_writer[n] for n in fetch_names)
    for index in range(len(block.ops) - 1, -1, -1):
        if index > last or block.ops[index].type in ("feed", "fetch"):
            block._remove_op(index)
    program.desc.flush()
    return program


def save_pruned_inference_model(
    model: LoadedModel,
    out_dir: "os.PathLike[str] | str",
    *,
    feed_names: Sequence[str],
    fetch_names: Sequence[str],
    input_shapes: Optional[Mapping[str, Sequence[int]]] = None,
    program: Any = None,
) -> ModelFiles:
    """Save the part of a legacy program that computes ``fetch_names`` from ``feed_names``.

    Ops that the fetches do not depend on are pruned, and so are the weights only they used. Unless
    ``program`` is given, the program is first cut after the fetches (see :func:`truncated_clone`).

    Args:
      model: from :func:`load_inference_model` (a legacy ``.pdmodel`` program).
      out_dir: folder to write ``inference.pdmodel`` and ``inference.pdiparams`` into (created).
      feed_names: the inputs of the pruned program.
      fetch_names: the outputs of the pruned program (variable names of ``program``).
      input_shapes: optional fixed shapes for some inputs, e.g. ``{"image": (1, 3, 640, 640)}``.
      program: an edited clone of ``model.program`` to save instead of it (its weights must live in
        ``model.scope``).

    Returns:
      The written :class:`ModelFiles`.

    Raises:
      ConversionError: the program is PIR, a name is unknown, or Paddle fails to prune or save.
      BackendUnavailableError: paddlepaddle is not installed.
    """
    if model.files.is_pir:
        raise ConversionError(
            f"{model.files.program}: a PIR (.json) program; prune it with save_pir_inference_model"
        )
    paddle = import_paddle()
    program = truncated_clone(model, fetch_names) if program is None else program
    block = program.global_block()
    names = list(feed_names) + list(fetch_names)
    missing = [n for n in names if not block.has_var(n)]
    if missing:
        raise ConversionError(f"{model.files.program}: no variables named {missing}")
    for name, shape in (input_shapes or {}).items():
        block.var(name).desc.set_shape([int(d) for d in shape])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        with paddle.static.scope_guard(model.scope):
            paddle.static.save_inference_model(
                str(out / "inference"),
                [block.var(n) for n in feed_names],
                [block.var(n) for n in fetch_names],
                model.executor,
                program=program,
            )
    except Exception as exc:
        raise ConversionError(f"cannot save the pruned program of {model.files.directory}: {exc}") from exc
    return find_model_files(out)


def save_pir_inference_model(
    model: LoadedModel,
    out_dir: "os.PathLike[str] | str",
    *,
    feeds: Sequence[Any],
    fetches: Sequence[Tuple[str, Any]],
    program: Any = None,
) -> ModelFiles:
    """Save the part of a PIR program that computes ``fetches`` from ``feeds``, with named outputs.

    Ops that the fetches do not depend on (a post-process that consumes them, unused inputs...) are
    pruned, and so are the weights only they used. PIR values carry no names (Paddle names unnamed
    outputs ``fetch_name_<i>``), so the saved program's fetch ops are renamed afterwards: a predictor
    of the result reports the names given here.

    Args:
      model: from :func:`load_inference_model` (a PIR ``.json`` program).
      out_dir: folder to write ``inference.json`` and ``inference.pdiparams`` into (created).
      feeds: the input values of the pruned program (results of ``pd_op.data``/``pd_op.feed`` ops of
        ``program``), in feed order.
      fetches: ``(name, value)`` pairs, the outputs of the pruned program in fetch order; names unique.
      program: an edited ``model.program`` (or a clone) to save instead of it; its weights must live in
        ``model.scope``.

    Returns:
      The written :class:`ModelFiles`.

    Raises:
      InvalidInputError: no fetches, or a name given twice.
      ConversionError: the program is legacy, or Paddle fails to prune or save.
      BackendUnavailableError: paddlepaddle is not installed.
    """
    if not model.files.is_pir:
        raise ConversionError(f"{model.files.program}: not a PIR (.json) program; use save_pruned_inference_model")
    names = [name for name, _ in fetches]
    if not names or len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
        raise InvalidInputError(f"fetches need unique non-empty names, got {names}")
    paddle = import_paddle()
    program = model.program if program is None else program
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / PIR_JSON
    try:
        with paddle.static.scope_guard(model.scope), paddle.pir_utils.IrGuard():
            paddle.static.save_inference_model(
                str(out / "inference"),
                list(feeds),
                [value for _, value in fetches],
                model.executor,
                program=program,
            )
            saved = paddle.static.Program()
            paddle.base.core.deserialize_pir_program(str(path), saved)
            fetch_ops = [op for op in saved.global_block().ops if op.name() == "pd_op.fetch"]
            if sorted(int(op.attrs()["col"]) for op in fetch_ops) != list(range(len(names))):
                raise ConversionError(f"the saved program has {len(fetch_ops)} outputs, expected {len(names)}")
            for op in fetch_ops:
                op.set_str_attr("name", names[int(op.attrs()["col"])])
            # Same flags as save_inference_model: overwrite, not human-readable, trainable attributes kept.
            paddle.base.core.serialize_pir_program(saved, str(path), True, False, True)
    except ConversionError:
        raise
    except Exception as exc:
        raise ConversionError(f"cannot save the pruned program of {model.files.directory}: {exc}") from exc
    return find_model_files(out)


def _tensor_desc(dtype_code: int, shape: Sequence[int]) -> bytes:
    # VarType.TensorDesc protobuf: field 1 (data_type, varint), field 2 (dims, repeated int64, unpacked).
    def varint(value: int) -> bytes:
        value &= (1 << 64) - 1
        out = bytearray()
        while True:
            byte = value & 0x7F
            value >>= 7
            if value:
                out.append(byte | 0x80)
            else:
                out.append(byte)
                return bytes(out)

    parts = [b"\x08", varint(dtype_code)]
    for dim in shape:
        parts += [b"\x10", varint(int(dim))]
    return b"".join(parts)


def write_params(path: "os.PathLike[str] | str", tensors: Iterable[Tuple[str, np.ndarray]]) -> None:
    """Write an ``inference.pdiparams`` file (Paddle's ``save_combine`` format) without Paddle.

    Tensors are written sorted by name, which is the order Paddle reads them in. Each is
    ``uint32 0`` (version), ``uint64 0`` (no LoD), ``uint32 0`` (tensor version), ``int32`` length of
    the ``TensorDesc`` protobuf, the protobuf, then the raw little-endian data.

    Args:
      path: the file to write.
      tensors: ``(name, array)`` pairs; arrays of a dtype Paddle knows (float32, int64, ...).

    Raises:
      InvalidDtypeError: an array has a dtype Paddle cannot store.
      InvalidInputError: a name appears twice.
    """
    items = sorted(tensors, key=lambda item: item[0])
    names = [name for name, _ in items]
    if len(set(names)) != len(names):
        raise InvalidInputError(f"{path}: duplicate tensor names in {names}")
    with open(path, "wb") as f:
        for name, array in items:
            array = np.asarray(array)
            code = _VARTYPE_BY_DTYPE.get(array.dtype.name)
            if code is None:
                raise InvalidDtypeError(f"{path}: tensor {name!r} has dtype {array.dtype}, which Paddle cannot store")
            desc = _tensor_desc(code, array.shape)
            f.write(struct.pack("<IQIi", 0, 0, 0, len(desc)))
            f.write(desc)
            f.write(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes())


def create_predictor(files: ModelFiles, *, threads: int = 1, ir_optim: bool = True) -> Any:
    """Create a CPU Paddle Inference predictor.

    oneDNN (MKLDNN) is disabled: with Paddle 3.x it is not reliably stable on these graphs (PIR/oneDNN
    attribute-conversion crashes have been reported for 3.0-3.x) and it changes numerics; plain CPU
    kernels give a reproducible reference.

    Args:
      files: the model (``.pdmodel`` or ``.json`` with ``inference.pdiparams``).
      threads: CPU math threads (>= 1).
      ir_optim: run Paddle Inference's graph optimisation passes (conv+bn fusion...), as the
        PaddleClas reference does.

    Returns:
      A ``paddle.inference.Predictor``.

    Raises:
      InvalidInputError: ``threads`` < 1.
      MissingFileError: the params file is missing.
      ConversionError: Paddle cannot create the predictor.
    """
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise InvalidInputError(f"threads must be an int >= 1, got {threads!r}")
    if not files.params.is_file():
        raise MissingFileError(f"{files.directory} holds no {PDIPARAMS}")
    import_paddle()
    from paddle import inference

    config = inference.Config(str(files.program), str(files.params))
    config.disable_gpu()
    config.disable_mkldnn()
    config.disable_glog_info()
    config.set_cpu_math_library_num_threads(threads)
    config.switch_ir_optim(ir_optim)
    if not files.is_pir:
        # With PIR programs Paddle 3.3 fails to create a second predictor once memory_optimize_pass
        # ran ("Not find predictor_id 1 and pass_name memory_optimize_pass").
        config.enable_memory_optim()
    try:
        return inference.create_predictor(config)
    except Exception as exc:
        raise ConversionError(f"cannot create a Paddle Inference predictor for {files.directory}: {exc}") from exc


def run_predictor(predictor: Any, feeds: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Run a Paddle Inference predictor once.

    Args:
      predictor: from :func:`create_predictor`.
      feeds: one array per input name of the predictor.

    Returns:
      Output name -> array, for every output of the predictor.

    Raises:
      InvalidInputError: ``feeds`` does not name exactly the predictor's inputs.
      ConversionError: the run fails.
    """
    names = list(predictor.get_input_names())
    if sorted(feeds) != sorted(names):
        raise InvalidInputError(f"predictor expects inputs {sorted(names)}, got {sorted(feeds)}")
    try:
        for name in names:
            array = np.ascontiguousarray(feeds[name])
            handle = predictor.get_input_handle(name)
            handle.reshape(list(array.shape))
            handle.copy_from_cpu(array)
        predictor.run()
        return {n: predictor.get_output_handle(n).copy_to_cpu() for n in predictor.get_output_names()}
    except Exception as exc:
        raise ConversionError(f"Paddle Inference run failed: {exc}") from exc


@contextlib.contextmanager
def native_output_to(log_path: Path):
    """Send everything written to file descriptors 1 and 2 (Paddle's C++ logging, paddle2onnx's prints,
    Python log handlers) to ``log_path`` for the duration; the quickstart's own report stays readable."""
    os.environ.setdefault("GLOG_minloglevel", "2")
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(log_path, "ab") as log_file:
        try:
            os.dup2(log_file.fileno(), 1)
            os.dup2(log_file.fileno(), 2)
            yield
        finally:
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
