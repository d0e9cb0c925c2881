"""Shared fixtures: the shared data folder, deterministic RNGs, and replica models and bundles
built once per test session under pytest's temporary directory."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from edge_shitu_converters.shared import DET_GRAPH, REC_GRAPH, find_shared
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
    import hashlib
    import json

    root = tmp_path / "fake-bundle"
    root.mkdir()
    (root / "detector.onnx").write_bytes(b"placeholder detector")
    (root / "extractor.onnx").write_bytes(b"placeholder extractor")
    sha = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()
    m = manifest_for(det_sha=sha(root / "detector.onnx"), rec_sha=sha(root / "extractor.onnx"))
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
