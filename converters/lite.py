"""Convert Paddle PP-ShiTu models into Paddle-Lite bundles (``.nb`` naive-buffer files, fp32 or INT8).

A Lite bundle has the layout of an ONNX bundle (:mod:`edge_shitu_converters.convert`): ``detector.nb`` and/or
``extractor.nb`` plus ``manifest.json``, whose models say ``"backend": "paddlelite"``, the
``"target"`` machine (``"x86"`` or ``"arm"``) and the precision. The detector is the same program cut
at its raw heads (:func:`edge_shitu_converters.convert.cut_detector_heads`); its outputs keep the names
``scores_stride8`` ... ``boxes_stride64``, and the extractor's output keeps its Paddle fetch name
(Paddle-Lite reports the names of the variables the program's ``fetch`` ops read).

Paddle-Lite's model optimiser ``paddle_lite_opt`` (``paddlelite==2.13rc0``, the last release with a
Python wheel) needs Python <= 3.10 and numpy < 2, so it runs in a side environment, as a
subprocess: it segfaults on programs it cannot handle instead of raising. :func:`find_opt` locates it
(argument, ``$EDGE_SHITU_LITE_OPT``, ``PATH``) and explains how to install it when it is missing.

Known defects of Paddle-Lite 2.13rc0, handled here:

- Programs re-saved by Paddle 3.x's ``save_inference_model`` lose the ``XShape`` output of
  ``flatten_contiguous_range``, and ``opt`` dereferences it (segfault, x86 and arm alike).
  :func:`restore_flatten_xshape` gives it back before every ``opt`` run (the extractor after
  post-training quantisation is such a program); Paddle Inference outputs are unchanged by it.
- ``opt`` writes 16 bytes for its version string but initialises only ``v2.13-rc\\0``: the bytes
  after the NUL are whatever was in memory, so two runs give different files. They are zeroed, so a
  bundle (and its digests) is reproducible; Paddle-Lite loads and runs the zeroed file identically.
  ``opt``'s output also depends on the output path it is given and on the addresses its memory gets
  (another variable reuse; ``docs/benchmarks.md``), so :func:`run_opt` always has it write the same
  relative name in a folder of its own, with address-space randomisation off (``setarch -R``).
- Kernels are compiled into the file for one machine: an ARM ``.nb`` run on x86 returns garbage
  without an error (or crashes). Every written file is checked with
  :func:`edge_shitu.backends.paddlelite.read_nb_targets` to hold kernels of the requested target
  only, and the manifest records that target, which the runtime checks against the machine.
- INT8 on x86: Lite's x86 INT8 kernels give a correct extractor (close to fp32 on the replica, no
  NaN) but a silently wrong detector: its head outputs are unrelated to those of the quantised
  program run by Paddle Inference (quantising only the ``conv2d`` or only the ``depthwise_conv2d``
  ops is just as wrong; figures in ``docs/benchmarks.md``, "converters/lite.py: Paddle-Lite INT8"),
  so :func:`convert_lite` refuses an x86 INT8 detector. ARM files cannot run on an x86 machine at
  all: an ARM INT8 bundle is checked structurally here (kernel targets, manifest loaded by the
  runtime) and its numerical agreement must be measured on an ARM device.

INT8 models come from paddleslim's post-training static quantisation (``paddleslim.quant.quant_post_static``),
the toolkit PaddleClas quantises its own PP-ShiTu models with. paddleslim 2.6.0 runs on paddlepaddle 2.6
and pins ``opencv-python==4.6.0.66`` and numpy < 2, so it runs in the same side environment as
``opt``, as a subprocess (:mod:`edge_shitu_converters.paddleslim_worker`); the main environment keeps numpy 2
and Paddle 3. Activation ranges are calibrated on real photos, decoded and pre-processed exactly as
the runtime does (:func:`edge_shitu_converters.quantize.calibration_feeds`, in this environment; the batches
reach the worker as an ``.npz`` file). Weights get one scale per output channel; activations one scale
per tensor, computed by one of paddleslim's algorithms: ``avg`` (mean of per-batch absolute maxima; the
quickest and the default), ``abs_max`` (the largest absolute value seen), ``hist`` (99.99th percentile
of a histogram), ``KL`` (TensorRT-style entropy), ``mse`` and ``emd`` (the scale that minimises the
mean squared error or the earth mover's distance to float; the slowest). ``skip`` names weights
(e.g. ``extractor:conv2d_0.w_0``; :func:`quantizable_weights` lists them) whose ops stay in float, through
paddleslim's ``skip_tensor_list``; the manifest records the tool, its version, the algorithm and the
skipped weights (calibration times and agreement in ``docs/benchmarks.md``). Paddle-Lite needs
the legacy ``inference.pdmodel`` program: Paddle 3 PIR ``inference.json`` programs are refused (no
tool converts PIR back to the legacy format). ``int8_layers`` keeps the most damaging weights float, a given
number of them or, with a check, the fewest that pass it (:mod:`edge_shitu_converters.lite_search`, which
checks paddleslim's program in simulated INT8, so ARM models too).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from edge_shitu_converters import paddle_io
from edge_shitu_converters.convert import (
    EXPORT_FORMATS,
    _check_model_folders,
    _check_request,
    _detector_fields,
    _detector_input_spec,
    _extractor_fields,
    _publish_bundle,
    _rewrite_manifest,
    _source,
    _step,
    cut_detector_heads,
    failure_report_path,
    validate_export,
    verify_adding_search,
)
from edge_shitu_converters.int8_search import parse_int8_layers
from edge_shitu_converters.paddle_io import ModelFiles
from edge_shitu_converters.paddleslim_worker import (
    ALGOS as _SLIM_ALGOS,
    ERROR_PREFIX as _SLIM_ERROR_PREFIX,
    EXIT_MISSING as _SLIM_MISSING,
    QAT_SCALES,
)
from edge_shitu.bundle import Bundle, InputSpec, sha256_file
from edge_shitu.errors import (
    BackendUnavailableError,
    BundleError,
    ConversionError,
    InvalidInputError,
    MissingFileError,
)

__all__ = [
    "QAT_BATCH",
    "QAT_LEARNING_RATE",
    "QAT_SCALES",
    "quantize_aware_training",
    "LITE_TARGETS",
    "PTQ_ALGOS",
    "DEFAULT_ALGO",
    "DEFAULT_CALIB_COUNT",
    "OPT_ENV",
    "OPT_INSTALL_HINT",
    "find_opt",
    "run_opt",
    "restore_flatten_xshape",
    "QuantizedModel",
    "paddleslim_versions",
    "quantizable_weights",
    "quantize_post_training",
    "convert_lite",
]

_LOG = logging.getLogger(__name__)

LITE_TARGETS = ("x86", "arm")
# paddleslim's algorithm names; accepted case-insensitively.
PTQ_ALGOS = _SLIM_ALGOS
DEFAULT_ALGO = "avg"
DEFAULT_CALIB_COUNT = 32
OPT_ENV = "EDGE_SHITU_LITE_OPT"
OPT_NAME = "paddle_lite_opt"
OPT_INSTALL_HINT = (
    "paddle_lite_opt comes with paddlelite 2.13rc0, whose wheels need Python <= 3.10 and numpy < 2, so it "
    "lives in a side environment. Create one with\n"
    "    scripts/setup-lite-env            (from the edge-shitu repository; creates .venv-lite)\n"
    "or by hand:\n"
    "    python3.10 -m venv .venv-lite     (e.g. ~/.pyenv/versions/3.10.13/bin/python -m venv .venv-lite)\n"
    '    .venv-lite/bin/pip install paddlelite==2.13rc0 "numpy<2"\n'
    f"then point edge-shitu at it: export {OPT_ENV}=$PWD/.venv-lite/bin/{OPT_NAME}, or pass "
    "lite_opt= (CLI: --lite-opt .venv-lite/bin/paddle_lite_opt), or put .venv-lite/bin on PATH."
)

# Weighted ops quantised: paddleslim's defaults plus matmul (the PP-ShiTu programs have convolutions only).
_QUANTIZABLE_OPS = ("conv2d", "depthwise_conv2d", "mul", "matmul", "matmul_v2")
_CALIB_SEED = 0
_SLIM_TOOL = "paddleslim.quant_post_static"
_QAT_TOOL = "paddleslim.auto_compression (QuantAware + Distillation)"
_SLIM_HINT = "run scripts/setup-lite-env, which adds paddlepaddle 2.6.2 and paddleslim 2.6.0 to the side environment"
# A hung worker is killed. KL took 8 min on the extractor with 32 photos on 2 loaded cores, and the detector
# takes about 7x as long (docs/benchmarks.md, "Paddle-Lite INT8 with paddleslim").
_SLIM_TIMEOUT_S = 4 * 3600
#: Photos per step and SGD learning rate of quantisation-aware training: small, the model is fine-tuned to its own
#: fp32 outputs, not trained (on the replica detector, with the post-training scales held, 1e-4 and 1e-3 drove it
#: away from fp32, 1e-6 moved it closer: docs/benchmarks.md, "Batch norms frozen").
QAT_BATCH = 2
QAT_LEARNING_RATE = 1e-6
_PROBE_TIMEOUT_S = 300
_OPT_TIMEOUT_S = 900
_LOG_TAIL_LINES = 25
# .nb header: uint16 meta version, then a 16-byte version string ("v2.13-rc\0" + uninitialised bytes).
_NB_VERSION_SLICE = slice(2, 18)


def find_opt(explicit: "os.PathLike[str] | str | None" = None) -> Path:
    """Locate Paddle-Lite's ``paddle_lite_opt``: ``explicit``, then ``$EDGE_SHITU_LITE_OPT``, then ``PATH``,
    then the side environment ``scripts/setup-lite-env`` makes (``.venv-lite`` beside ``pyproject.toml``).

    A path given explicitly or by the environment variable must exist; it is never replaced by
    another one found later.

    Args:
      explicit: path of the executable (e.g. ``.venv-lite/bin/paddle_lite_opt``), or None.

    Returns:
      The executable's absolute path.

    Raises:
      BackendUnavailableError: the path given (or the one in the environment variable) is not an
        executable file, or none was given and ``paddle_lite_opt`` is not on ``PATH``; the message
        says how to create the side environment (:data:`OPT_INSTALL_HINT`).
    """
    for where, value in (("lite_opt", explicit), (f"${OPT_ENV}", os.environ.get(OPT_ENV) or None)):
        if value is None:
            continue
        path = Path(value).expanduser()
        if not path.is_file() or not os.access(path, os.X_OK):
            state = "is not an executable file" if path.exists() else "does not exist"
            raise BackendUnavailableError(f"{where} names {path}, which {state}.\n{OPT_INSTALL_HINT}")
        return path.absolute()
    found = shutil.which(OPT_NAME)
    if found is not None:
        return Path(found).absolute()
    from edge_shitu_converters.lite_worker import _repo_root

    local = _repo_root() / ".venv-lite" / ("Scripts" if os.name == "nt" else "bin") / OPT_NAME
    if local.is_file() and os.access(local, os.X_OK):
        return local.absolute()
    raise BackendUnavailableError(
        f"Paddle-Lite's model optimiser {OPT_NAME} was not found (no lite_opt argument, ${OPT_ENV} unset, "
        f"not on PATH, no {local}).\n{OPT_INSTALL_HINT}"
    )


def _log_tail(text: str) -> str:
    """The last lines of a tool's log as a terminal shows them: of a line that a progress bar rewrote with carriage
    returns, only its last state (split on them, a bar's updates would fill the whole tail)."""
    lines = [line.rsplit("\r", 1)[-1] for line in text.replace("\r\n", "\n").split("\n")]
    tail = [line for line in lines if line.strip()][-_LOG_TAIL_LINES:]
    return "\n".join(("  " + line) for line in tail) if tail else "  (no output)"


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def _opt_env() -> Dict[str, str]:
    # The side environment has its own Python: our PYTHONPATH/PYTHONHOME would point it at the wrong
    # site-packages (Python 3.11, numpy 2).
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def run_opt(
    model_file: "os.PathLike[str] | str",
    params_file: "os.PathLike[str] | str",
    out_path: "os.PathLike[str] | str",
    *,
    target: str,
    opt: "os.PathLike[str] | str",
    timeout_s: float = _OPT_TIMEOUT_S,
) -> Path:
    """Optimise a legacy Paddle program into a Paddle-Lite ``.nb`` file for one machine.

    ``opt`` runs as a subprocess (it segfaults on programs it cannot handle) with its output
    captured and logged at debug level. Its output is written in a private folder next to ``out_path``,
    always under the same name and with address-space randomisation off (``opt``'s output depends on
    both), and moved there only when it is complete: the uninitialised bytes of the version field are
    zeroed (so the same program always gives the same file) and the file's kernels are checked to
    target ``target`` only.

    Args:
      model_file: the legacy program (``inference.pdmodel``); Paddle 3.x-saved programs should go
        through :func:`restore_flatten_xshape` first.
      params_file: its weights (``inference.pdiparams``).
      out_path: the ``.nb`` file to write (the suffix is required; ``opt`` itself appends ``.nb``
        to whatever it is given).
      target: ``"x86"`` or ``"arm"``.
      opt: the ``paddle_lite_opt`` executable (see :func:`find_opt`).
      timeout_s: seconds before ``opt`` is killed.

    Returns:
      ``out_path`` as a Path.

    Raises:
      InvalidInputError: an unknown target, or ``out_path`` does not end in ``.nb``.
      MissingFileError: the program or params file does not exist.
      BackendUnavailableError: ``opt`` cannot be started.
      ConversionError: ``opt`` failed, crashed, timed out or wrote no file, or the file it wrote has
        kernels for another target; the message names the program, the target and the end of
        ``opt``'s log.
    """
    if target not in LITE_TARGETS:
        raise InvalidInputError(f"unknown Paddle-Lite target {target!r}; expected one of {', '.join(LITE_TARGETS)}")
    # Absolute: opt runs in a folder of its own.
    model, params, out = (Path(p).absolute() for p in (model_file, params_file, out_path))
    if out.suffix != ".nb":
        raise InvalidInputError(f"{out}: a Paddle-Lite model file name must end in .nb")
    for kind, path in (("program", model), ("params", params)):
        if not path.is_file():
            raise MissingFileError(f"Paddle {kind} file not found: {path}")
    # Resolved here: under setarch a missing opt would look like a failed run. Absolute: opt runs in a folder of
    # its own, where a relative path would name nothing.
    found = shutil.which(str(opt))
    if found is None:
        raise BackendUnavailableError(f"cannot run {opt}: not an executable file.\n{OPT_INSTALL_HINT}")
    executable = os.path.abspath(found)
    out.parent.mkdir(parents=True, exist_ok=True)
    # opt's bytes depend on the output path it is given and on where the system places its memory (it orders some
    # variables by address): it always writes the same relative name, in a folder of its own, with address-space
    # randomisation off.
    work = out.parent / f".{out.stem}.opt-{secrets.token_hex(6)}"
    work.mkdir()
    written = work / "model.nb"
    command = [
        *_fixed_layout(),
        executable,
        f"--model_file={model}",
        f"--param_file={params}",
        "--optimize_out=model",
        "--optimize_out_type=naive_buffer",
        f"--valid_targets={target}",
    ]
    what = f"Paddle-Lite opt ({target}) on {model}"
    _LOG.debug("running %s", " ".join(command))
    try:
        try:
            done = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                cwd=str(work),
                env=_opt_env(),
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            output = exc.output.decode("utf-8", "replace") if isinstance(exc.output, bytes) else ""
            raise ConversionError(f"{what} did not finish in {timeout_s:g} s; its log ends with:\n{_log_tail(output)}") from None
        except OSError as exc:
            raise BackendUnavailableError(f"cannot run {opt} ({exc}).\n{OPT_INSTALL_HINT}") from exc
        log = done.stdout.decode("utf-8", "replace")
        _LOG.debug("%s said:\n%s", what, log.strip())
        if done.returncode != 0:
            # opt aborts or segfaults on programs and ops it cannot handle rather than reporting them.
            raise ConversionError(
                f"{what} {_describe_exit(done.returncode)} (Paddle-Lite crashes on programs it cannot handle); "
                f"its log ends with:\n{_log_tail(log)}"
            )
        # paddle_lite_opt's Python wrapper exits with 0 even when it only printed its usage.
        if not written.is_file() or written.stat().st_size == 0:
            raise ConversionError(f"{what} wrote no model; its log ends with:\n{_log_tail(log)}")
        version = _zero_version_padding(written)
        _check_targets(written, target, what)
        os.replace(written, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _LOG.info("%s -> %s (%s, %.1f MB)", what, out, version, out.stat().st_size / 1e6)
    return out


@functools.lru_cache(maxsize=None)
def _fixed_layout() -> Tuple[str, ...]:
    """The command prefix that runs a program with address-space randomisation off (util-linux's ``setarch -R``),
    or ``()`` where that is not possible (no ``setarch``, or a sandbox that refuses the personality change)."""
    setarch = shutil.which("setarch")
    if setarch is not None:
        prefix = (setarch, platform.machine(), "-R")
        try:
            if subprocess.run([*prefix, "true"], stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
                              check=False).returncode == 0:
                return prefix
        except (OSError, subprocess.SubprocessError):
            pass
    _LOG.warning("setarch -R is not available: Paddle-Lite opt may write a different file for the same program "
                 "from one run to the next (the models compute the same)")
    return ()


def _zero_version_padding(path: Path) -> str:
    """Zero the bytes after the NUL of the .nb version field; return the version string."""
    with open(path, "r+b") as f:
        head = f.read(_NB_VERSION_SLICE.stop)
        if len(head) < _NB_VERSION_SLICE.stop:
            raise ConversionError(f"{path}: Paddle-Lite opt wrote a {len(head)}-byte file, not a .nb model")
        field = head[_NB_VERSION_SLICE]
        end = field.find(b"\0")
        if end < 0:
            end = len(field)
        f.seek(_NB_VERSION_SLICE.start + end)
        f.write(b"\0" * (len(field) - end))
    return field[:end].decode("ascii", "replace")


def _nb_version(path: Path) -> str:
    with open(path, "rb") as f:
        field = f.read(_NB_VERSION_SLICE.stop)[_NB_VERSION_SLICE]
    return field.split(b"\0", 1)[0].decode("ascii", "replace")


def _check_targets(path: Path, target: str, what: str) -> None:
    from edge_shitu.backends.paddlelite import read_nb_targets

    try:
        found = read_nb_targets(path)
    except BundleError as exc:
        raise ConversionError(f"{what} wrote an unreadable model: {exc}") from exc
    if found != frozenset({target}):
        raise ConversionError(f"{what} wrote kernels for {sorted(found)}, expected only {target}")


def restore_flatten_xshape(program_bytes: bytes) -> Tuple[bytes, int]:
    """Give every ``flatten_contiguous_range`` op of a legacy program its ``XShape`` output back.

    Paddle 3.x drops that output when it saves a legacy program (``save_inference_model``, which
    post-training quantisation uses); Paddle-Lite 2.13rc0's ``FlattenContiguousRangeOp::InferType``
    dereferences it and segfaults. ``XShape`` only records the input shape for the backward pass,
    so adding it changes no inference result (tested against Paddle Inference).

    Args:
      program_bytes: a serialized legacy ``ProgramDesc`` (the bytes of ``inference.pdmodel``).

    Returns:
      ``(bytes, count)``: the program with the outputs restored and the number of ops changed. When
      no op needed it, the input bytes are returned unchanged (and ``count`` is 0).

    Raises:
      ConversionError: the bytes are not a legacy program.
      BackendUnavailableError: paddlepaddle is not installed.
    """
    paddle_io.import_paddle()
    from paddle.base import core

    try:
        desc = core.ProgramDesc(program_bytes)
    except Exception as exc:  # Paddle raises its own C++ error types
        raise ConversionError(f"not a legacy Paddle program ({type(exc).__name__}: {exc})") from exc
    # Paddle 3 renamed LOD_TENSOR to DENSE_TENSOR.
    var_types = core.VarDesc.VarType
    dense = getattr(var_types, "DENSE_TENSOR", None) or getattr(var_types, "LOD_TENSOR")
    count = 0
    for block_index in range(desc.num_blocks()):
        block = desc.block(block_index)
        for op_index in range(block.op_size()):
            op = block.op(op_index)
            if op.type() != "flatten_contiguous_range" or "XShape" in op.output_names():
                continue
            x = block.find_var(op.input("X")[0].encode())
            name = op.output("Out")[0] + ".xshape"
            var = block.var(name.encode())
            var.set_type(dense)
            var.set_dtype(x.dtype())
            var.set_shape([0] + list(x.shape()))
            op.set_output("XShape", [name])
            count += 1
    if count == 0:
        return program_bytes, 0
    return desc.serialize_to_string(), count


def _opt_ready_program(files: ModelFiles, work: Path) -> Path:
    """The program file to give opt: ``files.program``, or a copy with flatten XShapes restored."""
    data, count = restore_flatten_xshape(files.program.read_bytes())
    if count == 0:
        return files.program
    work.mkdir(parents=True, exist_ok=True)
    fixed = work / files.program.name
    fixed.write_bytes(data)
    _LOG.info("%s: restored the XShape output of %d flatten_contiguous_range op(s) for Paddle-Lite", files.program, count)
    return fixed


def _normalise_algo(algo: Optional[str]) -> str:
    if algo is None:
        return DEFAULT_ALGO
    by_lower = {a.lower(): a for a in PTQ_ALGOS}
    if not isinstance(algo, str) or algo.lower() not in by_lower:
        raise InvalidInputError(f"unknown quantisation algorithm {algo!r}; expected one of {', '.join(PTQ_ALGOS)}")
    return by_lower[algo.lower()]


def _check_bias_correction(bias_correction: Any) -> None:
    if not isinstance(bias_correction, bool):
        raise InvalidInputError(f"bias_correction must be True or False, got {bias_correction!r}")


def _normalise_skip(skip: Optional[Sequence[str]]) -> Tuple[str, ...]:
    """The skip list as a tuple of distinct names, in the order given."""
    if skip is None:
        return ()
    if isinstance(skip, (str, bytes)):
        raise InvalidInputError(f"skip must be a list of weight names, not the single string {skip!r}")
    names = tuple(skip)
    bad = [n for n in names if not isinstance(n, str) or not n.strip() or n != n.strip()]
    if bad:
        raise InvalidInputError(
            f"skip must hold weight names (non-empty strings without surrounding spaces), got {bad!r}")
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class QuantizedModel:
    """A program quantised by :func:`quantize_post_training`.

    Attributes:
      files: the quantised legacy program and its weights.
      algo: the activation algorithm used (paddleslim's spelling).
      skip_tensors: the weights whose ops were kept in float, as given.
      quantized_ops: the number of weighted ops that got INT8 weights.
      versions: ``{"paddleslim": ..., "paddlepaddle": ...}`` of the side environment that quantised it.
      training: for :func:`quantize_aware_training`, the settings the worker trained with (``iters``, ``batch``,
        ``learning_rate``, ``seed``, ``photos``, ``optimizer``, and ``frozen_batch_norms``, how many batch norms kept
        the fp32 running statistics); None after post-training quantisation.
    """

    files: ModelFiles
    algo: str
    skip_tensors: Tuple[str, ...]
    quantized_ops: int
    versions: Dict[str, str]
    training: Optional[Dict[str, Any]] = None


def _run_slim(python: Path, args: Sequence[str], what: str, cwd: Path, timeout_s: float) -> str:
    """Run the paddleslim worker; return its stdout, or raise with the tail of its log."""
    command = [str(python), "-I", "-m", "edge_shitu_converters.paddleslim_worker", *args]
    _LOG.debug("running %s", " ".join(command))
    try:
        done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, cwd=str(cwd), env=_opt_env(),
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        output = exc.stderr.decode("utf-8", "replace") if isinstance(exc.stderr, bytes) else ""
        raise ConversionError(
            f"{what} did not finish in {timeout_s:g} s; its log ends with:\n{_log_tail(output)}") from None
    except OSError as exc:
        raise BackendUnavailableError(f"cannot run {python} ({exc}); {_SLIM_HINT}") from exc
    log = done.stderr.decode("utf-8", "replace")
    _LOG.debug("%s said:\n%s", what, (done.stdout.decode("utf-8", "replace") + log).strip())
    if done.returncode == _SLIM_MISSING:
        last = log.strip().splitlines()[-1] if log.strip() else "no output"
        raise BackendUnavailableError(
            f"the Paddle-Lite side environment {python} cannot quantise ({last}); {_SLIM_HINT}")
    if done.returncode != 0:
        # The worker's own report of the exception comes first: an error is shown on one bounded line, which the
        # tail of a log full of Paddle's messages would fill.
        said = [line for line in log.splitlines() if line.startswith(_SLIM_ERROR_PREFIX)]
        why = f": {said[-1][len(_SLIM_ERROR_PREFIX):].strip()}" if said else ""
        raise ConversionError(
            f"{what} {_describe_exit(done.returncode)}{why}; its log ends with:\n{_log_tail(log)}")
    return done.stdout.decode("utf-8", "replace")


def paddleslim_versions(python: "os.PathLike[str] | str | None" = None) -> Dict[str, str]:
    """The paddleslim and paddlepaddle versions of the Paddle-Lite side environment.

    Args:
      python: the side environment's Python; default
        :func:`edge_shitu_converters.lite_worker.find_lite_python`.

    Returns:
      ``{"paddleslim": ..., "paddlepaddle": ...}``.

    Raises:
      BackendUnavailableError: no side environment, or it cannot import paddle and paddleslim (the
        message says to run ``scripts/setup-lite-env``).
      ConversionError: the worker failed otherwise.
    """
    from edge_shitu_converters.lite_worker import find_lite_python

    exe = find_lite_python(python)
    out = _run_slim(exe, ["--versions"], f"paddleslim worker ({exe})", Path.cwd(), _PROBE_TIMEOUT_S)
    try:
        found = json.loads(out.strip().splitlines()[-1])
        return {"paddleslim": str(found["paddleslim"]), "paddlepaddle": str(found["paddlepaddle"])}
    except (IndexError, ValueError, KeyError, TypeError) as exc:
        raise ConversionError(f"paddleslim worker ({exe}) printed no versions: {out[-500:]!r}") from exc


def quantizable_weights(model_dir: "os.PathLike[str] | str") -> List[str]:
    """The weights that post-training quantisation gives INT8 values: the persistable inputs of the
    program's ``conv2d``, ``depthwise_conv2d``, ``mul`` and ``matmul(_v2)`` ops, in program order.

    These are the names ``skip`` (CLI ``--lite-skip``) takes.

    Args:
      model_dir: folder with a legacy ``inference.pdmodel``.

    Returns:
      The weight names (e.g. ``conv2d_0.w_0``).

    Raises:
      MissingFileError: a model file is missing.
      ConversionError: the program is a PIR ``.json`` program, or Paddle cannot read it.
      BackendUnavailableError: paddlepaddle is not installed.
    """
    files = _legacy_files(model_dir, "model")
    block = paddle_io.load_program(files.program).global_block()
    names: Dict[str, None] = {}
    for op in block.ops:
        if op.type not in _QUANTIZABLE_OPS:
            continue
        for name in op.input_arg_names:
            if block.has_var(name) and block.var(name).persistable:
                names[name] = None
    return list(names)


def quantize_post_training(
    model_dir: "os.PathLike[str] | str",
    out_dir: "os.PathLike[str] | str",
    *,
    feeds: Sequence[Dict[str, np.ndarray]],
    algo: str = DEFAULT_ALGO,
    skip: Optional[Sequence[str]] = None,
    bias_correction: bool = False,
    python: "os.PathLike[str] | str | None" = None,
    timeout_s: float = _SLIM_TIMEOUT_S,
) -> QuantizedModel:
    """Post-training static INT8 quantisation of a legacy Paddle program with paddleslim (for Paddle-Lite).

    Runs ``paddleslim.quant.quant_post_static`` in the Paddle-Lite side environment
    (:mod:`edge_shitu_converters.paddleslim_worker`). Weights get one scale per output channel
    (``channel_wise_abs_max``); activations one scale per tensor from the calibration ``feeds``,
    computed by ``algo``. ``conv2d``, ``depthwise_conv2d``, ``mul`` and ``matmul(_v2)`` ops are
    quantised, except those reading a tensor of ``skip``. The result is a legacy program with
    fake-quantisation ops, which Paddle Inference runs in simulated INT8 and Paddle-Lite's ``opt``
    turns into INT8 kernels.

    Args:
      model_dir: folder with a legacy ``inference.pdmodel`` and ``inference.pdiparams``.
      out_dir: folder to write the quantised ``inference.pdmodel`` and ``inference.pdiparams`` into
        (created).
      feeds: calibration batches ``{input name: float32 (N, 3, H, W)}``, e.g. from
        :func:`edge_shitu_converters.quantize.calibration_feeds`; all of them are used.
      algo: one of :data:`PTQ_ALGOS` (case-insensitive; see the module docstring).
      skip: weight names whose ops stay in float (see :func:`quantizable_weights`); names the program
        does not have are ignored here (:func:`convert_lite` refuses them).
      bias_correction: paddleslim's bias correction of the weights' rounding error (the weights stay whole
        INT8 levels; ``docs/benchmarks.md`` has its effect on the replica detector).
      python: the side environment's Python; default
        :func:`edge_shitu_converters.lite_worker.find_lite_python`.
      timeout_s: seconds before the worker is killed.

    Returns:
      The :class:`QuantizedModel`.

    Raises:
      InvalidInputError: no feeds, feeds of different inputs or shapes, an unknown algorithm, a
        malformed skip list or a ``bias_correction`` that is not a bool.
      MissingFileError: a model file is missing.
      ConversionError: the program is a PIR ``.json`` program, or paddleslim fails (the message
        has the end of its log).
      BackendUnavailableError: no side environment, or it lacks paddleslim (the message says to run
        ``scripts/setup-lite-env``).
    """
    slim_algo = _normalise_algo(algo)
    _check_bias_correction(bias_correction)
    return _slim(model_dir, out_dir, feeds, slim_algo, _normalise_skip(skip), python, timeout_s,
                 f"paddleslim quant_post_static ({slim_algo})",
                 {"bias_correction": bias_correction})


def quantize_aware_training(
    model_dir: "os.PathLike[str] | str",
    out_dir: "os.PathLike[str] | str",
    *,
    feeds: Sequence[Dict[str, np.ndarray]],
    iters: int,
    batch: int = QAT_BATCH,
    learning_rate: float = QAT_LEARNING_RATE,
    seed: int = 0,
    skip: Optional[Sequence[str]] = None,
    scales: str = QAT_SCALES[0],
    algo: str = DEFAULT_ALGO,
    python: "os.PathLike[str] | str | None" = None,
    timeout_s: Optional[float] = None,
) -> QuantizedModel:
    """Quantisation-aware training of a legacy Paddle program with paddleslim, its fp32 self as teacher.

    ``paddleslim.auto_compression.AutoCompression`` with ``QuantAware`` (weights per output channel, the ops of
    :func:`quantize_post_training`) and ``Distillation`` (l2 distance between the student's and the fp32
    program's outputs), trained by SGD on the photos of ``feeds`` without labels: no data set is needed beyond
    the calibration photos. By default the activations keep the scales of post-training quantisation (``algo``)
    throughout, so training starts from the post-training model and changes only its weights. The batch norms
    keep the fp32 running statistics (training on one or two photos a step would replace them with those photos'
    own). The result is the same fake-quantisation program format as :func:`quantize_post_training`'s, for
    ``opt``. Each iteration costs a forward and backward pass of both programs (``docs/benchmarks.md``: 1-3 s per
    step for the extractor, about 3 s for the detector here), after one post-training quantisation.

    Args:
      model_dir: folder with a legacy ``inference.pdmodel`` and ``inference.pdiparams``.
      out_dir: folder to write the trained ``inference.pdmodel`` and ``inference.pdiparams`` into (created).
      feeds: the photos, ``{input name: float32 (N, 3, H, W)}`` batches as for :func:`quantize_post_training`;
        they are re-batched by ``batch`` and shuffled each pass.
      iters: training iterations (>= 1).
      batch: photos per iteration (>= 1).
      learning_rate: SGD learning rate (> 0).
      seed: seed of the shuffling (and, with ``scales="moving"``, of Paddle's initialisation of the
        quantisation scales).
      skip: weight names whose ops stay float (and are trained in float); unlike :func:`quantize_post_training`,
        a name that no quantisable op reads is refused (the worker has to find each op to keep it float).
      scales: the activations' scales, one of :data:`QAT_SCALES`: ``"post_training"`` (those of
        :func:`quantize_post_training` with ``algo`` on the same photos, held) or ``"moving"`` (paddleslim's
        moving average of each step's largest value, from 1).
      algo: the post-training algorithm of the held scales (``scales="post_training"``), one of :data:`PTQ_ALGOS`.
      python: the side environment's Python; default :func:`edge_shitu_converters.lite_worker.find_lite_python`.
      timeout_s: seconds before the worker is killed; default that of post-training quantisation, or a minute per
        iteration when more (a detector step takes about 3 s here).

    Returns:
      The :class:`QuantizedModel` (``algo`` ``"qat"``).

    Raises:
      InvalidInputError: no feeds, feeds of different inputs or shapes, a malformed skip list, or a bad
        ``iters``, ``batch``, ``learning_rate``, ``scales`` or ``algo``.
      MissingFileError, ConversionError, BackendUnavailableError: as :func:`quantize_post_training`; a
        ConversionError also for a ``skip`` name that no quantisable op reads, or for an activation quantiser of
        the training program without a post-training scale.
    """
    for name, value in (("iters", iters), ("batch", batch), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "seed" else 1):
            raise InvalidInputError(f"quantisation-aware training: {name} must be a whole number "
                                    f"{'>= 0' if name == 'seed' else '>= 1'}, got {value!r}")
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float)) or not learning_rate > 0:
        raise InvalidInputError(f"quantisation-aware training: learning_rate must be > 0, got {learning_rate!r}")
    if scales not in QAT_SCALES:
        raise InvalidInputError(f"quantisation-aware training: scales must be one of {', '.join(QAT_SCALES)}, "
                                f"got {scales!r}")
    qat = {"iters": iters, "batch": batch, "learning_rate": float(learning_rate), "seed": seed, "scales": scales}
    if timeout_s is None:
        timeout_s = max(_SLIM_TIMEOUT_S, 60.0 * iters)
    return _slim(model_dir, out_dir, feeds, _normalise_algo(algo), _normalise_skip(skip), python, timeout_s,
                 f"paddleslim quantisation-aware training ({iters} iterations)", {"qat": qat})


def _slim(model_dir: "os.PathLike[str] | str", out_dir: "os.PathLike[str] | str",
          feeds: Sequence[Dict[str, np.ndarray]], slim_algo: str, names: Tuple[str, ...],
          python: "os.PathLike[str] | str | None", timeout_s: float, what: str,
          extra: Mapping[str, Any]) -> QuantizedModel:
    """One paddleslim worker request: post-training quantisation, or training when ``extra`` holds ``qat``;
    ``extra`` holds the request's optional keys (``qat``, ``bias_correction``)."""
    from edge_shitu_converters.lite_worker import find_lite_python

    batches = list(feeds)
    if not batches:
        raise InvalidInputError("post-training quantisation needs at least one calibration batch")
    keys = set(batches[0])
    if not keys or any(set(b) != keys for b in batches):
        raise InvalidInputError(
            f"every calibration batch must feed the same inputs, got {[sorted(b) for b in batches]}")
    files = _legacy_files(model_dir, "model")
    exe = find_lite_python(python)
    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    work = out / f".slim-{secrets.token_hex(6)}"
    work.mkdir()
    try:
        try:
            arrays = {k: np.stack([np.asarray(b[k], dtype=np.float32) for b in batches]) for k in sorted(keys)}
        except ValueError as exc:
            raise InvalidInputError(f"calibration batches of one input must have one shape: {exc}") from None
        np.savez(work / "feeds.npz", **arrays)
        del arrays
        request = {
            "model_dir": str(files.directory.absolute()),
            "model_filename": files.program.name,
            "params_filename": files.params.name,
            "out_dir": str(out),
            "feeds": str(work / "feeds.npz"),
            "algo": slim_algo,
            "skip_tensors": list(names),
            "quantizable_op_types": list(_QUANTIZABLE_OPS),
            "result": str(work / "result.json"),
            **extra,
        }
        (work / "request.json").write_text(json.dumps(request), encoding="utf-8")
        _run_slim(exe, [str(work / "request.json")], f"{what} of {files.directory}", work, timeout_s)
        result = json.loads((work / "result.json").read_text(encoding="utf-8"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return QuantizedModel(
        files=paddle_io.find_model_files(out),
        algo=str(result["algo"]),
        skip_tensors=names,
        quantized_ops=int(result["quantized_ops"]),
        versions={"paddleslim": str(result["paddleslim"]), "paddlepaddle": str(result["paddlepaddle"])},
        training=result.get("qat"),
    )


def _legacy_files(model_dir: "os.PathLike[str] | str", role: str) -> ModelFiles:
    files = paddle_io.find_model_files(model_dir)
    if files.is_pir:
        raise ConversionError(
            f"{files.program}: Paddle-Lite needs the legacy inference.pdmodel program of the {role}, and this is a "
            "Paddle 3 PIR program (inference.json); no tool converts PIR back to the legacy format. Export the "
            "model with FLAGS_enable_pir_api=0 (legacy save_inference_model), use the official inference.pdmodel, "
            "or convert to the onnx format, which reads .json programs"
        )
    return files


def _legacy_io(files: ModelFiles) -> Tuple[List[Tuple[str, List[int]]], List[Tuple[str, List[int]]]]:
    """The (name, shape) of the feeds and fetches of a legacy program, in column order."""
    program = paddle_io.load_program(files.program)
    block = program.global_block()

    def described(name: str) -> Tuple[str, List[int]]:
        return name, [int(d) for d in block.var(name).shape]

    def in_order(op_type: str) -> List[Any]:
        return sorted((op for op in block.ops if op.type == op_type), key=lambda op: op.attr("col"))

    feeds = [described(op.output("Out")[0]) for op in in_order("feed")]
    fetches = [described(op.input("X")[0]) for op in in_order("fetch")]
    return feeds, fetches


def _qat_batch(shape: Sequence[int]) -> int:
    """Photos per step of quantisation-aware training for a model input of ``shape`` ``(N, C, H, W)``: its fixed
    batch N when it has one (the PicoDet detector's program reshapes its heads for exactly one image, so a batch of
    two fails there), else :data:`QAT_BATCH`."""
    return int(shape[0]) if int(shape[0]) > 0 else QAT_BATCH


def _calibration(calib_dir: Path, spec: Dict[str, Any], count: int) -> List[Dict[str, np.ndarray]]:
    from edge_shitu_converters.quantize import calibration_feeds

    input_spec = InputSpec(
        name=spec["name"],
        shape=tuple(int(d) for d in spec["shape"]),  # type: ignore[arg-type]
        resize=spec["resize"],
        interpolation=spec["interpolation"],
        channel_order=spec["channel_order"],
        scale=float(spec["scale"]),
        mean=tuple(spec["mean"]),  # type: ignore[arg-type]
        std=tuple(spec["std"]),  # type: ignore[arg-type]
        layout=spec["layout"],
    )
    batch = input_spec.shape[0] if input_spec.shape[0] > 0 else 1
    return calibration_feeds(calib_dir, input_spec, count=count, seed=_CALIB_SEED, batch=batch)


class _LiteJob:
    """One convert_lite run: its settings and the per-model steps."""

    def __init__(
        self, target: str, precision: str, calib_dir: Optional[Path], calib_count: int, algo: str, opt: Path,
        skip: Dict[str, Tuple[str, ...]], python: Optional[Path], qat_iters: Optional[int],
        budget: Union[str, int] = "all", bias_correction: bool = False,
    ) -> None:
        self.target, self.precision = target, precision
        self.bias_correction = bias_correction
        self.calib_dir, self.calib_count, self.algo, self.opt = calib_dir, calib_count, algo, opt
        self.skip, self.python, self.qat_iters, self.budget = skip, python, qat_iters, budget
        self.versions: List[str] = []
        self.quantized: Dict[str, QuantizedModel] = {}
        # role -> (the fp32 program that was quantised, its input description): what a search re-quantises.
        self.sources: Dict[str, Tuple[ModelFiles, Dict[str, Any]]] = {}
        # role -> (weights, most damaging first; how many of them the quantised model keeps float).
        self.rankings: Dict[str, Tuple[List[Any], int]] = {}

    def _finish(
        self, role: str, folder: Path, files: ModelFiles, input_spec: Dict[str, Any], staging: Path, work: Path,
        timings: Dict[str, float],
    ) -> Path:
        """Quantise (int8) and optimise one program into ``staging/<role>.nb``. With ``int8_layers`` N the
        weights are ranked first, so the model is quantised and optimised once, with its N float weights."""
        if self.calib_dir is not None:  # int8: convert_lite requires photos
            self.sources[role] = (files, input_spec)
            float_weights: Sequence[str] = ()
            if isinstance(self.budget, int) and self.budget > 0:
                ranking = self.rank(role, folder, work / f"{role}_rank", timings)
                self.rankings[role] = (ranking, min(self.budget, len(ranking) - 1))
                float_weights = self.float_weights(role)
            files = self.quantize(role, float_weights, work / f"{role}_int8", folder, timings).files
        return self.optimise(role, files, staging, work / f"{role}_opt", folder, timings)

    def rank(self, role: str, folder: Path, work: Path, timings: Dict[str, float]) -> List[Any]:
        """The role's quantisable weights, less the user's float ones, most damaging first
        (:func:`edge_shitu_converters.lite_search.rank_weights` on the ONNX conversion of ``folder``)."""
        from edge_shitu_converters.convert import convert as convert_onnx
        from edge_shitu_converters.lite_search import rank_weights

        files, _ = self.sources[role]
        with _step(f"{role}: rank the layers (onnxruntime, each quantised alone)", folder, timings):
            (work / "rank").mkdir(parents=True)
            onnx_dir = convert_onnx(folder if role == "detector" else None, folder if role == "extractor" else None,
                                    work / "onnx")
            spec = Bundle.load(onnx_dir).models[role]
            user_float = set(self.skip.get(role, ()))
            return rank_weights(role, spec.path, spec.input, self.calib_dir, work / "rank",
                                [w for w in quantizable_weights(files.directory) if w not in user_float])

    def quantize(self, role: str, float_weights: Sequence[str], out: Path, folder: Path,
                 timings: Dict[str, float]) -> QuantizedModel:
        """paddleslim on the role's fp32 program, with the user's skip list and ``float_weights`` kept float;
        the result becomes the role's quantised model."""
        files, input_spec = self.sources[role]
        with _step(f"{role}: calibration photos", folder, timings):
            feeds = _calibration(self.calib_dir, input_spec, self.calib_count)
        skip = tuple(self.skip.get(role, ())) + tuple(w for w in float_weights if w not in self.skip.get(role, ()))
        kept = f", {len(skip)} weight(s) kept in float" if skip else ""
        if self.qat_iters is not None:
            with _step(f"{role}: paddleslim quantisation-aware training ({self.qat_iters} iterations from the "
                       f"{self.algo} post-training scales, {len(feeds)} photos{kept})", folder, timings):
                quantized = quantize_aware_training(files.directory, out, feeds=feeds, iters=self.qat_iters,
                                                    batch=_qat_batch(input_spec["shape"]), skip=skip,
                                                    algo=self.algo, python=self.python)
        else:
            corrected = ", bias correction" if self.bias_correction else ""
            with _step(f"{role}: paddleslim quant_post_static ({self.algo}{corrected}, {len(feeds)} batches{kept})",
                       folder, timings):
                quantized = quantize_post_training(files.directory, out, feeds=feeds, algo=self.algo, skip=skip,
                                                   bias_correction=self.bias_correction, python=self.python)
        self.quantized[role] = quantized
        return quantized

    def optimise(self, role: str, files: ModelFiles, staging: Path, work: Path, folder: Path,
                 timings: Dict[str, float]) -> Path:
        """``paddle_lite_opt`` of a program into ``staging/<role>.nb``."""
        path = staging / f"{role}{EXPORT_FORMATS['lite-' + self.target].suffix}"
        with _step(f"{role}: paddle_lite_opt {self.target}", folder, timings):
            program = _opt_ready_program(files, work)
            run_opt(program, files.params, path, target=self.target, opt=self.opt)
        self.versions.append(_nb_version(path))
        return path

    def extractor(self, rec: Path, staging: Path, work: Path, timings: Dict[str, float]) -> Dict[str, Any]:
        with _step("extractor: load", rec, timings):
            files = _legacy_files(rec, "extractor")
            source = _source(files)
            feeds, fetches = _legacy_io(files)
            if len(feeds) != 1 or len(fetches) != 1:
                raise ConversionError(f"expected one input and one output, got {feeds} -> {fetches}")
            (input_name, input_shape), (output_name, output_shape) = feeds[0], fetches[0]
            if len(input_shape) != 4 or input_shape[1] != 3 or len(output_shape) != 2 or output_shape[1] <= 0:
                raise ConversionError(f"expected input [N,3,H,W] and output [N,D], got {input_shape} -> {output_shape}")
            fields = _extractor_fields(input_name, input_shape, output_name, output_shape[1])
        path = self._finish("extractor", rec, files, fields["input"], staging, work, timings)
        return self._entry("extractor", path, fields, source)

    def detector(self, det: Path, staging: Path, work: Path, timings: Dict[str, float]) -> Dict[str, Any]:
        with _step("detector: load", det, timings):
            files = _legacy_files(det, "detector")
            source = _source(files)
            input_spec, _ = _detector_input_spec(det)
        with _step("detector: cut at raw heads", det, timings):
            heads = cut_detector_heads(det, work / "detector_heads")
        fields = _detector_fields(input_spec, heads)
        path = self._finish("detector", det, heads.files, fields["input"], staging, work, timings)
        return self._entry("detector", path, fields, source)

    def _entry(self, role: str, path: Path, fields: Dict[str, Any], source: Dict[str, Any]) -> Dict[str, Any]:
        entry = {
            "file": path.name,
            "sha256": sha256_file(path),
            "backend": EXPORT_FORMATS["lite-" + self.target].backend,
            "target": self.target,
            "precision": self.precision,
            **fields,
            "source": source,
        }
        if self.precision == "int8":
            entry["quantization"] = self.quantization(role)
        return entry

    def quantization(self, role: str) -> Dict[str, Any]:
        """The manifest's ``quantization`` of the role's quantised model."""
        quantized = self.quantized[role]
        method = {"bias_correction": self.bias_correction} if quantized.training is None else {
            "qat": {**quantized.training, "teacher": "the fp32 program", "loss": "l2 on the model outputs",
                    "data": "the calibration photos, unlabelled"}}
        return {
            "tool": _SLIM_TOOL if self.qat_iters is None else _QAT_TOOL,
            "version": quantized.versions["paddleslim"],
            "paddlepaddle": quantized.versions["paddlepaddle"],
            "algo": quantized.algo,
            "skip_tensors": list(quantized.skip_tensors),
            "quantized_ops": quantized.quantized_ops,
            "calibration_images": self.calib_count,
            "calibration_folder": Path(self.calib_dir).name,
            "preprocessing": "edge_shitu runtime",
            **method,
            **self._ranked(role),
        }

    def float_weights(self, role: str) -> List[str]:
        """The weights ``int8_layers`` N keeps float in the role's quantised model (none without a ranking)."""
        if role not in self.rankings:
            return []
        ranking, kept = self.rankings[role]
        return [r.weight for r in ranking[:kept]]

    def _ranked(self, role: str) -> Dict[str, Any]:
        """The manifest's record of the weights ranked and kept float, for a model quantised after a ranking."""
        if role not in self.rankings:
            return {}
        return {"int8_layers": self.budget, "blocks": len(self.rankings[role][0]),
                "float_weights": self.float_weights(role)}


def _skip_by_role(
    skip: Tuple[str, ...], folders: Sequence[Tuple[str, Optional[Path]]]
) -> Dict[str, Tuple[str, ...]]:
    """Share the skip list out to the models: ``detector:NAME`` / ``extractor:NAME``, or a bare ``NAME``
    that only one of the converted models has (the replicas' weight names repeat across models)."""
    if not skip:
        return {}
    weights = {role: quantizable_weights(folder) for role, folder in folders if folder is not None}
    chosen: Dict[str, List[str]] = {role: [] for role in weights}
    for entry in skip:
        prefix, colon, name = entry.partition(":")
        if colon and prefix in ("detector", "extractor"):
            if prefix not in weights:
                raise InvalidInputError(f"skip names {entry}, but no {prefix} is being converted")
            roles = [prefix] if name in weights[prefix] else []
        else:
            name = entry
            roles = [role for role, names in weights.items() if name in names]
            if len(roles) > 1:
                raise InvalidInputError(
                    f"skip names {name}, a weight of both the detector and the extractor: write detector:{name} "
                    f"or extractor:{name}"
                )
        if not roles:
            examples = ", ".join(f"{role}:{names[0]}" for role, names in weights.items() if names)
            raise InvalidInputError(
                f"skip names {entry}, which is not a weight of a quantised op ({', '.join(_QUANTIZABLE_OPS)}) in "
                f"the {' or the '.join(weights)}; expected names like {examples} (quantizable_weights lists them)"
            )
        chosen[roles[0]].append(name)
    return {role: tuple(dict.fromkeys(names)) for role, names in chosen.items() if names}


def convert_lite(
    det_dir: "os.PathLike[str] | str | None",
    rec_dir: "os.PathLike[str] | str | None",
    out_dir: "os.PathLike[str] | str",
    *,
    target: str,
    precision: str = "fp32",
    calib_dir: "os.PathLike[str] | str | None" = None,
    calib_count: Optional[int] = None,
    algo: Optional[str] = None,
    skip: Optional[Sequence[str]] = None,
    opt: "os.PathLike[str] | str | None" = None,
    python: "os.PathLike[str] | str | None" = None,
    name: Optional[str] = None,
    int8_layers: Union[str, int] = "all",
    qat_iters: Optional[int] = None,
    bias_correction: Optional[bool] = None,
    check_program: Optional[Callable[[Path, str, Path], Tuple[bool, Sequence[str], Mapping[str, Any]]]] = None,
    before_publish: Optional[Callable[[Path], None]] = None,
) -> Path:
    """Convert a detector and/or a feature extractor into a Paddle-Lite bundle for one machine.

    The bundle is built like an ONNX bundle (:func:`edge_shitu_converters.convert.convert`): assembled in a
    temporary sibling folder, its manifest loaded back by the runtime's :class:`~edge_shitu.bundle.Bundle`,
    then moved to ``out_dir``. Models are not run here (ARM files cannot run on x86); the numerical
    check of a Lite bundle is a separate step in the Paddle-Lite side environment.

    Args:
      det_dir: the PicoDet mainbody detector folder (legacy ``inference.pdmodel``), or None.
      rec_dir: the feature extractor folder (legacy ``inference.pdmodel``), or None.
      out_dir: the bundle folder to create; it must not exist or be empty.
      target: ``"x86"`` or ``"arm"``: the machine the bundle runs on.
      precision: ``"fp32"`` or ``"int8"`` (paddleslim post-training quantisation, see the module docstring).
      calib_dir: int8 only, required: folder of real photos (e.g. the drink gallery) to calibrate on.
      calib_count: int8 only: number of calibration photos (default :data:`DEFAULT_CALIB_COUNT`).
      algo: int8 only: one of :data:`PTQ_ALGOS` (default ``"avg"``).
      skip: int8 only: weights whose ops stay in float (:func:`quantizable_weights` lists them), as
        ``detector:NAME`` or ``extractor:NAME``, or as a bare ``NAME`` when only one of the converted
        models has that weight (the replicas' detector and extractor share names like ``conv2d_0.w_0``).
      opt: the ``paddle_lite_opt`` executable; default: ``$EDGE_SHITU_LITE_OPT``, then ``PATH``.
      python: int8 only: the side environment's Python that runs paddleslim; default
        :func:`edge_shitu_converters.lite_worker.find_lite_python`.
      name: bundle name; default e.g. ``ppshituv2-replica-s0-lite-x86-int8``.
      int8_layers: int8 only: ``"all"`` quantises every weight paddleslim can (less ``skip``); a whole number
        ``N`` also keeps the ``N`` most damaging weights float; ``"auto"`` (needs ``check_program``) keeps the
        fewest most damaging weights float with which each model passes ``check_program``
        (:mod:`edge_shitu_converters.lite_search`: ranked on the ONNX conversion, checked in simulated INT8).
        An ARM model (whose ``.nb`` cannot run here) gets that simulated check with ``"all"`` and N too, when
        ``check_program`` is given, and is refused when it fails.
      qat_iters: int8 only: paddleslim's quantisation-aware training for this many iterations after
        post-training quantisation with ``algo``, whose activation scales it keeps (:func:`quantize_aware_training`,
        the fp32 program as teacher, the calibration photos as data), with the weights of ``skip`` and of
        ``int8_layers`` N float. ``int8_layers`` "auto" does not search then (each candidate would be a training
        run): it checks the trained program and refuses a bundle that fails, ARM included.
      bias_correction: int8 post-training only: paddleslim's bias correction of the weights' quantisation error
        (default False; see :func:`quantize_post_training`).
      check_program: ``check_program(staging, role, program_dir) -> (passed, failures, figures)``: the
        verification of one model's fake-quantisation program against its source, with the staging bundle's
        manifest for its pre- and post-processing (``convert(verify=True)`` gives it).
      before_publish: called with the staging folder once the bundle is complete (after the search), e.g.
        its verification; an exception stops the publication.

    Returns:
      ``out_dir`` as a Path, holding ``detector.nb`` and/or ``extractor.nb`` and ``manifest.json``.

    Raises:
      InvalidInputError: both model folders are None, a bad name, ``out_dir`` is not empty, an unknown
        target or algorithm, a bad ``calib_count``, int8 without ``calib_dir``, calibration options
        with fp32, a skip name that no converted model has or that is ambiguous, or a calibration folder
        without readable photos.
      MissingFileError: a model folder, one of its files, or ``calib_dir`` is missing.
      BackendUnavailableError: ``paddle_lite_opt`` (the message says how to install it),
        paddlepaddle or PyYAML is missing; for int8, the side environment or its paddleslim is missing
        (the message says to run ``scripts/setup-lite-env``).
      ConversionError: an unsupported precision, a Paddle 3 PIR ``.json`` program, an x86 INT8
        detector (Paddle-Lite 2.13rc0 computes it wrongly), an ``int8_layers="auto"`` search that found no
        passing candidate, a trained program or an ARM model of ``int8_layers`` N or "all" that fails
        ``check_program`` (each step checked in ``<out_dir>.verify-failed.json``), or a conversion step failed
        (the message names the step and the model folder).
    """
    if target not in LITE_TARGETS:
        raise InvalidInputError(f"unknown Paddle-Lite target {target!r}; expected one of {', '.join(LITE_TARGETS)}")
    fmt = validate_export(f"lite-{target}", precision, None)
    det, rec, out = _check_request(det_dir, rec_dir, out_dir, name)
    calib: Optional[Path] = None
    count = DEFAULT_CALIB_COUNT
    if precision == "int8":
        if calib_dir is None:
            raise InvalidInputError(
                "int8 needs calibration photos: pass calib_dir (a folder of real photos, e.g. the drink gallery)"
            )
        calib = Path(calib_dir)
        if not calib.is_dir():
            raise MissingFileError(f"calibration photo folder not found: {calib}")
        if calib_count is not None:
            if isinstance(calib_count, bool) or not isinstance(calib_count, int) or calib_count < 1:
                raise InvalidInputError(f"calib_count must be an integer >= 1, got {calib_count!r}")
            count = calib_count
        if target == "x86" and det is not None:
            raise ConversionError(
                "Paddle-Lite 2.13rc0's x86 INT8 kernels compute the detector wrongly, without an error (head scores "
                "unrelated to the quantised program's): build the detector for x86 in fp32, or for arm in int8"
            )
    else:
        given = [k for k, v in {"calib_dir": calib_dir, "calib_count": calib_count, "algo": algo, "skip": skip,
                                "bias_correction": bias_correction}.items() if v is not None]
        if given:
            raise InvalidInputError(f"{' and '.join(given)} {'is' if len(given) == 1 else 'are'} for int8 bundles; "
                                    f"precision is {precision!r}")
    if bias_correction is not None:
        _check_bias_correction(bias_correction)
    budget = parse_int8_layers(int8_layers)
    if budget != "all" and precision != "int8":
        raise InvalidInputError(f"int8_layers is for int8 bundles; precision is {precision!r}")
    if qat_iters is not None:
        if precision != "int8":
            raise InvalidInputError(f"qat_iters is for int8 bundles; precision is {precision!r}")
        if isinstance(qat_iters, bool) or not isinstance(qat_iters, int) or qat_iters < 1:
            raise InvalidInputError(f"qat_iters must be a whole number of iterations >= 1, got {qat_iters!r}")
        if bias_correction is not None:
            raise InvalidInputError("bias_correction is a post-training quantisation setting; quantisation-aware "
                                    "training learns its weights")
    if budget == "auto" and check_program is None:
        _LOG.info("int8_layers 'auto' searches only with a verification: every weight is quantised")
        budget = "all"
    job_algo = _normalise_algo(algo)
    skip_names = _normalise_skip(skip)
    opt_path = find_opt(opt)
    timings: Dict[str, float] = {}
    slim_python: Optional[Path] = None
    slim_versions: Dict[str, str] = {}
    with _step("import tools", None, timings):
        paddle_version = paddle_io.paddle_version()
        if precision == "int8":
            from edge_shitu_converters.lite_worker import find_lite_python

            slim_python = find_lite_python(python)
            slim_versions = paddleslim_versions(slim_python)
    _check_model_folders(det, rec)
    # Refuse PIR programs before any work.
    for role, folder in (("detector", det), ("extractor", rec)):
        if folder is not None:
            _legacy_files(folder, role)
    skip_roles = _skip_by_role(skip_names, (("detector", det), ("extractor", rec)))
    if precision == "int8" and target == "arm":
        _LOG.warning(
            "ARM INT8 models cannot run on this machine: only their structure is checked here; measure their "
            "agreement with the fp32 models on an ARM device"
        )
    job = _LiteJob(fmt.target, precision, calib, count, job_algo, opt_path, skip_roles, slim_python, qat_iters,
                   budget, bool(bias_correction))

    def build(staging: Path, work: Path, timings: Dict[str, float]) -> Tuple[Dict[str, Dict[str, Any]], Dict[str, str]]:
        import edge_shitu

        models: Dict[str, Dict[str, Any]] = {}
        if det is not None:
            models["detector"] = job.detector(det, staging, work, timings)
        if rec is not None:
            models["extractor"] = job.extractor(rec, staging, work, timings)
        tools = {
            "edge_shitu": edge_shitu.__version__,
            "paddlepaddle": paddle_version,
            "paddlelite_opt": "+".join(sorted(set(job.versions))),
            **({"paddleslim": slim_versions["paddleslim"]} if precision == "int8" else {}),
        }
        return models, tools

    def publish_step(staging: Path) -> None:
        from edge_shitu_converters.lite_search import single_check_record

        models = {role: folder for role, folder in (("detector", det), ("extractor", rec)) if folder is not None}
        records: Dict[str, Any] = {}
        # An ARM .nb cannot run here, so its program gets the simulated check whatever the budget; an x86 one is
        # verified itself in Paddle-Lite.
        if precision == "int8" and check_program is not None and (budget == "auto" or fmt.target == "arm"):
            checks = {}
            for role, folder in models.items():
                with _step(f"{role}: check the INT8 program (simulated)", folder, timings):
                    checks[role] = check_program(staging, role, job.quantized[role].files.directory)
                records[role] = single_check_record(*checks[role], float_weights=job.float_weights(role))
            # Quantisation-aware training has no float layers to choose (each candidate would be a training run),
            # and int8_layers N has chosen them: the check is all there is.
            failing = {role: models[role] for role, check in checks.items() if not check[0]}
            if budget == "auto" and qat_iters is None and failing:
                records.update(_choose_float_weights(job, staging, check_program, failing, timings, checks))
            # The --lite-skip weights are float before any step counts one: named, so that no record reads as
            # "every layer INT8".
            for role, record in records.items():
                record["user_float_weights"] = list(job.skip.get(role, ()))
        failed = sorted(role for role, record in records.items() if record["chosen"] is None)
        if failed:
            # Even an ARM bundle, which its verification cannot run, is not published then.
            report = failure_report_path(out)
            failures = [f for role in failed for f in records[role]["steps"][-1]["failures"]]
            report.write_text(json.dumps({"passed": False, "failures": failures, "int8_search": records}, indent=2,
                                         sort_keys=True) + "\n", encoding="utf-8")
            what = ("after quantisation-aware training" if qat_iters is not None
                    else "with every weight but one float" if budget == "auto"
                    else "with every weight INT8" if budget == "all" else f"with int8_layers {budget}")
            raise ConversionError(f"{out}: no INT8 {' or '.join(failed)} passes {what} (simulated INT8): "
                                  f"{'; '.join(failures)} (every step tried: {report})")
        verify_adding_search(staging, out, records, before_publish)

    return _publish_bundle(out, build, name=name, name_suffix=f"{fmt.name}-{precision}", timings=timings,
                           before_publish=publish_step)


def _choose_float_weights(
    job: _LiteJob, staging: Path, check: Callable[[Path, str, Path], Tuple[bool, Sequence[str], Mapping[str, Any]]],
    models: Mapping[str, Path], timings: Dict[str, float],
    first_checks: Mapping[str, Tuple[bool, Sequence[str], Mapping[str, Any]]],
) -> Dict[str, Any]:
    """``int8_layers`` "auto" on a complete staging bundle: for each of ``models`` (role -> source folder), ranks
    the weights, searches the fewest to keep float for the model to pass ``check``, re-optimises the chosen
    candidate into the bundle and rewrites its manifest entry. ``first_checks`` holds the check of each model's
    program with every weight INT8, the search's first candidate. Returns role -> search record."""
    from edge_shitu_converters.lite_search import search_lite_int8

    records: Dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="edge-shitu-lite-int8-") as tmp:
        work = Path(tmp)
        for role, folder in models.items():
            ranking = job.rank(role, folder, work / role, timings)
            candidates: Dict[int, QuantizedModel] = {0: job.quantized[role]}  # by the number of weights float

            def quantize(weights: Sequence[str], out: Path, role: str = role, folder: Path = folder) -> Path:
                if weights:
                    candidates[len(weights)] = job.quantize(role, weights, out, folder, timings)
                return candidates[len(weights)].files.directory

            def check_candidate(program: Path, role: str = role) -> Tuple[bool, Sequence[str], Mapping[str, Any]]:
                return check(staging, role, program)

            (work / f"{role}-search").mkdir()
            with _step(f"{role}: int8 search", folder, timings):
                result = search_lite_int8(ranking, quantize, check_candidate, work / f"{role}-search",
                                          first=first_checks[role])
            records[role] = result.record()
            kept = len(result.float_weights)
            job.quantized[role] = candidates[kept]
            path = job.optimise(role, candidates[kept].files, staging, work / f"{role}-opt", folder, timings)
            quantization = dict(job.quantization(role), int8_layers="auto", blocks=len(ranking),
                                float_weights=list(result.float_weights),
                                search={"steps": len(result.steps), "chosen": result.chosen})
            _rewrite_manifest(staging, role, {"sha256": sha256_file(path), "quantization": quantization})
    return records
