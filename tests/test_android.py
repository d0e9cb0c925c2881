"""The Android app's Python side, against a bridge simulator (tests/android_sim/java): the ``android`` backend and
the ``shitu_android`` module the Kotlin code calls.

The simulator stands in for Chaquopy's ``java`` module and the app's Kotlin ``OrtBridge`` with their contracts
(flat float arrays and shapes, Java element types, typed signatures), running the real onnxruntime underneath.
It cannot show JNI costs, device speed or ONNX Runtime for Android's own numerics; the Kotlin is never compiled
here (no Maven/Google access). CI runs this file under Chaquopy's versions: Python 3.12 with numpy 1.26.
"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataclasses import replace

from conftest import build_wheel
from edge_shitu.backends import create_session
from edge_shitu.bundle import Bundle
from edge_shitu.cli import main
from edge_shitu.errors import BackendUnavailableError, BundleError, InvalidDtypeError, InvalidInputError
from edge_shitu.gallery import Gallery
from edge_shitu.kiosk.service import KioskService, ServiceOptions
from edge_shitu.options import BackendOptions, EmbedderOptions
from edge_shitu.embedder import Embedder

ROOT = Path(__file__).resolve().parent.parent
SIM = Path(__file__).resolve().parent / "android_sim"
APP_PYTHON = ROOT / "android_demo" / "app" / "src" / "main" / "python"
KOTLIN = ROOT / "android_demo" / "app" / "src" / "main" / "java" / "com" / "edgeshitu" / "demo"


@pytest.fixture
def java(monkeypatch):
    """The simulated ``java`` module, importable as Chaquopy's, with zeroed conversion counts."""
    monkeypatch.syspath_prepend(str(SIM))
    monkeypatch.delitem(sys.modules, "java", raising=False)
    module = importlib.import_module("java")
    module.reset()
    yield module
    sys.modules.pop("java", None)


@pytest.fixture
def app(java, monkeypatch):
    monkeypatch.syspath_prepend(str(APP_PYTHON))
    monkeypatch.delitem(sys.modules, "shitu_android", raising=False)
    module = importlib.import_module("shitu_android")
    yield module
    module.close()
    sys.modules.pop("shitu_android", None)


@pytest.fixture(scope="module")
def frames(test_images) -> list:
    """Four drink photos as upright RGB frames of at most 480 px, as the app's camera would send."""
    out = []
    for path in sorted(test_images)[:4]:
        im = Image.open(path).convert("RGB")
        im.thumbnail((480, 480))
        out.append(np.ascontiguousarray(np.asarray(im)))
    return out


def _records_without_timings(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("timings_ms", "image")}


# ---------------------------------------------------------------------------------------------- the backend


def test_android_backend_gives_the_onnxruntime_backends_results(java, tiny_bundle, tmp_path, frames):
    gallery = tmp_path / "g.db"
    with KioskService.open(tiny_bundle, gallery, options=ServiceOptions(threads=1)) as desktop:
        for i, frame in enumerate(frames[:2]):
            desktop.enrol(frame, f"label{i}")
        expected = [_records_without_timings(desktop.recognize(f)) for f in frames]
    with KioskService.open(tiny_bundle, gallery, options=ServiceOptions(threads=1, backend="android")) as phone:
        got = [_records_without_timings(phone.recognize(f)) for f in frames]
    assert got == expected
    assert any(r["label"] == "label0" for r in got[0]["results"])
    # Every input crossed as one 1-D float32 array and its int64 shape: Chaquopy's one-copy path.
    assert java.stats["calls"] == 2 * len(frames) and java.stats["slow"] == 0
    assert java.stats["fast"] == 2 * java.stats["calls"]


def test_one_file_bundles_cross_as_bytes(java, tiny_bundle, tmp_path, frames):
    esb = tmp_path / "tiny.esb"
    assert main(["bundle", "pack", str(tiny_bundle), "-o", str(esb)]) == 0
    options = EmbedderOptions(backend=BackendOptions(name="android", threads=1))
    with Embedder.from_bundle(esb, options=options) as phone, Embedder.from_bundle(tiny_bundle) as desktop:
        np.testing.assert_array_equal(phone.embed(frames), desktop.embed(frames))


@pytest.mark.paddle
def test_replica_bundle_and_drink_gallery_identical_on_both_backends(java, replica_bundle, drink_dir, test_images,
                                                                      tmp_path):
    labels = (drink_dir / "gallery" / "drink_label.txt").read_text(encoding="utf-8").splitlines()[::25]
    (tmp_path / "labels.txt").write_text("\n".join(labels) + "\n", encoding="utf-8")
    gallery = tmp_path / "drinks.db"
    assert main(["gallery", "build", "--bundle", str(replica_bundle), "--images", str(drink_dir / "gallery"),
                 "--labels", str(tmp_path / "labels.txt"), "--out", str(gallery), "--threads", "1"]) == 0
    photos = [Path(p).read_bytes() for p in sorted(test_images)]
    with KioskService.open(replica_bundle, gallery, options=ServiceOptions(threads=1)) as desktop:
        expected = [_records_without_timings(desktop.recognize(p)) for p in photos]
    with KioskService.open(replica_bundle, gallery, options=ServiceOptions(threads=1, backend="android")) as phone:
        got = [_records_without_timings(phone.recognize(p)) for p in photos]
    assert got == expected
    assert sum(len(r["results"]) for r in got) >= len(photos)
    assert java.stats["slow"] == 0


def test_without_chaquopy_the_backend_says_where_it_runs(tiny_bundle):
    sys.modules.pop("java", None)
    with pytest.raises(BackendUnavailableError, match="only inside a Chaquopy app"):
        Embedder.from_bundle(tiny_bundle, options=EmbedderOptions(backend=BackendOptions(name="android")))


def test_bridge_errors_are_ours(java, tiny_bundle, tmp_path, monkeypatch):
    from edge_shitu.backends.android import AndroidOrtSession

    with pytest.raises(BundleError, match="ONNX Runtime for Android cannot load this model"):
        AndroidOrtSession.from_bytes(b"not a model", where="x.onnx")
    with pytest.raises(InvalidDtypeError):
        AndroidOrtSession.from_bytes(bytearray(b"x"), where="x.onnx")
    session = AndroidOrtSession.from_file(tiny_bundle / "extractor.onnx", threads=1)
    assert session.input_names == ("x",) and session.input_shapes["x"] == (None, 3, 224, 224)
    with pytest.raises(InvalidDtypeError, match="float32"):
        session.run({"x": np.zeros((1, 3, 224, 224))})
    with pytest.raises(InvalidInputError, match="no input"):
        session.run({"y": np.zeros((1, 3, 224, 224), np.float32)})
    with pytest.raises(InvalidInputError, match="no outputs"):
        session.run({"x": np.zeros((1, 3, 224, 224), np.float32)}, ["nope"])
    with pytest.raises(BundleError, match="cannot run this model"):
        session.run({"x": np.zeros((1, 3, 100, 100), np.float32)})
    out, = session.run({"x": np.zeros((2, 3, 224, 224), np.float32)})
    assert out.shape == (2, 512) and out.dtype == np.float32
    session.close()
    session.close()
    with pytest.raises(InvalidInputError, match="closed"):
        session.run({"x": np.zeros((1, 3, 224, 224), np.float32)})
    monkeypatch.delitem(java._CLASSES, "com.edgeshitu.demo.OrtBridge")
    with pytest.raises(BackendUnavailableError, match="OrtBridge"):
        AndroidOrtSession.from_file(tiny_bundle / "extractor.onnx")


def test_android_runs_only_onnx_model_files(java, tiny_bundle):
    # A Paddle-Lite model file (.nb) cannot run in ONNX Runtime, whatever the bridge.
    spec = replace(Bundle.load(tiny_bundle).extractor, backend="paddlelite")
    with pytest.raises(BundleError, match="paddlelite backend, not android"):
        create_session(spec, name="android")


# ---------------------------------------------------------------------------------------------- the contract


def _kotlin(name: str) -> str:
    path = KOTLIN / name
    assert path.is_file(), f"{path} is missing"
    return path.read_text(encoding="utf-8")


def test_the_simulator_has_the_kotlin_bridges_signatures(java):
    source = _kotlin("OrtBridge.kt")
    compact = " ".join(source.split())
    for signature in ("fun fromFile(path: String, threads: Int): OrtBridge",
                      "fun fromBytes(model: ByteArray, threads: Int): OrtBridge",
                      "fun inputNames(): Array<String>", "fun outputNames(): Array<String>",
                      "fun inputShape(name: String): LongArray",
                      "fun run(name: String, data: FloatArray, shape: LongArray): Outputs",
                      "@JvmField val data: Array<FloatArray>", "@JvmField val shapes: Array<LongArray>",
                      "override fun close()"):
        assert signature in compact, signature
    assert compact.count("@JvmStatic") >= 2
    declared = set(re.findall(r"\bfun\s+(\w+)\s*\(", source))
    simulated = {n for n in vars(java.OrtBridge) if not n.startswith("_")}
    assert simulated == declared & simulated and {"fromFile", "fromBytes", "inputNames", "outputNames",
                                                   "inputShape", "run", "close"} <= simulated


def test_every_python_function_the_kotlin_calls_exists(app):
    source = _kotlin("ShituPython.kt")
    # Through its call("name", ...) helper, or callAttr("name", ...) directly.
    called = set(re.findall(r'\b(?:call|callAttr)\(\s*"(\w+)"', source))
    assert {"open", "recognize_rgb", "enrol_rgb", "set_max_distance", "set_min_similarity", "thumbnail"} <= called
    missing = sorted(name for name in called if not callable(getattr(app, name, None)))
    assert missing == []


# ---------------------------------------------------------------------------------------------- the app module


def _rgb(frame: np.ndarray) -> bytes:
    return np.ascontiguousarray(frame).tobytes()


def test_app_flow_enrol_recognise_list_relabel_remove(app, java, tiny_bundle, tmp_path, frames):
    answer = json.loads(app.recognize_rgb(_rgb(frames[0]), frames[0].shape[1], frames[0].shape[0], 0))
    assert answer == {"error": "no bundle is open: import a bundle first"}
    opened = json.loads(app.open(str(tiny_bundle), str(tmp_path / "phone.db"), 1))
    assert opened["items"] == 0 and opened["bits"] == 512 and opened["replica"] is True

    h, w = frames[0].shape[:2]
    added = json.loads(app.enrol_rgb(_rgb(frames[0]), w, h, 0, "红牛", ""))
    assert set(added) == {"id", "label", "box"} and added["label"] == "红牛"
    boxed = json.loads(app.enrol_rgb(_rgb(frames[1]), frames[1].shape[1], frames[1].shape[0], 0, "可乐",
                                     "[10, 20, 200.5, 180]"))
    assert boxed["box"] == [10.0, 20.0, 200.5, 180.0]

    seen = json.loads(app.recognize_rgb(_rgb(frames[0]), w, h, 0))
    assert seen["results"][0]["label"] == "红牛" and seen["results"][0]["distance"] == 0
    # A Java byte[] as Chaquopy hands it over (signed bytes) gives the same answer as Python bytes.
    as_java = java.jarray(java.jbyte)(frames[0].reshape(-1).view(np.int8))
    assert json.loads(app.recognize_rgb(as_java, w, h, 0))["results"] == seen["results"]

    page = json.loads(app.list_items("", 0, 10))
    assert page["total"] == 2 and [i["label"] for i in page["items"]] == ["红牛", "可乐"]
    assert all(i["has_thumbnail"] and i["source"] == "android" for i in page["items"])
    assert json.loads(app.labels()) == {"labels": [{"label": "可乐", "count": 1}, {"label": "红牛", "count": 1}]}
    jpeg = app.thumbnail(added["id"])
    assert isinstance(jpeg, bytes) and jpeg[:3] == b"\xff\xd8\xff"
    assert app.thumbnail(999) is None
    assert json.loads(app.relabel(boxed["id"], "百事")) == {"id": boxed["id"], "label": "百事"}
    assert json.loads(app.remove(boxed["id"])) == {"deleted": 1}
    assert "error" in json.loads(app.remove(boxed["id"]))
    # A gallery the phone creates keeps int8 compact features: accepted by similarity, its own slider.
    settings = json.loads(app.settings())
    assert (settings["mode"], settings["compact"], settings["min_similarity"]) == ("similarity", "int8", 0.5)
    assert json.loads(app.set_min_similarity(0.75))["min_similarity"] == 0.75
    assert json.loads(app.set_max_distance(0))["max_distance"] == 0
    assert json.loads(app.settings())["max_distance"] == 0
    assert json.loads(app.close()) == {"closed": True}

    # The phone's gallery is a desktop gallery: it checks clean and the desktop recogniser finds the item.
    with Gallery.open(tmp_path / "phone.db") as g:
        assert g.check() == [] and len(g) == 1 and g.max_distance == 0 and g.min_similarity == 0.75
    with KioskService.open(tiny_bundle, tmp_path / "phone.db", options=ServiceOptions(threads=1)) as desktop:
        assert desktop.recognize(frames[0])["results"][0]["label"] == "红牛"


def test_rotation_gives_boxes_in_the_upright_frame(app, tiny_bundle, tmp_path, frames):
    json.loads(app.open(str(tiny_bundle), str(tmp_path / "g.db"), 1))
    upright = frames[2]
    h, w = upright.shape[:2]
    direct = json.loads(app.recognize_rgb(_rgb(upright), w, h, 0))
    for rotation, turns in ((90, 1), (180, 2), (270, 3)):
        # The sensor's frame is the upright one turned counter-clockwise; `rotation` turns it back clockwise.
        sensor = np.ascontiguousarray(np.rot90(upright, turns))
        got = json.loads(app.recognize_rgb(_rgb(sensor), sensor.shape[1], sensor.shape[0], rotation))
        assert (got["width"], got["height"]) == (w, h)
        assert got["results"] == direct["results"], rotation


@pytest.mark.parametrize("call, words", [
    (lambda a, f: a.recognize_rgb(b"\x00" * 10, 4, 4, 0), "has 48 bytes"),
    (lambda a, f: a.recognize_rgb(_rgb(f), f.shape[1], f.shape[0], 45), "rotation"),
    (lambda a, f: a.recognize_rgb(_rgb(f), 0, f.shape[0], 0), "width"),
    (lambda a, f: a.recognize_rgb("text", 2, 2, 0), "bytes or a Java byte[]"),
    (lambda a, f: a.recognize_rgb(b"\x00" * 3 * 5000 * 5000, 5000, 5000, 0), "larger than"),
    (lambda a, f: a.enrol_rgb(_rgb(f), f.shape[1], f.shape[0], 0, "a\tb", ""), "label"),
    (lambda a, f: a.enrol_rgb(_rgb(f), f.shape[1], f.shape[0], 0, "x", "[1, 2, 3]"), "box"),
    (lambda a, f: a.enrol_rgb(_rgb(f), f.shape[1], f.shape[0], 0, "x", "{oops"), "JSON list"),
    (lambda a, f: a.enrol_rgb(_rgb(f), f.shape[1], f.shape[0], 0, "x", '["1", 2, 3, 4]'), "four numbers"),
    (lambda a, f: a.remove(-1), "item id"),
    (lambda a, f: a.relabel(12345, "x"), "no gallery item"),
    (lambda a, f: a.list_items("", 0, 0), "limit"),
    (lambda a, f: a.set_max_distance(513), "max_distance"),
    (lambda a, f: a.set_min_similarity(1.5), "min_similarity"),
])
def test_bad_calls_answer_one_line_errors(app, tiny_bundle, tmp_path, frames, call, words):
    json.loads(app.open(str(tiny_bundle), str(tmp_path / "g.db"), 1))
    answer = json.loads(call(app, frames[0]))
    assert set(answer) == {"error"} and words in answer["error"] and "\n" not in answer["error"]


def test_open_refuses_another_models_gallery_and_keeps_the_open_one(app, tiny_bundle, tmp_path, frames):
    assert "error" not in json.loads(app.open(str(tiny_bundle), str(tmp_path / "g.db"), 1))
    other = Gallery.create(tmp_path / "other.db", fingerprint="ab" * 16)
    other.close()
    refused = json.loads(app.open(str(tiny_bundle), str(tmp_path / "other.db"), 1))
    assert "another model" in refused["error"] or "fingerprint" in refused["error"]
    assert "error" not in json.loads(app.settings())
    assert "error" in json.loads(app.open(str(tmp_path / "missing.esb"), str(tmp_path / "g.db"), 1))
    assert "threads" in json.loads(app.open(str(tiny_bundle), str(tmp_path / "g.db"), -1))["error"]


def test_a_desktop_built_gallery_opens_on_the_phone(app, tiny_bundle, drink_dir, tmp_path):
    labels = (drink_dir / "gallery" / "drink_label.txt").read_text(encoding="utf-8").splitlines()[::100]
    (tmp_path / "labels.txt").write_text("\n".join(labels) + "\n", encoding="utf-8")
    assert main(["gallery", "build", "--bundle", str(tiny_bundle), "--images", str(drink_dir / "gallery"),
                 "--labels", str(tmp_path / "labels.txt"), "--out", str(tmp_path / "desk.db"), "--thumbnails"]) == 0
    opened = json.loads(app.open(str(tiny_bundle), str(tmp_path / "desk.db"), 1))
    assert opened["items"] == len(labels)
    first = json.loads(app.list_items("", 0, 1))["items"][0]
    assert app.thumbnail(first["id"])[:3] == b"\xff\xd8\xff"


# ---------------------------------------------------------------------------------------------- the wheel


@pytest.mark.slow
def test_the_wheel_is_pure_python_and_runs_with_only_numpy_and_pillow(tmp_path, tiny_bundle):
    wheel = build_wheel(tmp_path)
    assert wheel.name.endswith("-py3-none-any.whl")
    env = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    py = env / "bin" / "python"
    numpy_pin = f"numpy=={np.__version__}"
    import PIL

    subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", numpy_pin,
                    f"pillow=={PIL.__version__}"], check=True, capture_output=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", str(wheel)],
                   check=True, capture_output=True)
    probe = (
        "import json, sys, importlib.metadata as m\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "import numpy, PIL, shitu_android\n"
        "from edge_shitu.gallery import Gallery\n"
        "from edge_shitu.codes import binarize\n"
        "dists = sorted(d.metadata['Name'].lower() for d in m.distributions())\n"
        "g = Gallery.create(':memory:', fingerprint='ab' * 16)\n"
        "g.add(binarize(numpy.random.default_rng(0).normal(size=(3, 512))), ['a', 'b', 'c'])\n"
        "hit = g.search(g.codes()[1][1:2], k=1)\n"
        "answer = json.loads(shitu_android.open(sys.argv[2], sys.argv[3], 1))\n"
        "print(json.dumps({'dists': dists, 'hit': int(hit.ids[0, 0]), 'open': answer}))\n"
    )
    out = subprocess.run([str(py), "-c", probe, str(APP_PYTHON), str(tiny_bundle), str(tmp_path / "g.db")],
                         check=True, capture_output=True, text=True).stdout
    result = json.loads(out)
    assert set(result["dists"]) - {"pip", "setuptools"} == {"edge-shitu", "numpy", "pillow"}
    assert result["hit"] == 1
    # Off the phone there is no Java bridge: the app's open() says so in one line instead of failing obscurely.
    assert "only inside a Chaquopy app" in result["open"]["error"]
