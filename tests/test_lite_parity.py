"""A replica converted to an x86 Paddle-Lite bundle, run by the edge-shitu CLI under Python 3.10 in the side
environment, recognises the drink test images like the fp32 ONNX bundle does in this environment:
codes >= 99 % equal bits, boxes within 1 px, same labels."""

from __future__ import annotations

import io
import json
import os
import subprocess

import numpy as np
import pytest

from edge_shitu.cli import main

pytestmark = [pytest.mark.paddle, pytest.mark.slow]


@pytest.fixture(scope="module")
def lite_bundle(replica_dirs, lite_opt, tmp_path_factory):
    from edge_shitu_converters.convert import convert

    return convert(replica_dirs["detector"], replica_dirs["extractor"], tmp_path_factory.mktemp("lite") / "b",
                   format="lite-x86", lite_opt=lite_opt)


@pytest.fixture(scope="module")
def labels(drink_dir, tmp_path_factory):
    lines = (drink_dir / "gallery" / "drink_label.txt").read_text(encoding="utf-8").splitlines()[:80]
    path = tmp_path_factory.mktemp("labels") / "labels.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _here(*argv):
    out, err = io.StringIO(), io.StringIO()
    code = main([str(a) for a in argv], stdout=out, stderr=err)
    assert code == 0, err.getvalue()
    return out.getvalue()


def _side(python, *argv):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    proc = subprocess.run([str(python), "-m", "edge_shitu.cli", *map(str, argv)], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _bits(hexcodes):
    return np.unpackbits(np.frombuffer(bytes.fromhex("".join(hexcodes)), np.uint8))


def test_lite_x86_bundle_recognises_like_the_onnx_bundle(replica_bundle, lite_bundle, lite_python, drink_dir,
                                                          labels, test_images, tmp_path):
    version = subprocess.run([str(lite_python), "-c", "import sys, numpy; print(sys.version_info[:2], numpy.__version__)"],
                             capture_output=True, text=True, check=True).stdout
    assert version.startswith("(3, 10)") and " 1." in version  # the runtime itself runs under 3.10 / numpy < 2

    images = [str(p) for p in test_images]
    onnx_codes = [r["code"] for r in json.loads(_here("embed", "--bundle", replica_bundle, "--json", *images))]
    lite_codes = [r["code"] for r in json.loads(_side(lite_python, "embed", "--bundle", lite_bundle, "--json", *images))]
    a, b = _bits(onnx_codes).reshape(len(images), -1), _bits(lite_codes).reshape(len(images), -1)
    agreement = (a == b).mean(axis=1)
    assert agreement.min() >= 0.99, agreement

    onnx_det = json.loads(_here("detect", "--bundle", replica_bundle, "--json", *images))
    lite_det = json.loads(_side(lite_python, "detect", "--bundle", lite_bundle, "--json", *images))
    for o, l in zip(onnx_det, lite_det):
        assert len(o["boxes"]) == len(l["boxes"]) >= 1, o["image"]
        np.testing.assert_allclose([x["box"] for x in o["boxes"]], [x["box"] for x in l["boxes"]], atol=1.0)

    g_onnx, g_lite = tmp_path / "onnx.db", tmp_path / "lite.db"
    root = drink_dir / "gallery"
    _here("gallery", "build", "--bundle", replica_bundle, "--images", root, "--labels", labels, "--out", g_onnx)
    _side(lite_python, "gallery", "build", "--bundle", lite_bundle, "--images", root, "--labels", labels, "--out", g_lite)
    onnx_rec = json.loads(_here("recognize", "--bundle", replica_bundle, "--gallery", g_onnx, "--json", *images))
    lite_rec = json.loads(_side(lite_python, "recognize", "--bundle", lite_bundle, "--gallery", g_lite, "--json", *images))
    for o, l in zip(onnx_rec, lite_rec):
        assert [r["label"] for r in o["results"]] == [r["label"] for r in l["results"]], o["image"]
        np.testing.assert_allclose([r["box"] for r in o["results"]], [r["box"] for r in l["results"]], atol=1.0)


def test_lite_bundle_refuses_the_onnx_gallery(replica_bundle, lite_bundle, lite_python, labels, drink_dir, tmp_path,
                                             test_images):
    g_onnx = tmp_path / "onnx.db"
    _here("gallery", "build", "--bundle", replica_bundle, "--images", drink_dir / "gallery", "--labels", labels,
          "--out", g_onnx)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    proc = subprocess.run([str(lite_python), "-m", "edge_shitu.cli", "recognize", "--bundle", str(lite_bundle),
                           "--gallery", str(g_onnx), str(test_images[0])], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "rebuild the gallery" in proc.stderr.lower()
