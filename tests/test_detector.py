"""PicoDet decode + NMS: oracle tests against a slow transcription of the reference maths, and parity of
our ONNX heads + numpy post-process with Paddle Inference running the official full graph."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edge_shitu.boxes import nms
from edge_shitu.bundle import HeadsSpec
from edge_shitu.detector import decode_picodet
from edge_shitu.options import DetectorOptions

HEADS = HeadsSpec(scores=("s8", "s16", "s32", "s64"), boxes=("b8", "b16", "b32", "b64"),
                  strides=(8, 16, 32, 64), reg_max=7, cell_offset=0.5, num_classes=1)


def _slow_iou(a, b):
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    area = lambda r: max(r[2] - r[0], 0) * max(r[3] - r[1], 0)
    return inter / (area(a) + area(b) - inter)


def _slow_decode(scores, logits, in_size, scale, opt):
    """Per-anchor loops straight from the reference's decode and the in-graph program (clip to input, / scale)."""
    in_w, in_h = in_size
    sx, sy = scale
    cands = []
    for level, s in enumerate(HEADS.strides):
        fw = math.ceil(in_w / s)
        sc = scores[level].reshape(-1)
        lg = logits[level].reshape(-1, 4, 8)
        anchors = sorted(range(sc.size), key=lambda i: -sc[i])[: opt.nms_top_k]
        for i in sorted(anchors):
            if not sc[i] > opt.score_threshold:
                continue
            cx, cy = (i % fw + 0.5) * s, (i // fw + 0.5) * s
            d = []
            for side in range(4):
                e = [math.exp(v - max(lg[i, side])) for v in lg[i, side]]
                d.append(sum(k * ek for k, ek in enumerate(e)) / sum(e) * s)
            box = [cx - d[0], cy - d[1], cx + d[2], cy + d[3]]
            box = [min(max(box[0], 0), in_w), min(max(box[1], 0), in_h), min(max(box[2], 0), in_w), min(max(box[3], 0), in_h)]
            cands.append(([box[0] / sx, box[1] / sy, box[2] / sx, box[3] / sy], float(sc[i])))
    cands.sort(key=lambda c: -c[1])
    cands = cands[: opt.nms_top_k]
    kept = []
    for box, score in cands:
        if all(_slow_iou(box, k[0]) <= opt.nms_iou for k in kept):
            kept.append((box, score))
    return kept[: opt.keep_top_k]


def _random_heads(rng, in_size=(640, 640), bias=-3.0):
    scores, logits = [], []
    for s in HEADS.strides:
        fh, fw = math.ceil(in_size[1] / s), math.ceil(in_size[0] / s)
        scores.append((1 / (1 + np.exp(-(rng.normal(size=(1, fh, fw, 1)) * 1.5 + bias)))).astype(np.float32))
        logits.append(rng.normal(scale=2.0, size=(1, fh, fw, 32)).astype(np.float32))
    return scores, logits


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("scale", [(1.0, 1.0), (640 / 1200, 640 / 802), (640 / 333, 640 / 4000)])
def test_decode_matches_slow_oracle(seed, scale):
    rng = np.random.default_rng(seed)
    scores, logits = _random_heads(rng)
    opt = DetectorOptions(nms_top_k=300, keep_top_k=40).with_defaults({})  # the oracle reads every field
    boxes, sc, cls = decode_picodet(scores, logits, HEADS, input_size=(640, 640), scale=scale, options=opt)
    slow = _slow_decode(scores, logits, (640, 640), scale, opt)
    assert len(slow) > 5, "oracle case must exercise NMS on several boxes"
    assert boxes.shape == (len(slow), 4)
    np.testing.assert_allclose(boxes, np.array([b for b, _ in slow]), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(sc, np.array([s for _, s in slow]), rtol=1e-6)
    assert (cls == 0).all()


def test_decode_of_tied_scores_matches_slow_oracle():
    # Quantised (INT8) heads give many equal scores: candidates keep their (level, anchor) order
    # through the stable sort, and only levels with more passing anchors than nms_top_k are cut.
    rng = np.random.default_rng(7)
    scores, logits = _random_heads(rng, bias=-5.0)
    scores = [np.round(s * 16) / 16 for s in scores]
    opt = DetectorOptions(nms_top_k=1000, keep_top_k=60).with_defaults({})
    passing = [int((s > opt.score_threshold).sum()) for s in scores]
    assert passing[0] < opt.nms_top_k < sum(passing), passing
    boxes, sc, _ = decode_picodet(scores, logits, HEADS, input_size=(640, 640), scale=(0.5, 0.7), options=opt)
    slow = _slow_decode(scores, logits, (640, 640), (0.5, 0.7), opt)
    assert len(np.unique(sc)) < len(sc) and len(slow) > 5
    np.testing.assert_allclose(boxes, np.array([b for b, _ in slow]), rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(sc, np.array([s for _, s in slow], dtype=np.float32))


def test_decode_accepts_flat_head_layout():
    rng = np.random.default_rng(5)
    scores, logits = _random_heads(rng)
    flat_s = [s.reshape(1, -1, 1) for s in scores]
    flat_l = [l.reshape(1, -1, 32) for l in logits]
    opt = DetectorOptions()
    a = decode_picodet(scores, logits, HEADS, input_size=(640, 640), scale=(1, 1), options=opt)
    b = decode_picodet(flat_s, flat_l, HEADS, input_size=(640, 640), scale=(1, 1), options=opt)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_decode_nothing_above_threshold_gives_empty():
    rng = np.random.default_rng(0)
    scores, logits = _random_heads(rng, bias=-30.0)
    boxes, sc, cls = decode_picodet(scores, logits, HEADS, input_size=(640, 640), scale=(1, 1), options=DetectorOptions())
    assert boxes.shape == (0, 4) and sc.shape == (0,) and cls.shape == (0,)


def test_decode_rejects_outputs_of_wrong_size():
    from edge_shitu.errors import BundleError

    rng = np.random.default_rng(0)
    scores, logits = _random_heads(rng, in_size=(320, 320))
    with pytest.raises(BundleError, match="stride 8"):
        decode_picodet(scores, logits, HEADS, input_size=(640, 640), scale=(1, 1), options=DetectorOptions())


def test_nms_matches_slow_greedy(rng):
    xy = rng.uniform(0, 100, size=(200, 2))
    wh = rng.uniform(5, 40, size=(200, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    scores = rng.uniform(size=200)
    order = np.argsort(-scores, kind="stable")
    for thr in (0.0, 0.05, 0.3, 0.6, 1.0):
        kept = []
        for i in order:
            if all(_slow_iou(boxes[i], boxes[j]) <= thr for j in kept):
                kept.append(int(i))
        assert nms(boxes, order, thr).tolist() == kept


def test_nms_edge_cases():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 20, 30]], dtype=float)
    assert nms(boxes, np.array([], dtype=np.int64), 0.5).tolist() == []
    assert nms(boxes, np.array([1, 0, 2]), 0.5).tolist() == [1, 2]  # identical box suppressed, order kept
    assert nms(boxes, np.array([0, 1, 2]), 0.5, max_keep=1).tolist() == [0]


@pytest.mark.parametrize("seed", [0, 3])
def test_pruned_decode_equals_full_decode_then_cut(seed):
    rng = np.random.default_rng(seed)
    scores, logits = _random_heads(rng, bias=-1.0)
    opt = DetectorOptions().with_defaults({})
    full = decode_picodet(scores, logits, HEADS, input_size=(640, 640), scale=(0.5, 0.7), options=opt)
    for min_score, max_keep in [(0.2, 5), (0.5, 3), (0.0, 100), (0.9, 1)]:
        keep = full[1] >= min_score
        want = [a[keep][:max_keep] for a in full]
        got = decode_picodet(scores, logits, HEADS, input_size=(640, 640), scale=(0.5, 0.7), options=opt,
                             min_score=min_score, max_keep=max_keep)
        assert len(want[0]) > 0
        for w, g in zip(want, got):
            np.testing.assert_array_equal(w, g)
