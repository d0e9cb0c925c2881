"""Shared fixtures: the shared data folder, deterministic RNGs, replica models and bundles (Paddle) and a
tiny runnable ONNX bundle (onnx + onnxruntime only), built once per test session under pytest's
temporary directory.

Nothing here imports ``edge_shitu_converters`` (or anything of the convert extra) at module level, so
``pytest -m "not paddle"`` runs with only ``edge-shitu[onnx,dev]`` installed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

from edge_shitu.errors import MissingFileError

# Under CI every test must really run: a skip there means an install step is missing.
STRICT = os.environ.get("EDGE_SHITU_STRICT") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if STRICT and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under EDGE_SHITU_STRICT=1 (CI must run every test): {report.longrepr}"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    from edge_shitu_converters.shared import find_shared  # stdlib only, no Paddle

    try:
        return find_shared()
    except MissingFileError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def drink_dir(shared_dir: Path) -> Path:
    return shared_dir / "data" / "drink_dataset_v1.0"


@pytest.fixture(scope="session")
def test_images(drink_dir: Path) -> list:
    return sorted(p for p in (drink_dir / "test_images").iterdir() if p.is_file())


@pytest.fixture(scope="session")
def verify_photos(test_images, tmp_path_factory) -> Path:
    """A folder of the first three drink test photos: what converted models are verified on in tests."""
    import shutil

    d = tmp_path_factory.mktemp("verify-photos")
    for p in test_images[:3]:
        shutil.copy(p, d / p.name)
    return d


@pytest.fixture(scope="session")
def embeddings_npz(shared_dir: Path) -> Path:
    return shared_dir / "data" / "ppshituv2-drink-embeddings" / "dev.npz"


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def _need_paddle():
    # The official programs are legacy (non-PIR) Paddle programs; choose the mode before paddle is imported.
    os.environ.setdefault("FLAGS_enable_pir_api", "0")
    pytest.importorskip("paddle", reason="paddlepaddle (the 'convert' extra) is not installed")
    pytest.importorskip("paddle2onnx", reason="paddle2onnx (the 'convert' extra) is not installed")


@pytest.fixture(scope="session")
def replica_dirs(shared_dir: Path, tmp_path_factory) -> dict:
    """Replica Paddle inference models (official graphs, seed-0 random weights): role -> folder."""
    _need_paddle()
    from edge_shitu_converters.replica import write_replica
    from edge_shitu_converters.shared import DET_GRAPH, REC_GRAPH

    root = tmp_path_factory.mktemp("replicas")
    graphs = shared_dir / "models" / "ppshitu-graphs"
    return {
        "detector": write_replica(graphs / DET_GRAPH, root / DET_GRAPH, seed=0),
        "extractor": write_replica(graphs / REC_GRAPH, root / REC_GRAPH, seed=0),
    }


@pytest.fixture(scope="session")
def replica_bundle(replica_dirs: dict, tmp_path_factory) -> Path:
    """An fp32 ONNX bundle converted from the replicas."""
    from edge_shitu_converters.convert import convert

    out = tmp_path_factory.mktemp("bundles") / "replica-fp32"
    return convert(replica_dirs["detector"], replica_dirs["extractor"], out, precision="fp32")


def translate_to_pir(model_dir: Path, out_dir: Path) -> Path:
    """Save a legacy model folder as a Paddle 3 PIR program (``inference.json``), the way Paddle 3.3
    loads a legacy program: ``paddle.pir.translate_to_pir`` of the loaded program, then
    ``save_inference_model`` in PIR mode. The weights are saved with it."""
    from edge_shitu_converters import paddle_io

    paddle = paddle_io.import_paddle()
    from paddle.static.pir_io import get_pir_parameters

    model = paddle_io.load_inference_model(model_dir)
    with paddle.static.scope_guard(model.scope), paddle.pir_utils.IrGuard():
        program = paddle.pir.translate_to_pir(model.program.desc)
        block = program.global_block()
        feeds = [op.result(0) for op in block.ops if op.name() in ("pd_op.data", "pd_op.feed")]
        fetches = [op.operand_source(0) for op in block.ops if op.name() == "pd_op.fetch"]
        params, _ = get_pir_parameters(program)
        paddle.base.libpaddle.pir.create_loaded_parameter(
            [v for v in params if v.persistable], model.scope, model.executor._default_executor
        )
        paddle.static.save_inference_model(str(out_dir / "inference"), feeds, fetches, model.executor, program=program)
    if (model_dir / "infer_cfg.yml").is_file():
        shutil.copyfile(model_dir / "infer_cfg.yml", out_dir / "infer_cfg.yml")
    return out_dir


# ---------------------------------------------------------------- Paddle-Lite side environment


@pytest.fixture(scope="session")
def lite_python() -> Path:
    """Python of the Paddle-Lite side environment ($EDGE_SHITU_LITE_PYTHON or <repo>/.venv-lite)."""
    from edge_shitu_converters.lite_worker import find_lite_python
    from edge_shitu.errors import BackendUnavailableError

    try:
        return find_lite_python()
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def lite_opt(lite_python) -> Path:
    """paddle_lite_opt: $EDGE_SHITU_LITE_OPT, else the side environment's own."""
    env = os.environ.get("EDGE_SHITU_LITE_OPT")
    opt = Path(env) if env else lite_python.parent / "paddle_lite_opt"
    if not (opt.is_file() and os.access(opt, os.X_OK)):
        pytest.skip(f"no paddle_lite_opt at {opt}: create the side environment with scripts/setup-lite-env")
    return opt


# ---------------------------------------------------------------- fake bundles and sessions
# Models are replaced by small deterministic numpy functions, so pipeline logic is tested exactly,
# without model files; the real models are exercised by the replica tests.

MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


def manifest_for(det_file="detector.onnx", rec_file="extractor.onnx", det_sha="0" * 64, rec_sha="0" * 64):
    """A valid manifest (schema of edge_shitu_converters.convert) for two model files."""
    def inp(name, shape, interp):
        return {"name": name, "shape": shape, "resize": "stretch", "interpolation": interp, "channel_order": "RGB",
                "scale": 1 / 255, "mean": MEAN, "std": STD, "layout": "NCHW"}

    return {
        "format": "edge-shitu-bundle", "format_version": 1, "name": "fake",
        "models": {
            "detector": {
                "file": det_file, "sha256": det_sha, "backend": "onnxruntime", "precision": "fp32",
                "input": inp("image", [1, 3, 640, 640], "cubic"),
                "output": {"kind": "picodet_heads", "scores": ["s8", "s16", "s32", "s64"],
                           "boxes": ["b8", "b16", "b32", "b64"], "strides": [8, 16, 32, 64], "reg_max": 7,
                           "cell_offset": 0.5, "num_classes": 1},
                "labels": ["foreground"],
                "defaults": {"score_threshold": 0.025, "nms_iou": 0.6, "nms_top_k": 1000, "keep_top_k": 100,
                             "max_detections": 5, "min_score": 0.2},
                "source": {"kind": "replica", "model_dir_name": "det", "program_sha256": "x", "params_sha256": "y", "seed": 0},
            },
            "extractor": {
                "file": rec_file, "sha256": rec_sha, "backend": "onnxruntime", "precision": "fp32",
                "input": inp("x", [-1, 3, 224, 224], "linear"),
                "output": {"kind": "embedding", "name": "feat", "dim": 512, "normalized": False},
                "source": {"kind": "replica", "model_dir_name": "rec", "program_sha256": "x", "params_sha256": "y", "seed": 0},
            },
        },
        "codes": {"bits": 512, "method": "sign", "bit_order": "big"},
        "recognition": {"max_distance": 100, "final_nms_iou": 0.05, "whole_image": "if_none", "top_k": 5},
        "tools": {"edge_shitu": "test"},
    }


@pytest.fixture
def fake_bundle(tmp_path) -> Path:
    """A bundle directory whose model files are placeholder bytes (use with injected fake sessions)."""
    root = tmp_path / "fake-bundle"
    root.mkdir()
    (root / "detector.onnx").write_bytes(b"placeholder detector")
    (root / "extractor.onnx").write_bytes(b"placeholder extractor")
    return write_manifest(root)


def write_manifest(root: Path, name: str = "fake") -> Path:
    """Write ``root/manifest.json`` (:func:`manifest_for`) with the real sha256 of the two model files."""
    import hashlib
    import json

    sha = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()
    m = manifest_for(det_sha=sha(root / "detector.onnx"), rec_sha=sha(root / "extractor.onnx"))
    m["name"] = name
    (root / "manifest.json").write_text(json.dumps(m, indent=2))
    return root


class FakeDetectorSession:
    """Raw PicoDet heads that decode to given boxes (in 640x640 input pixels) with given scores."""

    input_names = ("image",)
    output_names = ("s8", "s16", "s32", "s64", "b8", "b16", "b32", "b64")

    def __init__(self, boxes_scores):
        self.boxes_scores = boxes_scores
        self.calls = 0

    def run(self, feeds, outputs=None):
        self.calls += 1
        assert feeds["image"].shape == (1, 3, 640, 640) and feeds["image"].dtype == np.float32
        scores, logits = [], []
        for s in (8, 16, 32, 64):
            n = 640 // s
            scores.append(np.zeros((1, n, n, 1), np.float32))
            logits.append(np.full((1, n, n, 32), -50.0, np.float32))
        for (x1, y1, x2, y2), score in self.boxes_scores:
            # Put each box on the stride-8 level, at the cell holding its centre; distances are exact
            # one-hot bins, so the box must be representable: side distances = whole multiples of 8 up to 56.
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            col, row = int(cx // 8), int(cy // 8)
            acx, acy = (col + 0.5) * 8, (row + 0.5) * 8
            d = [(acx - x1) / 8, (acy - y1) / 8, (x2 - acx) / 8, (y2 - acy) / 8]
            scores[0][0, row, col, 0] = score
            for side, dist in enumerate(d):
                lo = int(np.floor(dist))
                frac = dist - lo
                # two-bin mixture with logit weights reproducing the fractional expectation
                vals = np.full(8, -50.0)
                if frac < 1e-9:
                    vals[lo] = 0.0
                else:
                    vals[lo], vals[lo + 1] = np.log(1 - frac), np.log(frac)
                logits[0][0, row, col, side * 8:(side + 1) * 8] = vals
        return scores + logits

    def close(self):
        pass


class FakeExtractorSession:
    """Features from a fixed random projection of the 8x8-average-pooled input: same crop, same code."""

    input_names = ("x",)
    output_names = ("feat",)

    def __init__(self, seed=0):
        self.proj = np.random.default_rng(seed).normal(size=(3 * 8 * 8, 512)).astype(np.float32)
        self.batches = []

    def run(self, feeds, outputs=None):
        x = feeds["x"]
        assert x.ndim == 4 and x.shape[1:] == (3, 224, 224) and x.dtype == np.float32
        self.batches.append(x.shape[0])
        pooled = x.reshape(x.shape[0], 3, 8, 28, 8, 28).mean(axis=(3, 5)).reshape(x.shape[0], -1)
        return [pooled @ self.proj]

    def close(self):
        pass


# ---------------------------------------------------------------- tiny real ONNX models
# Written with onnx.helper (the dev extra) and run by onnxruntime, so the runtime's whole path (bundle
# verification, session creation, pre/post-processing, CLI) runs on real model files without Paddle.

ONNX_OPSET = 13
# IR 8 is what onnxruntime 1.14+ reads; the newest onnx would stamp a version older runtimes refuse.
ONNX_IR_VERSION = 8


def add_subgraph_reader(model, tensor: str) -> None:
    """Append an ``If`` whose branches read the outer ``tensor`` (a float tensor of ``model``), as a graph output:
    the kind of read a node-level map of readers does not see."""
    from onnx import TensorProto, helper, numpy_helper

    branch = helper.make_graph([helper.make_node("Identity", [tensor], ["inner"])], "branch", [],
                               [helper.make_tensor_value_info("inner", TensorProto.FLOAT, None)])
    model.graph.initializer.append(numpy_helper.from_array(np.array(True), "subgraph_flag"))
    model.graph.node.append(helper.make_node("If", ["subgraph_flag"], ["subgraph_out"], then_branch=branch,
                                             else_branch=branch))
    model.graph.output.append(helper.make_tensor_value_info("subgraph_out", TensorProto.FLOAT, None))


def write_onnx(path: Path, nodes, inputs, outputs, initializers=(), *, name: str = "tiny") -> Path:
    """Save a one-graph ONNX model (default domain at :data:`ONNX_OPSET`) after the ONNX checker passed it.

    Args:
      path: the ``.onnx`` file to write.
      nodes, inputs, outputs: as for ``onnx.helper.make_graph``.
      initializers: ``{name: ndarray}`` of constant tensors.
    """
    onnx = pytest.importorskip("onnx", reason="onnx (the 'dev' extra) is not installed")
    from onnx import helper, numpy_helper

    graph = helper.make_graph(list(nodes), name, list(inputs), list(outputs),
                              initializer=[numpy_helper.from_array(v, k) for k, v in dict(initializers).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
                              producer_name="edge-shitu tests")
    model.ir_version = ONNX_IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def write_shape_probe_extractor(path: Path, input_name: str = "x", dims=("N", 3, 224, 224)) -> Path:
    """An "extractor" (ReduceMean over the last axis) whose only point is its declared input (name, dims)."""
    from onnx import TensorProto, helper

    node = helper.make_node("ReduceMean", [input_name], ["feat"], axes=[-1], keepdims=0)
    return write_onnx(path, [node], [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, list(dims))],
                      [helper.make_tensor_value_info("feat", TensorProto.FLOAT, list(dims)[:-1])])


TINY_STRIDES = (8, 16, 32, 64)
TINY_REG_MAX = 7
TINY_SEED = 0
# Score conv: zero-mean filters (they answer to edges, not to brightness) at unit gain, and a bias that leaves
# each drink test photo 4 or 5 boxes above the default min_score 0.2 (its best score 0.31 to 0.94).
TINY_SCORE_GAIN, TINY_SCORE_BIAS, TINY_BOX_GAIN = 1.0, -3.0, 0.5


def write_tiny_detector(path: Path, seed: int = TINY_SEED) -> Path:
    """A PicoDet-shaped detector: ``image`` float32 [1, 3, 640, 640] -> the eight raw head outputs.

    Per stride s: a Conv with kernel = stride = s over the input gives one class score (Sigmoid) and
    ``4 * (reg_max + 1)`` box logits per cell, reshaped and transposed to the converter's layout
    ``s{s}`` [1, (640/s)^2, 1] and ``b{s}`` [1, (640/s)^2, 32] (names as in :func:`manifest_for`).
    Weights are drawn from ``default_rng(seed)``.
    """
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    nodes, consts = [], {"flat": np.array([1, 0, -1], np.int64)}
    score_outputs, box_outputs = [], []
    for s in TINY_STRIDES:
        cells = (640 // s) ** 2
        for kind, channels, gain, bias in (("s", 1, TINY_SCORE_GAIN, TINY_SCORE_BIAS),
                                           ("b", 4 * (TINY_REG_MAX + 1), TINY_BOX_GAIN, 0.0)):
            w = rng.normal(size=(channels, 3, s, s))
            w = (w - w.mean(axis=(2, 3), keepdims=True)) * gain / np.sqrt(w[0].size)
            consts[f"{kind}{s}_w"], consts[f"{kind}{s}_b"] = w.astype(np.float32), np.full(channels, bias, np.float32)
            nodes.append(helper.make_node("Conv", ["image", f"{kind}{s}_w", f"{kind}{s}_b"], [f"{kind}{s}_conv"],
                                          kernel_shape=[s, s], strides=[s, s]))
            last = f"{kind}{s}_conv"
            if kind == "s":
                nodes.append(helper.make_node("Sigmoid", [last], [f"s{s}_sigmoid"]))
                last = f"s{s}_sigmoid"
            nodes.append(helper.make_node("Reshape", [last, "flat"], [f"{kind}{s}_flat"]))
            nodes.append(helper.make_node("Transpose", [f"{kind}{s}_flat"], [f"{kind}{s}"], perm=[0, 2, 1]))
            info = helper.make_tensor_value_info(f"{kind}{s}", TensorProto.FLOAT, [1, cells, channels])
            (score_outputs if kind == "s" else box_outputs).append(info)
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 640, 640])
    return write_onnx(path, nodes, [image], score_outputs + box_outputs, consts, name="tiny-detector")


def write_tiny_extractor(path: Path, seed: int = TINY_SEED) -> Path:
    """An extractor computing what :class:`FakeExtractorSession` computes: ``x`` float32 [N, 3, 224, 224]
    -> AveragePool 28x28 (to 8x8) -> Flatten -> MatMul with ``default_rng(seed).normal((192, 512))``
    -> ``feat`` float32 [N, 512]."""
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("AveragePool", ["x"], ["pooled"], kernel_shape=[28, 28], strides=[28, 28]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "proj"], ["feat"]),
    ]
    return write_onnx(path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 224, 224])],
                      [helper.make_tensor_value_info("feat", TensorProto.FLOAT, ["N", 512])],
                      {"proj": FakeExtractorSession(seed).proj}, name="tiny-extractor")


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """A runnable fp32 ONNX bundle of :func:`write_tiny_detector` and :func:`write_tiny_extractor`, with the
    manifest of :func:`manifest_for` (a replica's, as its weights are random). Needs onnx and onnxruntime only."""
    pytest.importorskip("onnx", reason="onnx (the 'dev' extra) is not installed")
    pytest.importorskip("onnxruntime", reason="onnxruntime (the 'onnx' extra) is not installed")
    root = tmp_path_factory.mktemp("tiny-bundle")
    write_tiny_detector(root / "detector.onnx")
    write_tiny_extractor(root / "extractor.onnx")
    return write_manifest(root, name="tiny")


# What the edge-shitu wheel is built from (the rest of the checkout is not packaged).
WHEEL_SOURCES = ("pyproject.toml", "README.md", "edge_shitu", "converters", "bench")


def build_wheel(tmp: Path, env: Optional[dict] = None) -> Path:
    """Build the edge-shitu wheel from a copy of the checkout (an in-tree build would write build/ and
    *.egg-info into it) into ``tmp/dist``; returns the wheel's path."""
    repo = Path(__file__).resolve().parent.parent
    src = tmp / "src"
    src.mkdir(parents=True)
    for name in WHEEL_SOURCES:
        path = repo / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp / "dist"), str(src)],
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (tmp / "dist").glob("edge_shitu-*.whl")
    return wheel


def average_precision(relevant) -> float:
    """Slow and obvious AP of one ranking: ``relevant`` is a bool per ranked item, at least one True."""
    found, total = 0, 0.0
    for rank, ok in enumerate(relevant, start=1):
        if ok:
            found += 1
            total += found / rank
    return total / found



def run_cli(*argv, stderr=None):
    """Runs ``edge-shitu ARGV...`` in this process: ``(exit code, stdout, stderr)``; ``stderr`` may be a stream
    of the caller's (its text is then not returned)."""
    import io

    from edge_shitu.cli import main

    out, err = io.StringIO(), stderr or io.StringIO()
    code = main(list(map(str, argv)), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()
