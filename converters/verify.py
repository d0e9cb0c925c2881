"""Proof that a converted bundle still agrees with its source: ``convert --verify``.

The source models run in Paddle Inference (the official programs, the detector with its in-graph decode
and ``multiclass_nms3``); the bundle's models run in the runtime exactly as users run them (same
pre-processing, same session backend, same numpy decode). Both see the same pre-processed real photos.

Figures (written to ``verify.json`` in the bundle):

- extractor, on every photo whole plus the reference detector's crops: max abs diff of the raw
  features, mean and min cosine of the L2-normalised features, mean and min share of equal code bits;
- detector: the share of boxes (of either side) that have a partner on the other side with IoU >= 0.9
  (one-to-one, greedy by IoU), over the boxes the pipeline uses (the top 5 with score >= 0.2), and the
  largest score difference between partners.

Thresholds are per precision (:data:`THRESHOLDS`). fp32 conversion is exact up to float rounding, so its
thresholds are tight; INT8 changes every activation by up to a quantisation step, so its thresholds are
what a careful INT8 conversion of these architectures reaches on real photos (see the README table). On a
replica the figures measure conversion fidelity, not recognition accuracy.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from edge_shitu.bundle import VERIFY_NAME, Bundle
from edge_shitu.codes import binarize, l2_normalize
from edge_shitu.errors import InvalidInputError
from edge_shitu.image import crop, load_image

__all__ = ["VerifyThresholds", "THRESHOLDS", "VERIFY_FILE", "VERIFY_THREADS", "PaddleReferences", "verify_bundle",
           "write_unverifiable"]

_LOG = logging.getLogger(__name__)

VERIFY_FILE = VERIFY_NAME


@dataclass(frozen=True)
class VerifyThresholds:
    """Least agreement a converted bundle must reach.

    Attributes:
      extractor_min_cosine: smallest cosine between source and converted L2-normalised features.
      extractor_mean_bit_agreement: mean share of equal code bits.
      extractor_min_bit_agreement: smallest per-crop share of equal code bits.
      detector_match_rate: share of boxes with an IoU >= 0.9 partner.
      detector_max_score_diff: largest score difference between partners.
    """

    extractor_min_cosine: float
    extractor_mean_bit_agreement: float
    extractor_min_bit_agreement: float
    detector_match_rate: float
    detector_max_score_diff: float


THRESHOLDS: Dict[str, VerifyThresholds] = {
    "fp32": VerifyThresholds(extractor_min_cosine=0.9999, extractor_mean_bit_agreement=0.999,
                             extractor_min_bit_agreement=0.99, detector_match_rate=1.0,
                             detector_max_score_diff=1e-3),
    "int8": VerifyThresholds(extractor_min_cosine=0.95, extractor_mean_bit_agreement=0.95,
                             extractor_min_bit_agreement=0.85, detector_match_rate=0.8,
                             detector_max_score_diff=0.1),
}

MATCH_IOU = 0.9


def _iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ix = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = ix * iy
    area = lambda r: (r[:, 2] - r[:, 0]) * (r[:, 3] - r[:, 1])
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def match_boxes(ref: np.ndarray, ours: np.ndarray, *, iou: float = MATCH_IOU) -> List[tuple]:
    """One-to-one partners, greedy by IoU. Returns ``(ref_index, our_index, iou)`` tuples."""
    if len(ref) == 0 or len(ours) == 0:
        return []
    m = _iou_matrix(ref, ours)
    pairs = []
    while True:
        i, j = np.unravel_index(np.argmax(m), m.shape)
        if m[i, j] < iou:
            return pairs
        pairs.append((int(i), int(j), float(m[i, j])))
        m[i, :] = -1
        m[:, j] = -1


def _reference_top(rows: np.ndarray, top: int, min_score: float) -> np.ndarray:
    """PaddleClas parse_det_results: by score, the first ``top``, then drop those under ``min_score``."""
    rows = rows[np.argsort(-rows[:, 1], kind="stable")][:top]
    return rows[rows[:, 1] >= min_score]


def _images(images_dir: Path, limit: int) -> List[Path]:
    if not images_dir.is_dir():
        raise InvalidInputError(f"{images_dir}: verification image folder not found")
    paths = sorted(p for p in images_dir.rglob("*") if p.is_file() and p.suffix.lower() in
                   (".jpg", ".jpeg", ".png", ".webp", ".bmp"))
    if not paths:
        raise InvalidInputError(f"{images_dir}: no images (.jpg, .jpeg, .png, .webp, .bmp) to verify with")
    return paths[:limit]


# Threads of each side of a verification (Paddle Inference and the bundle's runtime).
VERIFY_THREADS = 2


class PaddleReferences:
    """The Paddle Inference side of verification, kept between :func:`verify_bundle` calls.

    The INT8 search verifies one candidate after another against the same Paddle models on the same
    photos: this keeps each reference predictor loaded and remembers its outputs by the SHA-256 of the
    exact input bytes, so a repeated input costs a hash and a changed one (another pre-processing, other
    photos) is run again; a cached answer is always that of the same input.
    """

    def __init__(self, *, threads: int = VERIFY_THREADS) -> None:
        self._threads = threads
        self._models: Dict[Any, Any] = {}
        self._outputs: Dict[Any, np.ndarray] = {}

    def _model(self, kind: type, model_dir: Path) -> Tuple[tuple, Any]:
        """``(key, reference model)``: one model per kind and folder (resolved, so two spellings of a folder
        share it); the key also names its remembered outputs."""
        key = (kind.__name__, str(Path(model_dir).resolve()))
        if key not in self._models:
            self._models[key] = kind(model_dir, threads=self._threads)
        return key, self._models[key]

    def _cached(self, key: tuple, arrays: tuple, compute: Callable[[], np.ndarray]) -> np.ndarray:
        digest = hashlib.sha256()
        for a in arrays:
            digest.update(repr((a.dtype.str, a.shape)).encode())
            digest.update(np.ascontiguousarray(a).tobytes())
        full = key + (digest.hexdigest(),)
        if full not in self._outputs:
            out = compute()
            out.setflags(write=False)  # shared by every later caller
            self._outputs[full] = out
        return self._outputs[full]

    def detector(self, model_dir: Path, image: np.ndarray, im_shape: np.ndarray, scale_factor: np.ndarray) -> np.ndarray:
        """:meth:`PaddleDetectorReference.run` of the model in ``model_dir`` (same arguments and result)."""
        from edge_shitu_converters.paddle_reference import PaddleDetectorReference

        key, ref = self._model(PaddleDetectorReference, model_dir)
        return self._cached(key, (image, im_shape, scale_factor),
                            lambda: ref.run(image, im_shape, scale_factor))

    def extractor(self, model_dir: Path, batch: np.ndarray) -> np.ndarray:
        """:meth:`PaddleExtractorReference.run` of the model in ``model_dir`` over ``batch`` (float32
        (N, 3, H, W)), 16 rows at a time; returns float32 (N, D)."""
        from edge_shitu_converters.paddle_reference import PaddleExtractorReference

        key, ref = self._model(PaddleExtractorReference, model_dir)
        return self._cached(key, (batch,),
                            lambda: np.concatenate([ref.run(batch[i:i + 16]) for i in range(0, len(batch), 16)]))


def verify_bundle(bundle_dir: Union[Path, Bundle], *, det_dir: Optional[Path], rec_dir: Optional[Path], images_dir: Path,
                  max_images: int = 13, thresholds: Optional[VerifyThresholds] = None,
                  session_factory: Optional[Callable[[Any], Any]] = None, threads: int = VERIFY_THREADS,
                  roles: Optional[Sequence[str]] = None, references: Optional[PaddleReferences] = None) -> Dict[str, Any]:
    """Compare a bundle's models with their Paddle sources on real photos; write ``verify.json``.

    Args:
      bundle_dir: the converted bundle (a folder, or an already loaded :class:`Bundle`).
      det_dir: the detector's Paddle model folder (None when the bundle has no detector).
      rec_dir: the extractor's Paddle model folder (None when the bundle has no extractor).
      images_dir: real photos (searched recursively); the first ``max_images`` in name order are used.
      thresholds: pass/fail limits; default :data:`THRESHOLDS` for the bundle's precision.
      session_factory: ``f(model_spec) -> Session`` for the converted models (default: the runtime's
        backend for the spec, in this process).
      threads: threads for both sides.
      roles: verify only these of the bundle's models ("detector", "extractor"); default all. The
        extractor is checked on the crops of the *reference* detector's boxes, so those are computed
        either way.
      references: the Paddle side, to reuse between calls (see :class:`PaddleReferences`); default a
        fresh one.

    Returns:
      The report written to ``bundle_dir/verify.json``; ``report["passed"]`` says whether every figure
      met its threshold, ``report["failures"]`` lists those that did not, and each verified model's section
      (``report["detector"]``, ``report["extractor"]``) lists its own under ``"failures"``.

    Raises:
      InvalidInputError: no usable images, an unknown role, no role, or a role the bundle has no model for.
      BundleError, MissingFileError: the bundle or a model folder is unusable.
    """
    from edge_shitu.backends import create_session
    from edge_shitu.detector import Detector, detector_input
    from edge_shitu.embedder import Embedder
    from edge_shitu.options import DetectorOptions, EmbedderOptions

    bundle = Bundle.load(bundle_dir)  # a loaded Bundle is used as is (its files were hashed already)
    wanted = set(bundle.models) if roles is None else set(roles)
    if not wanted <= {"detector", "extractor"}:
        raise InvalidInputError(f"unknown model role(s) to verify: {', '.join(sorted(wanted - {'detector', 'extractor'}))}")
    if not wanted or not wanted <= set(bundle.models):
        # A role the bundle lacks would otherwise pass with nothing checked.
        raise InvalidInputError(f"{bundle.path}: no {', '.join(sorted(wanted - set(bundle.models))) or 'model'} "
                                f"to verify; the bundle has {', '.join(sorted(bundle.models)) or 'none'}")
    refs = references if references is not None else PaddleReferences(threads=threads)
    precisions = {m.precision for m in bundle.models.values()}
    precision = "int8" if "int8" in precisions else "fp32"
    limits = thresholds or THRESHOLDS[precision]
    make = session_factory or (lambda spec: create_session(spec, threads=threads))
    paths = _images(Path(images_dir), max_images)
    images = [load_image(p) for p in paths]
    report: Dict[str, Any] = {"precision": precision, "images": [p.name for p in paths],
                              "thresholds": asdict(limits), "match_iou": MATCH_IOU}
    failures: List[str] = []
    crops_per_image: List[List[np.ndarray]] = [[img] for img in images]

    if bundle.detector is not None:
        if det_dir is None:
            raise InvalidInputError("the bundle has a detector: give its Paddle model folder to verify it")
        check_det = "detector" in wanted
        spec = bundle.detector
        det = Detector(spec, make(spec), DetectorOptions()) if check_det else None
        cut = DetectorOptions().with_defaults(spec.defaults)
        matched = total = 0
        score_diff = 0.0
        per_image = []
        for img, crops in zip(images, crops_per_image):
            h, w = img.shape[:2]
            tensor, scale = detector_input(spec, img)
            rows = _reference_top(refs.detector(det_dir, tensor,
                                                np.array([[spec.input.height, spec.input.width]], np.float32),
                                                np.array([[scale[1], scale[0]]], np.float32)),
                                  cut.max_detections, cut.min_score)
            ref_boxes = rows[:, 2:6].astype(np.float64)
            crops.extend(crop(img, tuple(b)) for b in ref_boxes)
            if det is None:
                continue
            ours = det.postprocess(det.infer(tensor), image_size=(w, h), scale=scale)
            our_boxes = np.array([d.box for d in ours], dtype=np.float64).reshape(-1, 4)
            pairs = match_boxes(ref_boxes, our_boxes)
            matched += 2 * len(pairs)
            total += len(ref_boxes) + len(our_boxes)
            for i, j, _ in pairs:
                score_diff = max(score_diff, abs(float(rows[i, 1]) - ours[j].score))
            per_image.append({"reference_boxes": len(ref_boxes), "converted_boxes": len(our_boxes),
                              "matched": len(pairs)})
        if det is not None:
            det.close()
    if bundle.detector is not None and "detector" in wanted:
        rate = matched / total if total else 1.0
        report["detector"] = {"match_rate": rate, "max_score_diff": score_diff, "boxes": total // 2 if total else 0,
                              "per_image": per_image}
        det_failures = report["detector"]["failures"] = []
        if rate < limits.detector_match_rate:
            det_failures.append(f"detector match rate {rate:.4f} < {limits.detector_match_rate}")
        if score_diff > limits.detector_max_score_diff:
            det_failures.append(f"detector score diff {score_diff:.4g} > {limits.detector_max_score_diff}")
        failures.extend(det_failures)

    if bundle.extractor is not None and "extractor" in wanted:
        if rec_dir is None:
            raise InvalidInputError("the bundle has an extractor: give its Paddle model folder to verify it")
        emb = Embedder(bundle.extractor, bundle.codes, make(bundle.extractor), EmbedderOptions())
        crops = [c for cs in crops_per_image for c in cs]
        batch = emb.preprocess(crops)
        ours = emb.infer(batch)
        theirs = refs.extractor(rec_dir, batch)
        emb.close()
        cos = np.sum(l2_normalize(ours) * l2_normalize(theirs), axis=1)
        bits = np.unpackbits(binarize(ours) ^ binarize(theirs), axis=1).mean(axis=1)
        agree = 1.0 - bits
        report["extractor"] = {
            "crops": len(crops), "max_abs_diff": float(np.abs(ours - theirs).max()),
            "mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
            "mean_bit_agreement": float(agree.mean()), "min_bit_agreement": float(agree.min()),
        }
        rec_failures = report["extractor"]["failures"] = []
        if cos.min() < limits.extractor_min_cosine:
            rec_failures.append(f"extractor min cosine {cos.min():.5f} < {limits.extractor_min_cosine}")
        if agree.mean() < limits.extractor_mean_bit_agreement:
            rec_failures.append(
                f"extractor mean bit agreement {agree.mean():.5f} < {limits.extractor_mean_bit_agreement}")
        if agree.min() < limits.extractor_min_bit_agreement:
            rec_failures.append(f"extractor min bit agreement {agree.min():.5f} < {limits.extractor_min_bit_agreement}")
        failures.extend(rec_failures)

    report["passed"] = not failures
    report["failures"] = failures
    report["replica"] = bundle.is_replica
    (bundle.path / VERIFY_FILE).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    _LOG.info("verify %s: %s", bundle.path, "passed" if not failures else "; ".join(failures))
    return report


def write_unverifiable(bundle_dir: Path, reason: str) -> Dict[str, Any]:
    """Record in ``verify.json`` that the bundle could not be verified on this machine, and why."""
    bundle = Bundle.load(bundle_dir)
    report = {"passed": None, "unverifiable": reason, "failures": [], "replica": bundle.is_replica,
              "precision": "int8" if any(m.precision == "int8" for m in bundle.models.values()) else "fp32"}
    (Path(bundle_dir) / VERIFY_FILE).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    _LOG.warning("verify %s: not verified: %s", bundle_dir, reason)
    return report
