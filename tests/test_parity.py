"""The key conversion test: on a replica and the real drink photos, our ONNX heads + numpy decode/NMS give
the same boxes as Paddle Inference running the official full graph (decode + multiclass_nms3 in-graph) on
the same input tensor. Also: extractor features and codes agree with Paddle Inference."""

from __future__ import annotations

import numpy as np
import pytest

from edge_shitu.codes import binarize
from edge_shitu.detector import Detector
from edge_shitu.embedder import Embedder
from edge_shitu.image import crop, load_image
from edge_shitu.options import DetectorOptions

pytestmark = pytest.mark.paddle


@pytest.fixture(scope="module")
def paddle_det(replica_dirs):
    from edge_shitu_converters.paddle_reference import PaddleDetectorReference

    return PaddleDetectorReference(replica_dirs["detector"], threads=2)


@pytest.fixture(scope="module")
def paddle_rec(replica_dirs):
    from edge_shitu_converters.paddle_reference import PaddleExtractorReference

    return PaddleExtractorReference(replica_dirs["extractor"], threads=2)


def _reference_filter(rows: np.ndarray, top: int = 5, threshold: float = 0.2) -> np.ndarray:
    """PaddleClas parse_det_results: sort by score, keep the first 5, drop those under 0.2."""
    rows = rows[np.argsort(-rows[:, 1], kind="stable")][:top]
    return rows[rows[:, 1] >= threshold]


def _match(ours: np.ndarray, ref: np.ndarray, ours_scores: np.ndarray) -> None:
    assert len(ours) == len(ref), f"count differs: ours {len(ours)}, Paddle {len(ref)}"
    np.testing.assert_allclose(ours_scores, ref[:, 1], atol=1e-4)
    np.testing.assert_allclose(ours, ref[:, 2:], atol=0.5)


def test_detector_matches_official_graph_on_drink_photos(replica_bundle, paddle_det, test_images):
    det = Detector.from_bundle(replica_bundle)
    full = Detector.from_bundle(replica_bundle, options=DetectorOptions(max_detections=100, min_score=0.0))
    counts = []
    for path in test_images:
        img = load_image(path)
        h, w = img.shape[:2]
        tensor, scale = det.preprocess(img)
        raw = det.infer(tensor)
        ref = paddle_det.run(tensor, np.array([[640, 640]], np.float32), np.array([[640 / h, 640 / w]], np.float32))

        # Everything the in-graph NMS keeps (up to 100 boxes at score > 0.025) ...
        everything = full.postprocess(raw, image_size=(w, h), scale=scale)
        _match(np.array([d.box for d in everything]).reshape(-1, 4), ref, np.array([d.score for d in everything]))
        # ... and what the pipeline uses: PaddleClas's top 5 with score >= 0.2.
        picked = det.postprocess(raw, image_size=(w, h), scale=scale)
        top = _reference_filter(ref)
        _match(np.array([d.box for d in picked]).reshape(-1, 4), top, np.array([d.score for d in picked]))
        counts.append(len(picked))
    # The replica must exercise the real code paths: a handful of boxes on most photos.
    assert sum(c >= 1 for c in counts) >= len(test_images) - 2, counts


def test_extractor_features_and_codes_match_paddle(replica_bundle, paddle_rec, test_images):
    emb = Embedder.from_bundle(replica_bundle)
    crops = []
    for path in test_images[:6]:
        img = load_image(path)
        h, w = img.shape[:2]
        crops += [img, crop(img, (w * 0.2, h * 0.1, w * 0.7, h * 0.9))]
    batch = emb.preprocess(crops)
    ours = emb.infer(batch)
    ref = paddle_rec.run(batch)
    assert np.abs(ours - ref).max() < 1e-3 * max(1.0, np.abs(ref).max())
    a, b = binarize(ours), binarize(ref)
    agree = 1 - np.unpackbits(a ^ b).mean()
    assert agree >= 0.999, agree
