"""Shared fixtures: the shared data folder, deterministic RNGs, and replica models and bundles
built once per test session under pytest's temporary directory."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from converters.shared import DET_GRAPH, REC_GRAPH, find_shared
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
    pytest.importorskip("paddle", reason="paddlepaddle (the 'convert' extra) is not installed")
    pytest.importorskip("paddle2onnx", reason="paddle2onnx (the 'convert' extra) is not installed")


@pytest.fixture(scope="session")
def replica_dirs(shared_dir: Path, tmp_path_factory) -> dict:
    """Replica Paddle inference models (official graphs, seed-0 random weights): role -> folder."""
    _need_paddle()
    from converters.replica import write_replica

    root = tmp_path_factory.mktemp("replicas")
    graphs = shared_dir / "models" / "ppshitu-graphs"
    return {
        "detector": write_replica(graphs / DET_GRAPH, root / DET_GRAPH, seed=0),
        "extractor": write_replica(graphs / REC_GRAPH, root / REC_GRAPH, seed=0),
    }


@pytest.fixture(scope="session")
def replica_bundle(replica_dirs: dict, tmp_path_factory) -> Path:
    """An fp32 ONNX bundle converted from the replicas."""
    from converters.convert import convert

    out = tmp_path_factory.mktemp("bundles") / "replica-fp32"
    return convert(replica_dirs["detector"], replica_dirs["extractor"], out, precision="fp32")
