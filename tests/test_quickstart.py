"""`edge-shitu quickstart` end to end, in-process: replicas, and the official route through a local mirror."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from edge_shitu_converters.shared import DET_GRAPH, REC_GRAPH
from edge_shitu.cli import main
from edge_shitu.gallery import Gallery

pytestmark = [pytest.mark.paddle, pytest.mark.slow]


def run(*argv):
    out, err = io.StringIO(), io.StringIO()
    return main(list(map(str, argv)), stdout=out, stderr=err), out.getvalue(), err.getvalue()


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


def test_quickstart_official_without_a_source_fails_cleanly(tmp_path):
    code, out, err = run("quickstart", "--work", tmp_path / "w", "--models", "official", "--mirror", tmp_path / "empty")
    # A source that cannot deliver is a failure of the environment (exit 1), reported in one line.
    assert code == 1 and err.count("\n") == 1 and err.startswith("edge-shitu: error:") and "empty" in err
