"""The edge-shitu command, run in-process on real drink photos: on the tiny ONNX bundle (no Paddle), and
end to end on a replica bundle (the official architecture, converted with Paddle) for detect, recognize
and models fetch."""

from __future__ import annotations

import json
import shutil
import sys

import pytest


from conftest import run_cli as run

BOTH_BUNDLES = pytest.mark.parametrize("bundle", ["tiny", pytest.param("replica", marks=pytest.mark.paddle)],
                                       indirect=True)


@pytest.fixture
def bundle(request):
    """The tiny ONNX bundle, or the replica bundle where a test is parametrized with "replica"."""
    kind = getattr(request, "param", "tiny")
    return request.getfixturevalue({"tiny": "tiny_bundle", "replica": "replica_bundle"}[kind])


@pytest.fixture(scope="module")
def _galleries() -> dict:
    return {}


@pytest.fixture
def small_gallery(bundle, drink_dir, tmp_path_factory, _galleries):
    """A gallery (built once per bundle) of the drink gallery's folders 0 and 1, plus a missing and a corrupt entry."""
    if bundle in _galleries:
        return _galleries[bundle]
    root = tmp_path_factory.mktemp("cli-gallery")
    images = root / "images"
    shutil.copytree(drink_dir / "gallery" / "0", images / "0")
    shutil.copytree(drink_dir / "gallery" / "1", images / "1")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    lines = [l for l in (drink_dir / "gallery" / "drink_label.txt").read_text(encoding="utf-8").splitlines()
             if l.split("/")[0] in ("0", "1")]
    lines += ["missing/0.jpg\tghost", "broken.jpg\tbroken"]
    labels = root / "labels.txt"
    labels.write_text("\n".join(lines) + "\n", encoding="utf-8")
    db = root / "g.db"
    code, out, err = run("gallery", "build", "--bundle", bundle, "--images", images, "--labels", labels,
                         "--out", db)
    assert code == 0, err
    _galleries[bundle] = {"db": db, "images": images, "labels": labels, "n": len(lines) - 2, "out": out, "err": err}
    return _galleries[bundle]


@BOTH_BUNDLES
def test_detect_json(bundle, test_images):
    code, out, err = run("detect", "--bundle", bundle, "--json", *test_images[:3])
    assert code == 0, err
    records = json.loads(out)
    assert [r["image"] for r in records] == [str(p) for p in test_images[:3]]
    for r in records:
        assert 1 <= len(r["boxes"]) <= 5
        for b in r["boxes"]:
            x1, y1, x2, y2 = b["box"]
            assert x2 > x1 and y2 > y1 and b["score"] >= 0.2
    assert "REPLICA" in err


def test_embed_json_is_deterministic_hex(bundle, test_images):
    code, out, err = run("embed", "--bundle", bundle, "--json", test_images[0], test_images[0], test_images[1])
    assert code == 0, err
    codes = [r["code"] for r in json.loads(out)]
    assert all(len(c) == 128 and int(c, 16) >= 0 for c in codes)
    assert codes[0] == codes[1] != codes[2]


def test_gallery_build_reports_skips(small_gallery):
    assert f"{small_gallery['n']} image(s) added, 2 skipped" in small_gallery["out"]
    assert "missing/0.jpg" in small_gallery["err"] and "broken.jpg" in small_gallery["err"]


def test_gallery_info_list_add_remove_relabel(small_gallery, bundle, test_images, tmp_path):
    db = tmp_path / "g.db"
    shutil.copy(small_gallery["db"], db)
    code, out, _ = run("gallery", "info", db, "--json")
    info = json.loads(out)
    assert code == 0 and info["items"] == small_gallery["n"] and info["bits"] == 512

    code, out, err = run("gallery", "add", db, "--bundle", bundle, "--label", "shelf", *test_images[:2])
    assert code == 0 and "added 2 item(s)" in out, err
    code, out, _ = run("gallery", "list", db, "--label", "shelf", "--json")
    shelf = json.loads(out)
    assert [it["label"] for it in shelf] == ["shelf", "shelf"]

    code, out, _ = run("gallery", "relabel", db, "--id", shelf[0]["id"], "--label", "shelf photo")
    assert code == 0 and "relabelled 1" in out
    code, out, _ = run("gallery", "remove", db, "--label", "shelf")
    assert code == 0 and "removed 1 item(s)" in out
    code, out, _ = run("gallery", "remove", db, "--id", shelf[0]["id"])
    assert code == 0 and "removed 1 item(s)" in out
    code, out, _ = run("gallery", "info", db, "--json")
    assert json.loads(out)["items"] == small_gallery["n"]

    code, _, err = run("gallery", "remove", db, "--id", 999999)
    assert code == 2 and "999999" in err and "Traceback" not in err


@BOTH_BUNDLES
def test_recognize_json_and_timings(small_gallery, bundle, test_images, tmp_path):
    db = tmp_path / "g.db"
    shutil.copy(small_gallery["db"], db)
    run("gallery", "add", db, "--bundle", bundle, "--label", "the shelf", test_images[0])
    code, out, err = run("recognize", "--bundle", bundle, "--gallery", db, "--json", "--timings",
                         "--whole-image", "always", test_images[0], test_images[1])
    assert code == 0, err
    first, second = json.loads(out)
    whole = [r for r in first["results"] if r["label"] == "the shelf"]
    assert whole and whole[0]["distance"] == 0 and whole[0]["similarity"] == 1.0
    for rec in (first, second):
        assert set(rec["timings_ms"]) >= {"decode", "det_pre", "det_infer", "det_post", "rec_pre", "rec_infer",
                                          "search", "nms", "total"}
        for r in rec["results"]:
            assert set(r) == {"box", "label", "distance", "similarity", "detection_score", "whole_image",
                              "candidates"} and r["distance"] <= 100
            assert r["candidates"][0]["distance"] == r["distance"] and r["candidates"][0]["label"] == r["label"]
    # The pure-numpy search gives the same answers as the default one (faiss where it is installed).
    code, out_numpy, err = run("recognize", "--bundle", bundle, "--gallery", db, "--json",
                               "--whole-image", "always", "--search-backend", "numpy", test_images[0], test_images[1])
    assert code == 0, err
    assert [r["results"] for r in json.loads(out_numpy)] == [first["results"], second["results"]]


def test_recognize_text_output(small_gallery, bundle, test_images):
    code, out, err = run("recognize", "--bundle", bundle, "--gallery", small_gallery["db"],
                         "--timings", "--max-distance", 512, test_images[0])
    assert code == 0, err
    assert f"{test_images[0]}:" in out and "timings ms: decode" in out


@pytest.mark.parametrize("name, content", [("absent.jpg", None), ("empty.png", b""), ("text.jpg", b"hello"),
                                           ("cut.jpg", "truncated")])
def test_bad_images_exit_2_with_one_line(bundle, tmp_path, test_images, name, content):
    path = tmp_path / name
    if content == "truncated":
        data = test_images[0].read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif content is not None:
        path.write_bytes(content)
    needle = name
    code, out, err = run("detect", "--bundle", bundle, path)
    assert code == 2
    # Besides the error: the replica note and the progress status line of a non-terminal stderr.
    lines = [line for line in err.strip().splitlines() if not line.startswith(("note:", "detecting: 1/1"))]
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("edge-shitu: error:")


def test_debug_shows_traceback(bundle, tmp_path):
    code, _, err = run("--debug", "detect", "--bundle", bundle, tmp_path / "absent.jpg")
    assert code == 2 and "Traceback" in err


def test_bad_bundle_and_gallery(tmp_path, bundle, small_gallery):
    code, _, err = run("detect", "--bundle", tmp_path, "x.jpg")
    assert code == 2 and "manifest" in err
    other = tmp_path / "other.db"
    from edge_shitu.gallery import Gallery

    Gallery.create(other, fingerprint="ab" * 16).close()
    code, _, err = run("recognize", "--bundle", bundle, "--gallery", other, "x.jpg")
    assert code == 2 and "was built with fingerprint" in err and "rebuild the gallery" in err.lower()


def test_usage_errors_exit_2():
    assert run("detect")[0] == 2
    assert run("no-such-command")[0] == 2
    code, out, _ = run("--version")
    assert code == 0 and "edge-shitu" in out


def test_missing_extra_names_the_pip_command(monkeypatch, tmp_path):
    for name in [m for m in sys.modules if m == "paddle" or m.startswith("paddle.") or m.startswith("edge_shitu_converters.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "paddle", None)
    code, _, err = run("replicate", tmp_path, tmp_path / "out")
    assert code == 1 and 'pip install "edge-shitu[convert]"' in err


@pytest.mark.paddle
def test_models_list_and_fetch_from_a_mirror(tmp_path, shared_dir, replica_dirs):
    import tarfile

    from edge_shitu_converters.shared import REC_GRAPH

    code, out, err = run("models", "list")
    assert code == 0, err
    names = [line.split("\t")[0] for line in out.splitlines()]
    assert {"picodet-mainbody", "ppshituv2-extractor"} <= set(names)
    assert all("https://" in line for line in out.splitlines())

    mirror = tmp_path / "mirror"
    arch = (mirror / "paddle-imagenet-models-name.bj.bcebos.com" / "dygraph" / "rec" / "models" / "inference"
            / "PP-ShiTuV2" / f"{REC_GRAPH}.tar")
    arch.parent.mkdir(parents=True)
    graph = shared_dir / "models" / "ppshitu-graphs" / REC_GRAPH
    with tarfile.open(arch, "w") as tar:
        for n in ("inference.pdmodel", "inference.pdiparams.info"):
            tar.add(graph / n, arcname=f"{REC_GRAPH}/{n}")
        tar.add(replica_dirs["extractor"] / "inference.pdiparams", arcname=f"{REC_GRAPH}/inference.pdiparams")
    cache = tmp_path / "cache"
    code, out, err = run("models", "fetch", "ppshituv2-extractor", "--mirror", mirror, "--cache", cache)
    assert code == 0, err
    assert "inference.pdmodel: sha256 3e0ade05639f" in out and "(pinned-ok)" in out
    assert "inference.pdiparams: sha256" in out and "(unpinned)" in out  # the hash seen is printed
    code, out, _ = run("models", "fetch", "ppshituv2-extractor", "--mirror", mirror, "--cache", cache)
    assert code == 0 and "already cached" in out

    # An archive whose pinned program differs is refused, and nothing is left in the cache.
    with tarfile.open(arch, "w") as tar:
        tar.add(replica_dirs["detector"] / "inference.pdmodel", arcname=f"{REC_GRAPH}/inference.pdmodel")
        tar.add(graph / "inference.pdiparams.info", arcname=f"{REC_GRAPH}/inference.pdiparams.info")
        tar.add(replica_dirs["extractor"] / "inference.pdiparams", arcname=f"{REC_GRAPH}/inference.pdiparams")
    code, _, err = run("models", "fetch", "ppshituv2-extractor", "--mirror", mirror, "--cache", tmp_path / "c2", "--force")
    assert code == 1 and "sha256 mismatch" in err and "inference.pdmodel" in err
    assert not any((tmp_path / "c2").rglob("inference.pdiparams"))
