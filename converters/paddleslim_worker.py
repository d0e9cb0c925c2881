"""paddleslim's post-training quantisation, run in the Paddle-Lite side environment.

paddleslim 2.6.0 (the last release) runs on paddlepaddle 2.6 and pins ``opencv-python==4.6.0.66``;
with its other training dependencies it would downgrade the main environment (numpy 2, Paddle 3),
so it lives in the Python 3.10 side environment made by ``scripts/setup-lite-env``, beside
paddlelite, which already needs numpy < 2 there. :func:`edge_shitu_converters.lite.quantize_post_training`
runs this module as a subprocess of that environment's Python::

    <side python> -I -m edge_shitu_converters.paddleslim_worker --versions
    <side python> -I -m edge_shitu_converters.paddleslim_worker REQUEST.json

``--versions`` prints ``{"paddleslim": ..., "paddlepaddle": ...}`` as one JSON line. A request is a
JSON object:

- ``model_dir``, ``model_filename``, ``params_filename``: the legacy fp32 program to quantise;
- ``out_dir``: where to write the quantised ``inference.pdmodel`` and ``inference.pdiparams``;
- ``feeds``: an ``.npz`` file with one float32 array per model input, shaped ``(batches, N, C, H, W)``
  (the calibration batches, already pre-processed by the runtime);
- ``algo``: paddleslim's activation algorithm (``avg``, ``abs_max``, ``hist``, ``KL``, ``mse``, ``emd``);
- ``skip_tensors``: names of tensors whose ops stay in float (``skip_tensor_list``);
- ``quantizable_op_types``: the op types to quantise;
- ``result``: a JSON file to write the outcome to: the versions, and ``quantized_ops`` (the number of
  weighted ops that got INT8 weights);
- ``bias_correction`` (optional, default false): paddleslim's bias correction of the weights' quantisation error
  (the weights stay whole INT8 levels). Its other rounding, ``round_type="adaround"``, is not offered: in this
  fake-quant format paddleslim 2.6 saves AdaRound's weights as fractional levels (``docs/benchmarks.md``), which
  Paddle Inference would simulate as if they were INT8 and ``opt`` would round again;
- ``qat`` (optional): ``{"iters", "batch", "learning_rate", "seed", "scales"}``: quantisation-aware training after
  post-training quantisation (``scales`` ``"post_training"``) or instead of it (``"moving"``)
  (``paddleslim.auto_compression.AutoCompression`` with ``QuantAware`` and ``Distillation``): the fp32 program is
  the teacher, the loss is the l2 distance between the student's and the teacher's outputs, and the feeds' photos,
  unlabelled, are the only data (the ops of ``skip_tensors`` stay float and are trained as such). The student's
  batch norms keep the fp32 running statistics. ``scales`` (one of :data:`QAT_SCALES`) says where the activations'
  scales come from: ``"post_training"`` runs post-training quantisation (``algo``) first and holds its scales
  through training, so that training starts from, and only changes the weights of, the post-training model;
  ``"moving"`` is paddleslim's own moving average of each step's largest value, started from 1 (``algo`` does not
  apply).

Exit status 0 on success, 3 when paddle or paddleslim cannot be imported, 1 on any other failure;
the last line of stderr then says what failed. Only the standard library and numpy are imported
at module level: the request is checked before Paddle is loaded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np

__all__ = ["ALGOS", "EXIT_MISSING", "QAT_SCALES", "main", "quantize", "versions"]

#: Activation algorithms of paddleslim's ``quant_post_static`` offered for Paddle-Lite.
ALGOS = ("avg", "abs_max", "hist", "KL", "mse", "emd")

#: Where quantisation-aware training takes the activations' scales from (see the module docstring).
QAT_SCALES = ("post_training", "moving")
# The op that quantises an activation in paddleslim's training program, and in a post-training program.
_TRAINING_QUANTISER = "fake_quantize_moving_average_abs_max"
_POST_TRAINING_QUANTISER = "fake_quantize_range_abs_max"
# The optimiser of quantisation-aware training (recorded with its result).
_QAT_OPTIMIZER = "SGD"
# The name scope whose ops quantisation-aware training leaves float.
_FLOAT_SCOPE = "skip_quant"

#: Exit status when paddle or paddleslim is missing from the side environment.
EXIT_MISSING = 3
#: How the line that reports a failure on stderr starts (the parent puts the rest of it first in its error).
ERROR_PREFIX = "paddleslim_worker:"

# The ops that carry quantised weights in a saved fake-quant (onnx_format=False) program.
_DEQUANT_OPS = ("fake_channel_wise_dequantize_max_abs", "fake_dequantize_max_abs")
_REQUEST_KEYS = frozenset(
    {"model_dir", "model_filename", "params_filename", "out_dir", "feeds", "algo", "skip_tensors",
     "quantizable_op_types", "result"}
)


class _Missing(Exception):
    """paddle or paddleslim cannot be imported."""


def versions() -> Dict[str, str]:
    """The versions of paddleslim and paddlepaddle in this environment.

    Raises:
      _Missing: one of them cannot be imported.
    """
    from importlib import metadata

    try:
        import paddle  # noqa: F401
        import paddleslim  # noqa: F401
    except ImportError as exc:
        raise _Missing(f"{type(exc).__name__}: {exc}") from exc
    return {"paddleslim": metadata.version("paddleslim"), "paddlepaddle": metadata.version("paddlepaddle")}


def _batches(path: Path) -> List[Dict[str, np.ndarray]]:
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    counts = {name: len(a) for name, a in arrays.items()}
    if not arrays or len(set(counts.values())) != 1 or 0 in counts.values():
        raise ValueError(f"{path}: expected one (batches, N, C, H, W) array per input, same batch count; got {counts}")
    return [{name: np.ascontiguousarray(a[i], dtype=np.float32) for name, a in arrays.items()}
            for i in range(next(iter(counts.values())))]


def _drop_fetch_scales(program: Any) -> int:
    """Remove the ``scale(x, 1.0)`` ops Paddle 2.6's ``save_inference_model`` puts before every fetch.

    They rename the outputs (``save_infer_model/scale_0.tmp_0`` instead of the source program's
    ``batch_norm_25.tmp_2`` or ``scores_stride8``), and the bundle's manifest, like Paddle 3, keeps the
    source names. Returns the number of ops removed.
    """
    block = program.global_block()
    removed = 0
    for fetch in [op for op in block.ops if op.type == "fetch"]:
        (name,) = fetch.input("X")
        index = next((i for i, op in enumerate(block.ops) if name in op.output_arg_names), None)
        if index is None:
            continue
        op = block.ops[index]
        identity = op.attr("scale") == 1.0 and op.attr("bias") == 0.0
        if op.type != "scale" or not identity or not name.startswith("save_infer_model/scale_"):
            continue
        (source,) = op.input("X")
        fetch._rename_input(name, source)
        block._remove_op(index)
        block._remove_var(name)
        removed += 1
    return removed


def quantize(request: Dict[str, Any]) -> Dict[str, Any]:
    """Run ``paddleslim.quant.quant_post_static``, and/or its quantisation-aware training when the request has
    ``qat``, for one request (see the module docstring).

    Args:
      request: the request object.

    Returns:
      The result object (also written to ``request["result"]``).

    Raises:
      ValueError: a malformed request or feeds file; for training, a ``skip_tensors`` name that no quantisable op
        reads, or an activation quantiser without a post-training scale.
      _Missing: paddle or paddleslim cannot be imported.
      Exception: whatever Paddle raises while quantising.
    """
    unknown = set(request) - _REQUEST_KEYS - {"qat", "bias_correction"}
    missing = _REQUEST_KEYS - set(request)
    if unknown or missing:
        raise ValueError(f"bad request: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
    if request["algo"] not in ALGOS:
        raise ValueError(f"unknown algorithm {request['algo']!r}; expected one of {', '.join(ALGOS)}")
    if not isinstance(request.get("bias_correction", False), bool):
        raise ValueError(f"bias_correction must be true or false, got {request['bias_correction']!r}")
    skip: Sequence[str] = list(request["skip_tensors"])
    qat = request.get("qat")
    if qat is not None:
        if set(qat) != {"iters", "batch", "learning_rate", "seed", "scales"} or request.get("bias_correction"):
            raise ValueError(f"bad qat request {qat!r} (iters, batch, learning_rate, seed, scales; no bias_correction)")
        if qat["scales"] not in QAT_SCALES:
            raise ValueError(f"qat scales must be one of {', '.join(QAT_SCALES)}, got {qat['scales']!r}")
    batches = _batches(Path(request["feeds"]))
    found = versions()
    import paddle
    from paddleslim.quant import quant_post_static

    class _Batches(paddle.io.DataLoader):
        # Paddle 2.6's PostTrainingQuantization asserts an io.DataLoader but only calls it and takes
        # its len(); the batches are already made, so no dataset, workers or collation are needed.
        def __init__(self, items: List[Dict[str, np.ndarray]]) -> None:
            self._items = items

        def __iter__(self):
            return iter(self._items)

        def __len__(self) -> int:
            return len(self._items)

    paddle.enable_static()
    executor = paddle.static.Executor(paddle.CPUPlace())
    scope = paddle.static.Scope()
    out_dir = Path(request["out_dir"])
    training = None
    if qat is not None:
        # The program to train, its float weights' ops in the skip scope: a bad float weight is refused here,
        # before the post-training run (minutes on a detector).
        program = paddle.static.Program.parse_from_string(
            (Path(request["model_dir"]) / request["model_filename"]).read_bytes())
        _keep_float(program, request["quantizable_op_types"], skip)
        scales = None
        if qat["scales"] == "post_training":
            import tempfile

            with tempfile.TemporaryDirectory(prefix="ptq-") as tmp, paddle.static.scope_guard(scope):
                _post_training(request, quant_post_static, executor, scope, Path(tmp), _Batches(batches),
                               len(batches), skip)
                scales = _activation_scales(Path(tmp), executor)
        training = _train(request, qat, program, batches, out_dir, scales)
    else:
        with paddle.static.scope_guard(scope):
            _post_training(request, quant_post_static, executor, scope, out_dir, _Batches(batches), len(batches), skip)
    program_file = out_dir / "inference.pdmodel"
    program = paddle.static.Program.parse_from_string(program_file.read_bytes())
    if _drop_fetch_scales(program):
        program_file.write_bytes(program.desc.serialize_to_string())
    quantized = sum(op.type in _DEQUANT_OPS for block in program.blocks for op in block.ops)
    result = {**found, "algo": "qat" if qat is not None else request["algo"], "skip_tensors": list(skip),
              "quantized_ops": int(quantized), **({"qat": training} if training is not None else {})}
    Path(request["result"]).write_text(json.dumps(result), encoding="utf-8")
    return result


def _post_training(request: Dict[str, Any], quant_post_static: Any, executor: Any, scope: Any, out_dir: Path,
                   loader: Any, batch_nums: int, skip: Sequence[str]) -> None:
    quant_post_static(
        executor=executor,
        model_dir=str(request["model_dir"]),
        quantize_model_path=str(out_dir),
        data_loader=loader,
        model_filename=request["model_filename"],
        params_filename=request["params_filename"],
        save_model_filename="inference.pdmodel",
        save_params_filename="inference.pdiparams",
        batch_nums=batch_nums,
        scope=scope,
        algo=request["algo"],
        bias_correction=request.get("bias_correction", False),
        quantizable_op_type=list(request["quantizable_op_types"]),
        # Lite's long-standing fake-quant format (paddleslim's default is the ONNX-style one).
        onnx_format=False,
        skip_tensor_list=list(skip) or None,
    )


def _activation_scales(model_dir: Path, executor: Any) -> Dict[str, np.ndarray]:
    """``{scale variable: float32 (1,)}`` of every activation quantiser of a saved post-training program."""
    import paddle

    scope = paddle.static.Scope()
    with paddle.static.scope_guard(scope):
        program, _, _ = paddle.static.load_inference_model(
            str(model_dir), executor, model_filename="inference.pdmodel", params_filename="inference.pdiparams")
        names = [op.input("InScale")[0] for op in program.global_block().ops if op.type == _POST_TRAINING_QUANTISER]
        return {name: np.array(scope.find_var(name).get_tensor(), dtype=np.float32).reshape(1) for name in names}


def _hold_activation_scales(scales: Dict[str, np.ndarray]) -> Any:
    """Make the training program that AutoCompression builds next quantise its activations by ``scales``, held:
    the scales go into the global scope, where paddleslim's quantisation pass takes a scale variable's start
    from, and its training quantisers run in test mode (a moving average no more), which AutoCompression has no
    setting for (paddleslim's own ``scale_trainable`` also freezes the weights' scales, at 0). Returns a function
    that puts paddleslim's ``quant_aware`` back and tells how many quantisers were held (the scales stay in the
    scope of this one-request process).

    Raises:
      ValueError: an activation quantiser of the training program has no post-training scale.
    """
    import paddle
    import paddleslim.auto_compression.create_compressed_program as built

    place = paddle.CPUPlace()
    for name, value in scales.items():
        paddle.static.global_scope().var(name).get_tensor().set(value, place)
    quant_aware = built.quant_aware
    held = []

    def holding(program: Any, *args: Any, **kwargs: Any) -> Any:
        result = quant_aware(program, *args, **kwargs)
        if not kwargs.get("for_test"):
            for block in result.blocks:
                for op in block.ops:
                    if op.type != _TRAINING_QUANTISER:
                        continue
                    (name,) = op.input("InScale")
                    if name not in scales:
                        raise ValueError(f"the activation quantiser {name!r} has no post-training scale")
                    op._set_attr("is_test", True)
                    held.append(name)
        return result

    built.quant_aware = holding

    def undo() -> int:
        built.quant_aware = quant_aware
        return len(held)

    return undo


def _train(request: Dict[str, Any], qat: Dict[str, Any], program: Any, batches: List[Dict[str, np.ndarray]],
           out_dir: Path, scales: "Dict[str, np.ndarray] | None" = None) -> Dict[str, Any]:
    """Quantisation-aware training of the request's program (``program``, parsed, with its float weights' ops in
    the skip scope: :func:`_keep_float`), distilled from itself in fp32 (see the module docstring);
    writes ``inference.pdmodel`` / ``inference.pdiparams`` into ``out_dir``. ``scales``: the activation scales to
    hold (``qat["scales"] == "post_training"``), or None for the moving average. Returns the settings it trained
    with (the batch is at most the number of photos)."""
    import shutil
    import tempfile

    import paddle
    from paddleslim.auto_compression import AutoCompression

    source = Path(request["model_dir"])
    outputs = [op.input("X")[0] for op in program.global_block().ops if op.type == "fetch"]
    arrays = {name: np.concatenate([b[name] for b in batches]) for name in batches[0]}
    count = len(next(iter(arrays.values())))
    batch = min(int(qat["batch"]), count)
    rng = np.random.default_rng(int(qat["seed"]))

    def loader():
        order = rng.permutation(count)
        for start in range(0, count - batch + 1, batch):
            yield {name: a[order[start:start + batch]] for name, a in arrays.items()}

    config = {
        # Lite's fake-quant format, weights per output channel as in post-training quantisation.
        "QuantAware": {"onnx_format": False, "quantize_op_types": list(request["quantizable_op_types"]),
                       "weight_quantize_type": "channel_wise_abs_max", "not_quant_pattern": [_FLOAT_SCOPE]},
        "Distillation": {"loss": "l2", "node": outputs, "alpha": 1.0},
        "TrainConfig": {"train_iter": int(qat["iters"]), "eval_iter": 10 ** 9,
                        "logging_iter": max(1, int(qat["iters"]) // 10), "learning_rate": float(qat["learning_rate"]),
                        "optimizer_builder": {"optimizer": {"type": _QAT_OPTIMIZER}}},
    }
    with tempfile.TemporaryDirectory(prefix="qat-") as tmp:
        # AutoCompression rewrites the program in the folder it is given (shape inference): it gets a copy, which is
        # also the teacher.
        model = Path(tmp) / "model"
        model.mkdir()
        for name in (request["model_filename"], request["params_filename"]):
            shutil.copy(source / name, model / name)
        frozen = _freeze_batch_norms(program)
        (model / request["model_filename"]).write_bytes(program.desc.serialize_to_string())
        # An epoch is one pass over the photos; the data loader is called again for each.
        paddle.seed(int(qat["seed"]))
        undo = _hold_activation_scales(scales) if scales is not None else None
        try:
            AutoCompression(model_dir=str(model), model_filename=request["model_filename"],
                            params_filename=request["params_filename"], save_dir=str(Path(tmp) / "out"),
                            config=config, train_dataloader=loader, deploy_hardware=None,
                            eval_callback=None).compress()
        finally:
            held = undo() if undo is not None else 0
        out_dir.mkdir(parents=True, exist_ok=True)
        # Saved under the program's name, or "infered_shape" when AutoCompression had to fix a dynamic shape.
        (saved,) = (Path(tmp) / "out").glob("*.pdmodel")
        shutil.copy(saved, out_dir / "inference.pdmodel")
        shutil.copy(saved.with_suffix(".pdiparams"), out_dir / "inference.pdiparams")
    return {"iters": int(qat["iters"]), "batch": batch, "learning_rate": float(qat["learning_rate"]),
            "seed": int(qat["seed"]), "photos": count, "optimizer": _QAT_OPTIMIZER, "frozen_batch_norms": frozen,
            "scales": qat["scales"], "held_activation_scales": held,
            **({"post_training_algo": request["algo"]} if scales is not None else {})}


def _keep_float(program: Any, op_types: Sequence[str], weights: Sequence[str]) -> None:
    """Put the ops of ``op_types`` that read one of ``weights`` in the name scope that quantisation-aware training
    leaves float (paddleslim skips ops by name scope, not by tensor as ``quant_post_static`` does).

    Raises:
      ValueError: a name of ``weights`` that no such op reads.
    """
    names, read = set(weights), set()
    for block in program.blocks:
        for op in block.ops:
            hit = names.intersection(op.input_arg_names) if op.type in op_types else set()
            if hit:
                op._set_attr("op_namescope", f"/{_FLOAT_SCOPE}/")
                read |= hit
    unread = [name for name in weights if name not in read]
    if unread:
        raise ValueError(f"skip_tensors {unread} are not weights of a quantisable op of the program")


def _freeze_batch_norms(program: Any) -> int:
    """Make every ``batch_norm`` of ``program`` normalise by its running statistics in training too, and leave them
    as they are: returns how many there are.

    paddleslim turns the inference program into a training one by clearing ``is_test``, so each step would
    normalise by the statistics of its one or two photos and move the running means and variances towards them
    (a 100-step detector run changed 54 of its 156, and matched none of the fp32 boxes: ``docs/benchmarks.md``).
    The teacher normalises by the fp32 model's statistics; with them frozen the student learns only its weights and
    scales, the part that quantisation disturbs.
    """
    count = 0
    for block in program.blocks:
        for op in block.ops:
            if op.type in ("batch_norm", "sync_batch_norm"):
                op._set_attr("use_global_stats", True)
                op._set_attr("trainable_statistics", False)
                count += 1
    return count


def main(argv: "Sequence[str] | None" = None) -> int:
    """Entry point: ``--versions`` or one request file (see the module docstring).

    Returns:
      The exit status.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args == ["--versions"]:
            print(json.dumps(versions()), flush=True)
            return 0
        if len(args) != 1:
            raise ValueError("usage: paddleslim_worker --versions | paddleslim_worker REQUEST.json")
        quantize(json.loads(Path(args[0]).read_text(encoding="utf-8")))
        return 0
    except _Missing as exc:
        print(f"{ERROR_PREFIX} cannot import paddle and paddleslim ({exc})", file=sys.stderr, flush=True)
        return EXIT_MISSING
    except Exception as exc:  # the parent reports it with the log's tail
        print(f"{ERROR_PREFIX} {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
