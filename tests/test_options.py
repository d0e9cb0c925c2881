"""Option dataclasses check types and ranges in one place; thread counts are checked against the machine."""

from __future__ import annotations

import math
import os

import pytest

from edge_shitu.errors import InvalidInputError
from edge_shitu.options import (
    MAX_BATCH,
    MAX_CANDIDATES,
    MAX_DETECTIONS,
    MAX_TOP_K,
    BackendOptions,
    DetectorOptions,
    EmbedderOptions,
    RecognizerOptions,
    check_threads,
)

CPUS = os.cpu_count() or 1


@pytest.mark.parametrize("threads", [0, -1, CPUS + 1, 100_000, True, 1.5, "2", float("nan")])
def test_thread_counts_outside_the_machine_are_refused(threads):
    with pytest.raises(InvalidInputError) as info:
        BackendOptions(threads=threads)
    assert str(info.value) == (f"threads must be a positive int from 1 to {CPUS} (this machine has {CPUS} CPU cores), "
                               f"got {threads!r}")


def test_thread_counts_up_to_the_core_count_are_kept():
    assert BackendOptions(threads=1).threads == 1
    assert BackendOptions(threads=CPUS).threads == CPUS
    assert BackendOptions().threads is None
    assert check_threads(CPUS) == CPUS


def test_thread_limit_follows_the_machine(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert BackendOptions(threads=4).threads == 4
    with pytest.raises(InvalidInputError, match=r"^--threads must be a positive int from 1 to 4 \(this machine has 4 "):
        check_threads(5, name="--threads")
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    with pytest.raises(InvalidInputError, match="from 1 to 1"):
        check_threads(2)


def test_every_backend_checks_threads_before_loading(tmp_path, fake_bundle):
    from edge_shitu.backends import create_session
    from edge_shitu.backends.onnxruntime import OnnxRuntimeSession
    from edge_shitu.backends.paddlelite import PaddleLiteSession
    from edge_shitu.bundle import Bundle

    # One too many, not 100 000: should the check ever go, this test must not spawn the threads it guards against.
    missing = tmp_path / "no-such-model"
    with pytest.raises(InvalidInputError, match="threads must be a positive int"):
        OnnxRuntimeSession.from_file(missing, threads=CPUS + 1)
    with pytest.raises(InvalidInputError, match="threads must be a positive int"):
        PaddleLiteSession.from_file(missing, target="x86", threads=CPUS + 1)
    with pytest.raises(InvalidInputError, match="threads must be a positive int"):
        create_session(Bundle.load(fake_bundle).extractor, threads=CPUS + 1)


@pytest.mark.parametrize("kwargs, message", [
    ({"min_score": "high"}, r"min_score must be a number in \[0, 1\], got 'high'"),
    ({"nms_iou": math.nan}, r"nms_iou must be a number in \[0, 1\]"),
    ({"nms_top_k": MAX_CANDIDATES + 1}, f"nms_top_k must be a positive integer at most {MAX_CANDIDATES}"),
    ({"keep_top_k": 0}, "keep_top_k must be a positive integer"),
    ({"max_detections": MAX_DETECTIONS + 1}, f"max_detections must be a positive integer at most {MAX_DETECTIONS}"),
    ({"max_detections": 5.0}, "max_detections must be a positive integer"),
    ({"clip": "yes"}, "clip must be true or false"),
    ({"backend": {"threads": 1}}, "backend must be BackendOptions, got dict"),
])
def test_detector_options_check_types_and_ranges(kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        DetectorOptions(**kwargs)


def test_detector_options_from_mapping():
    assert DetectorOptions.from_mapping({"min_score": 0.5}, max_detections=3) == DetectorOptions(min_score=0.5,
                                                                                                 max_detections=3)
    with pytest.raises(InvalidInputError, match="unknown detector option"):
        DetectorOptions.from_mapping({"colour": 1})
    with pytest.raises(InvalidInputError, match="must be a mapping"):
        DetectorOptions.from_mapping([("min_score", 0.5)])
    with pytest.raises(InvalidInputError, match="score_threshold must have a value, got None"):
        DetectorOptions.from_mapping({"score_threshold": None})


def test_user_options_override_bundle_defaults_field_by_field():
    defaults = {"score_threshold": 0.1, "nms_iou": 0.5, "nms_top_k": 50, "keep_top_k": 20, "max_detections": 7,
                "min_score": 0.3}
    mine = DetectorOptions(min_score=0.6).with_defaults(defaults)
    assert mine == DetectorOptions(score_threshold=0.1, nms_iou=0.5, nms_top_k=50, keep_top_k=20, max_detections=7,
                                   min_score=0.6)
    # What the bundle leaves out is the reference pipeline's.
    assert DetectorOptions().with_defaults({"min_score": 0.4}) == DetectorOptions(
        score_threshold=0.025, nms_iou=0.6, nms_top_k=1000, keep_top_k=100, max_detections=5, min_score=0.4)
    rec = RecognizerOptions(top_k=2, detector=DetectorOptions(max_detections=1)).with_defaults(
        {"top_k": 9, "whole_image": "always", "final_nms_iou": 0.2}, defaults)
    assert (rec.top_k, rec.whole_image.value, rec.final_nms_iou, rec.max_distance) == (2, "always", 0.2, None)
    assert rec.detector.max_detections == 1 and rec.detector.min_score == 0.3 and rec.detector.nms_top_k == 50
    assert RecognizerOptions().with_defaults({"top_k": 9}, None).detector is None


def test_recognizer_and_cli_merge_the_same_way(fake_bundle, monkeypatch, tmp_path):
    """Options given through the API or the CLI override the bundle's defaults field by field."""
    import io
    import json

    from conftest import FakeDetectorSession, FakeExtractorSession
    from edge_shitu.cli import main
    from edge_shitu.gallery import Gallery
    from edge_shitu.recognizer import Recognizer

    manifest = json.loads((fake_bundle / "manifest.json").read_text())
    manifest["recognition"].update(top_k=3, whole_image="always", final_nms_iou=0.3)
    manifest["models"]["detector"]["defaults"].update(max_detections=4, min_score=0.35)
    (fake_bundle / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr("edge_shitu.embedder.create_session", lambda spec, **kw: FakeExtractorSession())
    monkeypatch.setattr("edge_shitu.detector.create_session", lambda spec, **kw: FakeDetectorSession([]))
    db = tmp_path / "g.db"
    from edge_shitu.bundle import Bundle

    Gallery.create(db, fingerprint=Bundle.load(fake_bundle).code_fingerprint).close()
    with Recognizer.from_bundle(fake_bundle, db, options=RecognizerOptions(top_k=1)) as rec:
        assert (rec.options.top_k, rec.options.whole_image.value, rec.options.final_nms_iou) == (1, "always", 0.3)
        assert (rec.detector.options.max_detections, rec.detector.options.min_score) == (4, 0.35)
    seen = {}
    real = Recognizer.from_bundle.__func__

    def spy(cls, bundle, gallery, *, options=None):
        made = real(cls, bundle, gallery, options=options)
        seen["options"], seen["detector"] = made.options, made.detector.options
        return made

    monkeypatch.setattr(Recognizer, "from_bundle", classmethod(spy))
    image = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (64, 64)).save(image)
    code = main(["recognize", "--bundle", str(fake_bundle), "--gallery", str(db), "--top-k", "2", str(image)],
                stdout=io.StringIO(), stderr=io.StringIO())
    assert code == 0
    assert (seen["options"].top_k, seen["options"].whole_image.value, seen["options"].final_nms_iou) == (2, "always", 0.3)
    assert (seen["detector"].max_detections, seen["detector"].min_score) == (4, 0.35)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_batch": MAX_BATCH + 1}, f"max_batch must be a positive integer at most {MAX_BATCH}"),
    ({"epsilon": "tiny"}, "epsilon must be a finite number"),
    ({"epsilon": math.inf}, "epsilon must be a finite number"),
    ({"epsilon": 0.0}, "epsilon must be > 0"),
    ({"backend": None}, "backend must be BackendOptions, got NoneType"),
])
def test_embedder_options_check_types_and_ranges(kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        EmbedderOptions(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"top_k": MAX_TOP_K + 1}, f"top_k must be a positive integer at most {MAX_TOP_K}"),
    ({"final_nms_iou": "0.5"}, r"final_nms_iou must be a number in \[0, 1\]"),
    ({"max_distance": -1}, "max_distance must be a non-negative integer"),
    ({"whole_image": ["always"]}, "whole_image must be one of"),
    ({"include_unknown": 1}, "include_unknown must be true or false"),
    ({"embedder": None}, "embedder must be EmbedderOptions, got NoneType"),
    ({"detector": {}}, "detector must be DetectorOptions or None, got dict"),
])
def test_recognizer_options_check_types_and_ranges(kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        RecognizerOptions(**kwargs)
