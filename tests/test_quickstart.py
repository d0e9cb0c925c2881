"""`edge-shitu quickstart` end to end, in-process: replicas, the official route through a local mirror, and where
the demo data set comes from (shared folder, cache, mirror) when there is no checkout beside it."""

from __future__ import annotations

import json
import socket
import tarfile

import pytest

from edge_shitu_converters import shared as shared_mod
from edge_shitu_converters.shared import DET_GRAPH, REC_GRAPH
from edge_shitu.gallery import Gallery

from conftest import run_cli as run

HOST = "paddle-imagenet-models-name.bj.bcebos.com"


@pytest.mark.paddle
@pytest.mark.slow
def test_quickstart_with_replicas_then_reuse(tmp_path, test_images):
    work = tmp_path / "work"
    code, out, err = run("quickstart", "--work", work, "--models", "replica", "--threads", 2)
    assert code == 0, err + out
    assert "using REPLICAS" in out and "labels below are MEANINGLESS" in out
    lines = {l.strip().split(":")[0]: l for l in out.splitlines() if l.startswith("      ") and ": " in l}
    for img in test_images:
        assert img.name in lines, f"no result line for {img.name}"
        assert "[replica: meaningless]" in lines[img.name]
    assert "per-stage time, median over 13 images" in out and "det_infer" in out
    with Gallery.open(work / "drink-gallery-replica.db", readonly=True) as g:
        # drink_label.txt names one image that is absent (213/0.jpg): reported and skipped, never fatal.
        assert "213/0.jpg" in out and len(g) > 900
    code, out2, err = run("quickstart", "--work", work, "--models", "replica")
    assert code == 0, err
    assert "reusing" in out2 and "[4/4]" in out2


def _tar(dest, folder_name, files):
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest, "w") as tar:
        for name, path in files.items():
            tar.add(path, arcname=f"{folder_name}/{name}")


@pytest.mark.paddle
@pytest.mark.slow
def test_quickstart_official_route_through_a_mirror(tmp_path, shared_dir, replica_dirs):
    # A mirror laid out like the official host, holding the official programs. The official weights cannot be
    # had here, so the archives carry replica weights in their place; the fetch, hash checks, conversion and
    # recognition follow exactly the path the real archives take.
    host = tmp_path / "mirror" / "paddle-imagenet-models-name.bj.bcebos.com" / "dygraph" / "rec" / "models" / "inference"
    graphs = shared_dir / "models" / "ppshitu-graphs"
    for graph, sub, extra in [(DET_GRAPH, "", ["infer_cfg.yml"]), (REC_GRAPH, "PP-ShiTuV2/", [])]:
        files = {n: graphs / graph / n for n in ["inference.pdmodel", "inference.pdiparams.info", *extra]}
        files["inference.pdiparams"] = replica_dirs["detector" if graph == DET_GRAPH else "extractor"] / "inference.pdiparams"
        _tar(host / f"{sub}{graph}.tar", graph, files)
    work = tmp_path / "work"
    code, out, err = run("quickstart", "--work", work, "--models", "official", "--mirror", tmp_path / "mirror",
                         "--limit", 40)
    assert code == 0, err + out
    assert "REPLICA" not in out and "[4/4]" in out
    manifest = json.loads((work / "bundle-official-fp32" / "manifest.json").read_text())
    assert {m["source"]["kind"] for m in manifest["models"].values()} == {"official"}
    # The bundle records which pinned archive each model came from, and from where.
    archives = {m["source"]["archive"]["name"] for m in manifest["models"].values()}
    assert archives == {"picodet-mainbody", "ppshituv2-extractor"}
    assert all(str(tmp_path / "mirror") in m["source"]["archive"]["fetched_from"] for m in manifest["models"].values())
    with Gallery.open(work / "drink-gallery-official.db", readonly=True) as g:
        assert len(g) == 40


@pytest.mark.paddle
def test_quickstart_official_without_a_source_fails_cleanly(tmp_path):
    code, out, err = run("quickstart", "--work", tmp_path / "w", "--models", "official", "--mirror", tmp_path / "empty")
    # A source that cannot deliver is a failure of the environment (exit 1), reported in one line.
    assert code == 1 and err.count("\n") == 1 and err.startswith("edge-shitu: error:") and "empty" in err


@pytest.fixture
def no_checkout_shared(tmp_path, monkeypatch):
    """As in an installed wheel: no $EDGE_SHITU_SHARED, no ../shared beside the package or the working folder."""
    monkeypatch.delenv("EDGE_SHITU_SHARED", raising=False)
    monkeypatch.setattr(shared_mod, "__file__", str(tmp_path / "site" / "pkg" / "shared.py"))
    home = tmp_path / "site" / "cwd"
    home.mkdir(parents=True)
    monkeypatch.chdir(home)


@pytest.fixture
def offline(monkeypatch):
    """Every network connection fails at once, as on a machine without network."""
    attempts = []

    def unreachable(self, address, *args):
        attempts.append(address)
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket.socket, "connect", unreachable)
    monkeypatch.setattr(socket.socket, "connect_ex", unreachable)
    return attempts


def drink_mirror(mirror, drink_dir):
    """A mirror laid out like the official host, holding drink_dataset_v1.0.tar packed from the shared copy."""
    dest = mirror / HOST / "dygraph" / "rec" / "data" / "drink_dataset_v1.0.tar"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest, "w") as tar:
        tar.add(drink_dir, arcname="drink_dataset_v1.0")
    return mirror


def test_no_network_and_no_data_says_what_to_pass(tmp_path, no_checkout_shared, offline):
    code, out, err = run("quickstart", "--work", tmp_path / "w", "--bundle", tmp_path / "no-bundle")
    # One line, exit 1 (the environment cannot deliver, as for any FetchError), naming both ways out.
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith("edge-shitu: error: the drink demo data set is in no shared folder nor in the cache")
    assert "pass --mirror DIR" in err and "EDGE_SHITU_SHARED" in err
    assert "[1/4]" in out and "[2/4]" not in out


def test_explicit_shared_folder_without_the_data_does_not_fall_back(tmp_path, monkeypatch, offline):
    monkeypatch.setenv("EDGE_SHITU_SHARED", str(tmp_path / "empty"))
    code, out, err = run("quickstart", "--work", tmp_path / "w", "--bundle", tmp_path / "no-bundle")
    assert code == 2 and "shared data not found" in err and str(tmp_path / "empty") in err
    assert offline == []


@pytest.mark.paddle
@pytest.mark.slow
def test_data_set_from_a_mirror_then_from_the_cache_without_network(tmp_path, drink_dir, replica_bundle,
                                                                    no_checkout_shared, monkeypatch):
    mirror = drink_mirror(tmp_path / "mirror", drink_dir)
    work = tmp_path / "work"
    code, out, err = run("quickstart", "--work", work, "--bundle", replica_bundle, "--mirror", mirror,
                         "--limit", 20, "--threads", 2)
    assert code == 0, err + out
    data = work / "data" / "drink-dataset-v1" / "drink_dataset_v1.0"
    assert f"data: {data} (fetched from {mirror / HOST}" in out
    assert "[4/4]" in out and "[replica: meaningless]" in out
    # Second run: no mirror, and any network attempt would fail the run; the verified cache is enough.
    attempts = []

    def refuse(self, address, *args):
        attempts.append(address)
        raise AssertionError(f"network connection attempted to {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    code, out, err = run("quickstart", "--work", work, "--bundle", replica_bundle, "--limit", 20)
    assert code == 0, err + out
    assert f"data: {data} (cached, verified)" in out and attempts == []


def test_bundle_and_models_exclude_each_other(tmp_path):
    code, out, err = run("quickstart", "--work", tmp_path / "w", "--bundle", tmp_path, "--models", "replica")
    assert code == 2 and "not allowed with argument" in err
