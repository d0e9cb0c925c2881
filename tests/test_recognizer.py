"""Pipeline logic with deterministic fake sessions: batching, whole-image policy, acceptance, ranking, NMS."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import FakeDetectorSession, FakeExtractorSession
from edge_shitu.bundle import Bundle
from edge_shitu.detector import Detector
from edge_shitu.embedder import Embedder
from edge_shitu.errors import FingerprintMismatchError, InvalidInputError
from edge_shitu.gallery import Gallery
from edge_shitu.image import crop
from edge_shitu.options import DetectorOptions, RecognizerOptions
from edge_shitu.recognizer import STAGES, Recognizer
from edge_shitu.types import WholeImagePolicy

BOX_A = (96.0, 96.0, 176.0, 160.0)
BOX_B = (400.0, 300.0, 480.0, 380.0)


@pytest.fixture
def image():
    rng = np.random.default_rng(7)
    img = rng.integers(0, 255, size=(640, 640, 3), dtype=np.uint8)
    img[96:160, 96:176] = (200, 30, 30)
    img[300:380, 400:480] = (20, 30, 220)
    return img


def _pipeline(bundle_dir, boxes_scores, gallery=None, **opts):
    bundle = Bundle.load(bundle_dir)
    det = Detector.from_bundle(bundle, session=FakeDetectorSession(boxes_scores))
    ext_session = FakeExtractorSession()
    emb = Embedder.from_bundle(bundle, session=ext_session)
    if gallery is None:
        gallery = Gallery.create(":memory:", fingerprint=bundle.code_fingerprint)
    rec = Recognizer(bundle, det, emb, gallery, RecognizerOptions(**opts))
    return rec, ext_session


def test_detector_decodes_fake_heads_exactly(fake_bundle, image):
    det = Detector.from_bundle(fake_bundle, session=FakeDetectorSession([(BOX_A, 0.9), (BOX_B, 0.5)]))
    found = det.detect(image)
    assert [d.score for d in found] == pytest.approx([0.9, 0.5])
    np.testing.assert_allclose([d.box for d in found], [BOX_A, BOX_B], atol=1e-3)


def test_detector_min_score_and_max_detections(fake_bundle, image):
    boxes = [((8.0 + 80 * i, 8.0, 72.0 + 80 * i, 72.0), 0.9 - 0.1 * i) for i in range(7)]
    det = Detector.from_bundle(fake_bundle, session=FakeDetectorSession(boxes))
    assert len(det.detect(image)) == 5  # reference: top 5 ...
    det = Detector.from_bundle(fake_bundle, session=FakeDetectorSession(boxes),
                               options=DetectorOptions(min_score=0.55))
    assert [round(d.score, 2) for d in det.detect(image)] == [0.9, 0.8, 0.7, 0.6]  # ... with score >= threshold


def test_recognises_enrolled_crops_with_one_batched_call(fake_bundle, image):
    rec, ext = _pipeline(fake_bundle, [(BOX_A, 0.9), (BOX_B, 0.8)])
    codes = rec.embedder.embed([crop(image, BOX_A), crop(image, BOX_B)])
    rec.gallery.add(codes, ["red", "blue"])
    ext.batches.clear()
    res = rec.recognize(image)
    assert ext.batches == [2], "all crops of an image go through the extractor in one call"
    assert sorted(r.label for r in res.recognitions) == ["blue", "red"]
    assert all(r.distance == 0 and r.similarity == 1.0 for r in res.recognitions)
    assert set(res.timings_ms) == set(STAGES) and res.timings_ms["total"] > 0
    assert (res.width, res.height) == (640, 640)


def test_whole_image_policies(fake_bundle, image):
    for policy, boxes, expect_whole in [
        (WholeImagePolicy.IF_NONE, [], True),
        (WholeImagePolicy.IF_NONE, [(BOX_A, 0.9)], False),
        (WholeImagePolicy.ALWAYS, [(BOX_A, 0.9)], True),
        (WholeImagePolicy.NEVER, [], False),
    ]:
        rec, ext = _pipeline(fake_bundle, boxes, whole_image=policy, max_distance=512)
        rec.gallery.add(rec.embedder.embed([image]), ["scene"])
        ext.batches.clear()
        res = rec.recognize(image)
        assert any(r.whole_image for r in res.recognitions) == expect_whole, policy
        if policy is WholeImagePolicy.NEVER:
            assert res.recognitions == () and ext.batches == []


def test_unknown_regions_are_rejected_or_reported(fake_bundle, image):
    rec, _ = _pipeline(fake_bundle, [(BOX_A, 0.9)], max_distance=0)
    far = np.bitwise_not(rec.embedder.embed([crop(image, BOX_A)]))  # every bit differs: distance 512
    rec.gallery.add(far, ["opposite"])
    assert rec.recognize(image).recognitions == ()
    rec, _ = _pipeline(fake_bundle, [(BOX_A, 0.9)], max_distance=0, include_unknown=True)
    rec.gallery.add(far, ["opposite"])
    (only,) = rec.recognize(image).recognitions
    assert only.label is None and only.distance == 512 and only.similarity == 0.0
    assert only.candidates[0].label == "opposite"


def test_empty_gallery(fake_bundle, image):
    rec, _ = _pipeline(fake_bundle, [(BOX_A, 0.9)])
    assert rec.recognize(image).recognitions == ()
    rec, _ = _pipeline(fake_bundle, [(BOX_A, 0.9)], include_unknown=True)
    (only,) = rec.recognize(image).recognitions
    assert only.label is None and only.distance is None and only.candidates == ()


def test_final_nms_ranks_by_smallest_distance(fake_bundle, image):
    # Two overlapping detections: the lower-scored one matches exactly, the other one does not.
    inner = (104.0, 104.0, 168.0, 152.0)
    rec, _ = _pipeline(fake_bundle, [(BOX_A, 0.95), (inner, 0.5)], max_distance=512)
    code_a = rec.embedder.embed([crop(image, BOX_A)])
    code_inner = rec.embedder.embed([crop(image, inner)])
    flipped = code_a.copy()
    flipped[0, :4] ^= 0xFF  # 32 bits away from BOX_A's own code
    rec.gallery.add(np.concatenate([flipped, code_inner]), ["near", "exact"])
    (winner,) = rec.recognize(image).recognitions
    # The reference ranks Hamming results by raw score descending, i.e. the worst match first.
    assert winner.label == "exact" and winner.distance == 0
    np.testing.assert_allclose(winner.box, inner, atol=1e-3)


def test_max_distance_resolution(fake_bundle, image):
    rec, _ = _pipeline(fake_bundle, [])
    assert rec.max_distance == 100  # bundle default (the reference's hamming_radius)
    rec.gallery.set_max_distance(77)
    assert rec.max_distance == 77  # calibrated value stored in the gallery
    rec, _ = _pipeline(fake_bundle, [], max_distance=12)
    rec.gallery.set_max_distance(77)
    assert rec.max_distance == 12  # explicit option wins


def test_detector_threshold_resolution_and_effect(fake_bundle, image):
    boxes = [(BOX_A, 0.9), (BOX_B, 0.5)]
    rec, _ = _pipeline(fake_bundle, boxes, include_unknown=True, whole_image=WholeImagePolicy.NEVER)
    assert rec.det_threshold == pytest.approx(0.2)  # bundle default (the reference's threshold)
    assert len(rec.recognize(image).recognitions) == 2
    rec.gallery.set_det_threshold(0.7)  # stored with the gallery (the kiosk's setting)
    assert rec.det_threshold == pytest.approx(0.7)
    assert [r.detection_score for r in rec.recognize(image).recognitions] == pytest.approx([0.9])
    rec.gallery.set_det_threshold(None)
    assert len(rec.recognize(image).recognitions) == 2
    rec, _ = _pipeline(fake_bundle, boxes, include_unknown=True, whole_image=WholeImagePolicy.NEVER,
                       detector=DetectorOptions(min_score=0.95))
    rec.gallery.set_det_threshold(0.1)
    assert rec.det_threshold == pytest.approx(0.95)  # explicit option wins
    assert rec.recognize(image).recognitions == ()


def test_detector_postprocess_threshold_override_is_checked(fake_bundle, image):
    det = Detector.from_bundle(fake_bundle, session=FakeDetectorSession([(BOX_A, 0.9), (BOX_B, 0.5)]))
    tensor, scale = det.preprocess(image)
    raw = det.infer(tensor)
    assert len(det.postprocess(raw, image_size=(640, 640), scale=scale, min_score=0.6)) == 1
    assert len(det.postprocess(raw, image_size=(640, 640), scale=scale, min_score=0.0)) == 2
    for bad in (-0.1, 1.5, float("nan"), True, "0.5"):
        with pytest.raises(InvalidInputError, match="min_score"):
            det.postprocess(raw, image_size=(640, 640), scale=scale, min_score=bad)


def test_gallery_of_another_model_is_refused(fake_bundle):
    bundle = Bundle.load(fake_bundle)
    other = Gallery.create(":memory:", fingerprint="f" * 32)
    det = Detector.from_bundle(bundle, session=FakeDetectorSession([]))
    emb = Embedder.from_bundle(bundle, session=FakeExtractorSession())
    with pytest.raises(FingerprintMismatchError, match="rebuild the gallery"):
        Recognizer(bundle, det, emb, other, RecognizerOptions())


def test_embedder_chunks_large_batches(fake_bundle, image):
    from edge_shitu.options import EmbedderOptions

    ext = FakeExtractorSession()
    emb = Embedder.from_bundle(fake_bundle, session=ext, options=EmbedderOptions(max_batch=4))
    feats = emb.features([image[i * 10:(i + 1) * 10 + 50] for i in range(10)])
    assert ext.batches == [4, 4, 2]
    assert feats.shape == (10, 512) and feats.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, rtol=1e-5)
    assert emb.features([]).shape == (0, 512)


def test_search_backend_option_is_checked():
    assert RecognizerOptions(search_backend="numpy").search_backend == "numpy"
    with pytest.raises(ValueError, match="search_backend must be one of auto, numpy, faiss"):
        RecognizerOptions(search_backend="annoy")
