"""Replicas: official PP-ShiTu programs with deterministic random weights.

The official weights (``inference.pdiparams``) cannot be downloaded here, but the programs can. A
replica is the official program, copied byte for byte, plus an ``inference.pdiparams`` of the right
names, shapes and dtypes filled by fixed rules. It has the real architecture, operators, tensor shapes
and cost, so conversion, runtime parity, quantisation mechanics and latency can be tested on it; its
outputs mean nothing, so accuracy cannot. A folder holding the official ``inference.pdiparams`` instead
works everywhere a replica does.

Weight rules (each persistable variable is classified by how the program *uses* it, never by its
position; a variable used in a way no rule covers is an error, not a silent zero, and one that no op
reads at all is written as zeros with a warning):

- convolution filters (``conv2d``/``depthwise_conv2d`` ``Filter``, shape ``[out, in/groups, kh, kw]``):
  He-normal, ``std = sqrt(2 / fan_in)``, ``fan_in = in_channels_per_group * kh * kw``;
- batch norm: scale 1, bias 0, running mean 0, running variance 1 (an identity up to epsilon);
- biases (``elementwise_add`` ``Y``): 0;
- fully connected weights (``matmul``/``matmul_v2``/``mul`` ``Y``, shape ``[in, out]``): Xavier-uniform,
  ``U(-a, a)`` with ``a = sqrt(6 / (in + out))``, the default initialiser of ``paddle.nn.Linear``;
  it keeps the output variance near the input's, as He-normal does for the ReLU convolutions;
- constants that are not learned weights: the PicoDet detector's ``dygraph_tmp_4`` ``[8]``, the
  distribution projection of its in-graph decode, is ``0, 1, ..., 7`` (zeros would give every box
  zero size);
- PicoDet class logits (see below): the class row (output channel 0) of the four head filters
  ``conv2d_84.w_0`` ... ``conv2d_87.w_0`` (strides 8, 16, 32, 64; 33 output channels: 0 = class,
  1-32 = box bins) and channel 0 of their biases ``conv2d_84.b_0`` ... ``conv2d_87.b_0``; the box
  rows keep the plain He-normal rule.

PicoDet class rule (:class:`ReplicaOptions`): ``row0 = class_gain * (he_normal - class_shift[level] *
he_std)`` and ``bias0 = class_bias``, with the defaults ``class_gain = 12``, ``class_shift = (0.31, 0.25,
0.15, 0.0)``, ``class_bias = -2``. Why not just a class bias: with zero biases and identity batch norms
the network is nearly positively homogeneous, so the head features scale with the image's contrast,
which varies widely across photos: a plain bias gives a hundred boxes above 0.2 on some test images
and none on others. The gain makes the score nearly a sign test of a scale-free quantity, and the
negative shift makes positives rare; the per-level shifts also let the coarser heads fire, so box
sizes vary. The values were tuned for seed 0 (the replica every test uses) on the 13 drink test
images (``drink_dataset_v1.0/test_images``), so that the full official graph (in-graph decode +
``multiclass_nms3``: score 0.025, IoU 0.6, keep 100) gives every one of them a few boxes above 0.2,
of varied sizes (the counts are in ``docs/benchmarks.md``, "converters/replica.py: PicoDet class
rule"). Other seeds draw other filters: their counts differ (some test images may get none or more
than 20), so tests use seed 0.

Determinism: each variable draws from its own ``numpy.random.Generator(PCG64)`` seeded with
``SeedSequence([seed, int(sha256(name)[:16])])``, so a weight depends only on (seed, its name, its
shape), not on the order of variables; the same seed gives byte-identical files (for a given numpy
version: numpy does not promise identical random streams across versions).

Every replica folder holds ``replica.json`` beside the model: ``{"kind": "replica", "seed",
"source_program_sha256", "params_sha256", "rules"}``; the converter reads it to record the bundle's
provenance, so a replica is never mistaken for the real model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from edge_shitu_converters import paddle_io
from edge_shitu_converters.paddle_io import VarInfo
from edge_shitu.bundle import sha256_file
from edge_shitu.errors import ConversionError, InvalidInputError

__all__ = [
    "ReplicaOptions",
    "REPLICA_FILE",
    "write_replica",
    "replica_weights",
    "read_replica_info",
]

_LOG = logging.getLogger(__name__)

REPLICA_FILE = "replica.json"

# Files copied unchanged from the graph folder when present (the program is required).
_COPIED = ("inference.pdiparams.info", "infer_cfg.yml")

# The PicoDet mainbody detector's non-learned constant and its head biases (see the module docstring).
_PICODET_PROJECT = ("dygraph_tmp_4", (8,))
# Head convolutions of strides 8, 16, 32, 64 (each: 1x1 conv, 33 channels; channel 0 = class logit).
_PICODET_HEAD_FILTERS = tuple(f"conv2d_{i}.w_0" for i in (84, 85, 86, 87))
_PICODET_HEAD_BIASES = tuple(f"conv2d_{i}.b_0" for i in (84, 85, 86, 87))
_PICODET_HEAD_CHANNELS = 33


@dataclass(frozen=True)
class ReplicaOptions:
    """How a replica's PicoDet class logits are made (ignored for other graphs).

    Attributes:
      class_gain: factor applied to the class row (channel 0) of each head filter.
      class_shift: per head (strides 8, 16, 32, 64), subtracted from every He-normal weight of the
        class row before the gain, in units of that filter's He std ``sqrt(2 / fan_in)``.
      class_bias: the class channel of the four head biases.
    """

    class_gain: float = 12.0
    class_shift: Tuple[float, float, float, float] = (0.31, 0.25, 0.15, 0.0)
    class_bias: float = -2.0

    def __post_init__(self) -> None:
        numbers = (self.class_gain, self.class_bias, *self.class_shift)
        if len(self.class_shift) != 4 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in numbers
        ):
            raise InvalidInputError(f"ReplicaOptions needs finite numbers and 4 class_shift values, got {self!r}")
        if self.class_gain <= 0:
            raise InvalidInputError(f"class_gain must be > 0, got {self.class_gain}")


_RULES = {
    "conv_filter": "he_normal: std = sqrt(2 / fan_in), fan_in = in_channels_per_group * kh * kw",
    "batch_norm": {"scale": 1.0, "bias": 0.0, "mean": 0.0, "variance": 1.0},
    "bias": 0.0,
    "fc_weight": "xavier_uniform: U(-a, a), a = sqrt(6 / (fan_in + fan_out))",
    "constants": {"dygraph_tmp_4": "arange(8) (PicoDet distribution projection)"},
    "rng": "numpy PCG64 per variable, SeedSequence([seed, int.from_bytes(sha256(name)[:16], 'little')])",
}


def _rng(seed: int, name: str) -> np.random.Generator:
    key = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:16], "little")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, key])))


def _he_normal(var: VarInfo, seed: int) -> np.ndarray:
    if len(var.shape) != 4:
        raise ConversionError(f"conv filter {var.name} has shape {var.shape}, expected [out, in/groups, kh, kw]")
    fan_in = var.shape[1] * var.shape[2] * var.shape[3]
    return _rng(seed, var.name).standard_normal(var.shape) * math.sqrt(2.0 / fan_in)


def _xavier_uniform(var: VarInfo, seed: int) -> np.ndarray:
    if len(var.shape) != 2:
        raise ConversionError(f"fc weight {var.name} has shape {var.shape}, expected [in, out]")
    limit = math.sqrt(6.0 / (var.shape[0] + var.shape[1]))
    return _rng(seed, var.name).uniform(-limit, limit, var.shape)


def _const(value: float) -> Callable[[VarInfo, int], np.ndarray]:
    return lambda var, seed: np.full(var.shape, value)


_RULE_BY_USE: Dict[Tuple[str, str], Tuple[str, Callable[[VarInfo, int], np.ndarray]]] = {
    ("conv2d", "Filter"): ("conv_filter", _he_normal),
    ("depthwise_conv2d", "Filter"): ("conv_filter", _he_normal),
    ("batch_norm", "Scale"): ("bn_scale", _const(1.0)),
    ("batch_norm", "Bias"): ("bn_bias", _const(0.0)),
    ("batch_norm", "Mean"): ("bn_mean", _const(0.0)),
    ("batch_norm", "Variance"): ("bn_variance", _const(1.0)),
    ("elementwise_add", "Y"): ("bias", _const(0.0)),
    ("matmul", "Y"): ("fc_weight", _xavier_uniform),
    ("matmul_v2", "Y"): ("fc_weight", _xavier_uniform),
    ("mul", "Y"): ("fc_weight", _xavier_uniform),
}


# Control-flow ops list the variables their sub-blocks read; that is not a use of its own.
_PASS_THROUGH = {("while", "X"), ("conditional_block", "Input")}


def _is_picodet(variables: Dict[str, VarInfo]) -> bool:
    name, shape = _PICODET_PROJECT
    biases = [variables.get(n) for n in _PICODET_HEAD_BIASES]
    filters = [variables.get(n) for n in _PICODET_HEAD_FILTERS]
    return (
        name in variables
        and variables[name].shape == shape
        and all(v is not None and v.shape == (_PICODET_HEAD_CHANNELS,) for v in biases)
        and all(
            v is not None and len(v.shape) == 4 and v.shape[0] == _PICODET_HEAD_CHANNELS and v.shape[2:] == (1, 1)
            for v in filters
        )
    )


def replica_weights(
    variables: List[VarInfo], *, seed: int, options: Optional[ReplicaOptions] = None
) -> Dict[str, np.ndarray]:
    """Make the replica weights of a program's persistable variables (pure numpy).

    Args:
      variables: the program's persistables, from :func:`edge_shitu_converters.paddle_io.list_persistables`.
      seed: the replica seed (int >= 0).
      options: the PicoDet class-logit rule (default ``ReplicaOptions()``); used only when the
        variables are those of the PicoDet mainbody detector.

    Returns:
      Name -> array of the variable's shape and dtype (float32 for every official graph).

    Raises:
      ConversionError: a variable is used in a way no rule covers, or in two conflicting ways, or
        has a dtype other than float32.
    """
    options = ReplicaOptions() if options is None else options
    by_name = {v.name: v for v in variables}
    picodet = _is_picodet(by_name)
    out: Dict[str, np.ndarray] = {}
    for var in variables:
        if var.dtype != "float32":
            raise ConversionError(f"replica: variable {var.name} has dtype {var.dtype}; only float32 is handled")
        if picodet and var.name == _PICODET_PROJECT[0]:
            value = np.arange(var.shape[0], dtype=np.float64)
        elif picodet and var.name in _PICODET_HEAD_BIASES:
            value = np.zeros(var.shape)
            value[0] = options.class_bias
        elif picodet and var.name in _PICODET_HEAD_FILTERS:
            value = _he_normal(var, seed)
            std = math.sqrt(2.0 / (var.shape[1] * var.shape[2] * var.shape[3]))
            shift = options.class_shift[_PICODET_HEAD_FILTERS.index(var.name)]
            value[0] = options.class_gain * (value[0] - shift * std)
        else:
            rules = {_RULE_BY_USE[use][0]: _RULE_BY_USE[use][1] for use in var.uses if use in _RULE_BY_USE}
            unknown = [use for use in var.uses if use not in _RULE_BY_USE and use not in _PASS_THROUGH]
            if not var.uses:
                # Read by no op, so it cannot change any output; zeros keep the file complete.
                _LOG.warning("replica: variable %s %s is used by no op; writing zeros", var.name, var.shape)
                value = np.zeros(var.shape)
            elif len(rules) != 1 or unknown:
                raise ConversionError(
                    f"replica: no single weight rule for variable {var.name} {var.shape}, used as {list(var.uses)}"
                )
            else:
                (make,) = rules.values()
                value = make(var, seed)
        out[var.name] = np.asarray(value, dtype=np.float32).reshape(var.shape)
    return out


def read_replica_info(model_dir: "os.PathLike[str] | str") -> Optional[dict]:
    """Read a model folder's ``replica.json``.

    Args:
      model_dir: a Paddle model folder.

    Returns:
      The parsed ``replica.json``, or None when the folder holds none (official weights).

    Raises:
      ConversionError: the file is not valid JSON or lacks ``kind == "replica"`` and an int ``seed``.
    """
    path = Path(model_dir) / REPLICA_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{path}: not a readable replica.json ({exc})") from exc
    if not isinstance(info, dict) or info.get("kind") != "replica" or not isinstance(info.get("seed"), int):
        raise ConversionError(f'{path}: expected {{"kind": "replica", "seed": <int>, ...}}, got {info!r}')
    return info


def write_replica(
    graph_dir: "os.PathLike[str] | str",
    out_dir: "os.PathLike[str] | str",
    *,
    seed: int = 0,
    options: Optional[ReplicaOptions] = None,
) -> Path:
    """Write a replica model folder: the official program with deterministic random weights.

    Copies ``inference.pdmodel`` (or a PIR ``inference.json``) byte for byte, plus
    ``inference.pdiparams.info`` and ``infer_cfg.yml`` when present, writes ``inference.pdiparams``
    by the rules of this module, and ``replica.json``.

    Args:
      graph_dir: a folder with the official program (weights not needed).
      out_dir: the replica folder to write (created; files of the same names are overwritten). Must
        differ from ``graph_dir``.
      seed: int >= 0; the same seed gives byte-identical files.
      options: the PicoDet class-logit rule (default ``ReplicaOptions()``, see the module
        docstring); ignored for other graphs.

    Returns:
      ``out_dir`` as a Path.

    Raises:
      InvalidInputError: bad seed, or ``out_dir`` is ``graph_dir``.
      MissingFileError: ``graph_dir`` holds no program.
      ConversionError: Paddle cannot read the program, or a weight has no rule.
      BackendUnavailableError: paddlepaddle is not installed.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InvalidInputError(f"seed must be an int >= 0, got {seed!r}")
    options = ReplicaOptions() if options is None else options
    paddle_io.import_paddle()  # a missing extra is reported before anything about the files
    files = paddle_io.find_model_files(graph_dir, need_params=False)
    out = Path(out_dir)
    if out.exists() and out.resolve() == files.directory.resolve():
        raise InvalidInputError(f"out_dir must differ from graph_dir, got {out} twice")
    variables = paddle_io.list_persistables(files.program)
    weights = replica_weights(variables, seed=seed, options=options)

    out.mkdir(parents=True, exist_ok=True)
    for stale in (paddle_io.PDMODEL, paddle_io.PIR_JSON):
        if (out / stale).exists() and stale != files.program.name:
            (out / stale).unlink()
    shutil.copyfile(files.program, out / files.program.name)
    for name in _COPIED:
        if (files.directory / name).is_file():
            shutil.copyfile(files.directory / name, out / name)
    params = out / paddle_io.PDIPARAMS
    tmp = out / (paddle_io.PDIPARAMS + ".tmp")
    paddle_io.write_params(tmp, weights.items())
    os.replace(tmp, params)

    rules = dict(_RULES)
    if _is_picodet({v.name: v for v in variables}):
        rules["picodet_class"] = {
            "filters": list(_PICODET_HEAD_FILTERS),
            "biases": list(_PICODET_HEAD_BIASES),
            "row0": "class_gain * (he_normal - class_shift[level] * he_std)",
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(options).items()},
        }
    info = {
        "kind": "replica",
        "seed": seed,
        "source_program_sha256": sha256_file(files.program),
        "params_sha256": sha256_file(params),
        "rules": rules,
    }
    (out / REPLICA_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    _LOG.info("replica of %s (seed %d, %d tensors) written to %s", files.directory.name, seed, len(weights), out)
    return out
