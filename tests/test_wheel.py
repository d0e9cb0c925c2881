"""A real install, away from this checkout: the wheel built from the repository, installed with the ``onnx`` extra
only into a fresh virtual environment, lists the pinned models and runs the quickstart through a local mirror.

The fresh environment has no Paddle, so it cannot convert models; as a user without the ``convert`` extra
would, it runs the quickstart with ``--bundle``: a bundle converted here, in the development environment.
The official weights cannot be had on these machines, so that bundle is a STAND-IN: replicas (the official
graphs with random weights), and the quickstart marks its labels as meaningless. The demo data set does come
from the mirror, through the installed models.lock, with its pinned hashes checked.

pip installs the extra's packages from its usual index (set PIP_FIND_LINKS / PIP_NO_INDEX to use local wheels).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import build_wheel

pytestmark = [pytest.mark.paddle, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
HOST = "paddle-imagenet-models-name.bj.bcebos.com"


def _run(cmd, *, cwd, env, timeout=600):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def _clean_env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("EDGE_SHITU_") and k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["XDG_CACHE_HOME"] = str(tmp / "xdg-cache")
    env["HOME"] = str(tmp / "home")
    env["PIP_CACHE_DIR"] = os.environ.get("PIP_CACHE_DIR", str(Path.home() / ".cache" / "pip"))
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv (no system site-packages) with the wheel installed as ``edge-shitu[onnx]``: its bin folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    env = _clean_env(tmp)
    wheel = build_wheel(tmp, env)
    code, out, err = _run([sys.executable, "-m", "venv", tmp / "venv"], cwd=tmp, env=env)
    assert code == 0, out + err
    bin_dir = tmp / "venv" / "bin"
    code, out, err = _run([bin_dir / "python", "-m", "pip", "install", f"{wheel}[onnx]"], cwd=tmp, env=env)
    assert code == 0, out + err
    return bin_dir


@pytest.fixture
def outside(tmp_path) -> Path:
    """A working folder with no ``shared`` beside it or in it."""
    cwd = tmp_path / "elsewhere" / "cwd"
    cwd.mkdir(parents=True)
    return cwd


def test_installed_wheel_is_self_contained(installed, outside):
    env = _clean_env(outside.parent)
    code, out, err = _run([installed / "python", "-c",
                           "import importlib.util, edge_shitu, edge_shitu_converters.fetch as f;"
                           "print(edge_shitu.__file__); print(f.default_lock_path());"
                           "print(importlib.util.find_spec('paddle'))"], cwd=outside, env=env)
    assert code == 0, err
    package, lock, paddle = out.splitlines()
    venv = installed.parent
    assert Path(package).is_relative_to(venv) and Path(lock).is_relative_to(venv) and Path(lock).is_file()
    assert paddle == "None", "the onnx extra must not bring Paddle"

    code, out, err = _run([installed / "edge-shitu", "models", "list"], cwd=outside, env=env)
    assert code == 0, err
    rows = {line.split("\t")[0]: line.split("\t") for line in out.splitlines()}
    assert rows["picodet-mainbody"][1] == "detector" and rows["ppshituv2-extractor"][1] == "extractor"
    assert rows["drink-dataset-v1"][1] == "dataset"
    assert rows["drink-dataset-v1"][-1] == f"https://{HOST}/dygraph/rec/data/drink_dataset_v1.0.tar"


def test_installed_quickstart_without_convert_extra_says_what_to_do(installed, outside):
    code, out, err = _run([installed / "edge-shitu", "quickstart", "--work", outside / "w"], cwd=outside,
                          env=_clean_env(outside.parent))
    assert code == 1 and err.count("\n") == 1, err
    assert "'convert' extra" in err and "--bundle DIR" in err


def test_installed_quickstart_end_to_end_through_a_local_mirror(installed, outside, drink_dir, replica_bundle):
    mirror = outside.parent / "mirror"
    archive = mirror / HOST / "dygraph" / "rec" / "data" / "drink_dataset_v1.0.tar"
    archive.parent.mkdir(parents=True)
    with tarfile.open(archive, "w") as tar:
        tar.add(drink_dir, arcname="drink_dataset_v1.0")
    env = _clean_env(outside.parent)
    work = outside / "work"
    cmd = [installed / "edge-shitu", "quickstart", "--work", work, "--bundle", replica_bundle, "--limit", 30,
           "--threads", 2]
    code, out, err = _run([*cmd, "--mirror", mirror], cwd=outside, env=env)
    assert code == 0, err + out
    data = work / "data" / "drink-dataset-v1" / "drink_dataset_v1.0"
    assert f"data: {data} (fetched from {mirror / HOST}" in out
    results = [line for line in out.splitlines() if line.startswith("      ") and ".jp" in line]
    assert len(results) == 13 and all("[replica: meaningless]" in line for line in results)
    assert "30 added" in out and "per-stage time, median over 13 images" in out

    # Again without the mirror, through a proxy that refuses every connection: the verified cache is enough.
    env.update({"https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9", "no_proxy": ""})
    code, out, err = _run(cmd, cwd=outside, env=env)
    assert code == 0, err + out
    assert f"data: {data} (cached, verified)" in out and "[4/4]" in out
